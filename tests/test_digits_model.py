import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from toca_fx.eval.metrics import classifier_accuracy, digits_frechet_distance
from toca_fx.models.digits import RESOLUTION, load_digits_classifier, load_digits_dit
from toca_fx.eval.sampling import DEFAULT_STEPS, ddim_sample

REPO = Path(__file__).resolve().parents[1]

# The committed checkpoint gets 20/20 of these right (and 0.999 on 1,000 samples); 0.9 leaves room
# for numeric differences between machines flipping a borderline sample or two.
SAMPLE_ACCURACY_BOUND = 0.9
SAMPLE_COUNT = 20


def test_checkpoint_loads_as_a_small_float32_dit():
    model = load_digits_dit()
    assert not model.training
    assert model.num_classes == 10 and model.patch_size == 1 and model.out_channels == 1
    assert all(p.dtype == torch.float32 for p in model.parameters())
    x = torch.randn(2, 1, RESOLUTION, RESOLUTION)
    out = model(x, torch.tensor([999, 10]), torch.tensor([3, 10]))
    assert out.shape == x.shape and torch.isfinite(out).all()
    # Trained: at t = 999 (pure noise) the predicted eps is nearly the input itself.
    assert torch.nn.functional.cosine_similarity(out[0].flatten(), x[0].flatten(), dim=0) > 0.99


def test_manual_attention_gives_the_same_model():
    x = torch.randn(2, 1, RESOLUTION, RESOLUTION)
    t, y = torch.tensor([500, 20]), torch.tensor([1, 7])
    with torch.no_grad():
        torch.testing.assert_close(load_digits_dit(attention="manual")(x, t, y), load_digits_dit()(x, t, y),
                                   rtol=1e-4, atol=1e-4)


def test_classifier_carries_reference_statistics():
    clf = load_digits_classifier()
    assert clf.ref_mu.dtype == torch.float64 and clf.ref_mu.abs().sum() > 0
    torch.testing.assert_close(clf.ref_cov, clf.ref_cov.T)
    noise = torch.rand(200, 1, RESOLUTION, RESOLUTION, generator=torch.Generator().manual_seed(0)) * 2 - 1
    assert digits_frechet_distance(clf, noise) > 500


def test_classifier_on_real_digits():
    pytest.importorskip("sklearn")
    from toca_fx.models.digits import digits_dataset

    images, labels = digits_dataset()
    assert images.shape == (1797, 1, RESOLUTION, RESOLUTION)
    assert images.min() >= -1 and images.max() <= 1
    clf = load_digits_classifier()
    assert classifier_accuracy(clf, images, labels) > 0.98
    assert digits_frechet_distance(clf, images[:1000]) < 40


def test_trained_model_samples_are_the_right_digits():
    labels = torch.arange(SAMPLE_COUNT) % 10
    samples = ddim_sample(load_digits_dit(), labels, (1, RESOLUTION, RESOLUTION), steps=DEFAULT_STEPS, seed=0)
    assert classifier_accuracy(load_digits_classifier(), samples, labels) >= SAMPLE_ACCURACY_BOUND


def test_training_script_runs_three_steps_on_cpu(tmp_path):
    cmd = [sys.executable, str(REPO / "examples" / "train_digits.py"), "--steps", "3", "--batch-size", "8",
           "--classifier-steps", "3", "--eval-samples", "4", "--eval-steps", "3", "--cfg-scales", "2",
           "--out", str(tmp_path)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert "accuracy" in result.stdout
    model = load_digits_dit(checkpoint=tmp_path / "digits_dit.pt")
    assert sum(p.numel() for p in model.parameters()) == sum(p.numel() for p in load_digits_dit().parameters())
    load_digits_classifier(checkpoint=tmp_path / "digits_classifier.pt")
