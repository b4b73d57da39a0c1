"""`CacheState`: the side state of one model (or one block of it, or one thread's use of it) at one
shape, kept apart from the graphs that use it.

It holds, per cache stream, the cache buffers (passed to every variant as extra inputs and updated in
place by them; each allocated when a variant that reads or writes it first runs, so caches no step
uses cost nothing), where the stream was last called (to tell a call the schedule expects from one it
does not), and the stream's CUDA-graph replays, which are bound to its buffers. Graphs of the same
model and shape (a graph recompiled for a new timestep value, or after `torch._dynamo.reset()`)
share one state: the buffers mean the same to all of them.

Without a timestep clock (`runtime.clock`) the state counts its own calls: `calls_per_step` streams
called in turn, a new generation after `num_steps` steps or `reset()`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from ..rewrite.layout import BufferSpec
from .clock import Clock, Tick


@dataclass(eq=False)
class Stream:
    buffers: list[torch.Tensor]
    allocated: set[int] = field(default_factory=set)
    complete: set = field(default_factory=set)  # `used` sets whose buffers are all allocated
    last: tuple[int, int] | None = None  # (generation, step) of its last call
    runners: dict[Any, Callable] = field(default_factory=dict)  # CUDA-graph replays with these buffers


class CacheState:
    """Buffers, streams and call positions of one model at one shape."""

    def __init__(self, specs: list[BufferSpec]):
        self.specs = specs
        self.streams: list[Stream] = []
        self.generation = 0  # the last generation called (of the clock it follows, or counted here)
        self.counted = 0  # calls of the counted generation so far
        self.num_steps = 0  # steps of the counted generation
        self.clock: Clock | None = None  # the clock its last call followed (None: counted)
        self.epoch = -1  # the backend's resets before its last call

    def stream(self, i: int) -> Stream:
        while len(self.streams) <= i:
            self.streams.append(Stream([s.stand_in() for s in self.specs]))
        return self.streams[i]

    def buffers(self, stream: Stream, used: frozenset[int]) -> list[torch.Tensor]:
        """The stream's buffers, one per spec: those at the indices `used` allocated (filled with their
        spec's value) on first use; the others stay empty stand-ins, which the call's graph must not read."""
        if used not in stream.complete:  # once per stream and `used`: no set arithmetic per call
            for i in used - stream.allocated:
                stream.buffers[i] = self.specs[i].allocate()
                stream.allocated.add(i)
            stream.complete.add(used)
        return stream.buffers

    def count(self, num_steps: int, streams: int) -> Tick:
        """The next call's place by counting (no clock): `streams` calls a step, `num_steps` steps."""
        if self.counted == 0:
            self.generation, self.num_steps = self.generation + 1, num_steps
        tick = Tick(self.generation, self.counted // streams, self.counted % streams)
        self.counted = (self.counted + 1) % (self.num_steps * streams)
        return tick

    def restart(self) -> None:
        """The next counted call starts a new generation."""
        self.counted = 0

    def release(self) -> None:
        """Free every buffer (and the CUDA graphs bound to them); the next call allocates what it uses."""
        self.streams.clear()

    @property
    def nbytes(self) -> int:
        """Bytes of the buffers allocated, over all streams."""
        return sum(self.specs[i].nbytes for s in self.streams for i in s.allocated)
