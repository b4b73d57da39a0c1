"""A class-conditional PixArt-style DiT on 32x32 glyphs rendered from the fonts matplotlib ships, and its
classifier.

Data recipe (deterministic for a seed, on the CPU): each of the 43 classes (digits, 24 capital letters
without O and I, nine symbols) is rendered once per font by FreeType (21 of matplotlib's DejaVu, STIX and
Computer Modern faces) into a 64x64 template, thickened by a 1, 3 or 5 pixel max-filter (three stroke
widths); a sample picks class, font and stroke at random, is zoomed by 0.8-1.35, rotated by +-20 degrees,
shifted by up to +-3 pixels, resampled at 64x64 and averaged down to 32x32. Ink is +1, background -1.

The model (`GlyphsDiT`) is PixArt's block (self-attention, cross-attention, MLP, adaLN-single) with
the class given as a few learned context tokens that the cross-attention reads: 32x32 at patch size 1 is
1024 image tokens. The checkpoints in checkpoints/ are written by examples/train_glyphs.py.
"""
from __future__ import annotations

import math
import os
from functools import lru_cache
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..eval.metrics import DigitClassifier
from .digits import load_model, save_checkpoint
from .pixart import PixArt

__all__ = [
    "CLASSES", "FONTS", "RESOLUTION", "DIT_CONFIG", "CLASSIFIER_CONFIG", "GlyphsDiT", "glyph_templates",
    "glyphs_dataset", "load_glyphs_dit", "load_glyphs_classifier", "save_checkpoint",
]

CHECKPOINT_DIR = Path(__file__).parent / "checkpoints"
DIT_CHECKPOINT = CHECKPOINT_DIR / "glyphs_dit.pt"
CLASSIFIER_CHECKPOINT = CHECKPOINT_DIR / "glyphs_classifier.pt"

CLASSES = "0123456789ABCDEFGHJKLMNPQRSTUVWXYZ+=?!&#@%*"
FONTS = (
    "DejaVuSans.ttf", "DejaVuSans-Bold.ttf", "DejaVuSans-Oblique.ttf", "DejaVuSans-BoldOblique.ttf",
    "DejaVuSansMono.ttf", "DejaVuSansMono-Bold.ttf", "DejaVuSansMono-Oblique.ttf",
    "DejaVuSansMono-BoldOblique.ttf", "DejaVuSerif.ttf", "DejaVuSerif-Bold.ttf", "DejaVuSerif-Italic.ttf",
    "DejaVuSerif-BoldItalic.ttf", "STIXGeneral.ttf", "STIXGeneralBol.ttf", "STIXGeneralItalic.ttf",
    "STIXGeneralBolIta.ttf", "cmr10.ttf", "cmss10.ttf", "cmtt10.ttf", "cmb10.ttf", "cmti10.ttf",
)
STROKES = (1, 3, 5)  # max-filter sizes on the 64x64 template
RESOLUTION = 32
TEMPLATE = 64
FONT_SIZE = 40  # points at 72 dpi: pixels per em on the template

DIT_CONFIG = dict(
    input_size=RESOLUTION, patch_size=1, in_channels=1, hidden_size=192, depth=12, num_heads=4,
    mlp_ratio=4.0, num_classes=len(CLASSES), context_tokens=4,
)
CLASSIFIER_CONFIG = dict(resolution=RESOLUTION, width=32, feature_dim=128, num_classes=len(CLASSES))


def _render(font_path: str, char: str) -> torch.Tensor:
    """One glyph's coverage in [0, 1], centred by its bitmap box on a TEMPLATE x TEMPLATE canvas."""
    from matplotlib.ft2font import FT2Font, LoadFlags  # lazy: only data generation needs matplotlib

    font = FT2Font(font_path)
    font.set_size(FONT_SIZE, 72)
    font.set_text(char, 0.0, flags=LoadFlags.DEFAULT)
    font.draw_glyphs_to_bitmap(antialiased=True)
    bitmap = torch.tensor(font.get_image(), dtype=torch.float32) / 255.0
    h, w = bitmap.shape
    if max(h, w) > TEMPLATE - 4:
        bitmap = F.interpolate(bitmap[None, None], scale_factor=(TEMPLATE - 4) / max(h, w), mode="area")[0, 0]
        h, w = bitmap.shape
    canvas = torch.zeros(TEMPLATE, TEMPLATE)
    top, left = (TEMPLATE - h) // 2, (TEMPLATE - w) // 2
    canvas[top:top + h, left:left + w] = bitmap
    return canvas


@lru_cache(maxsize=1)
def glyph_templates() -> torch.Tensor:
    """Templates [classes, fonts, strokes, TEMPLATE, TEMPLATE] in [0, 1] (ink coverage)."""
    import matplotlib

    font_dir = os.path.join(matplotlib.get_data_path(), "fonts", "ttf")
    base = torch.stack([
        torch.stack([_render(os.path.join(font_dir, font), char) for font in FONTS]) for char in CLASSES
    ])
    flat = base.flatten(0, 1)[:, None]
    strokes = [F.max_pool2d(flat, k, stride=1, padding=k // 2) for k in STROKES]
    return torch.stack(strokes, dim=1).reshape(len(CLASSES), len(FONTS), len(STROKES), TEMPLATE, TEMPLATE)


def _affine(n: int, gen: torch.Generator) -> torch.Tensor:
    """Random zoom, rotation and shift as affine_grid matrices [n, 2, 3] (output to template coordinates)."""
    zoom = 0.8 + 0.55 * torch.rand(n, generator=gen)
    angle = (torch.rand(n, generator=gen) * 2 - 1) * math.radians(20)
    shift = (torch.rand(n, 2, generator=gen) * 2 - 1) * (3 / (RESOLUTION / 2))
    cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
    row0 = torch.stack([cos, -sin, shift[:, 0]], dim=1)
    row1 = torch.stack([sin, cos, shift[:, 1]], dim=1)
    return torch.stack([row0, row1], dim=1)


def glyphs_dataset(
    n: int, seed: int = 0, device: torch.device | str | None = None, batch: int = 8192
) -> tuple[torch.Tensor, torch.Tensor]:
    """`n` glyph images [n, 1, 32, 32] in [-1, 1] and labels [n] on `device`. The random choices come
    from a CPU generator, so a seed gives the same images on every device up to resampling rounding."""
    templates = glyph_templates().to(device)
    gen = torch.Generator().manual_seed(seed)
    labels = torch.randint(len(CLASSES), (n,), generator=gen)
    fonts = torch.randint(len(FONTS), (n,), generator=gen)
    strokes = torch.randint(len(STROKES), (n,), generator=gen)
    theta = _affine(n, gen)
    labels, fonts, strokes, theta = (a.to(device) for a in (labels, fonts, strokes, theta))
    images = []
    for start in range(0, n, batch):
        sl = slice(start, start + batch)
        src = templates[labels[sl], fonts[sl], strokes[sl]][:, None]
        grid = F.affine_grid(theta[sl], [len(src), 1, TEMPLATE, TEMPLATE], align_corners=False)
        ink = F.grid_sample(src, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        images.append(F.avg_pool2d(ink, TEMPLATE // RESOLUTION).clamp(0, 1) * 2 - 1)
    return torch.cat(images) if images else torch.empty(0, 1, RESOLUTION, RESOLUTION, device=device), labels


class GlyphsDiT(PixArt):
    """PixArt conditioned on a class: `forward(x [B, 1, 32, 32], t [B], y [B])`, the label `num_classes`
    being the null class of classifier-free guidance. Each class is `context_tokens` learned tokens
    that every block's cross-attention reads; the adaLN modulation sees only the timestep."""

    def __init__(self, num_classes: int = len(CLASSES), context_tokens: int = 4, hidden_size: int = 192,
                 attention: str = "sdpa", **kwargs):
        super().__init__(hidden_size=hidden_size, caption_channels=hidden_size, learn_sigma=False,
                         attention=attention, **kwargs)
        self.num_classes = num_classes
        self.context_tokens = context_tokens
        self.class_tokens = nn.Parameter(torch.randn(num_classes + 1, context_tokens, hidden_size) * 0.02)

    def zero_init_(self) -> "GlyphsDiT":
        """Every block's branch outputs and the final projection start at zero (identity blocks)."""
        for block in self.blocks:
            for linear in (block.attn.proj, block.cross_attn.proj, block.mlp.fc2):
                nn.init.zeros_(linear.weight)
                nn.init.zeros_(linear.bias)
        nn.init.zeros_(self.final_linear.weight)
        nn.init.zeros_(self.final_linear.bias)
        return self

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return super().forward(x, t, self.class_tokens[y])


def load_glyphs_dit(
    device: torch.device | str | None = None, attention: str = "sdpa", checkpoint: str | Path | None = None
) -> GlyphsDiT:
    """The trained glyphs DiT in float32 eval mode; `attention="manual"` exposes the attention map."""
    return load_model(GlyphsDiT, checkpoint or DIT_CHECKPOINT, device, attention=attention)


def load_glyphs_classifier(
    device: torch.device | str | None = None, checkpoint: str | Path | None = None
) -> DigitClassifier:
    """The glyphs classifier (the digits' CNN at 32x32, 43 classes) with the real glyphs' feature
    statistics, in eval mode."""
    return load_model(DigitClassifier, checkpoint or CLASSIFIER_CHECKPOINT, device)
