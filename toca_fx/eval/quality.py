"""What the quality harnesses share: the embedded models by name, sampling from shared noise, per-sample
metrics against the uncached samples, and summaries with bootstrap intervals.

A record is a dict of per-sample tensors for one image set: classifier `features` [N, F] and `correct`
[N], and `psnr`, `ssim`, `rel_l2` [N] against the reference (uncached) samples from the same noise.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from .intervals import (Interval, frechet_interval, mean_interval, paired_frechet_difference,
                        paired_mean_difference)
from .metrics import DigitClassifier, classifier_features, psnr, relative_l2, ssim
from .sampling import ddim_sample

MODELS = ("digits", "glyphs")
PSNR_CAP = 100.0  # dB: identical images would be inf
PAIRED_METRICS = ("accuracy", "psnr", "ssim", "rel_l2")


@dataclass
class QualityModel:
    name: str
    model: torch.nn.Module
    classifier: DigitClassifier
    shape: tuple[int, int, int]
    num_classes: int
    dtype: torch.dtype = torch.float32


def _tiny(name: str) -> tuple[torch.nn.Module, DigitClassifier]:
    """Random small models of the named family at 8x8 (the harness path, for CPU tests)."""
    from ..models.dit import DiT
    from ..models.glyphs import CLASSES, GlyphsDiT

    torch.manual_seed(0)
    if name == "digits":
        model = DiT(input_size=8, patch_size=1, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                    num_classes=10, learn_sigma=False)
        return model, DigitClassifier(resolution=8, width=8, feature_dim=8, num_classes=10)
    model = GlyphsDiT(input_size=8, patch_size=1, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                      num_classes=len(CLASSES), context_tokens=2)
    return model, DigitClassifier(resolution=8, width=8, feature_dim=8, num_classes=len(CLASSES))


def load_quality_model(name: str, device: torch.device | str = "cpu", tiny: bool = False,
                       checkpoint_dir: str | Path | None = None, dtype: torch.dtype = torch.float32) -> QualityModel:
    """The digits or glyphs DiT (weights in `dtype`) with its classifier (`tiny`: random 8x8 stand-ins
    of the same family). `checkpoint_dir` holds `<name>_dit.pt` and `<name>_classifier.pt` (default:
    the package's)."""
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if tiny:
        model, classifier = _tiny(name)
    else:
        ckpt = None if checkpoint_dir is None else Path(checkpoint_dir)
        dit_ckpt = None if ckpt is None else ckpt / f"{name}_dit.pt"
        clf_ckpt = None if ckpt is None else ckpt / f"{name}_classifier.pt"
        if name == "digits":
            from ..models.digits import load_digits_classifier as load_clf, load_digits_dit as load_dit
        else:
            from ..models.glyphs import load_glyphs_classifier as load_clf, load_glyphs_dit as load_dit
        model, classifier = load_dit(checkpoint=dit_ckpt), load_clf(checkpoint=clf_ckpt)
    return QualityModel(name, model.eval().to(device, dtype), classifier.eval().to(device), sample_shape(model),
                        model.num_classes, dtype)


def sample_shape(model: torch.nn.Module) -> tuple[int, int, int]:
    """(C, H, W) of the images a DiT or PixArt of this package takes (square, from its patch embedding)."""
    proj = model.x_embedder.proj
    size = proj.kernel_size[0] * int(round(model.pos_embed.shape[1] ** 0.5))
    return proj.in_channels, size, size


def shared_noise(count: int, shape: tuple[int, ...], seed: int = 0) -> torch.Tensor:
    """The start noise [count, *shape] every setting samples from (a CPU generator)."""
    return torch.randn((count, *shape), generator=torch.Generator().manual_seed(seed))


def eval_labels(count: int, num_classes: int) -> torch.Tensor:
    """Labels 0, 1, ..., num_classes - 1 in turn."""
    return torch.arange(count) % num_classes


def sample_in_chunks(fn: Callable, noise: torch.Tensor, labels: torch.Tensor, steps: int, chunk: int,
                     null_label: int, device: torch.device | str, cfg_scale: float = 1.5,
                     dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """DDIM samples from `noise`, `chunk` at a time (one generation per chunk), returned on the CPU;
    `dtype` is what the model is fed."""
    out = []
    for start in range(0, len(labels), chunk):
        sl = slice(start, start + chunk)
        out.append(ddim_sample(fn, labels[sl].to(device), tuple(noise.shape[1:]), steps=steps,
                               noise=noise[sl], null_label=null_label, cfg_scale=cfg_scale,
                               dtype=dtype).cpu())
    return torch.cat(out)


@torch.no_grad()
def record(images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor,
           classifier: DigitClassifier) -> dict[str, torch.Tensor]:
    """Per-sample metrics of `images` (CPU) against the `reference` samples from the same noise."""
    features = classifier_features(classifier, images)
    logits = classifier.head(features.to(next(classifier.parameters()).device).float()).cpu()
    return {
        "features": features,
        "correct": (logits.argmax(dim=1) == labels.cpu()).double(),
        "psnr": psnr(images, reference).clamp(max=PSNR_CAP),
        "ssim": ssim(images, reference),
        "rel_l2": relative_l2(images, reference),
    }


def _metric(rec: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return rec["correct" if name == "accuracy" else name]


def summarize(rec: dict[str, torch.Tensor], classifier: DigitClassifier, resamples: int = 1000,
              seed: int = 0) -> dict[str, Interval]:
    """Each metric with its 95% bootstrap interval: accuracy, Frechet distance to the classifier's
    reference statistics, mean PSNR, SSIM and relative L2."""
    mu, cov = classifier.ref_mu.cpu(), classifier.ref_cov.cpu()
    out = {name: mean_interval(_metric(rec, name), resamples, seed) for name in PAIRED_METRICS}
    out["frechet"] = frechet_interval(rec["features"], mu, cov, resamples, seed)
    return out


def compare(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], classifier: DigitClassifier,
            resamples: int = 1000, seed: int = 0) -> dict[str, Interval]:
    """a minus b on each metric, with paired 95% bootstrap intervals."""
    mu, cov = classifier.ref_mu.cpu(), classifier.ref_cov.cpu()
    out = {name: paired_mean_difference(_metric(a, name), _metric(b, name), resamples, seed)
           for name in PAIRED_METRICS}
    out["frechet"] = paired_frechet_difference(a["features"], b["features"], mu, cov, resamples, seed)
    return out
