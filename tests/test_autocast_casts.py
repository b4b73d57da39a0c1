"""Under torch.autocast, parameters that only matmuls and convolutions read are passed cast once
(toca_fx.compile.autocast): the same outputs as autocast's own casts, no cast of them in the graphs."""
from __future__ import annotations

import torch
import torch.nn as nn

import toca_fx.backend as toca_backend
from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.compile.autocast import CastParameters, lowered_parameters

from tests.helpers import step_inputs, tiny_dit


def _generation(model, config, inputs):
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        return [fast(*a) for a in inputs], backend


def test_lowered_parameters_are_those_only_matmuls_read():
    model = tiny_dit()
    seen = {}

    def backend(gm, example_inputs):
        seen["lowered"] = lowered_parameters(gm, example_inputs)
        seen["names"] = [n.name for n in gm.graph.nodes if n.op == "placeholder"]
        return gm

    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.compile(model, backend=backend, dynamic=False)(*step_inputs(model, 1)[0])
    names = [seen["names"][i] for i in seen["lowered"]]
    assert any("qkv" in n and "weight" in n for n in names) and any("x_embedder" in n for n in names)
    assert not any("y_embedder" in n for n in names)  # an embedding table: autocast keeps it float32
    assert set(seen["lowered"].values()) == {torch.bfloat16}
    torch._dynamo.reset()
    with torch.no_grad():  # autocast off: nothing cast
        torch.compile(model, backend=backend, dynamic=False)(*step_inputs(model, 1)[0])
    assert seen["lowered"] == {}


def test_cached_casts_give_autocasts_results_exactly(monkeypatch):
    model = tiny_dit()
    config = ToCaConfig(interval=3, ratio=0.5, num_steps=6, inner="eager", self_attn="recompute")
    inputs = step_inputs(model, 6)
    substituted = []
    original = CastParameters.substitute
    monkeypatch.setattr(CastParameters, "substitute", lambda self, args: substituted.append(1) or original(self, args))
    cached, backend = _generation(model, config, inputs)
    assert len(substituted) >= 6  # every call passed the cast copies
    assert 0 < backend.stats()["flops_ratio"] < 1  # counted outside autocast, as the graphs ran: under it
    torch._dynamo.reset()
    monkeypatch.setattr(toca_backend, "lowered_parameters", lambda gm, ex: {})  # autocast's own casts, in the graph
    plain, _ = _generation(model, config, inputs)
    for step, (a, p) in enumerate(zip(cached, plain)):
        torch.testing.assert_close(a, p, rtol=0, atol=0, msg=f"step {step}")


def test_a_changed_parameter_is_cast_again_at_the_same_address():
    w = nn.Parameter(torch.randn(4, 4))
    casts = CastParameters(lambda x, w: x @ w, {1: torch.bfloat16})
    first = casts.substitute([torch.ones(4), w])[1]
    assert first.dtype == torch.bfloat16 and casts.substitute([torch.ones(4), w])[1] is first
    with torch.no_grad():
        w.mul_(2)  # in place: a new version
    again = casts.substitute([torch.ones(4), w])[1]
    assert again is first and torch.equal(again, w.detach().bfloat16())
    w.data = torch.randn(4, 4)  # new storage, same version
    assert torch.equal(casts.substitute([torch.ones(4), w])[1], w.detach().bfloat16())
    other = nn.Parameter(torch.randn(4, 4))  # another model's parameter at the same position
    assert torch.equal(casts.substitute([torch.ones(4), other])[1], other.detach().bfloat16())
    assert torch.equal(casts.substitute([torch.ones(4), w])[1], w.detach().bfloat16())
