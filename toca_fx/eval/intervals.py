"""Percentile-bootstrap 95% intervals over samples, single and paired.

Paired: sample i of two image sets comes from the same noise and label, so both sets are resampled at
the same indices and the interval is that of the difference, much narrower than either set's own.
"""
from __future__ import annotations

from typing import Callable

import torch

from .metrics import feature_statistics, frechet_distance

Interval = tuple[float, float, float]  # (estimate on all samples, low, high)


def bootstrap_indices(n: int, resamples: int = 1000, seed: int = 0) -> torch.Tensor:
    """[resamples, n] indices drawn with replacement from a seeded CPU generator."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, n, (resamples, n), generator=gen)


def percentile_interval(estimate: float, replicates: torch.Tensor, level: float = 0.95) -> Interval:
    """(estimate, low, high) with the bounds at the (1 -/+ level) / 2 quantiles of the replicates."""
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    low, high = torch.quantile(replicates.double(), q).tolist()
    return estimate, low, high


def bootstrap(stat: Callable[[torch.Tensor], float], n: int, resamples: int = 1000, seed: int = 0,
              level: float = 0.95) -> Interval:
    """Interval of `stat(indices)`, a statistic of the samples at `indices`, over bootstrap resamples."""
    replicates = torch.tensor([stat(idx) for idx in bootstrap_indices(n, resamples, seed)], dtype=torch.float64)
    return percentile_interval(stat(torch.arange(n)), replicates, level)


def mean_interval(values: torch.Tensor, resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of the mean of per-sample `values` [N]."""
    values = values.double()
    replicates = values[bootstrap_indices(len(values), resamples, seed)].mean(dim=1)
    return percentile_interval(values.mean().item(), replicates, level)


def paired_mean_difference(a: torch.Tensor, b: torch.Tensor, resamples: int = 1000, seed: int = 0,
                           level: float = 0.95) -> Interval:
    """Interval of mean(a) - mean(b) for paired per-sample values (the mean of a - b)."""
    if a.shape != b.shape:
        raise ValueError(f"paired values need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")
    return mean_interval(a.double() - b.double(), resamples, seed, level)


def frechet_to(features: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor) -> float:
    """Frechet distance of features [N, F] to the Gaussian (mu, cov)."""
    return frechet_distance(*feature_statistics(features), mu, cov)


def frechet_interval(features: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor, resamples: int = 1000,
                     seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of the Frechet distance of features [N, F] to the reference (mu, cov)."""
    return bootstrap(lambda idx: frechet_to(features[idx], mu, cov), len(features), resamples, seed, level)


def paired_frechet_difference(a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor, cov: torch.Tensor,
                              resamples: int = 1000, seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of FD(a) - FD(b) for paired features [N, F], both resampled at the same indices."""
    if a.shape != b.shape:
        raise ValueError(f"paired features need equal shapes, got {tuple(a.shape)} and {tuple(b.shape)}")

    def gap(idx: torch.Tensor) -> float:
        return frechet_to(a[idx], mu, cov) - frechet_to(b[idx], mu, cov)

    return bootstrap(gap, len(a), resamples, seed, level)


def excludes_zero(interval: Interval) -> bool:
    """Whether the interval lies wholly on one side of 0 (the difference is beyond the noise)."""
    return interval[1] > 0 or interval[2] < 0
