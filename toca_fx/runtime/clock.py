"""Where a call falls in a generation, read off the model's timestep input.

A denoising step is one call of the model as the user made it, whatever number of graphs serve it.
The graph that takes the timestep (`analysis.timestep`) reads its value at each call: a value below
the last one is the next step, the same value again is another call of the same step (the second half
of classifier-free guidance called apart, or a second-order sampler's second evaluation: each gets a
cache stream of its own), and a value above it starts a new generation. Graphs that run after it in
the same model call (blocks split off by graph breaks) follow the same clock: the clock last read in
this thread.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Tick:
    """One call's place: the generation (a number that grows), the step in it and the cache stream."""

    generation: int
    step: int
    stream: int


class Clock:
    """The steps of one model's generations, from the timesteps it is called with."""

    def __init__(self) -> None:
        self.generation = 0
        self.step = 0
        self.stream = 0
        self.num_steps = 0  # the steps planned for the current generation
        self.last: tuple[float, ...] | None = None

    def observe(self, t: tuple[float, ...]) -> bool:
        """Advance by one call at timesteps `t` (a timestep, and any other input embedded the same
        way, such as a constant guidance strength); whether the call starts a new generation."""
        new = self.last is None or len(t) != len(self.last) or any(a > b for a, b in zip(t, self.last))
        if new:
            self.generation, self.step, self.stream = self.generation + 1, 0, 0
        elif any(a < b for a, b in zip(t, self.last)):
            self.step, self.stream = self.step + 1, 0
        else:
            self.stream += 1
        self.last = t
        return new

    def tick(self) -> Tick:
        return Tick(self.generation, self.step, self.stream)

    def restart(self) -> None:
        """The next call starts a new generation, whatever its timestep."""
        self.last = None


def read_timestep(value: Any) -> float | None:
    """The first number of a timestep input (a device read for a CUDA tensor); None if not finite."""
    if isinstance(value, torch.Tensor):
        if not value.numel():
            return None
        value = value.detach().reshape(-1)[0].item()
    value = float(value)
    return value if math.isfinite(value) else None
