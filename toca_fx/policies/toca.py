"""ToCa's schedule: a full step every `interval` calls (the first call of a generation included, and the
last `full_last`; the interval stretched early and shrunk late by `interval_stretch`, and 2 inside
`dense_steps`), partial steps between. On a partial step self-attention is reused whole (or
recomputed for the chosen queries, by config) and the other cached branches recompute
ceil(r * N) tokens, r = ratio x kind, depth and step factors (`schedules`); r = 0 reuses the branch.
With `forecast_order` set, a branch forecasts where it would reuse (`Mode.FORECAST`, k = 0) and
forecasts its other tokens where it recomputes chosen ones (the hybrid, k > 0).
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING

from .plan import BranchPlan, Mode, StepKind
from .schedules import depths, kind_of, ramp, snapped_ramp

if TYPE_CHECKING:
    from ..analysis.residual import Branch
    from ..config import ToCaConfig


class ToCaPolicy:
    """ToCa's schedule as a `Policy`, from the fields of a `ToCaConfig`."""

    def __init__(self, config: ToCaConfig):
        self.config = config
        self._full: dict[int, frozenset[int]] = {}  # num_steps -> its full steps

    def label(self, step: int, num_steps: int) -> StepKind:
        last = step >= num_steps - self.config.full_last
        return StepKind.FULL if step in self.full_steps(num_steps) or last else StepKind.PARTIAL

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
        if self.label(step, num_steps) == StepKind.FULL:
            return {b.index: BranchPlan(Mode.FILL) for b in branches}
        c = self.config
        step_f = snapped_ramp(c.step_factors, step, num_steps, c.step_levels)
        depth = depths(branches)
        plans = {b.index: self._plan(b, step_f * snapped_ramp(c.depth_factors, *depth[b.index], c.depth_levels)) for b in branches}
        return plans if c.forecast_order is None else {i: _forecasting(p) for i, p in plans.items()}

    def _gap(self, step: int, num_steps: int) -> int:
        dense = self.config.dense_steps
        if dense is not None and dense[0] <= step / num_steps < dense[1]:
            return 2
        w = self.config.interval_stretch
        return max(1, round(self.config.interval / ramp((1 - w, 1 + w), step, num_steps)))

    def _plan(self, branch: Branch, factor: float) -> BranchPlan:
        if branch.attends_tokens and self.config.self_attn == "reuse":
            return BranchPlan(Mode.REUSE)
        factor *= dict(self.config.kind_factors).get(kind_of(branch), 1.0)
        ratio = min(1.0, max(0.0, self.config.ratio * factor))
        k = min(branch.tokens, math.ceil(ratio * branch.tokens - 1e-9))
        if k == 0:
            return BranchPlan(Mode.REUSE)
        if k == branch.tokens:  # every token: the plain computation, no gather or scatter
            return BranchPlan(Mode.FILL)
        return BranchPlan(Mode.ROWS, k)

    def __repr__(self) -> str:
        return "ToCaPolicy(the ToCaConfig's schedule)"


def _forecasting(plan: BranchPlan) -> BranchPlan:
    """A partial step's plan with forecasting: reuse forecasts, rows forecast the tokens not chosen."""
    if plan.mode in (Mode.REUSE, Mode.ROWS):
        return BranchPlan(Mode.FORECAST, plan.k)
    return plan
