"""benchmarks/policies_quality.py's paired comparison of Frechet distances."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import torch

from toca_fx.eval.metrics import digits_frechet_distance
from toca_fx.models.digits import digits_dataset, load_digits_classifier

_spec = importlib.util.spec_from_file_location("policies_quality", Path(__file__).parents[1] / "benchmarks" / "policies_quality.py")
quality = sys.modules["policies_quality"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)


def test_paired_fd_gap_is_the_difference_with_an_interval_around_it():
    classifier = load_digits_classifier()
    real = digits_dataset()[0][:300]
    blurred = torch.nn.functional.avg_pool2d(real, 3, stride=1, padding=1)  # the same digits, worse
    gap, low, high = quality.paired_fd_gap(classifier, blurred, real, resamples=50)
    expected = digits_frechet_distance(classifier, blurred) - digits_frechet_distance(classifier, real)
    assert abs(gap - expected) < 1e-6 * max(1.0, abs(expected))
    assert 0 < low < gap < high  # blurring is clearly worse, and the interval brackets the estimate

    same = quality.paired_fd_gap(classifier, real, real, resamples=20)
    assert same == (0.0, 0.0, 0.0)  # paired: identical sets differ by exactly 0 on every resample
