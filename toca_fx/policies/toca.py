"""ToCa's schedule: a full step every `interval` calls (the first call of a generation included, and the
last `full_last`), partial steps between. On a partial step self-attention is reused whole (or
recomputed for the chosen queries, by config) and the other cached branches recompute
ceil(r * N) tokens, r = ratio x kind, depth and step factors (`schedules`); r = 0 reuses the branch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..analysis.residual import Branch
from ..config import ToCaConfig
from .schedules import depths, kind_of, ramp

FULL, PARTIAL = "full", "partial"


@dataclass(frozen=True)
class BranchPlan:
    """What one branch does in one variant: "fill" (compute all, fill the cache), "rows" (recompute
    `k` tokens), "reuse" (skip, add the cache)."""

    mode: str
    k: int = 0


class ToCaPolicy:
    """A policy maps (step, branch) to a plan: `plans` for a step of a `num_steps` generation, and a
    `label` that names the step in statistics. Steps with equal plans share one compiled graph."""

    def __init__(self, config: ToCaConfig):
        self.config = config

    def label(self, step: int, num_steps: int) -> str:
        last = step >= num_steps - self.config.full_last
        return FULL if step % self.config.interval == 0 or last else PARTIAL

    def plans(self, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]:
        variant = self.label(step, num_steps)
        if variant == FULL:
            return {b.index: BranchPlan("fill") for b in branches}
        step_f = ramp(self.config.step_factors, step, num_steps)
        depth = depths(branches)
        return {b.index: self._plan(b, step_f * ramp(self.config.depth_factors, *depth[b.index])) for b in branches}

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
