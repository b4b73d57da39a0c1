"""Scores inside compiled graphs: maps filled on full steps, read by the right branches."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.scores import select_tokens

from .helpers import step_inputs, tiny_dit, tiny_pixart

TOCA = {"attention": 1.0, "cross_entropy": 0.5, "staleness": 0.25, "spatial": 0.6}


def _run(model, config, steps=4):
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        outs = [fast(*args) for args in step_inputs(model, steps)]
    return backend, outs


def _buffers(backend):
    graph = backend.graphs[0]
    return {spec.name: buf for spec, buf in zip(graph.state.specs, graph.state.stream_buffers[0])}


def test_fused_attention_map_equals_the_written_out_one():
    config = ToCaConfig(interval=4, num_steps=4, inner="eager", scores={"attention": 1.0})
    maps = [_buffers(_run(tiny_dit(kind), config, steps=1)[0])["b0_attn"] for kind in ("sdpa", "manual")]
    torch.testing.assert_close(maps[0], maps[1])
    sampled = _buffers(_run(tiny_dit(), replace(config, attention_queries=4), steps=1)[0])
    assert torch.nn.functional.cosine_similarity(sampled["b0_attn"], maps[0], dim=0) > 0.9


def test_each_branch_reads_its_blocks_maps_and_the_grid_of_the_patch_embedding():
    backend, _ = _run(tiny_pixart("manual"), ToCaConfig(interval=4, num_steps=4, inner="eager", scores=TOCA))
    graph = backend.graphs[0].variant_graph("partial")
    reads = {
        str(n.args[1]): (str(n.args[5]), str(n.args[6]), n.args[7])
        for n in graph.graph.nodes if n.target is select_tokens
    }
    # Blocks are (self-attention, cross-attention, MLP): branches 0-2 and 3-5.
    assert reads == {
        "toca_b1_stale": ("toca_b0_attn", "toca_b1_ent", (4, 4)),
        "toca_b2_stale": ("toca_b0_attn", "toca_b1_ent", (4, 4)),
        "toca_b4_stale": ("toca_b3_attn", "toca_b4_ent", (4, 4)),
        "toca_b5_stale": ("toca_b3_attn", "toca_b4_ent", (4, 4)),
    }
    buffers = _buffers(backend)
    assert all(buffers[name].norm() > 0.99 for name in ("b0_attn", "b1_ent", "b3_attn", "b4_ent"))


def test_inductor_compiles_the_combined_score_like_eager():
    model = tiny_pixart()
    config = ToCaConfig(interval=3, ratio=0.3, num_steps=5, scores=TOCA, kind_factors={"mlp": 2.0}, full_last=1)
    backend, compiled = _run(model, config, steps=5)
    _, eager = _run(model, replace(config, inner="eager"), steps=5)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    stats = backend.stats()
    assert stats["calls"] == {"full": 3, "partial": 2}
    mlp = [b for b in stats["branches"] if b["kind"] == "mlp"]
    assert mlp[0]["computed_fraction"] == pytest.approx((3 * 16 + 2 * 10) / (5 * 16))  # ceil(0.6 x 16)


def test_scores_from_state_alone_keep_no_reference_norm_and_do_not_read_the_stream():
    backend, _ = _run(tiny_pixart("manual"), ToCaConfig(interval=4, num_steps=4, inner="eager", scores=TOCA))
    graph = backend.graphs[0]
    assert not [s for s in graph.state.specs if s.name.endswith("_ref")]
    # The same scores and the "change" score: each scored branch keeps its reference norms.
    with_change = ToCaConfig(interval=4, num_steps=4, inner="eager", scores={**TOCA, "change": 1.0})
    refs = [s for s in _run(tiny_pixart("manual"), with_change)[0].graphs[0].state.specs if s.name.endswith("_ref")]
    assert len(refs) == len([s for s in graph.state.specs if s.name.endswith("_stale")]) > 0
    stale = torch.zeros(16)
    idx = select_tokens(torch.full((2, 16, 8), float("nan")), stale, None, 4, (("staleness", 1.0),))
    assert idx.numel() == 4 and torch.isfinite(stale).all()  # a NaN stream is never read


def test_attention_map_in_half_precision_ranks_like_float32():
    from toca_fx.scores import attention_influence

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 64, 16, generator=g), torch.randn(2, 4, 64, 16, generator=g)
    exact, half = torch.zeros(64), torch.zeros(64)
    attention_influence(q, k, exact, 0, 0)
    attention_influence(q.bfloat16(), k.bfloat16(), half, 0, 0)
    assert half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(exact, half, dim=0) > 0.999
    assert len(set(exact.topk(16).indices.tolist()) & set(half.topk(16).indices.tolist())) >= 14
