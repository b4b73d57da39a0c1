import math

import pytest
import torch

from toca_fx.eval.metrics import (
    DigitClassifier,
    classifier_accuracy,
    feature_statistics,
    frechet_distance,
    psnr,
    relative_l2,
    ssim,
)


def images(seed: int, n: int = 4, size: int = 16) -> torch.Tensor:
    return torch.rand(n, 1, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def random_cov(seed: int, dim: int) -> torch.Tensor:
    a = torch.randn(dim, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return a @ a.T + 0.1 * torch.eye(dim, dtype=torch.float64)


def test_psnr_identical_is_inf_and_known_pair():
    x = images(0)
    assert torch.isinf(psnr(x, x)).all()
    a, b = torch.zeros(2, 1, 8, 8), torch.full((2, 1, 8, 8), 0.1)
    # MSE 0.01, peak 2 (images in [-1, 1]): 10 log10(4 / 0.01).
    torch.testing.assert_close(psnr(a, b), torch.full((2,), 10 * math.log10(400), dtype=torch.float64))
    assert psnr(a, b, data_range=1.0)[0].item() == pytest.approx(20.0)


def test_relative_l2():
    b = images(1)
    torch.testing.assert_close(relative_l2(1.1 * b, b), torch.full((4,), 0.1, dtype=torch.float64))
    assert (relative_l2(b, b) == 0).all()


def test_ssim_identical_is_one_noise_is_low():
    x = images(2)
    torch.testing.assert_close(ssim(x, x), torch.ones(4, dtype=torch.float64))
    assert (ssim(x, images(3)).abs() < 0.15).all()
    torch.testing.assert_close(ssim(x, images(3)), ssim(images(3), x))
    # A small perturbation keeps SSIM high, a large one does not.
    assert (ssim(x, x + 0.05 * images(4)) > 0.95).all()
    assert (ssim(x, x + 1.0 * images(4)) < ssim(x, x + 0.3 * images(4))).all()


def test_ssim_of_constant_images_is_the_luminance_term():
    # No variance: SSIM = (2 a b + C1) / (a^2 + b^2 + C1), C1 = (0.01 * 2)^2; window shrinks to fit 8x8.
    a, b = torch.full((1, 1, 8, 8), 0.3), torch.full((1, 1, 8, 8), -0.2)
    c1 = 0.02**2
    expected = (2 * 0.3 * -0.2 + c1) / (0.3**2 + 0.2**2 + c1)
    assert ssim(a, b).item() == pytest.approx(expected, rel=1e-5)


def test_frechet_distance_of_a_gaussian_to_itself_is_zero():
    mu, cov = torch.randn(6, dtype=torch.float64), random_cov(0, 6)
    assert frechet_distance(mu, cov, mu, cov) == pytest.approx(0.0, abs=1e-8)


def test_frechet_distance_equal_covariances_is_mean_distance():
    mu1, cov = torch.zeros(6, dtype=torch.float64), random_cov(1, 6)
    mu2 = torch.arange(6, dtype=torch.float64)
    assert frechet_distance(mu1, cov, mu2, cov) == pytest.approx(55.0, rel=1e-8)


def test_frechet_distance_closed_forms_for_covariances():
    zero = torch.zeros(2, dtype=torch.float64)
    # Diagonal: sum (sqrt s1 - sqrt s2)^2.
    d1, d2 = torch.tensor([4.0, 9.0], dtype=torch.float64), torch.tensor([1.0, 1.0], dtype=torch.float64)
    assert frechet_distance(zero, d1.diag(), zero, d2.diag()) == pytest.approx(1.0 + 4.0)
    # 2x2, not commuting: tr sqrt(M) = sqrt(tr M + 2 sqrt(det M)) for M = C1 C2.
    c1, c2 = random_cov(2, 2), random_cov(3, 2)
    m = c1 @ c2
    tr_sqrt = math.sqrt(m.trace().item() + 2 * math.sqrt(torch.linalg.det(m).item()))
    expected = (c1.trace() + c2.trace()).item() - 2 * tr_sqrt
    assert frechet_distance(zero, c1, zero, c2) == pytest.approx(expected, rel=1e-8)
    assert frechet_distance(zero, c2, zero, c1) == pytest.approx(expected, rel=1e-8)


def test_feature_statistics_of_samples_recover_the_gaussian():
    gen = torch.Generator().manual_seed(5)
    cov = random_cov(4, 3)
    samples = torch.randn(20000, 3, generator=gen, dtype=torch.float64) @ torch.linalg.cholesky(cov).T + 2.0
    mu, est = feature_statistics(samples)
    torch.testing.assert_close(mu, torch.full((3,), 2.0, dtype=torch.float64), rtol=0, atol=0.1)
    assert frechet_distance(mu, est, torch.full((3,), 2.0, dtype=torch.float64), cov) < 0.05


def test_classifier_shapes_and_accuracy():
    clf = DigitClassifier(resolution=16, feature_dim=64).eval()
    x = images(6, n=5)
    assert clf(x).shape == (5, 10) and clf.features(x).shape == (5, 64)
    predicted = clf(x).argmax(dim=1)
    assert classifier_accuracy(clf, x, predicted) == 1.0
    assert classifier_accuracy(clf, x, (predicted + 1) % 10) == 0.0
