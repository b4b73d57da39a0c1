"""Rules for ops that move data without computing: views, permutations, splits and joins. Each says where
the token axis goes; one that splits or merges it is refused."""
from __future__ import annotations

import itertools
from dataclasses import replace

import torch.fx as fx

from ..axes import Axes, Info, NotTokenLocal, Passengers, TokenFlow
from ..graphs import op_name, shape
from .common import arg, check_external, info_of, norm_dim, only_token_input, require_untouched, reshape_axis, sub_range


def _reshape_like(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    src, dst = shape(node.args[0]), shape(node)
    return axes.moved(lambda d: reshape_axis(src, dst, d, node))


def _expand(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    offset = len(shape(node)) - len(shape(node.args[0]))
    return axes.moved(lambda d: d + offset)


def _permute(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dims = arg(node, 1, "dims")
    dims = list(dims) if isinstance(dims, (list, tuple)) else list(node.args[1:])
    dims = [norm_dim(d, ndim) for d in dims]
    return axes.moved(dims.index)


def _transpose(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    a, b = (norm_dim(d, ndim) for d in (arg(node, 1, "dim0"), arg(node, 2, "dim1")))
    return axes.moved(lambda d: b if d == a else a if d == b else d)


def _movedim(node: fx.Node, flow: TokenFlow) -> Info:
    """`movedim` / `moveaxis`: the axes `source` go to `destination`, the others keep their order."""
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    source, destination = arg(node, 1, "source"), arg(node, 2, "destination")
    source = [norm_dim(d, ndim) for d in (source if isinstance(source, (list, tuple)) else [source])]
    destination = [norm_dim(d, ndim) for d in (destination if isinstance(destination, (list, tuple)) else [destination])]
    order: list[int | None] = [None] * ndim
    for s, d in zip(source, destination):
        order[d] = s
    rest = iter(d for d in range(ndim) if d not in source)
    order = [next(rest) if o is None else o for o in order]
    return axes.moved(order.index)


def _repeat(node: fx.Node, flow: TokenFlow) -> Info:
    """`x.repeat(*sizes)` tiles each axis (leading sizes add axes); the token axis must not be tiled."""
    axes = only_token_input(node, flow)
    sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    offset = len(sizes) - len(shape(node.args[0]))
    moved = axes.moved(lambda d: d + offset)
    if sizes[moved.tok] != 1 or (moved.key is not None and sizes[moved.key] != 1):
        raise NotTokenLocal(f"'repeat' ({node.name}) tiles the token axis")
    return moved


def _split(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dim = norm_dim(arg(node, 2, "dim", 0), ndim)
    if axes.key == dim:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) splits the key axis")
    sizes = [int(v.shape[dim]) for v in node.meta["example_value"]]
    if dim != axes.tok:
        return tuple(axes for _ in sizes)
    bounds = list(itertools.accumulate([0, *sizes]))
    return tuple(sub_range(node, axes, lo, hi, flow) for lo, hi in zip(bounds, bounds[1:]))


def _unbind(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dim = norm_dim(arg(node, 1, "dim", 0), ndim)
    require_untouched(node, axes, [dim], "unbinds")
    moved = axes.moved(lambda d: d - (d > dim))
    return tuple(moved for _ in node.meta["example_value"])


def _cat(node: fx.Node, flow: TokenFlow) -> Info:
    """Joins: along other axes, the other tensors are indexed by token like the stream; along the token
    axis, the stream's rows (one input) among rows of other tensors or other parts (`Passengers`)."""
    tensors = list(arg(node, 0, "tensors"))
    infos = [info_of(flow, t) for t in tensors]
    stack = op_name(node) == "stack"
    dim = norm_dim(arg(node, 1, "dim", 0), len(shape(tensors[0])) + stack)
    passengers = [i for i in infos if isinstance(i, Passengers)]
    if any(p.tok != dim for p in passengers):
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) joins other-stream rows across the token axis")
    kinds = {i for i in infos if i is not None and not isinstance(i, Passengers)}
    axes = kinds.pop() if len(kinds) == 1 else None
    if not isinstance(axes, Axes):
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) joins tensors with different token axes")
    if stack:
        if None in infos:
            raise NotTokenLocal(f"'stack' ({node.name}) joins token and non-token tensors")
        return axes.moved(lambda d: d + (d >= dim))
    if axes.key == dim:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) concatenates along the key axis")
    if dim != axes.tok:  # other tensors joined feature-wise are indexed by token like the stream
        for t, info in zip(tensors, infos):
            if info is None:
                check_external(node, t, axes, len(shape(node)), flow)
        return axes
    if sum(isinstance(i, Axes) for i in infos) > 1:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) concatenates the tokens with themselves")
    position = next(i for i, info in enumerate(infos) if isinstance(info, Axes))
    before = sum(shape(t)[dim] for t in tensors[:position])
    return replace(axes, start=before + axes.start, extra=shape(node)[dim] - flow.tokens)
