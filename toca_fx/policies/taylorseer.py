"""TaylorSeer's schedule (arXiv 2503.06923, its public code): the first `first_full` steps full, then a
full step every `interval` steps; every branch forecasts in between (`Mode.FORECAST`, needs
`ToCaConfig.forecast_order`). With first_full 3 and interval 6, a 50-step generation is full at steps
0, 1, 2, 8, 14, ..., 44.
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .plan import BranchPlan, Mode, StepKind

if TYPE_CHECKING:
    from ..analysis.residual import Branch


class TaylorSeerPolicy:
    """`ToCaConfig(policy=TaylorSeerPolicy(interval=6), forecast_order=1)`."""

    forecasts = True

    def __init__(self, interval: int, first_full: int = 3):
        for name, value in (("interval", interval), ("first_full", first_full)):
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"TaylorSeerPolicy.{name} must be an int >= 1, got {value!r}")
        self.interval, self.first_full = interval, first_full

    def label(self, step: int, num_steps: int) -> StepKind:
        full = step < self.first_full or (step - self.first_full + 1) % self.interval == 0
        return StepKind.FULL if full else StepKind.PARTIAL

    def plans(self, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]:
        mode = Mode.FILL if self.label(step, num_steps) == StepKind.FULL else Mode.FORECAST
        return {b.index: BranchPlan(mode) for b in branches}

    def __repr__(self) -> str:
        return f"TaylorSeerPolicy(interval={self.interval}, first_full={self.first_full})"
