"""FORA's schedule: a full step every `interval` calls (the first of a generation included); between
them every branch is skipped and its cached output added (whole-branch reuse, no token choice), or
with `forecast`, its Taylor forecast (`Mode.FORECAST`; needs `ToCaConfig.forecast_order`).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

from .plan import BranchPlan, Mode, StepKind

if TYPE_CHECKING:
    from ..analysis.residual import Branch


class FORAPolicy:
    """Whole-branch reuse between full steps: `ToCaConfig(policy=FORAPolicy(interval=3))`."""

    def __init__(self, interval: int, forecast: bool = False):
        if not isinstance(interval, int) or isinstance(interval, bool) or interval < 1:
            raise ValueError(f"FORAPolicy.interval must be an int >= 1, got {interval!r}")
        if not isinstance(forecast, bool):
            raise ValueError(f"FORAPolicy.forecast must be True or False, got {forecast!r}")
        self.interval, self.forecasts = interval, forecast

    def label(self, step: int, num_steps: int) -> StepKind:
        return StepKind.FULL if step % self.interval == 0 else StepKind.PARTIAL

    def plans(self, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]:
        skip = Mode.FORECAST if self.forecasts else Mode.REUSE
        mode = Mode.FILL if self.label(step, num_steps) == StepKind.FULL else skip
        return {b.index: BranchPlan(mode) for b in branches}

    def __repr__(self) -> str:
        return f"FORAPolicy(interval={self.interval}{', forecast=True' if self.forecasts else ''})"
