"""`CacheState`: the side state of one compiled graph, kept apart from the graphs that use it.

It holds the cache buffers (passed to every variant as extra inputs and updated in place by them),
the step counter that picks the variant, and the counters behind `stats()`.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()


class CacheState:
    """Buffers, step counter and statistics of one compiled graph."""

    def __init__(self, specs: list[BufferSpec], num_steps: int):
        self.specs = specs
        self.num_steps = num_steps
        self.buffers: list[torch.Tensor] | None = None
        self.step = 0
        self.calls: Counter[str] = Counter()
        self.rows: Counter[int] = Counter()  # branch index -> token rows computed, summed over calls
        self.row_capacity: Counter[int] = Counter()  # branch index -> rows a run without cache computes

    def ensure_buffers(self) -> list[torch.Tensor]:
        """Allocate the buffers on first use, with the graph's devices and dtypes."""
        if self.buffers is None:
            self.buffers = [torch.zeros(s.shape, dtype=s.dtype, device=s.device) for s in self.specs]
        return self.buffers

    def record(self, variant: str, rows: dict[int, tuple[int, int]]) -> None:
        """Count one call: the variant run and, per branch, (rows computed, rows in total)."""
        self.calls[variant] += 1
        for index, (done, total) in rows.items():
            self.rows[index] += done
            self.row_capacity[index] += total
        self.step = (self.step + 1) % self.num_steps

    def reset(self) -> None:
        """Start a new generation: the next call is a full step, which overwrites every buffer."""
        self.step = 0

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self.specs)
