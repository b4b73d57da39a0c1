"""The plans of one captured graph: each generation's steps, and one `Variant` per distinct plan.

A generation of `num_steps` calls is planned once (`policies.plan.plan_generation`: checked, dead fills
dropped); steps with equal plans share a `Variant`, so the hot path finds everything on it without
hashing a plan key.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

import torch.fx as fx

from ..analysis.residual import Branch
from ..policies.plan import BranchPlan, Mode, Policy, StepKind, plan_generation, plan_key


@dataclass(eq=False)
class Variant:
    """One distinct plan and what running it takes, each part made on first use."""

    id: int  # its position in `Planner.variants`: the key of `CacheState.plan_calls`
    key: tuple  # the plan key: ((branch index, BranchPlan), ...)
    rows: dict[int, tuple[int, int]]  # branch index -> (token rows computed, rows without cache) per call
    graph: fx.GraphModule | None = None  # the rewritten graph
    used: frozenset[int] | None = None  # indices of the buffers its graph reads or writes
    fn: Callable | None = None  # compiled `graph`
    seconds: float = 0.0  # its first call's wait for `fn`: compiling it, or its worker and loading it
    worker: Any = None  # `compile.workers.WorkerTimes` where a worker compiled it ahead
    regions: tuple[int, int] | None = None  # compiled by regions: (blocks, distinct forms compiled)

    @property
    def modes(self) -> set[Mode]:
        return {plan.mode for _, plan in self.key}


class Step(NamedTuple):
    label: StepKind
    variant: Variant


class Planner:
    def __init__(self, branches: list[Branch], policy: Policy):
        self.branches, self.policy = branches, policy
        self.variants: list[Variant] = []  # in the order planned
        self._by_key: dict[tuple, Variant] = {}
        self._generations: dict[int, list[Step]] = {}  # num_steps -> each step

    def generation(self, num_steps: int) -> list[Step]:
        if num_steps not in self._generations:
            planned = plan_generation(self.policy, num_steps, self.branches)
            self._generations[num_steps] = [Step(label, self._variant(plans)) for label, plans in planned]
        return self._generations[num_steps]

    def fill_all(self) -> Step:
        """A full step that fills every cache: what a call the schedule did not expect runs."""
        return Step(StepKind.FULL, self._variant({b.index: BranchPlan(Mode.FILL) for b in self.branches}))

    def first_of(self, label: StepKind) -> Variant:
        """The variant of the first step labelled `label` in the generations planned so far."""
        if not self._generations:
            raise LookupError("no generation planned yet")
        return next(s.variant for steps in self._generations.values() for s in steps if s.label == label)

    def first_call(self, variant: Variant) -> tuple[StepKind, int]:
        """The label and step of the first step that runs `variant`."""
        return next((s.label, i) for steps in self._generations.values() for i, s in enumerate(steps) if s.variant is variant)

    def _variant(self, plans: dict[int, BranchPlan]) -> Variant:
        key = plan_key(plans)
        if key not in self._by_key:
            rows = {b.index: _rows(plans[b.index], b.tokens) for b in self.branches}
            self._by_key[key] = Variant(len(self.variants), key, rows)
            self.variants.append(self._by_key[key])
        return self._by_key[key]


def _rows(plan: BranchPlan, tokens: int) -> tuple[int, int]:
    computed = {Mode.FILL: tokens, Mode.COMPUTE: tokens, Mode.ROWS: plan.k, Mode.REUSE: 0, Mode.FORECAST: plan.k}[plan.mode]
    return computed, tokens
