"""Plans: what each branch does at each step, the `Policy` protocol that makes them, and their checks.

A policy labels each step of a generation (`StepKind`) and gives every branch a `BranchPlan`: a `Mode`
and, for `Mode.ROWS` and `Mode.FORECAST`, how many tokens it recomputes. Steps with equal plans share one compiled graph,
so plans are values: hashable, compared by content (`plan_key`). A generation's plans are checked once,
when it is planned (`plan_generation`), with errors that name the policy, the step and the branch.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import TYPE_CHECKING, Protocol, runtime_checkable

if TYPE_CHECKING:
    from ..analysis.residual import Branch


class Mode(str, Enum):
    """A branch's mode in one step's graph."""

    FILL = "fill"  # compute every token, store the output in the cache
    ROWS = "rows"  # recompute the chosen tokens, scatter them into the cache, add the cache
    REUSE = "reuse"  # skip the branch, add the cache
    COMPUTE = "compute"  # compute every token as the model does, store nothing (see `drop_dead_fills`)
    FORECAST = "forecast"  # add the Taylor extrapolation of the cache; k > 0: recompute k chosen tokens too

    __hash__ = str.__hash__  # equal to its value as a key too: Mode.FILL and "fill" are one key

    def __str__(self) -> str:
        return self.value


class StepKind(str, Enum):
    """A step's label in statistics: every branch filled, or not."""

    FULL = "full"
    PARTIAL = "partial"

    __hash__ = str.__hash__

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class BranchPlan:
    """What one branch does in one step: `mode`, and for `Mode.ROWS` the `k` tokens it recomputes; for
    `Mode.FORECAST`, k = 0 forecasts every token, k > 0 (the hybrid) recomputes k chosen tokens exactly
    and forecasts the others."""

    mode: Mode
    k: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.mode, Mode):
            if self.mode not in _MODES:
                raise ValueError(f"BranchPlan.mode must be one of {_MODES}, got {self.mode!r}")
            object.__setattr__(self, "mode", Mode(self.mode))
        if not isinstance(self.k, int) or isinstance(self.k, bool) or self.k < 0:
            raise ValueError(f"BranchPlan.k must be an int >= 0, got {self.k!r}")

    @property
    def chooses_rows(self) -> bool:
        """Whether the branch recomputes chosen tokens (and so reads token scores)."""
        return self.mode == Mode.ROWS or (self.mode == Mode.FORECAST and self.k > 0)


_MODES = tuple(m.value for m in Mode)
_STEP_KINDS = tuple(s.value for s in StepKind)


@runtime_checkable
class Policy(Protocol):
    """Maps (step, branch) to a plan. `label` names a step in statistics; `plans` gives every branch of
    the graph (by `Branch.index`) its plan at `step` of a `num_steps` generation."""

    def label(self, step: int, num_steps: int) -> StepKind: ...

    def plans(self, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]: ...


def plan_generation(policy: Policy, num_steps: int, branches: list[Branch]) -> list[tuple[StepKind, dict[int, BranchPlan]]]:
    """Each step's label and plans, checked (see `check_step`), with fills no step reads dropped."""
    steps = [(_label(policy, s, num_steps), check_step(policy, s, num_steps, branches)) for s in range(num_steps)]
    _check_filled_before_read(policy, [plans for _, plans in steps], branches)
    dropped = drop_dead_fills([plans for _, plans in steps])
    return [(label, plans) for (label, _), plans in zip(steps, dropped)]


def check_step(policy: Policy, step: int, num_steps: int, branches: list[Branch]) -> dict[int, BranchPlan]:
    """The policy's plans of one step, each checked: one `BranchPlan` per branch index, a `Mode.ROWS`
    plan with 1 <= k <= the branch's tokens, made `Mode.REUSE` where the branch does not allow rows
    (`Branch.modes`). Raises ValueError naming the policy, step and branch."""
    plans = policy.plans(step, num_steps, branches)
    where = f"{policy!r} at step {step} of {num_steps}"
    if not isinstance(plans, dict):
        raise ValueError(f"{where}: plans() must return a dict of branch index -> BranchPlan, got {type(plans).__name__}")
    indices = {b.index for b in branches}
    if set(plans) != indices:
        missing, extra = sorted(indices - set(plans)), sorted(set(plans) - indices)
        raise ValueError(f"{where}: plans() must give every branch index {sorted(indices)} a plan; "
                         f"missing {missing}, unknown {extra}")
    for b in branches:
        plan = plans[b.index]
        if not isinstance(plan, BranchPlan):
            raise ValueError(f"{where}, branch {b.index} ({b.name}): expected a BranchPlan, got {plan!r}")
        if plan.mode == Mode.ROWS and not 1 <= plan.k <= b.tokens:
            raise ValueError(f"{where}, branch {b.index} ({b.name}): a rows plan's k must be in [1, {b.tokens}], got {plan.k}")
        if plan.mode == Mode.FORECAST and not plan.k < b.tokens:
            raise ValueError(f"{where}, branch {b.index} ({b.name}): a forecast plan's k must be in [0, {b.tokens}), got {plan.k}")
    return {b.index: _allowed(plans[b.index], b) for b in branches}


def _allowed(plan: BranchPlan, branch: Branch) -> BranchPlan:
    """A plan that recomputes chosen rows of a branch that allows only whole-branch modes (not proven
    token-local) uses the branch whole instead: a rows plan reuses it, a hybrid forecast forecasts it all."""
    if Mode.ROWS in branch.modes or plan.k == 0 or plan.mode not in (Mode.ROWS, Mode.FORECAST):
        return plan
    return BranchPlan(Mode.REUSE) if plan.mode == Mode.ROWS else BranchPlan(Mode.FORECAST, 0)


def plan_key(plans: dict[int, BranchPlan]) -> tuple:
    return tuple(sorted(plans.items()))


def drop_dead_fills(generation: list[dict[int, BranchPlan]]) -> list[dict[int, BranchPlan]]:
    """The plans of a generation's steps, with each fill whose buffers are written again before anything
    reads them made a plain computation (`Mode.COMPUTE`: no cache stores, no score refresh): at ratio 1.0
    the graph is the model's own. Steps with equal plans share one compiled graph, so a step changes
    only where every step with its plans changes alike: dropping stores never adds a compilation.
    A branch that forecasts at any step keeps every fill: the next fill's divided differences read it."""
    keep = {i for plans in generation for i, p in plans.items() if p.mode == Mode.FORECAST}
    dropped = [_drop(plans, generation[(s + 1) % len(generation)], keep) for s, plans in enumerate(generation)]
    outcomes: dict[tuple, set[tuple]] = {}
    for plans, new in zip(generation, dropped):
        outcomes.setdefault(plan_key(plans), set()).add(plan_key(new))
    return [new if len(outcomes[plan_key(plans)]) == 1 else plans for plans, new in zip(generation, dropped)]


def _drop(plans: dict[int, BranchPlan], next_plans: dict[int, BranchPlan], keep: set[int]) -> dict[int, BranchPlan]:
    """`next_plans`: the next call's (after the last step, the next generation's first). Rows plans read
    token scores and other branches' attention maps, so a next step with any keeps every fill; `keep`:
    the branches whose fills stay fills."""
    if any(p.chooses_rows for p in next_plans.values()):
        return plans
    return {i: BranchPlan(Mode.COMPUTE) if p.mode == Mode.FILL and next_plans[i].mode == Mode.FILL and i not in keep
            else p for i, p in plans.items()}


def _label(policy: Policy, step: int, num_steps: int) -> StepKind:
    label = policy.label(step, num_steps)
    if label not in _STEP_KINDS:
        raise ValueError(f"{policy!r} at step {step} of {num_steps}: label() must be one of {_STEP_KINDS}, got {label!r}")
    return StepKind(label)


def _check_filled_before_read(policy: Policy, generation: list[dict[int, BranchPlan]], branches: list[Branch]) -> None:
    """A branch that adds, forecasts or updates its cache (reuse, forecast, rows) at a step no earlier step
    of the generation filled would read what another generation left, or zeros: the plan is refused."""
    for b in branches:
        for step, plans in enumerate(generation):
            mode = plans[b.index].mode
            if mode == Mode.FILL:
                break
            if mode in (Mode.REUSE, Mode.ROWS, Mode.FORECAST):
                raise ValueError(f"{policy!r} at step {step} of {len(generation)}, branch {b.index} ({b.name}): "
                                 f"'{mode}' reads a cache that no earlier step of the generation filled")
