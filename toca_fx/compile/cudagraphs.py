"""CUDA-graph replay of a compiled variant, for `mode="reduce-overhead"`.

Inductor's own CUDA graphs skip graphs that mutate non-static inputs, and every variant updates its
cache buffers in place. Here the variant is captured as is: its first call runs normally (the warm-up),
its second is captured and replayed. Inputs that keep their storage (parameters, buffers, the cache
buffers) are used in place; the others are copied into static slots before each replay. Outputs are
cloned out of the graph's memory pool, so a caller may keep them across steps.
"""
from __future__ import annotations

from typing import Any, Callable

import torch


class CudaGraphed:
    def __init__(self, fn: Callable, static: list[bool], pool: Any):
        self.fn = fn
        self.static = static
        self.pool = pool
        self.calls = 0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.slots: list[Any] = []
        self.copied: list[int] = []  # positions of the non-static tensor inputs, copied into slots per replay
        self.outputs: Any = None

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1:
            return self.fn(*args)
        if self.graph is None:
            self._capture(args)
        for i in self.copied:  # not a loop over all inputs: parameters make most of them
            self.slots[i].copy_(args[i])
        self.graph.replay()
        return type(self.outputs)(o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs)

    def _capture(self, args: tuple) -> None:
        self.copied = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not self.static[i]]
        self.slots = list(args)
        for i in self.copied:
            self.slots[i] = args[i].clone()
        torch.cuda.synchronize()
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, pool=self.pool):
            self.outputs = self.fn(*self.slots)
