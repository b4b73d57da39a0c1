"""Sample-quality metrics: a digits classifier (accuracy, Frechet distance in its feature space), and
PSNR, SSIM and relative L2 between two batches of images (cached against uncached samples, say).

Images are [B, C, H, W] in [-1, 1] unless a data range says otherwise; pairwise metrics return one value
per image, [B].
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F


class DigitClassifier(nn.Module):
    """A small CNN for the 10 digits at the generator's resolution (a multiple of 4).

    Its penultimate activations are the feature space of `digits_frechet_distance`; the buffers `ref_mu`
    and `ref_cov` hold the statistics of the real digits there, so they travel with the checkpoint.
    """

    def __init__(self, resolution: int = 16, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()

        def stage(cin: int, cout: int) -> list[nn.Module]:
            return [nn.Conv2d(cin, cout, 3, padding=1), nn.ReLU(), nn.Conv2d(cout, cout, 3, padding=1),
                    nn.ReLU(), nn.MaxPool2d(2)]

        self.body = nn.Sequential(
            *stage(1, width), *stage(width, 2 * width), nn.Flatten(),
            nn.Linear(2 * width * (resolution // 4) ** 2, feature_dim), nn.ReLU(),
        )
        self.head = nn.Sequential(nn.Dropout(0.2), nn.Linear(feature_dim, num_classes))
        self.register_buffer("ref_mu", torch.zeros(feature_dim, dtype=torch.float64))
        self.register_buffer("ref_cov", torch.eye(feature_dim, dtype=torch.float64))

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x))


def _batched(fn: Callable[[torch.Tensor], torch.Tensor], images: torch.Tensor, batch_size: int) -> torch.Tensor:
    return torch.cat([fn(chunk) for chunk in images.split(batch_size)])


@torch.no_grad()
def classifier_accuracy(
    classifier: DigitClassifier, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500
) -> float:
    """Fraction of `images` that the classifier assigns to their `labels`."""
    classifier.eval()
    device = next(classifier.parameters()).device
    logits = _batched(lambda b: classifier(b.to(device).float()).cpu(), images, batch_size)
    return (logits.argmax(dim=1) == labels.cpu()).float().mean().item()


@torch.no_grad()
def classifier_features(classifier: DigitClassifier, images: torch.Tensor, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features [B, F] (float64, on the CPU)."""
    classifier.eval()
    device = next(classifier.parameters()).device
    return _batched(lambda b: classifier.features(b.to(device).float()).cpu(), images, batch_size).double()


def feature_statistics(features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean [F] and unbiased covariance [F, F] of features [N, F], in float64."""
    features = features.double()
    return features.mean(dim=0), torch.cov(features.T)


def _psd_sqrt(m: torch.Tensor) -> torch.Tensor:
    w, v = torch.linalg.eigh(m)
    return (v * w.clamp(min=0).sqrt()) @ v.T


def frechet_distance(
    mu1: torch.Tensor, cov1: torch.Tensor, mu2: torch.Tensor, cov2: torch.Tensor
) -> float:
    """Frechet distance between Gaussians: |mu1 - mu2|^2 + tr(C1 + C2 - 2 (C1 C2)^(1/2)).

    tr (C1 C2)^(1/2) = tr (C1^(1/2) C2 C1^(1/2))^(1/2), a symmetric PSD matrix, so two eigen-decompositions
    replace scipy's general matrix square root.
    """
    mu1, cov1, mu2, cov2 = (a.double() for a in (mu1, cov1, mu2, cov2))
    s1 = _psd_sqrt(cov1)
    middle = s1 @ cov2 @ s1
    tr_sqrt = torch.linalg.eigvalsh((middle + middle.T) / 2).clamp(min=0).sqrt().sum()
    return ((mu1 - mu2).square().sum() + cov1.trace() + cov2.trace() - 2 * tr_sqrt).item()


def digits_frechet_distance(classifier: DigitClassifier, images: torch.Tensor) -> float:
    """Frechet distance of `images` to the real digits, in the classifier's feature space."""
    return features_frechet_distance(classifier, classifier_features(classifier, images))


def features_frechet_distance(classifier: DigitClassifier, features: torch.Tensor) -> float:
    """Frechet distance of classifier features [N, F] to the real digits' (the classifier's reference)."""
    return frechet_distance(*feature_statistics(features), classifier.ref_mu.cpu(), classifier.ref_cov.cpu())


def psnr(a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0) -> torch.Tensor:
    """Peak signal-to-noise ratio in dB per image (inf where the images are equal)."""
    mse = (a.double() - b.double()).square().flatten(1).mean(dim=1)
    return 10 * torch.log10(data_range**2 / mse)


def relative_l2(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """|a - b| / |b| per image: the error of `a` relative to the reference `b`."""
    diff = (a.double() - b.double()).flatten(1).norm(dim=1)
    return diff / b.double().flatten(1).norm(dim=1)


def _gaussian_window(size: int, sigma: float) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    g = torch.exp(-coords.square() / (2 * sigma**2))
    return g / g.sum()


def ssim(
    a: torch.Tensor, b: torch.Tensor, data_range: float = 2.0, window_size: int = 11, sigma: float = 1.5
) -> torch.Tensor:
    """Structural similarity per image (Wang et al. 2004): Gaussian window, valid filtering, mean over
    channels and positions. The window shrinks to the largest odd size that fits small images."""
    a, b = a.double(), b.double()
    channels, h, w = a.shape[1:]
    size = min(window_size, h, w)
    size -= 1 - size % 2
    g = _gaussian_window(size, sigma).to(a.device)
    kernel = (g[:, None] * g[None, :]).expand(channels, 1, size, size)

    def blur(x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, kernel, groups=channels)

    mu_a, mu_b = blur(a), blur(b)
    var_a = blur(a * a) - mu_a.square()
    var_b = blur(b * b) - mu_b.square()
    cov = blur(a * b) - mu_a * mu_b
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    num = (2 * mu_a * mu_b + c1) * (2 * cov + c2)
    den = (mu_a.square() + mu_b.square() + c1) * (var_a + var_b + c2)
    return (num / den).flatten(1).mean(dim=1)
