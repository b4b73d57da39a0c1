"""A learned router (Learning-to-Cache / HarmoniCa) as a policy: one gate per (step, branch).

At step s, branch b is computed (and its cache refilled) when `gates[s, b] >= threshold`, and reused
(skipped, its cached output added, or with `forecast` its Taylor forecast) otherwise. Step 0 always computes: the cache is empty. The gates are
the sigmoids of the logits trained by `toca_fx.router.train`; the file holds the gates, the threshold
and the branch names the router was trained on.
"""
from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .plan import BranchPlan, Mode, StepKind

if TYPE_CHECKING:
    from ..analysis.residual import Branch


class Router:
    """`ToCaConfig(policy=Router.load(path), num_steps=router.num_steps)`."""

    def __init__(self, gates: torch.Tensor, threshold: float = 0.5, branch_names: list[str] | None = None,
                 forecast: bool = False):
        if not isinstance(gates, torch.Tensor) or gates.dim() != 2 or gates.shape[0] < 1:
            raise ValueError(f"Router.gates must be a [num_steps, num_branches] tensor, got {gates!r}")
        if not isinstance(threshold, (int, float)) or isinstance(threshold, bool) or not 0.0 < threshold < 1.0:
            raise ValueError(f"Router.threshold must be a number in (0, 1), got {threshold!r}")
        if not isinstance(forecast, bool):
            raise ValueError(f"Router.forecast must be True or False, got {forecast!r}")
        self.forecasts = forecast
        self.gates = gates.detach().float().cpu()
        self.threshold = float(threshold)
        self.branch_names = list(branch_names or [])

    @property
    def num_steps(self) -> int:
        return self.gates.shape[0]

    def computes(self) -> torch.Tensor:
        """[num_steps, num_branches] bool: which branches run (the rest are reused) at each step."""
        run = self.gates >= self.threshold
        run[0] = True
        return run

    def label(self, step: int, num_steps: int) -> StepKind:
        self._check(num_steps)
        return StepKind.FULL if bool(self.computes()[step].all()) else StepKind.PARTIAL

    def plans(self, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]:
        self._check(num_steps)
        if len(branches) != self.gates.shape[1]:
            raise ValueError(f"router trained on {self.gates.shape[1]} branches, the graph has {len(branches)}")
        run = self.computes()[step]
        skip = Mode.FORECAST if self.forecasts else Mode.REUSE
        return {b.index: BranchPlan(Mode.FILL if run[b.index] else skip) for b in branches}

    def with_threshold(self, threshold: float) -> "Router":
        return Router(self.gates, threshold, self.branch_names, self.forecasts)

    def forecasting(self) -> "Router":
        """The same gates, forecasting the branches they skip (needs `ToCaConfig.forecast_order`)."""
        return Router(self.gates, self.threshold, self.branch_names, forecast=True)

    def save(self, path: str | Path) -> None:
        torch.save({"gates": self.gates, "threshold": self.threshold, "branch_names": self.branch_names}, path)

    @classmethod
    def load(cls, path: str | Path) -> "Router":
        data = torch.load(path, map_location="cpu", weights_only=True)
        return cls(data["gates"], data["threshold"], data["branch_names"])

    def _check(self, num_steps: int) -> None:
        if num_steps != self.num_steps:
            raise ValueError(f"router trained for {self.num_steps} steps, the generation has {num_steps}")

    def __repr__(self) -> str:
        reused = 1.0 - self.computes().float().mean().item()
        return f"Router(num_steps={self.num_steps}, branches={self.gates.shape[1]}, reused={reused:.0%})"
