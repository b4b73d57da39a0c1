"""Bootstrap intervals (toca_fx.eval.intervals) and the per-sample quality records against hand computations."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from toca_fx.eval.intervals import (
    bootstrap, bootstrap_indices, excludes_zero, frechet_interval, frechet_to, mean_interval,
    paired_frechet_difference, paired_mean_difference, percentile_interval,
)
from toca_fx.eval.metrics import DigitClassifier, feature_statistics, frechet_distance
from toca_fx.eval.quality import PSNR_CAP, compare, record, summarize


def values(seed: int, n: int = 50) -> torch.Tensor:
    return torch.randn(n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_indices_are_seeded_and_in_range():
    a, b = bootstrap_indices(10, 30, seed=1), bootstrap_indices(10, 30, seed=1)
    assert a.shape == (30, 10) and torch.equal(a, b)
    assert a.min() >= 0 and a.max() < 10
    assert not torch.equal(a, bootstrap_indices(10, 30, seed=2))


def test_mean_interval_matches_a_hand_loop_and_numpy_percentiles():
    v = values(0)
    est, low, high = mean_interval(v, resamples=200, seed=3)
    means = np.array([v[idx].mean().item() for idx in bootstrap_indices(len(v), 200, seed=3)])
    assert est == pytest.approx(v.mean().item(), abs=1e-12)
    assert low == pytest.approx(np.percentile(means, 2.5), abs=1e-12)
    assert high == pytest.approx(np.percentile(means, 97.5), abs=1e-12)
    assert low < est < high


def test_percentile_interval_of_known_replicates():
    # Quantiles of 0..100 by linear interpolation are 2.5 and 97.5.
    assert percentile_interval(50.0, torch.arange(101.0)) == pytest.approx((50.0, 2.5, 97.5))


def test_paired_difference_of_a_constant_shift_is_exact():
    v = values(1)
    assert paired_mean_difference(v + 0.25, v, resamples=50) == pytest.approx((0.25, 0.25, 0.25), abs=1e-12)
    with pytest.raises(ValueError):
        paired_mean_difference(v, v[:-1])


def test_paired_interval_is_narrower_than_either_mean_when_pairs_correlate():
    v = values(2)
    w = v + 0.1 + 0.05 * values(3)
    est, low, high = paired_mean_difference(w, v, resamples=300)
    assert est == pytest.approx((w - v).mean().item())
    _, a_low, a_high = mean_interval(w, resamples=300)
    assert high - low < (a_high - a_low) / 5
    assert excludes_zero((est, low, high))


def test_bootstrap_of_a_statistic_calls_it_on_every_resample():
    v = values(4, n=20)
    est, low, high = bootstrap(lambda idx: v[idx].max().item(), 20, resamples=100, seed=0)
    maxima = torch.tensor([v[idx].max().item() for idx in bootstrap_indices(20, 100, seed=0)])
    assert est == v.max().item() and high <= v.max().item()
    assert low == pytest.approx(torch.quantile(maxima, 0.025).item())


def test_frechet_interval_and_paired_difference():
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(200, 3, generator=gen, dtype=torch.float64)
    mu, cov = torch.zeros(3, dtype=torch.float64), torch.eye(3, dtype=torch.float64)
    est, low, high = frechet_interval(a, mu, cov, resamples=50)
    assert est == pytest.approx(frechet_distance(*feature_statistics(a), mu, cov))
    assert 0 < low < high  # resampling duplicates inflate FD: the percentile interval need not hold est
    assert paired_frechet_difference(a, a, mu, cov, resamples=20) == (0.0, 0.0, 0.0)
    shifted = a + 1.0  # mean moves by 1 per dimension: FD up by exactly 3 on every resample
    gap = paired_frechet_difference(shifted, a, mu, cov, resamples=20)
    assert gap[0] == pytest.approx(frechet_to(shifted, mu, cov) - frechet_to(a, mu, cov))
    assert 2 < gap[1] <= gap[0] <= gap[2] < 4  # 3 + 2 sum(mean of a), the mean near 0


def test_excludes_zero():
    assert excludes_zero((1.0, 0.5, 2.0)) and excludes_zero((-1.0, -2.0, -0.1))
    assert not excludes_zero((0.1, -0.2, 0.4)) and not excludes_zero((0.0, 0.0, 0.0))


def test_records_summaries_and_comparisons():
    torch.manual_seed(0)
    clf = DigitClassifier(resolution=8, width=4, feature_dim=4, num_classes=3).eval()
    images = torch.rand(12, 1, 8, 8, generator=torch.Generator().manual_seed(1)) * 2 - 1
    labels = torch.arange(12) % 3
    same = record(images, images, labels, clf)
    assert (same["psnr"] == PSNR_CAP).all() and (same["rel_l2"] == 0).all()
    torch.testing.assert_close(same["ssim"], torch.ones(12, dtype=torch.float64))
    predicted = clf(images).argmax(dim=1)
    assert same["correct"].tolist() == (predicted == labels).double().tolist()
    s = summarize(same, clf, resamples=20)
    assert s["accuracy"][0] == pytest.approx((predicted == labels).double().mean().item())
    noisy = record(images + 0.1, images, labels, clf)
    diff = compare(noisy, same, clf, resamples=20)
    assert diff["psnr"][2] < 0 and diff["rel_l2"][1] > 0  # worse on every resample
    assert set(diff) == {"accuracy", "frechet", "psnr", "ssim", "rel_l2"}
