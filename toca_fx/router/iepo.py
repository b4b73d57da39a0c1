"""HarmoniCa's Image Error Proxy Objective weights: lambda(t), the effect of caching at step t on the
final sample. Estimated under the current router: the same noise is sampled with step t fully reused
and with step t fully computed (every other step as the router decides); lambda(t) is the mean squared
difference of the two final samples. All 2 (T - 1) variants run as one batch, with per-sample gates.
"""
from __future__ import annotations

import torch

from .student import Student
from .trajectory import Sampler

FLOOR = 1e-3  # relative to the largest effect: every step keeps a positive weight


@torch.no_grad()
def estimate_lambdas(student: Student, sampler: Sampler, computes: torch.Tensor, noise: torch.Tensor,
                     labels: torch.Tensor) -> torch.Tensor:
    """lambda(t) for t = 0..T-1 (positive, mean 1 over t >= 1; step 0 always computes and gets 1).
    `computes`: the router's hard decisions [T, branches]."""
    steps, batch = sampler.num_steps, len(labels)
    variants = 2 * (steps - 1)  # (reused at t, computed at t) for t = 1..T-1
    x = noise.repeat(variants, *[1] * (noise.dim() - 1))
    y = labels.repeat(variants)
    student.reset()
    for s, coeffs in enumerate(sampler.coefficients()):
        gates = computes[s].float()[:, None].repeat(1, variants * batch)
        if s > 0:
            first = 2 * (s - 1) * batch
            gates[:, first:first + batch] = 0.0
            gates[:, first + batch:first + 2 * batch] = 1.0
        student.gates = sampler.gates_for_batch(gates)
        x = sampler.step(student, x, y, coeffs)
    student.reset()
    finals = x.reshape(steps - 1, 2, batch, -1)
    effect = (finals[:, 0] - finals[:, 1]).pow(2).mean(dim=(1, 2)).cpu()
    effect = effect + FLOOR * effect.max() + 1e-12
    return torch.cat([torch.ones(1), effect / effect.mean()])
