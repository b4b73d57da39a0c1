"""`CachedGraph`: what the backend returns for a captured graph with cacheable branches.

At each call it asks the plan of the generation which variant this step runs, compiles that variant
at its first call, and runs it with the cache buffers of the graph's `CacheState` as extra inputs.
The step index never enters a graph, so steps never recompile.
"""
from __future__ import annotations

from collections import Counter
from typing import Any

import torch.fx as fx

from ..analysis.fake import metas_of
from ..analysis.marks import mark_stream, tag_branch
from ..analysis.residual import Analysis
from ..config import ToCaConfig
from ..policies.plan import StepKind
from ..policies.toca import ToCaPolicy
from ..rewrite.layout import buffer_specs
from .compiler import VariantCompiler
from .planner import Planner, Step
from .state import CacheState
from .stats import UNCACHED, FlopTable


class CachedGraph:
    """Dispatcher for one captured graph: picks, compiles and runs the variant of each step.
    Steps with the same plans share one variant: one graph, one compilation."""

    def __init__(self, gm: fx.GraphModule, analysis: Analysis, config: ToCaConfig, options: dict):
        self.gm, self.analysis, self.config = gm, analysis, config
        self.state = CacheState(buffer_specs(analysis, config), config.num_steps, config.calls_per_step)
        self.planner = Planner(analysis.branches, config.policy if config.policy is not None else ToCaPolicy(config))
        self.compiler = VariantCompiler(gm, config, options, self.state, self.planner)
        self._flops = FlopTable()
        for branch in analysis.branches:
            tag_branch(branch.index, branch.nodes)
        mark_stream([b.add for b in analysis.branches], analysis.branches[0].stream)

    def __call__(self, *args: Any) -> Any:
        # The hot path: per call, no hashing of plan keys and no loop over branches.
        label, variant = self.next_step()
        if variant.fn is None:
            self._compile(variant, args)
        out = variant.fn(*args, *self.state.buffers(variant.used))
        self.state.record(label, variant.id)
        return out

    def next_step(self) -> Step:
        """The label and variant of the next call."""
        return self.planner.generation(self.state.num_steps)[self.state.step]

    def variant_graph(self, label: str) -> fx.GraphModule:
        """The rewritten graph of the first step labelled `label` ("full", "partial"), uncompiled."""
        return self.compiler.graph(self._first_of(label))

    def variant_inputs(self, label: str, args: tuple) -> list[Any]:
        """What the variant of the first step labelled `label` is called with, after `args`."""
        return self.compiler.inputs(self._first_of(label), args)

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

    def _compile(self, variant: Any, args: tuple) -> None:
        if self._flops.example is None:  # shapes only, for counting FLOPs on demand (buffers as allocated)
            self._flops.example = metas_of(list(args)) + [s.meta() for s in self.state.specs]
        self.compiler.compile(variant, args, self.planner.generation(self.state.num_steps))

    def _first_of(self, label: str) -> Any:
        self.planner.generation(self.state.num_steps)
        return self.planner.first_of(StepKind(label))
