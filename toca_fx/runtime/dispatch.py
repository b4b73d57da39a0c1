"""`CachedGraph`: what the backend returns for a captured graph with cacheable branches.

At each call it finds whose computation the call is (its parameters) and where it falls in a
generation (the model's timestep clock, `runtime.clock`), takes that step's variant from the plan of
the generation, compiles it at its first call, and runs it with that owner's cache buffers as extra
inputs. The step index never enters a graph as a value, so steps never recompile: where branches
forecast, the runtime writes it into the graph's `clock` buffer before the call.

A call the schedule does not expect (a step past the planned ones, a stream that missed the step
before, a new owner or shape mid-generation) runs a step that fills every cache: never a stale one.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch.fx as fx

from ..analysis.marks import mark_stream, tag_branch
from ..analysis.residual import Analysis
from ..config import ToCaConfig
from ..policies.plan import StepKind
from ..policies.toca import ToCaPolicy
from ..rewrite.layout import buffer_specs, clock_index
from .clock import Tick
from .compiler import VariantCompiler
from .planner import Planner, Step, Variant
from .locate import Locator
from .registry import Runtime
from .state import CacheState, Stream
from .stats import UNCACHED, FlopTable


class CachedGraph:
    """Dispatcher for one captured graph: picks, compiles and runs the variant of each step.
    Steps with the same plans share one variant: one graph, one compilation."""

    def __init__(self, gm: fx.GraphModule, analysis: Analysis, config: ToCaConfig, options: dict,
                 runtime: Runtime, example_inputs: list[Any]):
        self.gm, self.analysis, self.config, self.runtime = gm, analysis, config, runtime
        self.layout = runtime.layout(tuple(buffer_specs(analysis, config)))
        self._clock = clock_index(self.layout)
        self.planner = Planner(analysis.branches, config.policy if config.policy is not None else ToCaPolicy(config))
        self.compiler = VariantCompiler(gm, config, options, self.layout, self.planner)
        self.calls: Counter = Counter()  # step label -> calls
        self.plan_calls: Counter = Counter()  # variant id -> calls
        self.state: CacheState | None = None  # the state of the last call
        self.locator = Locator(gm.graph, example_inputs, runtime, config.timestep_clock, config.calls_per_step)
        self._flops = FlopTable()
        for branch in analysis.branches:
            tag_branch(branch.index, branch.nodes)
        mark_stream([b.add for b in analysis.branches], analysis.branches[0].stream)

    def __call__(self, *args: Any) -> Any:
        state, tick, num_steps = self.locator.locate(args, self.layout, self)
        self.state = state
        stream = state.stream(tick.stream)
        label, variant = self._step(tick, stream, num_steps)
        if variant.fn is None:
            self._compile(variant, args, state, stream, num_steps)
        fn = self.compiler.replays.runner(id(self), variant, stream, args) if self.compiler.graphed else variant.fn
        buffers = state.buffers(stream, variant.used)
        if self._clock is not None:
            buffers[self._clock].fill_(tick.step)
        out = fn(*args, *buffers)
        stream.last = (tick.generation, tick.step)
        self.calls[label] += 1
        self.plan_calls[variant.id] += 1
        return out

    def next_step(self) -> Step:
        """The label and variant the schedule gives the next call of the last state, by counting."""
        steps = self.planner.generation(self.runtime.num_steps)
        stream = self.state.streams[0] if self.state is not None and self.state.streams else None
        last = stream.last[1] if stream is not None and stream.last is not None else -1
        return steps[(last + 1) % len(steps)]

    def variant_graph(self, label: str) -> fx.GraphModule:
        """The rewritten graph of the first step labelled `label` ("full", "partial"), uncompiled."""
        return self.compiler.graph(self._first_of(label))

    def variant_inputs(self, label: str, args: tuple) -> list[Any]:
        """What the variant of the first step labelled `label` is called with: `args`, then the buffers
        of the last call's first stream."""
        return self.compiler.inputs(self._first_of(label), args, self.state, self.state.stream(0))

    @property
    def n_compiled(self) -> int:
        return len(self.compiler.compiled)

    @property
    def flops(self) -> dict[Any, int]:
        """Theoretical FLOPs of one call of each plan compiled so far (by plan key), and "uncached"."""
        return {key: sum(by_branch.values()) for key, by_branch in self.flops_by_branch.items()}

    @property
    def flops_by_branch(self) -> dict[Any, Counter]:
        """As `flops`, split by branch index (None: the graph outside every branch)."""
        return self._flops.by_branch(self)

    def label_flops(self, label: str) -> int:
        """Theoretical FLOPs of one call of the step labelled `label` ("uncached" for the original)."""
        return self.flops[UNCACHED] if label == UNCACHED else self.flops[self._first_of(label).key]

    def _step(self, tick: Tick, stream: Stream, num_steps: int) -> Step:
        steps = self.planner.generation(num_steps)
        if tick.step >= len(steps):
            self.runtime.warn_once("past", f"toca_fx: a generation ran past its {num_steps} planned steps "
                                   "(ToCaConfig.num_steps); the steps past them fill every cache (computed in full)")
            return self.planner.fill_all()
        if tick.step > 0 and stream.last != (tick.generation, tick.step - 1):
            self.runtime.warn_once("unexpected", "toca_fx: a call the schedule did not expect (a model, block or "
                                   "shape first called mid-generation, a cache stream that missed a step, or "
                                   "parameters used twice in one step) filled every cache (computed in full)")
            return self.planner.fill_all()
        return steps[tick.step]

    def _compile(self, variant: Variant, args: tuple, state: CacheState, stream: Stream, num_steps: int) -> None:
        if self._flops.example is None:  # shapes only, for counting FLOPs on demand (buffers as allocated)
            self._flops.example = self.compiler.example(args)
        self.compiler.compile(variant, args, state, stream, self.planner.generation(num_steps))

    def _first_of(self, label: str) -> Variant:
        self.planner.generation(self.runtime.num_steps)
        return self.planner.first_of(StepKind(label))
