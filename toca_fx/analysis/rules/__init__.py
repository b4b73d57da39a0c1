"""The rules of token-axis propagation: per op kind, where the token axis of its output is, given its
inputs' (`axes.Info`), or `NotTokenLocal` with what breaks per-token computation.

`compute`: ops that compute along the feature axes; `layout`: views, permutations, splits, joins;
`indexing`: basic indexing; `attention`: attention maps and their products.
"""
from __future__ import annotations

from typing import Callable

import torch.fx as fx

from ..axes import Info, TokenFlow
from .attention import _einsum, _matmul, _sdpa
from .compute import (_dtype_from, _fresh_like, _layer_norm, _linear, _reduce, _repeat_interleave, _rms_norm,
                      _softmax, pointwise)
from .indexing import _getitem, _setitem, index_items, index_slot
from .layout import _cat, _expand, _movedim, _repeat, _permute, _reshape_like, _split, _transpose, _unbind

__all__ = ["JOINS", "POINTWISE", "RULES", "index_items", "index_slot", "pointwise"]

POINTWISE = frozenset(
    """add sub mul truediv div floordiv neg pow exp log sqrt rsqrt tanh sigmoid silu gelu relu
    float half bfloat16 double to type_as contiguous clone dropout sin cos abs clamp clamp_min clamp_max
    where masked_fill leaky_relu softplus erf rsub iadd imul isub itruediv square reciprocal mish
    hardswish hardtanh elu selu detach lerp addcmul sign size dim""".split()
)

# Ops whose rule places other-stream rows (`Passengers`) beside the stream's along the token axis.
JOINS = frozenset({"cat", "concat", "setitem"})

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
    "einsum": _einsum,
    "type_as": _dtype_from,
    "to": _dtype_from,
    "view_as_complex": _reshape_like,
    "view_as_real": _reshape_like,
    "movedim": _movedim,
    "moveaxis": _movedim,
    "repeat_interleave": _repeat_interleave,
    "repeat": _repeat,
    "setitem": _setitem,
    **{name: _fresh_like for name in ("empty_like", "zeros_like", "ones_like", "full_like")},
}

