"""The glyphs data recipe, GlyphsDiT and the committed glyphs checkpoints."""
from __future__ import annotations

import pytest
import torch

pytest.importorskip("matplotlib")

from toca_fx.eval.metrics import classifier_accuracy, digits_frechet_distance  # noqa: E402
from toca_fx.eval.sampling import ddim_sample  # noqa: E402
from toca_fx.models.glyphs import (  # noqa: E402
    CLASSES, CLASSIFIER_CHECKPOINT, DIT_CHECKPOINT, FONTS, RESOLUTION, STROKES, TEMPLATE, GlyphsDiT,
    glyph_templates, glyphs_dataset, load_glyphs_classifier, load_glyphs_dit,
)


def tiny_dit(attention: str = "sdpa") -> GlyphsDiT:
    torch.manual_seed(0)
    return GlyphsDiT(input_size=8, patch_size=1, in_channels=1, hidden_size=32, depth=2, num_heads=2,
                     num_classes=len(CLASSES), context_tokens=2, attention=attention).eval()


def test_every_template_has_ink_and_strokes_thicken():
    templates = glyph_templates()
    assert templates.shape == (len(CLASSES), len(FONTS), len(STROKES), TEMPLATE, TEMPLATE)
    ink = templates.sum(dim=(-1, -2))
    assert (ink[:, :, 0] > 20).all()  # every (class, font) rendered something
    assert (ink[:, :, 1:] > ink[:, :, :-1]).all()  # each stroke level adds ink


def test_dataset_is_deterministic_per_seed():
    a, la = glyphs_dataset(32, seed=3)
    b, lb = glyphs_dataset(32, seed=3)
    c, _ = glyphs_dataset(32, seed=4)
    assert a.shape == (32, 1, RESOLUTION, RESOLUTION) and la.shape == (32,)
    assert torch.equal(a, b) and torch.equal(la, lb)
    assert not torch.equal(a, c)
    assert a.min() >= -1 and a.max() <= 1 and 0 <= la.min() and la.max() < len(CLASSES)
    # Background dominates, but every image has ink.
    assert ((a > 0).flatten(1).float().mean(dim=1) > 0.02).all()
    assert (a < -0.9).float().mean() > 0.6


def test_dataset_batches_do_not_change_the_images():
    a, _ = glyphs_dataset(20, seed=5)
    b, _ = glyphs_dataset(20, seed=5, batch=7)
    torch.testing.assert_close(a, b)


def test_tiny_model_shapes_and_null_class():
    model = tiny_dit()
    x = torch.randn(3, 1, 8, 8)
    out = model(x, torch.tensor([999, 10, 0]), torch.tensor([0, 5, len(CLASSES)]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert model.class_tokens.shape == (len(CLASSES) + 1, 2, 32)


def test_zero_init_makes_the_output_zero():
    model = tiny_dit().zero_init_()
    out = model(torch.randn(2, 1, 8, 8), torch.tensor([5, 500]), torch.tensor([1, 2]))
    assert torch.count_nonzero(out) == 0


def test_manual_attention_gives_the_same_model():
    sdpa, manual = tiny_dit(), tiny_dit("manual")
    manual.load_state_dict(sdpa.state_dict())
    x, t, y = torch.randn(2, 1, 8, 8), torch.tensor([500, 20]), torch.tensor([1, 7])
    with torch.no_grad():
        torch.testing.assert_close(manual(x, t, y), sdpa(x, t, y), rtol=1e-4, atol=1e-5)


def test_checkpoints_are_small_and_load_as_float32():
    assert DIT_CHECKPOINT.stat().st_size <= 25 * 2**20
    model = load_glyphs_dit()
    assert not model.training and all(p.dtype == torch.float32 for p in model.parameters())
    assert len(model.blocks) >= 12 and model.pos_embed.shape[1] == RESOLUTION * RESOLUTION >= 1024
    assert model.num_classes == len(CLASSES)
    assert CLASSIFIER_CHECKPOINT.exists()


def test_trained_model_predicts_the_noise_at_t_999_and_samples():
    model = load_glyphs_dit()
    x = torch.randn(1, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model(x, torch.tensor([999]), torch.tensor([4]))
    assert torch.nn.functional.cosine_similarity(out.flatten(), x.flatten(), dim=0) > 0.99
    samples = ddim_sample(model, torch.tensor([12]), (1, RESOLUTION, RESOLUTION), steps=2, cfg_scale=1.0)
    assert samples.shape == (1, 1, RESOLUTION, RESOLUTION) and torch.isfinite(samples).all()
    assert samples.min() >= -1.5 and samples.max() <= 1.5


def test_classifier_on_real_held_out_glyphs():
    clf = load_glyphs_classifier()
    images, labels = glyphs_dataset(300, seed=1)
    assert classifier_accuracy(clf, images, labels) > 0.95
    torch.testing.assert_close(clf.ref_cov, clf.ref_cov.T)
    noise = torch.rand(300, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert digits_frechet_distance(clf, noise) > 2 * digits_frechet_distance(clf, images)
