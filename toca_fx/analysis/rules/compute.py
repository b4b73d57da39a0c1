"""Rules for ops that compute: elementwise ops, norms, softmax, reductions, linear layers; each leaves the
token axis where it is, or refuses an op that mixes along it."""
from __future__ import annotations

import torch.fx as fx

from ..axes import Info, NotTokenLocal, TokenFlow
from ..graphs import op_name, shape
from .common import align, arg, info_of, norm_dim, only_token_input, require_untouched, tensor_args


def pointwise(node: fx.Node, flow: TokenFlow) -> Info:
    if shape(node) is None:  # size queries and other scalars: nothing to track
        return None
    return align(node, flow)


def _last_dim(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    require_untouched(node, axes, [ndim - 1], "contracts")
    return axes


def _layer_norm(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    normalized = arg(node, 1, "normalized_shape")
    count = 1 if isinstance(normalized, int) else len(normalized)
    require_untouched(node, axes, list(range(ndim - count, ndim)), "normalises over")
    return axes


def _rms_norm(node: fx.Node, flow: TokenFlow) -> Info:
    return _layer_norm(node, flow)


def _softmax(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dim = norm_dim(arg(node, 1, "dim"), ndim)
    if dim == axes.tok:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) normalises over the token axis")
    return axes


def _reduce(node: fx.Node, flow: TokenFlow) -> Info:
    axes = only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dims = arg(node, 1, "dim")
    if dims is None:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) reduces over every axis")
    dims = [norm_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    require_untouched(node, axes, dims, "reduces over")
    if arg(node, 2, "keepdim", False):
        return axes
    return axes.moved(lambda d: d - sum(1 for r in dims if r < d))


def _linear(node: fx.Node, flow: TokenFlow) -> Info:
    for a in tensor_args(node)[1:]:
        if info_of(flow, a) is not None:
            raise NotTokenLocal(f"linear ({node.name}) with a weight computed from the tokens")
    return _last_dim(node, flow)


def _dtype_from(node: fx.Node, flow: TokenFlow) -> Info:
    """`x.type_as(y)`, `x.to(y)`: `y` gives only its dtype (and device), so only `x`'s axes matter."""
    axes = info_of(flow, node.args[0])
    if axes is not None:
        return axes
    if shape(node) is not None and any(info_of(flow, a) is not None for a in tensor_args(node)[1:]):
        return None  # an outside tensor cast to the stream's dtype: still outside
    return pointwise(node, flow)


def _fresh_like(node: fx.Node, flow: TokenFlow) -> Info:
    """`empty_like(x)` and kin: a new tensor of x's shape, its rows independent of every token."""
    return only_token_input(node, flow)


def _repeat_interleave(node: fx.Node, flow: TokenFlow) -> Info:
    """Repeats along one axis (heads, in grouped-query attention); along the token axis it would mix rows."""
    axes = only_token_input(node, flow)
    dim = arg(node, 2, "dim")
    if dim is None:
        raise NotTokenLocal(f"'repeat_interleave' ({node.name}) flattens the token axis")
    require_untouched(node, axes, [norm_dim(dim, len(shape(node.args[0])))], "repeats along")
    return axes
