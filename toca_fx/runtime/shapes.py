"""Dynamic shapes: one static graph, with its own cache state, per concrete input shape.

The pass needs a static token count (the number of rows a partial step gathers is baked into the
graph). When Dynamo hands over a graph with symbolic sizes (`dynamic=True`, `mark_dynamic`, or the
automatic dynamic shapes that a second resolution triggers), `PerShape` waits for each call's
concrete inputs, re-propagates FakeTensor shapes through a copy of the graph with them (`specialize`:
size computations fold to ints), and hands the static copy to the backend's static path. A new batch
size or resolution so gets a new graph and fresh state, never a stale cache.

A symbolic number that is no tensor's size (a Python-number timestep, which Dynamo makes symbolic once
it changes) must not make a graph per value: it enters the static graph as a 0-d tensor read with
`.item()`, so one graph serves every value, and the clock reads it like any timestep tensor.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx

from ..analysis.fake import FakeRun, new_fake_mode

Key = tuple


class PerShape:
    """Dispatcher for a graph with symbolic sizes: a static graph per concrete input shape."""

    def __init__(self, gm: fx.GraphModule, build: Callable[[fx.GraphModule, list[Any]], Callable]):
        self.gm = gm
        self.build = build
        self.by_shape: dict[Key, Callable] = {}
        self.numbers = number_inputs(gm)

    def __call__(self, *args: Any) -> Any:
        if self.numbers:
            args = tuple(torch.tensor(a) if i in self.numbers else a for i, a in enumerate(args))
        key = shape_key(args)
        fn = self.by_shape.get(key)
        if fn is None:
            fn = self.by_shape[key] = self.build(specialize(self.gm, list(args), self.numbers), list(args))
        return fn(*args)


def number_inputs(gm: fx.GraphModule) -> frozenset[int]:
    """Positions of the symbolic-number placeholders whose symbols size no tensor input."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    sizes = set()
    for node in placeholders:
        value = node.meta.get("example_value")
        if isinstance(value, torch.Tensor):
            for size in value.shape:
                sizes |= size.node.expr.free_symbols if isinstance(size, torch.SymInt) else set()
    return frozenset(i for i, node in enumerate(placeholders)
                     if isinstance(v := node.meta.get("example_value"), (torch.SymInt, torch.SymFloat))
                     and not (v.node.expr.free_symbols & sizes))


def shape_key(args: tuple) -> Key:
    """What a static graph depends on: tensor shapes and integer inputs (symbolic sizes)."""
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a if isinstance(a, int) else None for a in args)


def specialize(gm: fx.GraphModule, args: list[Any], numbers: frozenset[int] = frozenset()) -> fx.GraphModule:
    """A copy of `gm` for these inputs: sizes computed in the graph become constants, and every node's
    `example_value` is a FakeTensor of static shape. The placeholders at `numbers` take 0-d tensors."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    _read_numbers(graph, numbers)
    static = fx.GraphModule(gm, graph)
    mode = new_fake_mode()
    inputs = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
    FakeRun(static, mode, record=True).run_fakes(inputs)
    for node in list(graph.nodes):
        _fold(graph, node)
    return fx.GraphModule(gm, graph)


# ---------------------------------------------------------------------------------------------

def _read_numbers(graph: fx.Graph, numbers: frozenset[int]) -> None:
    """The placeholders at `numbers` become tensors, read by an `.item()` wherever the number was used."""
    placeholders = [n for n in graph.nodes if n.op == "placeholder"]
    for i in sorted(numbers):
        node = placeholders[i]
        with graph.inserting_after(placeholders[-1]):
            item = graph.call_method("item", (node,))
        node.replace_all_uses_with(item, delete_user_cb=lambda user: user is not item)


def _fold(graph: fx.Graph, node: fx.Node) -> None:
    """A node whose static value is a number (a size): the number replaces it in the nodes that read it."""
    value = node.meta.get("example_value")
    if not isinstance(value, (int, float, bool)) or node.op == "output":
        return
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
    if node.op == "placeholder":
        node.meta.pop("example_value")
    else:
        graph.erase_node(node)  # not dead-code elimination: it would drop in-place setitem
