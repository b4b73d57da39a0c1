"""Parameters cast once for autocast, not at every call.

A model run under `torch.autocast` with float32 weights traces, in every compiled graph, a cast of
each weight that a matmul or convolution reads: every call reads the float32 weights and writes
low-precision copies, a pass over the model's bytes per denoising step. Autocast casts those
operands to its dtype whatever they are, so a parameter that only such ops read can be passed already
cast: the graph's placeholder then takes a low-precision copy, made once per parameter and made again
(in place, at the same address: CUDA graphs stay valid) when the parameter changes (its version
counter or its storage). The results are those of autocast's own casts, bit for bit; parameters that
any other op reads (norms' weights, embeddings, which autocast keeps in float32) stay as they are.
"""
from __future__ import annotations

import operator
from typing import Any, Callable, Sequence

import torch
import torch.fx as fx
from torch.utils.weak import WeakIdKeyDictionary

from ..analysis.graphs import op_name

# Ops autocast runs in its lower-precision dtype, and the argument positions that may be parameters.
_LOWERED = {"linear": (1, 2), "conv1d": (1, 2), "conv2d": (1, 2), "conv3d": (1, 2), "conv_transpose1d": (1, 2),
            "conv_transpose2d": (1, 2), "conv_transpose3d": (1, 2), "matmul": (0, 1), "mm": (0, 1), "bmm": (0, 1),
            "addmm": (0, 1, 2), "baddbmm": (0, 1, 2), "addbmm": (0, 1, 2)}
_KEYWORDS = {"weight": 1, "bias": 2}


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast casts to on `device` now, or None where it is off."""
    kind = device.type
    try:
        if not torch.is_autocast_enabled(kind):
            return None
        return torch.get_autocast_dtype(kind)
    except (RuntimeError, TypeError):  # a device type autocast does not know
        return None


def lowered_parameters(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> dict[int, torch.dtype]:
    """Positions of the float32 parameters among `gm`'s inputs that only ops autocast lowers read (as
    operands), each with the dtype autocast casts them to; empty where autocast is off."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    out = {}
    for i, (node, value) in enumerate(zip(placeholders, example_inputs)):
        if not isinstance(value, torch.nn.Parameter) or value.dtype != torch.float32:
            continue
        dtype = autocast_dtype(value.device)
        if dtype is not None and dtype != torch.float32 and node.users and all(_lowered_use(u, node) for u in node.users):
            out[i] = dtype
    return out


def _lowered_use(user: fx.Node, node: fx.Node) -> bool:
    positions = _LOWERED.get(op_name(user)) if user.op in ("call_function", "call_method") else None  # x.mm(w): x is 0
    if positions is None:
        return False
    at = [j for j, a in enumerate(user.args) if a is node]
    named = [k for k, a in user.kwargs.items() if a is node]
    return all(j in positions for j in at) and all(_KEYWORDS.get(k, -1) in positions for k in named)


class CastParameters:
    """`fn` called with the parameters at `positions` replaced by cached low-precision copies."""

    def __init__(self, fn: Callable, positions: dict[int, torch.dtype]):
        self.fn = fn
        self.positions = sorted(positions)
        self.dtypes = [positions[i] for i in self.positions]
        self._get = operator.itemgetter(*self.positions)
        self._copies: WeakIdKeyDictionary = WeakIdKeyDictionary()  # parameter -> ((version, address), copy)
        self._last: tuple = ()
        self._marks: list = []
        self._casts: list[torch.Tensor] = []

    def __call__(self, *args: Any) -> Any:
        return self.fn(*self.substitute(args))

    def substitute(self, args: Sequence[Any]) -> list[Any]:
        """`args` with the cast copies in place of the parameters (made or refreshed where needed)."""
        params = self._get(args)
        params = params if len(self.positions) > 1 else (params,)
        marks = [(p._version, p.data_ptr()) for p in params]
        if len(params) != len(self._last) or not all(map(operator.is_, params, self._last)) or marks != self._marks:
            self._casts = [self._cast(p, d, m) for p, d, m in zip(params, self.dtypes, marks)]
            self._last, self._marks = params, marks
        out = list(args)
        for i, c in zip(self.positions, self._casts):
            out[i] = c
        return out

    def _cast(self, p: torch.Tensor, dtype: torch.dtype, mark: tuple[int, int]) -> torch.Tensor:
        entry = self._copies.get(p)
        if entry is not None and entry[0] == mark:
            return entry[1]
        if entry is not None and entry[1].shape == p.shape:
            copy = entry[1]
            with torch.no_grad():
                copy.copy_(p)  # the same address: graphs captured with it stay valid
        else:
            copy = torch.nn.Parameter(p.detach().to(dtype), requires_grad=False)
            torch._dynamo.mark_static_address(copy, guard=False)  # kept in place by CUDA graphs
        self._copies[p] = (mark, copy)
        return copy
