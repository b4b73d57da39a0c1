"""`CacheState`: the side state of one compiled graph, kept apart from the graphs that use it.

It holds the cache buffers (passed to every variant as extra inputs and updated in place by them;
each allocated when a variant that reads or writes it first runs, so caches no step uses cost nothing),
the step counter that picks the variant, and the counters behind `stats()`. A pipeline that calls the
model more than once per step (conditional, then unconditional guidance) has one set of buffers and
one step counter per call stream; calls take turns, so the streams' caches never mix.
"""
from __future__ import annotations

from collections import Counter

import torch

from ..rewrite.layout import BufferSpec


class CacheState:
    """Buffers, step counter and statistics of one compiled graph."""

    def __init__(self, specs: list[BufferSpec], num_steps: int, streams: int = 1):
        self.specs = specs
        self.num_steps = num_steps
        self.stream_buffers: list[list[torch.Tensor]] = [[s.stand_in() for s in specs] for _ in range(streams)]
        self._allocated: list[set[int]] = [set() for _ in range(streams)]
        self._complete: list[set[frozenset[int] | None]] = [set() for _ in range(streams)]  # `used` all allocated
        self.steps = [0] * streams
        self.turn = 0  # the call stream of the next call
        self.calls: Counter[str] = Counter()  # policy label ("full", "partial", ...) -> calls
        self.plan_calls: Counter[int] = Counter()  # plan id (the backend's) -> calls

    @property
    def step(self) -> int:
        """The step of the next call, within its stream's generation."""
        return self.steps[self.turn]

    def buffers(self, used: frozenset[int] | None = None) -> list[torch.Tensor]:
        """The next call's buffers, one per spec: those at the indices `used` (default: all) allocated
        (filled with their spec's value) on first use; the others stay empty stand-ins, which the
        call's graph must not read."""
        if used not in self._complete[self.turn]:  # once per stream and `used`: no set arithmetic per call
            self._allocate(used)
        return self.stream_buffers[self.turn]

    def _allocate(self, used: frozenset[int] | None) -> None:
        buffers, allocated = self.stream_buffers[self.turn], self._allocated[self.turn]
        for i in (set(range(len(self.specs))) if used is None else used) - allocated:
            s = self.specs[i]
            buffers[i] = s.allocate()
            allocated.add(i)
        self._complete[self.turn].add(used)

    def record(self, label: str, plan: int) -> None:
        """Count one call: its label and its plan, an id the backend gives each distinct plan (and from
        which it derives the rows computed per branch)."""
        self.calls[label] += 1
        self.plan_calls[plan] += 1
        self.steps[self.turn] = (self.steps[self.turn] + 1) % self.num_steps
        self.turn = (self.turn + 1) % len(self.steps)

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation (of `num_steps` steps, if given): the next call is the first stream's
        full step, which overwrites every buffer."""
        self.num_steps = num_steps or self.num_steps
        self.steps = [0] * len(self.steps)
        self.turn = 0

    def clear_counters(self) -> None:
        """Forget the calls counted so far (e.g. a warm-up), keeping the caches and the step."""
        self.calls.clear()
        self.plan_calls.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers allocated so far, over all call streams."""
        return sum(self.specs[i].nbytes for allocated in self._allocated for i in allocated)
