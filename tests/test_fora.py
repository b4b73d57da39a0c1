"""FORA: whole-branch reuse between full steps, against a hand-written eager reference."""
from __future__ import annotations

import pytest
import torch

from toca_fx import FORAPolicy, ToCaBackend, ToCaConfig
from toca_fx.models.layers import modulate, unpatchify

from tests.helpers import step_inputs, tiny_dit


def _fora_reference(model, inputs, interval):
    """DiT with each block's attention and MLP outputs (before their adaLN gates) cached on full steps
    and added, under the current step's gates, in between."""
    cache, outs = {}, []
    for step, (x, t, y) in enumerate(inputs):
        full = step % interval == 0
        tokens = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for i, blk in enumerate(model.blocks):
            sa, sc, ga, sm, scm, gm = blk.adaLN_modulation(c).chunk(6, dim=1)
            if full:
                cache[i, "attn"] = blk.attn(modulate(blk.norm1(tokens), sa, sc))
            tokens = tokens + ga.unsqueeze(1) * cache[i, "attn"]
            if full:
                cache[i, "mlp"] = blk.mlp(modulate(blk.norm2(tokens), sm, scm))
            tokens = tokens + gm.unsqueeze(1) * cache[i, "mlp"]
        out = model.final_layer(tokens, c)
        outs.append(unpatchify(out, model.patch_size, model.out_channels))
    return outs


def test_fora_matches_hand_written_reuse():
    model = tiny_dit()
    inputs = step_inputs(model, 7)
    backend = ToCaBackend(ToCaConfig(policy=FORAPolicy(3), num_steps=7, inner="eager"))
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        cached = [fast(*args) for args in inputs]
        reference = _fora_reference(model, inputs, 3)
        uncached = [model(*args) for args in inputs]
    for step, (a, b) in enumerate(zip(cached, reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert not torch.allclose(cached[2], uncached[2], atol=1e-4)
    stats = backend.stats()
    assert stats["calls"] == {"full": 3, "partial": 4}
    assert stats["compiles"] == 2  # one graph per distinct plan
    assert stats["flops_ratio"] < 0.75


@pytest.mark.parametrize("value", [0, 1.5, True])
def test_fora_interval_is_validated(value):
    with pytest.raises(ValueError, match="FORAPolicy.interval"):
        FORAPolicy(value)


def test_config_policy_is_validated():
    with pytest.raises(ValueError, match=r"ToCaConfig\.policy must be"):
        ToCaConfig(policy=object())
