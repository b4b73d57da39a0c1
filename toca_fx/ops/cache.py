"""The cache's functions that the rewrite inserts into graphs: gathering rows of the chosen tokens,
scattering recomputed rows into a cache, filling a cache. Plain torch code: Inductor traces through
them, and the printed graph names them (`scatter_rows`, `store`, ...).
"""
from __future__ import annotations

import torch


def gather_rows(x: torch.Tensor, dim: int, idx: torch.Tensor) -> torch.Tensor:
    """The rows of the chosen tokens."""
    return x.index_select(dim, idx)


def no_rows(x: torch.Tensor) -> torch.Tensor:
    """An empty token choice: a joint attention computes only the other stream's rows."""
    return torch.empty(0, dtype=torch.long, device=x.device)


def joint_rows(idx: torch.Tensor, start: int, n: int, total: int) -> torch.Tensor:
    """Positions along a joint token axis (another stream's rows around this stream's n rows at
    `start`): the other stream's rows whole, this stream's chosen rows."""
    before = torch.arange(start, device=idx.device)
    after = torch.arange(start + n, total, device=idx.device)
    return torch.cat([before, idx + start, after])


def scatter_rows(cache: torch.Tensor, dim: int, idx: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Write recomputed rows into the cache (in place) and return the updated cache."""
    return cache.index_copy_(dim, idx, rows.to(cache.dtype))


def store(cache: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Fill a cache buffer on a full step."""
    return cache.copy_(value)


# Caches in a narrower dtype than the branch output (`ToCaConfig.cache_dtype`, `rewrite.narrow_caches`): a
# float8 cache keeps one float32 scale per row (its largest magnitude over the format's largest value),
# and holds its elements as uint8 bytes (`fmt` names the format they hold): eager `index_copy_` has no
# float8 kernels, and rows written through a uint8 view of a float8 input are functionalized into a new
# tensor of the whole cache copied back at the end of the graph; into a cache of bytes they are written
# directly, as into a cache in the model's dtype.
FLOAT8_MAX = {torch.float8_e4m3fn: 448.0}
_TINY = 1e-12  # a row of zeros keeps a scale that divides


def _row_scale(value: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    return value.abs().amax(-1, keepdim=True).float().clamp_min(_TINY) / FLOAT8_MAX[fmt]


def _to_bytes(value: torch.Tensor, scale: torch.Tensor, fmt: torch.dtype) -> torch.Tensor:
    return (value.float() / scale).to(fmt).view(torch.uint8)


def store_scaled(cache: torch.Tensor, scale: torch.Tensor | None, value: torch.Tensor,
                 fmt: torch.dtype | None = None) -> torch.Tensor:
    """Fill a narrow cache on a full step: rounded to its dtype, or where it has row scales to the
    float8 format `fmt`, its bytes."""
    if scale is None:
        return cache.copy_(value)
    s = _row_scale(value, fmt)
    scale.copy_(s)
    return cache.copy_(_to_bytes(value, s, fmt))


def load(cache: torch.Tensor, scale: torch.Tensor | None, dtype: torch.dtype, fmt: torch.dtype | None = None) -> torch.Tensor:
    """A narrow cache read back in the branch output's `dtype` (a scaled cache's bytes as `fmt`)."""
    if scale is None:
        return cache.to(dtype)
    return (cache.view(fmt).float() * scale).to(dtype)


def scatter_scaled(cache: torch.Tensor, scale: torch.Tensor | None, dim: int, idx: torch.Tensor, rows: torch.Tensor,
                   dtype: torch.dtype, fmt: torch.dtype | None = None) -> torch.Tensor:
    """Write recomputed rows into a narrow cache (in place); the cache read back in `dtype`, with the
    recomputed rows as computed (not rounded to the cache's dtype)."""
    if scale is None:
        cache.index_copy_(dim, idx, rows.to(cache.dtype))
    else:
        s = _row_scale(rows, fmt)
        scale.index_copy_(dim, idx, s)
        cache.index_copy_(dim, idx, _to_bytes(rows, s, fmt))
    return load(cache, scale, dtype, fmt).index_copy(dim, idx, rows.to(dtype))
