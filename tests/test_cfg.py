"""Classifier-free guidance by two calls per step (conditional, then unconditional): one cache each."""
from __future__ import annotations

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig

from tests.diffusers_zoo import build, loop_inputs

STEPS = 6


@pytest.mark.parametrize("value", [0, -1, 1.5, True, "2"])
def test_calls_per_step_is_validated(value):
    with pytest.raises(ValueError, match="calls_per_step"):
        ToCaConfig(calls_per_step=value)


def _streams():
    """The conditional and unconditional calls of a loop: same latents, text vs. empty text."""
    cond = loop_inputs("pixart", STEPS)
    uncond = [{**kw, "encoder_hidden_states": torch.zeros_like(kw["encoder_hidden_states"])} for kw in cond]
    return cond, uncond


def _run(model, calls_per_step, calls):
    torch._dynamo.reset()
    config = ToCaConfig(interval=3, ratio=0.5, num_steps=STEPS, calls_per_step=calls_per_step, inner="eager")
    fast = torch.compile(model, backend=ToCaBackend(config), dynamic=False)
    with torch.no_grad():
        return [fast(**kw)[0] for kw in calls]


def test_separate_calls_keep_separate_caches():
    model = build("pixart")
    cond, uncond = _streams()
    interleaved = [kw for pair in zip(cond, uncond) for kw in pair]
    both = _run(model, 2, interleaved)
    # Each stream alone, with a cache of its own: what the interleaved run must reproduce exactly.
    assert all(torch.equal(a, b) for a, b in zip(both[0::2], _run(model, 1, cond)))
    assert all(torch.equal(a, b) for a, b in zip(both[1::2], _run(model, 1, uncond)))
    # Without calls_per_step, the repeated timestep tells the halves apart: the same caches.
    detected = _run(model, 1, interleaved)
    assert all(torch.equal(a, b) for a, b in zip(detected, both))
    # The test can fail: one cache for both halves would serve the conditional rows to the other.
    with torch.no_grad():
        uncached = model(**uncond[2])[0]
    assert not torch.allclose(both[5], uncached, atol=1e-4) and not torch.allclose(both[5], both[4], atol=1e-4)


def test_each_stream_has_its_own_buffers_and_steps():
    model = build("pixart")
    cond, uncond = _streams()
    config = ToCaConfig(interval=3, ratio=0.5, num_steps=STEPS, calls_per_step=2, inner="eager")
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        for a, b in zip(cond[:4], uncond[:4]):
            fast(**a), fast(**b)
    state = backend.graphs[0].state
    first, second = [s.buffers for s in state.streams]
    assert all(x.data_ptr() != y.data_ptr() for x, y in zip(first, second))
    assert [s.last[1] for s in state.streams] == [3, 3] and backend.stats()["calls"] == {"full": 4, "partial": 4}
    assert state.nbytes == 2 * sum(s.nbytes for s in state.specs)
