"""A small class-conditional DiT trained here on scikit-learn's handwritten digits, and its classifier.

The 8x8 digits are scaled to [-1, 1] and upsampled to 16x16; with patch size 1 that is 256 tokens, enough
for token-wise caching to choose among, while one sample costs about 0.6 GFLOP per step (CPU-friendly).
The checkpoints (package data in checkpoints/) are written by examples/train_digits.py.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F

from ..eval.metrics import DigitClassifier
from .dit import DiT

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DIT_CHECKPOINT = CHECKPOINT_DIR / "digits_dit.pt"
CLASSIFIER_CHECKPOINT = CHECKPOINT_DIR / "digits_classifier.pt"

RESOLUTION = 16
DIT_CONFIG = dict(
    input_size=RESOLUTION, patch_size=1, in_channels=1, hidden_size=128, depth=6, num_heads=4,
    mlp_ratio=4.0, num_classes=10, learn_sigma=False,
)
CLASSIFIER_CONFIG = dict(resolution=RESOLUTION, width=32, feature_dim=64, num_classes=10)


def digits_dataset(resolution: int = RESOLUTION) -> tuple[torch.Tensor, torch.Tensor]:
    """All 1797 digits as images [N, 1, R, R] in [-1, 1] (bilinear upsampling) and labels [N]."""
    from sklearn.datasets import load_digits  # lazy: only training and tests need scikit-learn

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 8.0 - 1.0  # pixel values 0..16
    images = F.interpolate(images, size=resolution, mode="bilinear", align_corners=False)
    return images, torch.from_numpy(digits.target).long()


def save_checkpoint(module: torch.nn.Module, config: dict, path: str | Path, dtype: torch.dtype | None = None) -> None:
    """Write {"config", "state_dict"}, floating-point tensors cast to `dtype` (fp16 halves the file)."""
    state = {
        k: (v.to(dtype) if dtype is not None and v.is_floating_point() else v).cpu()
        for k, v in module.state_dict().items()
    }
    torch.save({"config": dict(config), "state_dict": state}, path)


def load_model(cls: type[torch.nn.Module], checkpoint: str | Path, device: torch.device | str | None = None,
               **kwargs) -> torch.nn.Module:
    """A `cls` from a checkpoint `save_checkpoint` wrote, in float32 (load_state_dict's copy upcasts
    narrower weights) and eval mode; `kwargs` go to its constructor."""
    ckpt = torch.load(checkpoint, map_location="cpu", weights_only=True)
    model = cls(**ckpt["config"], **kwargs)
    model.load_state_dict(ckpt["state_dict"])
    return model.eval().to(device)


def load_digits_dit(
    device: torch.device | str | None = None, attention: str = "sdpa", checkpoint: str | Path | None = None
) -> DiT:
    """The trained digits DiT in float32 eval mode; `attention="manual"` exposes the attention map."""
    return load_model(DiT, checkpoint or DIT_CHECKPOINT, device, attention=attention)


def load_digits_classifier(
    device: torch.device | str | None = None, checkpoint: str | Path | None = None
) -> DigitClassifier:
    """The digits classifier, with the real digits' feature statistics, in eval mode."""
    return load_model(DigitClassifier, checkpoint or CLASSIFIER_CHECKPOINT, device)
