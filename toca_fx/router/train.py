"""Router training: HarmoniCa's Step-Wise Denoising Training with the Image Error Proxy Objective.

Each iteration samples the whole DDIM trajectory twice from the same noise: the teacher (the model,
no cache) and the student (the model whose branches the router mixes with their caches; its own
output is its next input). Every step t contributes

    lambda(t) * mse(x_student_{t+1}, x_teacher_{t+1})  +  beta * mean_b sigmoid(logit[t, b]) / (T - 1)

and its gradient goes to the logits of step t (the student's input is detached between steps). The
gate is a straight-through estimator: forward with (sigmoid(logit) >= threshold), as inference runs
(so a branch reused for several steps is as stale in training as in use), backward through the
sigmoid. The router starts from FORA's schedule (`init_interval`): from "everything computed" the
student equals the teacher, the squared error has zero gradient, and beta alone would move every gate
down together. lambda(t) (`iepo.py`) is re-estimated every `lambda_every` iterations.
With `target_reuse`, the budget is enforced in the forward pass: the hard gates compute exactly the
n = round((1 - target_reuse)(T - 1)B) pairs of steps >= 1 with the highest gates (the saved router is
thresholded at the n-th), so training learns which pairs to reuse at the target speedup (adapting beta
towards the target instead lets the share of reuse drift away from it).

Under a budget, training ranks pairs, so the size of each gradient matters, not only its sign. The
update is SGD with momentum on the gradient divided by its root mean square over all logits: one
scale for all, so a pair's step follows the size of its gradient (Adam's per-logit scale would move
every logit by about lr whatever its gradient). After each update the
logits of steps >= 1 are shifted so the budget's boundary sits at logit 0, where the sigmoid's
gradient is largest (a shift changes no ranking).
Any single batch is noisy (a first step can re-rank FORA's tied pairs for the worse), so every
`validate_every` iterations, and after the last, the router is scored by the final sample's squared
error against the teacher on a fixed validation batch (its own noise, drawn apart from the training
noise); the result keeps the best-scoring router, the start included.
Only the model and Gaussian noise (and random class labels) are needed.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

from ..config import check_field
from ..policies.learned import Router
from .iepo import estimate_lambdas
from .student import Student
from .trajectory import Sampler


@dataclass(frozen=True)
class TrainConfig:
    """num_steps: DDIM steps of the generations the router serves. beta: the one coefficient trading
    the image-error proxy against cache use (larger reuses more). threshold: a gate at or above it
    computes its branch. init_interval, init_logit: the start is FORA's schedule, every branch computed
    on steps that are multiples of `init_interval` (logit +init_logit) and reused on the others
    (-init_logit): close enough to the threshold for gates to cross it within training (about 12
    iterations of a steady gradient of average size at the default lr and momentum).
    target_reuse: None (gates compute where they reach `threshold`), or the fraction of (step, branch)
    pairs after step 0 to reuse: every forward then computes exactly the rest, the highest gates
    (`beta` still pushes all gates down, but no longer changes the budget).
    lr, momentum: SGD on the RMS-normalised gradient (a logit moves about lr / (1 - momentum) per
    iteration under a steady gradient of average size). validate_every, validate_batch: how often,
    and on how many samples, the router is scored for keeping the best."""

    num_steps: int = 20
    iterations: int = 40
    batch: int = 4
    lr: float = 0.02
    momentum: float = 0.9
    beta: float = 1e-3
    threshold: float = 0.5
    init_interval: int = 2
    init_logit: float = 1.0
    lambda_every: int = 5
    lambda_batch: int = 2
    cfg_scale: float = 1.5
    seed: int = 0
    target_reuse: float | None = None
    validate_every: int = 10
    validate_batch: int = 16

    def __post_init__(self) -> None:
        ok = isinstance(self.num_steps, int) and not isinstance(self.num_steps, bool) and self.num_steps >= 2
        _check(ok, "num_steps", "an int >= 2 (step 0 always computes: one step leaves nothing to learn)", self.num_steps)
        for name in ("iterations", "batch", "lambda_every", "lambda_batch", "init_interval",
                     "validate_every", "validate_batch"):
            value = getattr(self, name)
            _check(isinstance(value, int) and not isinstance(value, bool) and value >= 1, name, "an int >= 1", value)
        for name in ("lr", "beta", "cfg_scale"):
            value = getattr(self, name)
            _check(isinstance(value, (int, float)) and value > 0, name, "a number > 0", value)
        ok = isinstance(self.momentum, (int, float)) and 0 <= self.momentum < 1
        _check(ok, "momentum", "a number in [0, 1)", self.momentum)
        ok = isinstance(self.threshold, float) and 0 < self.threshold < 1
        _check(ok, "threshold", "a float in (0, 1)", self.threshold)
        _check(isinstance(self.init_logit, (int, float)), "init_logit", "a number", self.init_logit)
        _check(isinstance(self.seed, int), "seed", "an int", self.seed)
        ok = self.target_reuse is None or (isinstance(self.target_reuse, (int, float)) and 0 < self.target_reuse < 1)
        _check(ok, "target_reuse", "None or a number in (0, 1)", self.target_reuse)


@dataclass
class TrainResult:
    router: Router
    objectives: list[float] = field(default_factory=list)  # per iteration, before its update
    reused: list[float] = field(default_factory=list)  # fraction of (step >= 1, branch) its forward reused
    lambda_iterations: list[int] = field(default_factory=list)  # iterations that re-estimated lambda
    lambdas: list[torch.Tensor] = field(default_factory=list)
    validation: dict[int, float] = field(default_factory=dict)  # iteration -> validation error before it
    best_iteration: int = 0  # `router` is the router of this iteration, before its update


_check = partial(check_field, "TrainConfig")

# Each batch size and grad mode is a recompile of the student; Dynamo's fallback to eager after the
# default 8 would drop the caches (Student raises then).
_RECOMPILE_LIMIT = "recompile_limit" if hasattr(torch._dynamo.config, "recompile_limit") else "cache_size_limit"


@torch._dynamo.config.patch(_RECOMPILE_LIMIT, 64)
def train(model: Callable[..., torch.Tensor], shape: tuple[int, ...], *, config: TrainConfig | None = None,
          num_classes: int | None = None, path: str | Path | None = None, progress: bool = True) -> TrainResult:
    """Train a router for `model(x, t, y) -> eps` on samples of `shape` (C, H, W); class labels are drawn
    from `num_classes` (default `model.num_classes`, also the null label of guidance). Saves to `path`."""
    config = config or TrainConfig()
    num_classes = num_classes if num_classes is not None else getattr(model, "num_classes", None)
    if not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"train: num_classes must be given (the model has no int num_classes), got {num_classes!r}")
    sampler = Sampler(config.num_steps, config.cfg_scale, null_label=num_classes)
    student = Student(model)
    gen = torch.Generator().manual_seed(config.seed)
    device = next(model.parameters()).device if isinstance(model, torch.nn.Module) else torch.device("cpu")

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        return _draw(gen, n, shape, num_classes, device)

    names = student.branch_names(*_example(*draw(1), sampler))
    if not names:
        raise ValueError("train: the model has no cacheable branches (toca_fx.explain says why)")
    computed = torch.arange(config.num_steps, device=device) % config.init_interval == 0
    logits = (config.init_logit * (2 * computed.float() - 1))[:, None].repeat(1, len(names)).requires_grad_()
    optimizer = torch.optim.SGD([logits], lr=config.lr, momentum=config.momentum)
    budget = None if config.target_reuse is None else round((1 - config.target_reuse) * logits[1:].numel())
    router = _router(logits, config, names, budget)
    result = TrainResult(router=router)
    validation = _validation_set(model, sampler, config, shape, num_classes, device)
    lam = torch.ones(config.num_steps)
    bar = tqdm(total=config.iterations, desc="router", disable=not progress)
    for it in range(config.iterations + 1):
        computes = router.computes()  # training's hard gates are inference's, budget included
        if it % config.validate_every == 0 or it == config.iterations:
            _keep_if_best(result, router, it, _final_error(student, sampler, computes.to(device), *validation))
        if it == config.iterations:
            break
        if it % config.lambda_every == 0:
            lam = estimate_lambdas(student, sampler, computes, *draw(config.lambda_batch))
            result.lambda_iterations.append(it)
            result.lambdas.append(lam)
        optimizer.zero_grad()
        objective = _iteration(model, student, sampler, logits, computes.to(device), lam.to(device), config,
                               *draw(config.batch))
        logits.grad /= logits.grad[1:].pow(2).mean().sqrt().clamp_min(1e-30)  # one scale for every logit
        optimizer.step()
        if budget is not None:
            _center(logits, budget)
        router = _router(logits, config, names, budget)
        result.objectives.append(objective)
        result.reused.append(1.0 - computes[1:].float().mean().item())
        bar.set_postfix(objective=f"{objective:.4g}", reused=f"{result.reused[-1]:.0%}")
        bar.update()
    bar.close()
    if path is not None:
        result.router.save(path)
    return result


def _iteration(model: Callable[..., torch.Tensor], student: Student, sampler: Sampler, logits: torch.Tensor,
               computes: torch.Tensor, lam: torch.Tensor, config: TrainConfig, noise: torch.Tensor,
               labels: torch.Tensor) -> float:
    """One SDT pass with hard gates `computes` ([T, B] bool): teacher and student trajectories;
    accumulates the logits' gradient; the objective."""
    teacher = _teacher(model, sampler, noise, labels)
    student.reset()
    x, objective, pairs = noise, 0.0, (config.num_steps - 1) * logits.shape[1]
    for s, coeffs in enumerate(sampler.coefficients()):
        soft = torch.sigmoid(logits[s])
        student.gates = None if s == 0 else computes[s].float() + soft - soft.detach()  # step 0 fills the cache
        x = sampler.step(student, x.detach(), labels, coeffs)
        loss = lam[s] * (x - teacher[s]).pow(2).mean()
        if s > 0:
            loss = loss + config.beta * soft.sum() / pairs
            (grad,) = torch.autograd.grad(loss, logits)
            logits.grad = grad if logits.grad is None else logits.grad + grad
        objective += loss.item()
    student.gates = None
    student.reset()
    return objective


@torch.no_grad()
def _teacher(model: Callable[..., torch.Tensor], sampler: Sampler, noise: torch.Tensor,
             labels: torch.Tensor) -> list[torch.Tensor]:
    """The uncached trajectory: x after each step."""
    xs, x = [], noise
    for coeffs in sampler.coefficients():
        x = sampler.step(model, x, labels, coeffs)
        xs.append(x)
    return xs


def _validation_set(model: Callable[..., torch.Tensor], sampler: Sampler, config: TrainConfig,
                    shape: tuple[int, ...], num_classes: int, device: torch.device) -> tuple[torch.Tensor, ...]:
    """(noise, labels, the teacher's final sample): fixed, from a generator apart from the training noise."""
    gen = torch.Generator().manual_seed(config.seed + 1)
    noise, labels = _draw(gen, config.validate_batch, shape, num_classes, device)
    return noise, labels, _teacher(model, sampler, noise, labels)[-1]


def _draw(gen: torch.Generator, n: int, shape: tuple[int, ...], num_classes: int,
          device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """n noise samples of `shape` and n random class labels, from `gen` (on the CPU: reproducible)."""
    return (torch.randn((n, *shape), generator=gen).to(device),
            torch.randint(0, num_classes, (n,), generator=gen).to(device))


@torch.no_grad()
def _final_error(student: Student, sampler: Sampler, computes: torch.Tensor, noise: torch.Tensor,
                 labels: torch.Tensor, target: torch.Tensor) -> float:
    """Mean squared error of the final sample under the hard gates `computes`, against `target`."""
    student.reset()
    x = noise
    for s, coeffs in enumerate(sampler.coefficients()):
        student.gates = None if s == 0 else computes[s].float()
        x = sampler.step(student, x, labels, coeffs)
    student.gates = None
    student.reset()
    return (x - target).pow(2).mean().item()


def _keep_if_best(result: TrainResult, router: Router, iteration: int, error: float) -> None:
    best = result.validation.get(result.best_iteration)
    result.validation[iteration] = error
    if best is None or error < best:
        result.router, result.best_iteration = router, iteration


def _center(logits: torch.Tensor, budget: int) -> None:
    """Shift the logits of steps >= 1 so the budget's boundary (between the n-th and (n+1)-th highest)
    is at 0: the sigmoid's steepest point, where the straight-through gradient is largest."""
    with torch.no_grad():
        flat = logits[1:].flatten().sort(descending=True).values
        edges = flat[max(budget - 1, 0):budget + 1]
        logits[1:] -= edges.mean()


def _example(noise: torch.Tensor, labels: torch.Tensor, sampler: Sampler) -> tuple[torch.Tensor, ...]:
    t = torch.zeros(len(labels), dtype=torch.long, device=noise.device)
    if sampler.cfg_scale == 1.0:
        return noise, t, labels
    null = torch.full_like(labels, sampler.null_label)
    return torch.cat([noise, noise]), torch.cat([t, t]), torch.cat([labels, null])


def _router(logits: torch.Tensor, config: TrainConfig, names: list[str], budget: int | None) -> Router:
    gates = torch.sigmoid(logits.detach()).cpu()
    return Router(gates, config.threshold, names) if budget is None else _budget_router(gates, budget, names)


def _budget_router(gates: torch.Tensor, n: int, names: list[str]) -> Router:
    """The router computing exactly the n highest gates of steps >= 1, ties to the earlier (step,
    branch) pair: thresholded at the n-th highest gate. A threshold cannot split equal gates, so those
    tied with the n-th but not among the n are lowered by one float32 ulp (at the start, every gate
    of a FORA step is equal)."""
    flat = gates[1:].view(-1)  # a view: lowering its gates lowers the router's
    order = torch.argsort(flat, descending=True, stable=True)
    top = flat[order[n - 1]] if n else torch.nextafter(flat.max(), torch.tensor(1.0))
    flat[order[n:]] = flat[order[n:]].clamp(max=torch.nextafter(top, torch.tensor(0.0)))
    return Router(gates, top.item(), names)
