"""`Locator`: whose computation a call of one graph is, and where it falls in a generation.

The owner is found from the parameters the graph is called with (the identity of its first and last
parameter inputs: another block or another model is another owner), its `CacheState` from the
`Runtime`. The place comes from the owner's timestep clock when the graph reads a timestep (an input,
or a constant Dynamo baked in), from the clock last read in this thread when it does not (a graph
after a break, in the same model call), and by counting calls when there is no clock at all.
"""
from __future__ import annotations

from typing import Any

import torch.fx as fx

from ..analysis.timestep import parameter_inputs, timestep_constants, timestep_inputs
from ..rewrite.layout import BufferSpec
from .clock import Clock, Tick, read_timestep
from .registry import Owner, Runtime
from .state import CacheState


_MAX_STREAMS = 8  # calls at one timestep: guidance halves and a sampler's evaluations take a few


class Locator:
    def __init__(self, graph: fx.Graph, example_inputs: list[Any], runtime: Runtime, clocked: bool,
                 calls_per_step: int):
        self.runtime, self.clocked, self.calls_per_step = runtime, clocked, calls_per_step
        self._params = parameter_inputs(example_inputs)
        self._timesteps = timestep_inputs(graph, example_inputs) if clocked else []
        self._constants = timestep_constants(graph) if clocked and not self._timesteps else ()

    def locate(self, args: tuple, layout: tuple[BufferSpec, ...], anchor: object) -> tuple[CacheState, Tick, int]:
        """The state of this call's owner, the call's place, and the steps planned for its generation;
        `anchor` stands for the owner of a graph without parameters."""
        owner = self._owner(args, anchor)
        state = self.runtime.state(owner, layout)
        reads = self._timesteps or self._constants
        clock = self.runtime.clock(owner) if reads else self.runtime.current_clock()
        if clock is None or not self.clocked:
            if self.clocked:
                self.runtime.warn_once("no clock", "toca_fx: no input of the compiled model carries its timestep "
                                       "(an input that reaches a sine or cosine embedding), so steps are counted by "
                                       "calls: call backend.reset() before each generation and set calls_per_step "
                                       "for guidance called in halves")
            self.runtime.called(state, None)
            return state, state.count(self.runtime.num_steps, self.calls_per_step), state.num_steps
        if reads:
            self._observe(clock, args)
            if clock.stream >= _MAX_STREAMS:
                return self._count_from_now(state)
        self.runtime.called(state, clock)
        return state, clock.tick(), clock.num_steps

    def _count_from_now(self, state: CacheState) -> tuple[CacheState, Tick, int]:
        """The "timestep" never changes (an input embedded like one, but constant): count calls."""
        self.runtime.warn_once("constant clock", f"toca_fx: the input read as the timestep kept its value over "
                               f"{_MAX_STREAMS} calls, so it is not one: steps are counted by calls from now on")
        self.clocked = False
        self.runtime.called(state, None)
        return state, state.count(self.runtime.num_steps, self.calls_per_step), state.num_steps

    def _observe(self, clock: Clock, args: tuple) -> None:
        values = tuple(read_timestep(args[i]) for i in self._timesteps) or self._constants
        if None in values:
            self.runtime.warn_once("timestep", "toca_fx: a timestep input is empty or not finite: that call "
                                   "counts as the next step")
            values = tuple(v if v is not None else -float("inf") for v in values)
        # A generation that ended before its planned steps by the inputs' say, not by a reset.
        steps = clock.step + 1 if clock.last is not None else 0
        planned = clock.num_steps
        if clock.observe(values):
            self.runtime.started(clock, steps, planned)

    def _owner(self, args: tuple, anchor: object) -> Owner:
        if not self._params:
            return Owner((id(anchor),), anchor)
        first, last = args[self._params[0]], args[self._params[-1]]
        return Owner((id(first), id(last)), first)
