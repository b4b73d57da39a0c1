"""The pass on diffusers' own transformers (tiny random configs), over a 10-step loop.

Every model is caught by the same pass: no class, module name or attribute is looked at."""
from __future__ import annotations

import math

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig

from tests.diffusers_zoo import BUILDERS, build, loop_inputs

STEPS, INTERVAL = 10, 3  # full steps 0, 3, 6, 9; partial steps between
FULL_STEPS = (0, 3, 6, 9)

# Partial steps serve rows computed at most two steps earlier. The loop's latent drifts by 5% of a unit
# Gaussian per step, so a stale row is off by about the branch's change over <= 2 steps: ~10% of the
# output at worst, if every row were stale and errors added up across layers. Measured (relative L2
# error of any step): 0.3% (CogVideoX) to 3.2% (HunyuanDiT, 4 layers).
REL_ERROR_BOUND = 0.1


def _run(model, backend, inputs):
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        return [fast(**kwargs)[0] for kwargs in inputs]


def _eager(model, inputs):
    with torch.no_grad():
        return [model(**kwargs)[0] for kwargs in inputs]


@pytest.mark.parametrize("name", list(BUILDERS))
def test_every_token_recomputed_matches_eager(name):
    model, inputs = build(name), loop_inputs(name, STEPS)
    config = ToCaConfig(interval=INTERVAL, ratio=1.0, num_steps=STEPS, self_attn="recompute", inner="eager")
    backend = ToCaBackend(config)
    cached = _run(model, backend, inputs)
    for step, (a, b) in enumerate(zip(cached, _eager(model, inputs))):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    stats = backend.stats()
    assert stats["calls"] == {"full": 4, "partial": 6}
    assert stats["branches"] and stats["computed_fraction"] == 1.0


@pytest.mark.parametrize("name", list(BUILDERS))
def test_half_the_tokens_stay_close_to_uncached(name):
    model, inputs = build(name), loop_inputs(name, STEPS)
    config = ToCaConfig(interval=INTERVAL, ratio=0.5, num_steps=STEPS, self_attn="recompute", inner="eager")
    backend = ToCaBackend(config)
    cached, uncached = _run(model, backend, inputs), _eager(model, inputs)
    for b in backend.stats()["branches"]:
        n = b["tokens"]
        partial = (b["computed_fraction"] * STEPS - len(FULL_STEPS)) / (STEPS - len(FULL_STEPS))
        assert partial == pytest.approx(math.ceil(n / 2) / n), b["name"]  # half, rounded up
    for step, (a, b) in enumerate(zip(cached, uncached)):
        assert torch.isfinite(a).all(), f"step {step}"
        error = ((a - b).norm() / b.norm()).item()
        assert error < REL_ERROR_BOUND, f"step {step}: relative error {error:.4f}"
        if step in FULL_STEPS:
            assert error < 1e-5, f"full step {step} must equal the model"
        else:
            assert error > 1e-4, f"partial step {step} must serve cached rows"


def test_joint_attention_under_inductor_matches_eager():
    model, inputs = build("flux"), loop_inputs("flux", STEPS)
    config = ToCaConfig(interval=INTERVAL, ratio=1.0, num_steps=STEPS, self_attn="recompute")
    backend = ToCaBackend(config)
    for step, (a, b) in enumerate(zip(_run(model, backend, inputs), _eager(model, inputs))):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=f"step {step}")
    assert {b["kind"] for b in backend.stats()["branches"]} == {"joint_attn", "self_attn", "mlp"}


@pytest.mark.parametrize("name", ["sd3", "flux", "cogvideox"])
@pytest.mark.parametrize("self_attn", ["reuse", "recompute", "recompute_cached_kv"])
def test_joint_partial_step_on_unchanged_input_is_exact(name, self_attn):
    """Called twice with one input, the partial step's rows (image rows gathered, text rows kept whole
    and read off the same attention) must reproduce the full step exactly."""
    model, inputs = build(name), loop_inputs(name, 1)
    # Counted steps: by its timestep, a repeated input is another call of the same step.
    config = ToCaConfig(interval=2, ratio=0.5, num_steps=2, self_attn=self_attn, inner="eager", timestep_clock=False)
    backend = ToCaBackend(config)
    full, partial = _run(model, backend, inputs * 2)
    torch.testing.assert_close(partial, full, rtol=1e-5, atol=1e-5)
    assert backend.stats()["computed_fraction"] < 1.0


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_keeps_the_model_dtype(dtype):
    model, inputs = build("sd3", dtype=dtype), loop_inputs("sd3", 4, dtype=dtype)
    backend = ToCaBackend(ToCaConfig(interval=2, ratio=0.5, num_steps=4, inner="eager"))
    cached = _run(model, backend, inputs)
    uncached = _eager(model, inputs)
    assert all(out.dtype == dtype and torch.isfinite(out).all() for out in cached)
    caches = [s for s in backend.graphs[0].state.specs if s.name.endswith("_cache")]
    assert caches and all(s.dtype == dtype for s in caches)
    assert all(b.dtype == dtype for b in backend.graphs[0].state.streams[0].buffers if b.ndim == 3)
    for a, b in zip(cached, uncached):  # same bound as in fp32; half precision adds ~1e-2 at most
        assert ((a - b).float().norm() / b.float().norm()).item() < REL_ERROR_BOUND
