"""Rules for basic indexing: where each axis goes under an index, and which part of the token axis it
keeps. Advanced indexing (tensors, lists) is refused."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ..axes import Axes, Info, NotTokenLocal, Passengers, TokenFlow
from ..graphs import ancestors, op_name, shape
from .common import check_external, info_of, sub_range


def _getitem(node: fx.Node, flow: TokenFlow) -> Info:
    source, index = node.args
    info = info_of(flow, source)
    if isinstance(info, tuple):
        return info[index]
    if not isinstance(info, Axes):
        raise NotTokenLocal(f"indexing ({node.name}) of a value the pass does not track")
    src = shape(source)
    if info.key is not None and index_slot(node, src, index, info.key)[1] != range(src[info.key]):
        raise NotTokenLocal(f"indexing ({node.name}) selects part of the key axis")
    axes = info.moved(lambda d: index_slot(node, src, index, d)[0])
    kept = index_slot(node, src, index, info.tok)[1]
    if kept == range(src[info.tok]):
        return axes
    if kept.step != 1:
        raise NotTokenLocal(f"indexing ({node.name}) takes a strided part of the token axis")
    return sub_range(node, axes, kept.start, kept.stop, flow)


# Ops whose result may share memory with their first input: a write into it writes into that input too.
ALIASING = frozenset({"view", "reshape", "unflatten", "flatten", "transpose", "permute", "getitem", "unsqueeze",
                      "squeeze", "expand", "contiguous", "to", "type_as", "float", "half", "bfloat16", "double",
                      "detach", "movedim", "moveaxis", "swapaxes", "view_as_complex", "view_as_real"})


def _setitem(node: fx.Node, flow: TokenFlow) -> Info:
    """`out[index] = value`, as rotary embeddings are written into halves of the head axis or into the
    stream's rows of a joint tensor: row i of `out` stays a function of token i when the index keeps the
    stream's rows whole, `value`'s rows land on the same tokens, and nothing else sees the write."""
    target, index, value = node.args
    axes = info_of(flow, target)
    if not isinstance(axes, Axes) or axes.key is not None or not _owned(target):
        raise NotTokenLocal(f"in-place write ({node.name}) into a tensor that other values may alias")
    if _read_before(target, node):
        raise NotTokenLocal(f"in-place write ({node.name}) after {target.name} was read for another value")
    src = shape(target)
    kept = index_slot(node, src, index, axes.tok)[1]
    if kept.step != 1:
        raise NotTokenLocal(f"in-place write ({node.name}) into a strided part of the token axis")
    written = sub_range(node, axes.moved(lambda d: index_slot(node, src, index, d)[0]), kept.start, kept.stop, flow)
    dims = sum(1 for i in index_items(node, len(src), index) if i is None or isinstance(i, slice))
    incoming = info_of(flow, value)
    if isinstance(value, fx.Node) and incoming is None and isinstance(written, Axes):
        check_external(node, value, written, dims, flow)
    elif isinstance(incoming, Axes) and incoming.moved(lambda d: d + dims - len(shape(value))) == written:
        pass
    elif incoming is not None and not (isinstance(incoming, Passengers) and isinstance(written, Passengers)):
        raise NotTokenLocal(f"in-place write ({node.name}) moves rows to other tokens")
    return None


def _owned(node: fx.Node) -> bool:
    """Whether `node` is a view of a tensor computed in the graph that no other value aliases."""
    while op_name(node) in ALIASING:
        node = node.args[0]
        if not isinstance(node, fx.Node) or len(node.users) != 1:
            return False
    return node.op in ("call_function", "call_method")


def _read_before(target: fx.Node, write: fx.Node) -> bool:
    """Whether `target` is read before `write` other than by writes and what computes the written value."""
    feeding = ancestors(write.args[2]) if isinstance(write.args[2], fx.Node) else set()
    node = write.prev
    while node is not target:
        if target in node.all_input_nodes and node.target is not operator.setitem and node not in feeding:
            return True
        node = node.prev
    return False


def index_items(node: fx.Node, ndim: int, index: Any) -> list[Any]:
    """A basic index as one item per source axis, plus the `None`s that insert new axes."""
    items = list(index) if isinstance(index, tuple) else [index]
    if any(isinstance(i, (fx.Node, list, torch.Tensor)) for i in items):
        raise NotTokenLocal(f"advanced indexing ({node.name}) near the token axis")
    consumed = sum(1 for i in items if i is not None and i is not Ellipsis)
    expanded: list[Any] = []
    for i in items:
        expanded.extend([slice(None)] * (ndim - consumed) if i is Ellipsis else [i])
    expanded.extend([slice(None)] * (ndim - sum(1 for i in expanded if i is not None)))
    return expanded


def index_slot(node: fx.Node, src: tuple[int, ...], index: Any, axis: int) -> tuple[int, range]:
    """Under basic indexing: where source axis `axis` goes, and which of its positions it keeps."""
    src_axis = dst_axis = 0
    for i in index_items(node, len(src), index):
        if i is None:
            dst_axis += 1
            continue
        if src_axis == axis:
            if isinstance(i, slice):
                return dst_axis, range(src[axis])[i]
            raise NotTokenLocal(f"indexing ({node.name}) selects one row of a token axis")
        src_axis += 1
        dst_axis += isinstance(i, slice)
    raise NotTokenLocal(f"indexing ({node.name}) could not be followed")
