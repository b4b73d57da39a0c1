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
