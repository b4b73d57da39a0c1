"""Theoretical FLOPs of a graph, counted from its shapes (matmuls, convolutions, attention).

The graph runs on FakeTensors under PyTorch's FlopCounterMode, so nothing is computed and no device
time is spent; cache buffers are faked too, so counting never touches the real caches. Each node's
FLOPs go to the branch that owns it (`BRANCH` in its meta: set by the rewrite), the rest to None.
"""
from __future__ import annotations

from collections import Counter
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count


class TensorShape(NamedTuple):
    """What counting needs of a tensor input, without keeping the tensor alive."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device


def shapes_of(inputs: list[Any]) -> list[Any]:
    return [TensorShape(tuple(x.shape), x.stride(), x.dtype, x.device) if isinstance(x, torch.Tensor) else x for x in inputs]


def spec_shape(spec: Any) -> TensorShape:
    """A contiguous `TensorShape` for a `BufferSpec`."""
    return TensorShape(tuple(spec.shape), torch.empty(spec.shape, device="meta").stride(), spec.dtype, spec.device)


BRANCH = "toca_branch"  # node meta key: index of the branch a node belongs to


def graph_flops(gm: fx.GraphModule, inputs: list[Any]) -> Counter:
    """FLOPs of one call of `gm` on inputs of the given shapes (`shapes_of`), by owning branch index
    (None: outside every branch)."""
    with FakeTensorMode():
        fake = [
            torch.empty_strided(x.shape, x.stride, dtype=x.dtype, device=x.device) if isinstance(x, TensorShape) else x
            for x in inputs
        ]
        with FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
            counting = _ByBranch(gm, counter)
            counting.run(*fake)
    return counting.flops


class _ByBranch(fx.Interpreter):
    def __init__(self, gm: fx.GraphModule, counter: FlopCounterMode):
        super().__init__(gm)
        self.counter = counter
        self.flops: Counter = Counter()

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops[n.meta.get(BRANCH)] += self.counter.get_total_flops() - before
        return out


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The CPU kernel of fused attention is not in FlopCounterMode's table; the CUDA ones are.
_EXTRA = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
