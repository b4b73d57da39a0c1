"""Helpers the token-axis rules share: arguments, broadcasting, tensors from outside the branch indexed
by token, and where an axis goes under a reshape."""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Any

import torch.fx as fx

from ..axes import Axes, Info, NotTokenLocal, Passengers, TokenCut, TokenFlow
from ..graphs import op_name, shape


def info_of(flow: TokenFlow, arg: Any) -> Info:
    return flow.info.get(arg) if isinstance(arg, fx.Node) else None


def arg(node: fx.Node, pos: int, key: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(key, default)


def norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def tensor_args(node: fx.Node) -> list[fx.Node]:
    flat: list[Any] = []
    for a in list(node.args) + list(node.kwargs.values()):
        flat.extend(a if isinstance(a, (list, tuple)) else [a])
    return [a for a in flat if isinstance(a, fx.Node) and shape(a) is not None]


def only_token_input(node: fx.Node, flow: TokenFlow) -> Axes:
    axes = info_of(flow, node.args[0])
    if not isinstance(axes, Axes):
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) does not take the token tensor first")
    return axes


def require_untouched(node: fx.Node, axes: Axes, dims: list[int], what: str) -> None:
    if axes.tok in dims or (axes.key is not None and axes.key in dims):
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) {what} the token axis")


def align(node: fx.Node, flow: TokenFlow) -> Axes:
    """Broadcasting: token inputs must agree after right-alignment; externals broadcast or are rows."""
    out = shape(node)
    if out is None:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) has no tensor output")
    aligned: set[Axes] = set()
    for a in tensor_args(node):
        axes = info_of(flow, a)
        if isinstance(axes, Axes):
            offset = len(out) - len(shape(a))
            aligned.add(axes.moved(lambda d: d + offset))
    if len(aligned) != 1:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) combines tensors with different token axes")
    result = aligned.pop()
    for a in tensor_args(node):
        if info_of(flow, a) is None:
            check_external(node, a, result, len(out), flow)
    return result


def check_external(node: fx.Node, ext: fx.Node, axes: Axes, ndim: int, flow: TokenFlow) -> None:
    """`ext`, from outside the branch, broadcast against a result of `ndim` axes whose tokens lie along
    `axes`: either constant along them or indexed by token (its rows gathered with the stream's)."""
    ext_shape = shape(ext)
    axis = axes.tok - (ndim - len(ext_shape))
    if axis < 0 or ext_shape[axis] == 1:
        return
    rows = Axes(axis, start=axes.start, extra=axes.extra)
    if flow.external_rows.setdefault(ext, rows) != rows:
        raise NotTokenLocal(f"{ext.name} is indexed by token along two different axes")


def sub_range(node: fx.Node, axes: Axes, lo: int, hi: int, flow: TokenFlow) -> Info:
    """The token axis cut to [lo, hi): the stream's rows whole (with some other-stream rows), or
    only other-stream rows."""
    first, last = axes.start, axes.start + flow.tokens
    if lo <= first and last <= hi:
        return replace(axes, start=first - lo, extra=hi - lo - flow.tokens)
    if hi <= first or last <= lo:
        return Passengers(axes.tok)
    cuts = tuple(c - first for c in (lo, hi) if first < c < last)
    raise TokenCut(f"'{op_name(node)}' ({node.name}) cuts through the token axis", cuts)


def reshape_axis(src: tuple[int, ...], dst: tuple[int, ...], axis: int, node: fx.Node) -> int:
    """Where axis `axis` of `src` lands in `dst` under a reshape that keeps it whole."""
    before = math.prod(src[:axis])
    for j, size in enumerate(dst):
        if size == src[axis] and math.prod(dst[:j]) == before:
            return j
    raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) splits or merges the token axis")
