import math

import pytest
import torch

from toca_fx.eval.sampling import DEFAULT_STEPS, alphas_cumprod, ddim_sample, ddim_timesteps

SHAPE = (1, 4, 4)


def oracle(targets: dict[int, torch.Tensor], schedule: str = "linear"):
    """The exact eps for data that is one point per label: eps = (x - sqrt(a) x0) / sqrt(1 - a)."""
    a_bar = alphas_cumprod(schedule)
    calls = []

    def model(x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        calls.append((x.shape[0], t.clone(), y.clone()))
        a = a_bar[t].view(-1, 1, 1, 1)
        x0 = torch.stack([targets[int(label)] for label in y]).double()
        return ((x.double() - a.sqrt() * x0) / (1 - a).sqrt()).float()

    model.calls = calls
    return model


def test_schedules_decrease_from_one_to_noise():
    for schedule in ("linear", "cosine"):
        a = alphas_cumprod(schedule)
        assert a.shape == (1000,) and a.dtype == torch.float64
        assert (a[1:] < a[:-1]).all()
        assert 0.99 < a[0] < 1 and a[-1] < 1e-3
    assert alphas_cumprod("linear")[0].item() == pytest.approx(1 - 1e-4)
    with pytest.raises(ValueError):
        alphas_cumprod("quadratic")


def test_timesteps_run_from_pure_noise_to_zero():
    ts = ddim_timesteps(25)
    assert len(ts) == 25 and ts[0] == 999 and ts[-1] == 0
    assert (ts[1:] < ts[:-1]).all()
    with pytest.raises(ValueError):
        ddim_timesteps(0)


def test_zero_eps_telescopes_to_noise_over_sqrt_alpha_bar():
    # With eps = 0 every step scales x by sqrt(a_prev / a_t); the product is 1 / sqrt(a_bar[999]).
    noise = torch.randn(3, *SHAPE, generator=torch.Generator().manual_seed(1))
    out = ddim_sample(lambda x, t, y: torch.zeros_like(x), torch.zeros(3, dtype=torch.long), SHAPE,
                      steps=10, cfg_scale=1.0, noise=noise, clip_x0=False)
    expected = noise / math.sqrt(alphas_cumprod()[999].item())
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("schedule", ["linear", "cosine"])
def test_exact_eps_lands_on_the_data_point(schedule):
    targets = {0: torch.linspace(-1, 1, 16).view(SHAPE), 1: torch.full(SHAPE, 0.5)}
    labels = torch.tensor([0, 1, 1])
    out = ddim_sample(oracle(targets, schedule), labels, SHAPE, steps=20, cfg_scale=1.0, schedule=schedule)
    expected = torch.stack([targets[int(label)] for label in labels])
    torch.testing.assert_close(out, expected, rtol=0, atol=2e-4)


@pytest.mark.parametrize("clip", [True, False])
def test_clip_x0_keeps_samples_in_range(clip):
    targets = {0: torch.full(SHAPE, 3.0)}
    out = ddim_sample(oracle(targets), torch.zeros(2, dtype=torch.long), SHAPE, steps=10, cfg_scale=1.0,
                      clip_x0=clip)
    torch.testing.assert_close(out, torch.full_like(out, 1.0 if clip else 3.0), rtol=0, atol=1e-3)


def test_guidance_is_one_batched_call_per_step():
    # Guided eps = eps_u + s (eps_c - eps_u) is the exact eps of x0_u + s (x0_c - x0_u).
    null, scale = 10, 3.0
    targets = {3: torch.full(SHAPE, 0.4), 7: torch.full(SHAPE, -0.2), null: torch.full(SHAPE, 0.1)}
    model = oracle(targets)
    labels = torch.tensor([3, 7])
    out = ddim_sample(model, labels, SHAPE, steps=DEFAULT_STEPS, cfg_scale=scale, null_label=null)
    expected = torch.stack([targets[null] + scale * (targets[int(label)] - targets[null]) for label in labels])
    torch.testing.assert_close(out, expected, rtol=0, atol=5e-4)
    assert len(model.calls) == DEFAULT_STEPS
    for (batch, t, y), step in zip(model.calls, ddim_timesteps(DEFAULT_STEPS).tolist()):
        assert batch == 4
        assert (t == step).all()
        assert y.tolist() == [3, 7, null, null]


def test_null_label_comes_from_model_num_classes_or_is_required():
    class Model(torch.nn.Module):
        num_classes = 5

        def forward(self, x, t, y):
            assert y[len(y) // 2:].eq(5).all()
            return torch.zeros_like(x)

    ddim_sample(Model(), torch.zeros(2, dtype=torch.long), SHAPE, steps=2, cfg_scale=2.0)
    with pytest.raises(ValueError, match="null_label"):
        ddim_sample(lambda x, t, y: x, torch.zeros(2, dtype=torch.long), SHAPE, steps=2, cfg_scale=2.0)


def test_seed_and_generator_make_it_deterministic():
    def model(x, t, y):
        return 0.5 * x + 0.01 * y.view(-1, 1, 1, 1)

    labels = torch.tensor([0, 1, 2, 3])

    def run(seed):
        return ddim_sample(model, labels, SHAPE, steps=5, cfg_scale=1.5, null_label=9, seed=seed)

    torch.testing.assert_close(run(4), run(4), rtol=0, atol=0)
    torch.testing.assert_close(run(torch.Generator().manual_seed(4)), run(4), rtol=0, atol=0)
    assert not torch.allclose(run(4), run(5))


def test_progress_bar_goes_to_stderr(capsys):
    ddim_sample(lambda x, t, y: torch.zeros_like(x), torch.zeros(1, dtype=torch.long), SHAPE, steps=7,
                cfg_scale=1.0, progress=True)
    captured = capsys.readouterr()
    assert captured.out == ""
    assert "7/7" in captured.err and captured.err.endswith("\n")
