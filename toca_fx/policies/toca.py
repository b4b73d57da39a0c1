"""ToCa's schedule: a full step every `interval` calls (the first call of a generation included), partial
steps between. On a partial step self-attention is reused whole (or recomputed for the chosen
queries, by config) and the other cached branches recompute ceil(ratio * N) tokens.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..analysis.residual import Branch
from ..config import ToCaConfig

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
        return FULL if step % self.config.interval == 0 else PARTIAL

    def plans(self, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]:
        variant = self.label(step, num_steps)
        return {b.index: self._plan(variant, b) for b in branches}

    def _plan(self, variant: str, branch: Branch) -> BranchPlan:
        if variant == FULL:
            return BranchPlan("fill")
        if branch.attends_tokens and self.config.self_attn == "reuse":
            return BranchPlan("reuse")
        k = min(branch.tokens, max(1, math.ceil(self.config.ratio * branch.tokens - 1e-9)))
        if k == branch.tokens:  # every token: the plain computation, no gather or scatter
            return BranchPlan("fill")
        return BranchPlan("rows", k)
