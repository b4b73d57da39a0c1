"""Rules for basic indexing: where each axis goes under an index, and which part of the token axis it
keeps. Advanced indexing (tensors, lists) is refused."""
from __future__ import annotations

from typing import Any

import torch
import torch.fx as fx

from ..axes import Axes, Info, NotTokenLocal, TokenFlow
from .common import info_of, sub_range
from ..graphs import shape


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
