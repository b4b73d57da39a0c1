"""The inputs of a graph that carry the denoising timestep, found by what the graph does with them.

Matches: a graph input that is not a parameter, holds at most one number per sample (a 0-d tensor, a
[B] vector, a Python number), and reaches a sine or cosine before any matmul: the sinusoidal timestep
embedding every DiT starts with. Class labels go through an embedding lookup and latents through a
patch embedding (a matmul or convolution), so neither matches; a guidance-strength input embedded the
same way (FLUX) matches too, and is harmless: it stays constant through a generation.
Produces: the positions of those inputs among the graph's placeholders. A graph Dynamo made for one
Python-number timestep (it specialises a number on its first call) has the number baked in instead:
`timestep_constants` reads it off the tensor the graph builds from it.
"""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from .graphs import op_name

_MIN_BATCH = 64  # numbers a timestep input may hold even when no input shows the batch
_EMBED = {"sin", "cos"}
_FROM_NUMBER = {"tensor", "scalar_tensor", "full"}
_STOP = {"linear", "matmul", "bmm", "mm", "addmm", "einsum", "conv1d", "conv2d", "conv3d", "embedding",
         "scaled_dot_product_attention"}


def timestep_inputs(graph: fx.Graph, example_inputs: list[Any]) -> list[int]:
    """Positions of the placeholders that carry the timestep (see the module's doc)."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    return [i for i, (node, value) in enumerate(zip(placeholders, example_inputs))
            if _small(value, _batch(example_inputs)) and _reaches_embedding(node)]


def timestep_constants(graph: fx.Graph) -> tuple[float, ...]:
    """The numbers a graph fills tensors with from nothing (`torch.full`, `torch.tensor`) that then
    reach a sine or cosine: a timestep Dynamo specialised as a constant."""
    return tuple(float(n.args[1] if op_name(n) == "full" else n.args[0]) for n in graph.nodes
                 if n.op == "call_function" and _constant_number(n) and _reaches_embedding(n))


def parameter_inputs(example_inputs: list[Any]) -> list[int]:
    """Positions of the inputs that are the model's parameters: whose identity says which model (or
    which block of it) a call computes."""
    return [i for i, x in enumerate(example_inputs) if isinstance(x, torch.nn.Parameter)]


def _batch(example_inputs: list[Any]) -> int:
    """The largest leading size of the non-parameter inputs with 3 or more axes (latents): a
    timestep holds one number per sample at most."""
    sizes = [x.shape[0] for x in example_inputs
             if isinstance(x, torch.Tensor) and not isinstance(x, torch.nn.Parameter) and x.dim() >= 3]
    return max([_MIN_BATCH, *sizes])


def _small(value: Any, batch: int) -> bool:
    if isinstance(value, torch.nn.Parameter):
        return False
    if isinstance(value, torch.Tensor):
        return value.dim() <= 1 and value.numel() <= batch and not value.dtype.is_complex and value.dtype != torch.bool
    return isinstance(value, (int, float, torch.SymInt, torch.SymFloat)) and not isinstance(value, bool)


def _constant_number(node: fx.Node) -> bool:
    name = op_name(node)
    value = node.args[1] if name == "full" and len(node.args) > 1 else node.args[0] if name in _FROM_NUMBER and node.args else None
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _reaches_embedding(node: fx.Node) -> bool:
    seen, todo = {node}, [node]
    while todo:
        for user in todo.pop().users:
            name = op_name(user)
            if name in _EMBED:
                return True
            if name not in _STOP and user not in seen and user.op != "output":
                seen.add(user)
                todo.append(user)
    return False
