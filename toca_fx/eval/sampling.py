"""Deterministic DDIM sampling (eta = 0) with classifier-free guidance, for any `model(x, t, y) -> eps`.

Each denoising step makes exactly one model call: with guidance, the conditional and null-label halves
go through together as one batch of 2B. The caching backend counts calls as steps, so this matters.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from tqdm import tqdm

TRAIN_TIMESTEPS = 1000
DEFAULT_STEPS = 25
DEFAULT_CFG_SCALE = 1.5

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


def alphas_cumprod(schedule: str = "linear", timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """alpha_bar_t for t = 0..timesteps-1 (float64): DDPM's linear betas, or the cosine schedule."""
    if schedule == "linear":
        betas = torch.linspace(1e-4, 0.02, timesteps, dtype=torch.float64)
        return torch.cumprod(1.0 - betas, dim=0)
    if schedule == "cosine":
        # Nichol & Dhariwal (2021): alpha_bar follows cos^2, betas capped at 0.999.
        s = torch.arange(timesteps + 1, dtype=torch.float64) / timesteps
        f = torch.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2
        betas = (1 - f[1:] / f[:-1]).clamp(max=0.999)
        return torch.cumprod(1.0 - betas, dim=0)
    raise ValueError(f"schedule must be 'linear' or 'cosine', got {schedule!r}")


def ddim_timesteps(steps: int, timesteps: int = TRAIN_TIMESTEPS) -> torch.Tensor:
    """`steps` training timesteps from timesteps-1 down to 0, evenly spaced (the first is pure noise)."""
    if not 1 <= steps <= timesteps:
        raise ValueError(f"steps must be in [1, {timesteps}], got {steps}")
    return torch.linspace(timesteps - 1, 0, steps, dtype=torch.float64).round().long()


def _initial_noise(shape: tuple[int, ...], seed: int | torch.Generator, device: torch.device) -> torch.Tensor:
    # Drawn on the CPU, so that a seed gives the same samples on every device.
    gen = seed if isinstance(seed, torch.Generator) else torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=gen, dtype=torch.float32).to(device)


def _guided_eps(
    model: Model, x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor, null: torch.Tensor | None,
    cfg_scale: float, dtype: torch.dtype,
) -> torch.Tensor:
    if null is None:
        return model(x.to(dtype), t, labels).float()
    eps = model(torch.cat([x, x]).to(dtype), torch.cat([t, t]), torch.cat([labels, null])).float()
    cond, uncond = eps.chunk(2)
    return uncond + cfg_scale * (cond - uncond)


def _null_labels(model: Model, labels: torch.Tensor, null_label: int | None) -> torch.Tensor:
    if null_label is None:
        null_label = getattr(model, "num_classes", None)
        if null_label is None:
            raise ValueError("classifier-free guidance needs null_label (the model has no num_classes)")
    return torch.full_like(labels, null_label)


@torch.no_grad()
def ddim_sample(
    model: Model,
    labels: torch.Tensor,
    shape: tuple[int, ...],
    *,
    steps: int = DEFAULT_STEPS,
    cfg_scale: float = DEFAULT_CFG_SCALE,
    null_label: int | None = None,
    schedule: str = "linear",
    seed: int | torch.Generator = 0,
    noise: torch.Tensor | None = None,
    clip_x0: bool = True,
    dtype: torch.dtype = torch.float32,
    progress: bool = False,
) -> torch.Tensor:
    """Sample images [B, *shape] for int `labels` [B] by deterministic DDIM, one model call per step.

    cfg_scale != 1 runs classifier-free guidance with `null_label` (default: `model.num_classes`, the
    DiT convention). The start noise comes from `seed` (an int or a CPU generator) unless `noise` is
    given. `clip_x0` clamps each step's x0 prediction to [-1, 1] and re-derives eps from it, as pixel-space
    samplers do (ADM): without it a rare digits sample blows up a corner pixel, more so under guidance;
    pass False for latent models. `dtype` is what the model is fed; the sampler's own arithmetic stays in float32.
    """
    device = labels.device
    a_bar = alphas_cumprod(schedule)
    ts = ddim_timesteps(steps, len(a_bar))
    x = noise.float().to(device) if noise is not None else _initial_noise((len(labels), *shape), seed, device)
    null = None if cfg_scale == 1.0 else _null_labels(model, labels, null_label)
    for i, t in enumerate(tqdm(ts.tolist(), desc="sampling", disable=not progress)):
        a_t = a_bar[t].item()
        a_prev = a_bar[ts[i + 1]].item() if i + 1 < len(ts) else 1.0
        t_batch = torch.full((len(labels),), t, dtype=torch.long, device=device)
        eps = _guided_eps(model, x, t_batch, labels, null, cfg_scale, dtype)
        x = ddim_update(x, eps, a_t, a_prev, clip_x0)
    return x


def ddim_update(x: torch.Tensor, eps: torch.Tensor, a_t: float, a_prev: float, clip_x0: bool) -> torch.Tensor:
    """x at the next step from the model's eps at alpha_bar `a_t` (eta = 0); `clip_x0` clamps the x0
    prediction to [-1, 1] and re-derives eps from it."""
    x0 = (x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)
    if clip_x0:
        x0 = x0.clamp(-1, 1)
        eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)
    return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps
