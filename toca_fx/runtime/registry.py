"""`Runtime`: what the graphs of one backend share, the clocks of the models it compiled and the cache
state of each model (or block) at each shape, per thread.

Identity comes from the calls, not from how Dynamo cut the model: a graph called with another set of
parameters (another block of a model whose forward breaks inside its blocks, another model of the
same class) is another owner with its own state, found from the identity of its first and last
parameter inputs; graphs of one owner with the same buffer layout share one state. Each thread has
its own clocks and states. An owner's states and clocks go when its parameters do.

Memory: when a clock starts a generation, the states that followed it but were not called in the
generation before are freed; `reset()` frees those not called since the previous reset.
"""
from __future__ import annotations

import threading
import warnings
import weakref
from typing import Any, Hashable

from ..errors import ToCaWarning
from ..rewrite.layout import BufferSpec
from .clock import Clock
from .state import CacheState


class Owner:
    """Whose computation a call is: `key` (hashable), and `anchor`, whose death ends its state."""

    __slots__ = ("key", "anchor")

    def __init__(self, key: Hashable, anchor: Any):
        self.key, self.anchor = key, anchor


class Runtime:
    def __init__(self, num_steps: int):
        self.num_steps = num_steps  # the steps planned for each generation that starts from now on
        self._clocks: dict[tuple, Clock] = {}
        self._states: dict[tuple, CacheState] = {}
        self._layouts: dict[tuple, tuple] = {}
        self._epoch = 0  # resets so far
        self._local = threading.local()
        self._warned: set[str] = set()

    def clock(self, owner: Owner) -> Clock:
        """The clock of the model whose graph reads the timestep; it becomes this thread's current one."""
        key = ("clock", owner.key, threading.get_ident())
        clock = self._clocks.get(key)
        if clock is None:
            clock = self._clocks[key] = Clock()
            self._anchor(owner, key)
        self._local.clock = clock
        return clock

    def current_clock(self) -> Clock | None:
        """The clock last read in this thread (by the graph that takes the timestep)."""
        return getattr(self._local, "clock", None)

    def started(self, clock: Clock, steps_before: int, planned_before: int) -> None:
        """`clock` started a generation: plan it for `num_steps`, free the states it left unused, and
        say once if the generation before ended early."""
        clock.num_steps = self.num_steps
        if 0 < steps_before < planned_before:
            self.warn_once("early", f"toca_fx: a generation ended after {steps_before} of its {planned_before} "
                           "planned steps (the timestep moved back up); each generation is planned for "
                           "ToCaConfig.num_steps steps: set it (or call backend.reset(num_steps=...)) to the "
                           "steps you run")
        for state in self._states.values():
            if state.clock is clock and state.generation < clock.generation - 1:
                state.release()

    def layout(self, specs: tuple[BufferSpec, ...]) -> tuple[BufferSpec, ...]:
        """The one copy of an equal buffer layout: states are keyed by its identity, not hashed per call."""
        return self._layouts.setdefault(specs, specs)

    def state(self, owner: Owner, layout: tuple[BufferSpec, ...]) -> CacheState:
        """`owner`'s state for `layout` (as `layout()` returned it) in this thread."""
        key = ("state", owner.key, id(layout), threading.get_ident())
        state = self._states.get(key)
        if state is None:
            state = self._states[key] = CacheState(list(layout))
            self._anchor(owner, key)
        return state

    def called(self, state: CacheState, clock: Clock | None) -> None:
        """Book a call of `state` (following `clock`, or counting its own steps without one)."""
        state.clock, state.epoch = clock, self._epoch
        if clock is not None:
            state.generation = clock.generation

    def reset(self, num_steps: int | None) -> None:
        """The next call of every model starts a new generation (of `num_steps` steps, if given); the
        states not called since the previous reset are freed."""
        if num_steps is not None:
            self.num_steps = num_steps
        for clock in self._clocks.values():
            clock.restart()
        for state in self._states.values():
            state.restart()
            if state.epoch < self._epoch:
                state.release()
        self._epoch += 1

    @property
    def nbytes(self) -> int:
        return sum(s.nbytes for s in self._states.values())

    def warn_once(self, topic: str, message: str) -> None:
        if topic not in self._warned:
            self._warned.add(topic)
            warnings.warn(message, ToCaWarning, stacklevel=4)

    def _anchor(self, owner: Owner, key: tuple) -> None:
        weakref.finalize(owner.anchor, _forget, weakref.ref(self), key)

    def _forget(self, key: tuple) -> None:
        self._states.pop(key, None)
        self._clocks.pop(key, None)


def _forget(runtime: weakref.ref, key: tuple) -> None:
    """An owner's parameters are gone: so are its states and clocks (the runtime holds no reference)."""
    alive = runtime()
    if alive is not None:
        alive._forget(key)
