"""Taylor forecasting of cached branch outputs (TaylorSeer, arXiv 2503.06923), as functions graphs call.

A branch keeps factors f_0..f_n (f_0 is its cache, in the model's dtype; f_1..f_n in the forecast
dtype) and `meta` = [step of its last fill, factors held]. `clock` = [this call's step in its
generation], written by the runtime before each call, so the step distance is a tensor: no guards,
no recompiles per step.

- A fill at step s, d = s - (last fill's step): f_0 = F; f_{i+1} = (f_i(new) - f_i(old)) / d where the
  old f_i was held, else 0. A step that is not after the last fill (a new generation) holds nothing.
- A forecast at distance k = s - (last fill's step): F_hat = sum_i f_i k^i / i!.
- The hybrid's chosen rows, computed exactly (F_r) at distance k: the top factor's rows absorb the
  residual, f_n += n! / k^n (F_r - F_hat_r), so their forecast passes through F_r at k and continues
  from there with the lower factors kept; their anchor stays the last fill.
Arithmetic in float32; results cast to the buffers' dtypes.
"""
from __future__ import annotations

import math

import torch


def taylor_fill(clock: torch.Tensor, meta: torch.Tensor, cache: torch.Tensor, factors: tuple[torch.Tensor, ...],
                value: torch.Tensor) -> torch.Tensor:
    """Store `value` as f_0 and update the higher factors by divided differences (in place)."""
    step, last = clock[0], meta[0]
    held = torch.where(step > last, meta[1], torch.zeros_like(meta[1]))
    d = torch.clamp(step - last, min=1.0)
    old = [cache.float(), *(f.float() for f in factors[:-1])]
    new = [value.float()]
    for i in range(len(factors)):
        diff = (new[i] - old[i]) / d
        new.append(torch.where(held > i, diff, torch.zeros_like(diff)))
    for factor, fresh in zip(factors, new[1:]):
        factor.copy_(fresh)
    cache.copy_(value)
    meta.copy_(torch.stack([step, torch.clamp(held + 1, max=len(factors) + 1)]))
    return cache


def taylor_forecast(clock: torch.Tensor, meta: torch.Tensor, cache: torch.Tensor,
                    factors: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """F_hat = sum_i f_i k^i / i!, k the steps since the last fill, in the cache's dtype."""
    return _expand(clock[0] - meta[0], [cache, *factors]).to(cache.dtype)


def taylor_refresh_rows(clock: torch.Tensor, meta: torch.Tensor, cache: torch.Tensor,
                        factors: tuple[torch.Tensor, ...], dim: int, idx: torch.Tensor,
                        out: torch.Tensor) -> torch.Tensor:
    """The chosen rows `idx` of the top factor corrected so that their forecast equals `out`'s rows
    (computed exactly this step); returns the top factor (updated in place)."""
    k = torch.clamp(clock[0] - meta[0], min=1.0)
    rows = [f.index_select(dim, idx) for f in (cache, *factors)]
    residual = out.index_select(dim, idx).float() - _expand(k, rows)
    n, top = len(factors), factors[-1]
    fixed = top.index_select(dim, idx).float() + residual * (math.factorial(n) / k**n)
    return top.index_copy_(dim, idx, fixed.to(top.dtype))


def _expand(k: torch.Tensor, factors: list[torch.Tensor]) -> torch.Tensor:
    out = factors[0].float()
    for i, f in enumerate(factors[1:], 1):
        out = out + f.float() * (k**i / math.factorial(i))
    return out
