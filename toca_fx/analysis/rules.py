"""The rules of token-axis propagation: per op kind, where the token axis of its output is, given its
inputs' (`axes.Info`), or `NotTokenLocal` with what breaks per-token computation.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.fx as fx

from .axes import Axes, Info, NotTokenLocal, Passengers, TokenFlow
from .graphs import op_name, shape


# ---------------------------------------------------------------------------------------------
# Helpers shared by the rules

def _info(flow: TokenFlow, arg: Any) -> Info:
    return flow.info.get(arg) if isinstance(arg, fx.Node) else None


def _arg(node: fx.Node, pos: int, key: str, default: Any = None) -> Any:
    if len(node.args) > pos:
        return node.args[pos]
    return node.kwargs.get(key, default)


def _norm_dim(dim: int, ndim: int) -> int:
    return dim + ndim if dim < 0 else dim


def _tensor_args(node: fx.Node) -> list[fx.Node]:
    flat: list[Any] = []
    for a in list(node.args) + list(node.kwargs.values()):
        flat.extend(a if isinstance(a, (list, tuple)) else [a])
    return [a for a in flat if isinstance(a, fx.Node) and shape(a) is not None]


def _only_token_input(node: fx.Node, flow: TokenFlow) -> Axes:
    axes = _info(flow, node.args[0])
    if not isinstance(axes, Axes):
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) does not take the token tensor first")
    return axes


def _require_untouched(node: fx.Node, axes: Axes, dims: list[int], what: str) -> None:
    if axes.tok in dims or (axes.key is not None and axes.key in dims):
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) {what} the token axis")


def _align(node: fx.Node, flow: TokenFlow) -> Axes:
    """Broadcasting: token inputs must agree after right-alignment; externals broadcast or are rows."""
    out = shape(node)
    if out is None:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) has no tensor output")
    aligned: set[Axes] = set()
    for a in _tensor_args(node):
        axes = _info(flow, a)
        if isinstance(axes, Axes):
            offset = len(out) - len(shape(a))
            aligned.add(axes.moved(lambda d: d + offset))
    if len(aligned) != 1:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) combines tensors with different token axes")
    result = aligned.pop()
    for a in _tensor_args(node):
        if _info(flow, a) is None:
            _check_external(node, a, result, out, flow)
    return result


def _check_external(node: fx.Node, ext: fx.Node, axes: Axes, out: tuple[int, ...], flow: TokenFlow) -> None:
    ext_shape = shape(ext)
    axis = axes.tok - (len(out) - len(ext_shape))
    if axis < 0 or ext_shape[axis] == 1:
        return
    rows = Axes(axis, start=axes.start, extra=axes.extra)
    if flow.external_rows.setdefault(ext, rows) != rows:
        raise NotTokenLocal(f"{ext.name} is indexed by token along two different axes")


def _sub_range(node: fx.Node, axes: Axes, lo: int, hi: int, flow: TokenFlow) -> Info:
    """The token axis cut to [lo, hi): the stream's rows whole (with some other-stream rows), or
    only other-stream rows."""
    first, last = axes.start, axes.start + flow.tokens
    if lo <= first and last <= hi:
        return replace(axes, start=first - lo, extra=hi - lo - flow.tokens)
    if hi <= first or last <= lo:
        return Passengers(axes.tok)
    raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) cuts through the token axis")


def _reshape_axis(src: tuple[int, ...], dst: tuple[int, ...], axis: int, node: fx.Node) -> int:
    """Where axis `axis` of `src` lands in `dst` under a reshape that keeps it whole."""
    before = math.prod(src[:axis])
    for j, size in enumerate(dst):
        if size == src[axis] and math.prod(dst[:j]) == before:
            return j
    raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) splits or merges the token axis")

# ---------------------------------------------------------------------------------------------
# Rules: each maps a node to the Axes of its output

def pointwise(node: fx.Node, flow: TokenFlow) -> Info:
    if shape(node) is None:  # size queries and other scalars: nothing to track
        return None
    return _align(node, flow)


def _last_dim(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    _require_untouched(node, axes, [ndim - 1], "contracts")
    return axes


def _layer_norm(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    normalized = _arg(node, 1, "normalized_shape")
    count = 1 if isinstance(normalized, int) else len(normalized)
    _require_untouched(node, axes, list(range(ndim - count, ndim)), "normalises over")
    return axes


def _rms_norm(node: fx.Node, flow: TokenFlow) -> Info:
    return _layer_norm(node, flow)


def _softmax(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dim = _norm_dim(_arg(node, 1, "dim"), ndim)
    if dim == axes.tok:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) normalises over the token axis")
    return axes


def _reduce(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dims = _arg(node, 1, "dim")
    if dims is None:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) reduces over every axis")
    dims = [_norm_dim(d, ndim) for d in (dims if isinstance(dims, (list, tuple)) else [dims])]
    _require_untouched(node, axes, dims, "reduces over")
    if _arg(node, 2, "keepdim", False):
        return axes
    return axes.moved(lambda d: d - sum(1 for r in dims if r < d))


def _reshape_like(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    src, dst = shape(node.args[0]), shape(node)
    return axes.moved(lambda d: _reshape_axis(src, dst, d, node))


def _expand(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    offset = len(shape(node)) - len(shape(node.args[0]))
    return axes.moved(lambda d: d + offset)


def _permute(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dims = _arg(node, 1, "dims")
    dims = list(dims) if isinstance(dims, (list, tuple)) else list(node.args[1:])
    dims = [_norm_dim(d, ndim) for d in dims]
    return axes.moved(dims.index)


def _transpose(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    a, b = (_norm_dim(d, ndim) for d in (_arg(node, 1, "dim0"), _arg(node, 2, "dim1")))
    return axes.moved(lambda d: b if d == a else a if d == b else d)


def _split(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dim = _norm_dim(_arg(node, 2, "dim", 0), ndim)
    if axes.key == dim:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) splits the key axis")
    sizes = [int(v.shape[dim]) for v in node.meta["example_value"]]
    if dim != axes.tok:
        return tuple(axes for _ in sizes)
    bounds = list(itertools.accumulate([0, *sizes]))
    return tuple(_sub_range(node, axes, lo, hi, flow) for lo, hi in zip(bounds, bounds[1:]))


def _unbind(node: fx.Node, flow: TokenFlow) -> Info:
    axes = _only_token_input(node, flow)
    ndim = len(shape(node.args[0]))
    dim = _norm_dim(_arg(node, 1, "dim", 0), ndim)
    _require_untouched(node, axes, [dim], "unbinds")
    moved = axes.moved(lambda d: d - (d > dim))
    return tuple(moved for _ in node.meta["example_value"])


def _getitem(node: fx.Node, flow: TokenFlow) -> Info:
    source, index = node.args
    info = _info(flow, source)
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
    return _sub_range(node, axes, kept.start, kept.stop, flow)


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


def _cat(node: fx.Node, flow: TokenFlow) -> Info:
    tensors = list(_arg(node, 0, "tensors"))
    infos = [_info(flow, t) for t in tensors]
    kinds = {i for i in infos if i is not None}
    axes = kinds.pop() if len(kinds) == 1 else None
    if not isinstance(axes, Axes):
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) joins tensors with different token axes")
    stack = op_name(node) == "stack"
    dim = _norm_dim(_arg(node, 1, "dim", 0), len(shape(tensors[0])) + stack)
    if stack:
        if None in infos:
            raise NotTokenLocal(f"'stack' ({node.name}) joins token and non-token tensors")
        return axes.moved(lambda d: d + (d >= dim))
    if axes.key == dim:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) concatenates along the key axis")
    if dim != axes.tok:  # other tensors joined feature-wise are indexed by token like the stream
        for t, info in zip(tensors, infos):
            if info is None:
                _check_external(node, t, axes, shape(node), flow)
        return axes
    if len(infos) - infos.count(None) > 1:
        raise NotTokenLocal(f"'{op_name(node)}' ({node.name}) concatenates the tokens with themselves")
    position = next(i for i, info in enumerate(infos) if info is not None)
    before = sum(shape(t)[dim] for t in tensors[:position])
    return replace(axes, start=before + axes.start, extra=shape(node)[dim] - flow.tokens)


def _linear(node: fx.Node, flow: TokenFlow) -> Info:
    for a in _tensor_args(node)[1:]:
        if _info(flow, a) is not None:
            raise NotTokenLocal(f"linear ({node.name}) with a weight computed from the tokens")
    return _last_dim(node, flow)


def _matmul(node: fx.Node, flow: TokenFlow) -> Info:
    a, b = node.args[:2]
    ia, ib = _info(flow, a), _info(flow, b)
    out_ndim = len(shape(node))
    ra, rb = len(shape(a)), len(shape(b))
    if isinstance(ia, Axes) and ib is None and ia.key is None and ia.tok != ra - 1:
        return ia.moved(lambda d: d + out_ndim - ra)
    if isinstance(ia, Axes) and isinstance(ib, Axes) and ia.key is None and ib.key is None:
        if ia.tok == ra - 2 and ib.tok == rb - 1:  # q @ k^T: an attention map
            flow.full_inputs[node] = (b,)
            flow.self_attention.append(node)
            if ia.extra or ib.extra:
                flow.joint_attention.append(node)
            return replace(ia, tok=out_ndim - 2, key=out_ndim - 1)
    if isinstance(ia, Axes) and ia.key == ra - 1 and isinstance(ib, Axes) and ib.tok == rb - 2:
        flow.full_inputs[node] = (b,)  # attention map @ v
        return replace(ia, tok=out_ndim - 2, key=None)
    raise NotTokenLocal(f"matmul ({node.name}) mixes tokens in a way the pass does not know")


def _sdpa(node: fx.Node, flow: TokenFlow) -> Info:
    q, k, v = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    iq, ik, iv = _info(flow, q), _info(flow, k), _info(flow, v)
    ndim = len(shape(q))
    if not isinstance(iq, Axes) or iq.tok != ndim - 2:
        raise NotTokenLocal(f"attention ({node.name}) whose queries are not the tokens")
    if _arg(node, 5, "is_causal", False):
        raise NotTokenLocal(f"causal attention ({node.name}) cannot recompute a subset of queries")
    mask = _arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        _check_external(node, mask, iq, shape(node), flow)
    if isinstance(ik, Axes) and ik == iv and ik.tok == ndim - 2 and ik.key is None:
        flow.full_inputs[node] = (k, v)
        flow.self_attention.append(node)
        if iq.extra or ik.extra:
            flow.joint_attention.append(node)
    elif ik is None and iv is None:
        flow.cross_attention.append(node)
        flow.context_kv.extend([k, v])
    else:
        raise NotTokenLocal(f"attention ({node.name}) with keys and values of different origins")
    return iq


POINTWISE = frozenset(
    """add sub mul truediv div floordiv neg pow exp log sqrt rsqrt tanh sigmoid silu gelu relu
    float half bfloat16 to type_as contiguous clone dropout sin cos abs clamp clamp_min clamp_max
    where masked_fill leaky_relu softplus erf rsub iadd imul isub itruediv square reciprocal mish
    hardswish hardtanh elu selu detach lerp addcmul sign size dim""".split()
)

RULES: dict[str, Callable[[fx.Node, TokenFlow], Info]] = {
    "linear": _linear,
    "layer_norm": _layer_norm,
    "rms_norm": _rms_norm,
    "softmax": _softmax,
    "log_softmax": _softmax,
    "mean": _reduce,
    "sum": _reduce,
    "amax": _reduce,
    "var": _reduce,
    "norm": _reduce,
    "view": _reshape_like,
    "reshape": _reshape_like,
    "flatten": _reshape_like,
    "unflatten": _reshape_like,
    "unsqueeze": _reshape_like,
    "squeeze": _reshape_like,
    "expand": _expand,
    "expand_as": _expand,
    "permute": _permute,
    "transpose": _transpose,
    "swapaxes": _transpose,
    "chunk": _split,
    "split": _split,
    "split_with_sizes": _split,
    "unbind": _unbind,
    "getitem": _getitem,
    "cat": _cat,
    "concat": _cat,
    "stack": _cat,
    "matmul": _matmul,
    "bmm": _matmul,
    "scaled_dot_product_attention": _sdpa,
}

