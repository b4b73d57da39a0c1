"""The DDIM trajectory of router training, step by step, as `toca_fx.eval.sampling.ddim_sample` runs it
(eta = 0, batched classifier-free guidance, x0 clipped, the same `ddim_update`), but differentiable and
with the model called per step by the trainer."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..eval.sampling import alphas_cumprod, ddim_timesteps, ddim_update

Model = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class Sampler:
    num_steps: int
    cfg_scale: float = 1.5
    null_label: int = 0
    clip_x0: bool = True
    schedule: str = "linear"

    def coefficients(self) -> list[tuple[int, float, float]]:
        """(t, alpha_bar_t, alpha_bar_prev) per step."""
        a_bar = alphas_cumprod(self.schedule)
        ts = ddim_timesteps(self.num_steps, len(a_bar)).tolist()
        prev = [a_bar[t].item() for t in ts[1:]] + [1.0]
        return [(t, a_bar[t].item(), p) for t, p in zip(ts, prev)]

    def step(
        self, model: Model, x: torch.Tensor, labels: torch.Tensor, coeffs: tuple[int, float, float]
    ) -> torch.Tensor:
        """x of the next step."""
        t, a_t, a_prev = coeffs
        t_batch = torch.full((len(labels),), t, dtype=torch.long, device=x.device)
        if self.cfg_scale == 1.0:
            eps = model(x, t_batch, labels)
        else:
            null = torch.full_like(labels, self.null_label)
            cond, uncond = model(torch.cat([x, x]), torch.cat([t_batch, t_batch]), torch.cat([labels, null])).chunk(2)
            eps = uncond + self.cfg_scale * (cond - uncond)
        eps = eps[:, : x.shape[1]]  # a learned-sigma DiT returns (eps, sigma) along channels
        return ddim_update(x, eps, a_t, a_prev, self.clip_x0)

    def gates_for_batch(self, gates: torch.Tensor | None) -> torch.Tensor | None:
        """Per-sample gates [branches, B] repeated for the two halves of batched guidance."""
        if gates is None or gates.dim() == 1 or self.cfg_scale == 1.0:
            return gates
        return torch.cat([gates, gates], dim=1)
