"""Theoretical FLOPs of a graph, counted from its shapes (matmuls, convolutions, attention).

The graph runs on FakeTensors under PyTorch's FlopCounterMode, so nothing is computed and no device
time is spent; cache buffers are faked too, so counting never touches the real caches. Each node's
FLOPs go to the branch that owns it (`marks.branch_of`), the rest to None.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from ..analysis.fake import FakeRun, fakes, new_fake_mode
from ..analysis.marks import branch_of


def graph_flops(gm: fx.GraphModule, inputs: list[Any]) -> Counter:
    """FLOPs of one call of `gm` on inputs of the given metadata (`TensorMeta`s), by owning branch
    index (None: outside every branch)."""
    fake_mode = new_fake_mode()
    args = fakes(inputs, fake_mode)
    with torch.no_grad(), fake_mode, FlopCounterMode(display=False, custom_mapping=_EXTRA) as counter:
        counting = _ByBranch(gm, fake_mode, counter)
        counting.run(*args)
    return counting.flops


class _ByBranch(FakeRun):
    def __init__(self, gm: fx.GraphModule, fake_mode: FakeTensorMode, counter: FlopCounterMode):
        super().__init__(gm, fake_mode)
        self.counter = counter
        self.flops: Counter = Counter()

    def run_node(self, n: fx.Node) -> Any:
        before = self.counter.get_total_flops()
        out = super().run_node(n)
        self.flops[branch_of(n)] += self.counter.get_total_flops() - before
        return out


def _cpu_sdpa_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query_shape, key_shape, value_shape)


# The CPU kernel of fused attention is not in FlopCounterMode's table; the CUDA ones are.
_EXTRA = {}
if hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"):
    _EXTRA[torch.ops.aten._scaled_dot_product_flash_attention_for_cpu] = _cpu_sdpa_flops
