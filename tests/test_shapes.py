"""Shapes: a new batch size or resolution gets a new static graph and fresh cache state, whether
Dynamo's graph is static (dynamic=False) or symbolic (automatic dynamic shapes, mark_dynamic)."""
from __future__ import annotations

import warnings

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig, ToCaWarning

from tests.diffusers_zoo import build, loop_inputs


def _backend(ratio=0.5, self_attn="reuse", num_steps=10):
    return ToCaBackend(ToCaConfig(interval=3, ratio=ratio, num_steps=num_steps, self_attn=self_attn, inner="eager"))


@pytest.mark.parametrize("dynamic", [False, None])
def test_new_shape_starts_with_a_full_step_in_fresh_state(dynamic):
    model, backend = build("pixart"), _backend(num_steps=2)  # a generation of two steps per shape
    fast = torch.compile(model, backend=backend, dynamic=dynamic)
    shapes = [dict(size=8), dict(size=16), dict(size=8, batch=3), dict(size=12)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ToCaWarning)  # every shape is cached, none falls back
        with torch.no_grad():
            for shape in shapes:
                first, second = loop_inputs("pixart", 2, **shape)
                assert torch.equal(fast(**first)[0], model(**first)[0]), shape  # a full step
                assert not torch.allclose(fast(**second)[0], model(**second)[0], atol=1e-4), shape  # cached
    assert len(backend.graphs) == len(shapes)
    assert all(dict(g.calls) == {"full": 1, "partial": 1} for g in backend.graphs)
    assert {b["tokens"] for b in backend.stats()["branches"]} == {16, 64, 36}


def test_mark_dynamic_token_dim_is_specialised_per_token_count():
    model, backend = build("flux"), _backend(ratio=1.0, self_attn="recompute")
    fast = torch.compile(model, backend=backend)
    with torch.no_grad():
        for size in (8, 12):
            inputs = loop_inputs("flux", 4, size=size)
            for kwargs in inputs:
                torch._dynamo.mark_dynamic(kwargs["hidden_states"], 1)  # the token dim
                torch._dynamo.mark_dynamic(kwargs["img_ids"], 0)  # its rotary positions, one per token
                torch.testing.assert_close(fast(**kwargs)[0], model(**kwargs)[0], rtol=1e-5, atol=1e-5)
    # A symbolic graph, served by one static graph (own variants, own state) per token count.
    assert sorted({b["tokens"] for b in backend.stats()["branches"]}) == [5, 16, 21, 36, 41]  # 5: text
    assert [dict(g.calls) for g in backend.graphs] == [{"full": 2, "partial": 2}] * 2
