"""ToCa's schedule: a full step every `interval` calls (the first call of a generation included, and the
last `full_last`; the interval stretched early and shrunk late by `interval_stretch`, and 2 inside
`dense_steps`), partial steps between. On a partial step self-attention is reused whole (or
recomputed for the chosen queries, by config) and the other cached branches recompute
ceil(r * N) tokens, r = ratio x kind, depth and step factors (`schedules`); r = 0 reuses the branch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..analysis.residual import Branch
from ..config import ToCaConfig
from .schedules import depths, kind_of, ramp, snapped_ramp

FULL, PARTIAL = "full", "partial"


@dataclass(frozen=True)
class BranchPlan:
    """What one branch does in one variant: "fill" (compute all, fill the cache), "rows" (recompute
    `k` tokens), "reuse" (skip, add the cache), "compute" (compute all, no cache: see `drop_dead_fills`)."""

    mode: str
    k: int = 0


class ToCaPolicy:
    """A policy maps (step, branch) to a plan: `plans` for a step of a `num_steps` generation, and a
    `label` that names the step in statistics. Steps with equal plans share one compiled graph."""

    def __init__(self, config: ToCaConfig):
        self.config = config
        self._full: dict[int, frozenset[int]] = {}  # num_steps -> its full steps

    def label(self, step: int, num_steps: int) -> str:
        last = step >= num_steps - self.config.full_last
        return FULL if step in self.full_steps(num_steps) or last else PARTIAL

    def full_steps(self, num_steps: int) -> frozenset[int]:
        """The steps that are full by the interval schedule: each full step sets the gap to the next."""
        if num_steps not in self._full:
            steps, step = set(), 0
            while step < num_steps:
                steps.add(step)
                step += self._gap(step, num_steps)
            self._full[num_steps] = frozenset(steps)
        return self._full[num_steps]

    def plans(self, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]:
        variant = self.label(step, num_steps)
        if variant == FULL:
            return {b.index: BranchPlan("fill") for b in branches}
        c = self.config
        step_f = snapped_ramp(c.step_factors, step, num_steps, c.step_levels)
        depth = depths(branches)
        return {b.index: self._plan(b, step_f * snapped_ramp(c.depth_factors, *depth[b.index], c.depth_levels)) for b in branches}

    def _gap(self, step: int, num_steps: int) -> int:
        dense = self.config.dense_steps
        if dense is not None and dense[0] <= step / num_steps < dense[1]:
            return 2
        w = self.config.interval_stretch
        return max(1, round(self.config.interval / ramp((1 - w, 1 + w), step, num_steps)))

    def _plan(self, branch: Branch, factor: float) -> BranchPlan:
        if branch.attends_tokens and self.config.self_attn == "reuse":
            return BranchPlan("reuse")
        factor *= dict(self.config.kind_factors).get(kind_of(branch), 1.0)
        ratio = min(1.0, max(0.0, self.config.ratio * factor))
        k = min(branch.tokens, math.ceil(ratio * branch.tokens - 1e-9))
        if k == 0:
            return BranchPlan("reuse")
        if k == branch.tokens:  # every token: the plain computation, no gather or scatter
            return BranchPlan("fill")
        return BranchPlan("rows", k)


def drop_dead_fills(generation: list[dict[int, BranchPlan]]) -> list[dict[int, BranchPlan]]:
    """The plans of a generation's steps, with each fill whose buffers are written again before anything
    reads them made a plain computation ("compute": no cache stores, no score refresh): at ratio 1.0
    the graph is the model's own. Steps with equal plans share one compiled graph, so a step changes
    only where every step with its plans changes alike: dropping stores never adds a compilation."""
    dropped = [_drop(plans, generation[(s + 1) % len(generation)]) for s, plans in enumerate(generation)]
    outcomes: dict[tuple, set[tuple]] = {}
    for plans, new in zip(generation, dropped):
        outcomes.setdefault(plan_key(plans), set()).add(plan_key(new))
    return [new if len(outcomes[plan_key(plans)]) == 1 else plans for plans, new in zip(generation, dropped)]


def plan_key(plans: dict[int, BranchPlan]) -> tuple:
    return tuple(sorted(plans.items()))


def _drop(plans: dict[int, BranchPlan], next_plans: dict[int, BranchPlan]) -> dict[int, BranchPlan]:
    """`next_plans`: the next call's (after the last step, the next generation's first). Rows plans read
    token scores and other branches' attention maps, so a next step with any keeps every fill."""
    if any(p.mode == "rows" for p in next_plans.values()):
        return plans
    return {i: BranchPlan("compute") if p.mode == "fill" and next_plans[i].mode == "fill" else p for i, p in plans.items()}
