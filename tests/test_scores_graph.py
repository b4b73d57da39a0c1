"""Scores inside compiled graphs: maps filled on full steps, read by the right branches."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.ops.scores import influence_from_map, select_batch, select_tokens

from tests.helpers import step_inputs, tiny_dit, tiny_pixart

TOCA = {"attention": 1.0, "cross_entropy": 0.5, "staleness": 0.25, "spatial": 0.6}


def _run(model, config, steps=4):
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        outs = [fast(*args) for args in step_inputs(model, steps)]
    return backend, outs


def _buffers(backend):
    graph = backend.graphs[0]
    return {spec.name: buf for spec, buf in zip(graph.state.specs, graph.state.streams[0].buffers)}


def test_fused_attention_map_equals_the_written_out_one():
    config = ToCaConfig(interval=4, num_steps=4, inner="eager", scores={"attention": 1.0})
    maps = [_buffers(_run(tiny_dit(kind), config, steps=1)[0])["attn_n16"][0] for kind in ("sdpa", "manual")]
    torch.testing.assert_close(maps[0], maps[1])
    sampled = _buffers(_run(tiny_dit(), replace(config, attention_queries=4), steps=1)[0])
    assert torch.nn.functional.cosine_similarity(sampled["attn_n16"][0], maps[0], dim=0) > 0.9


def test_each_branch_reads_its_blocks_maps_and_the_grid_of_the_patch_embedding():
    backend, _ = _run(tiny_pixart("manual"), ToCaConfig(interval=4, num_steps=4, inner="eager", scores=TOCA))
    graph = backend.graphs[0].variant_graph("partial")
    # Blocks are (self-attention, cross-attention, MLP): branches 0-2 and 3-5. The scored branches
    # (1, 2, 4, 5) own the staleness rows 0-3; the attention maps are the self-attentions' (0, 3), the
    # entropies the cross-attentions' (1, 4), one row per block in each stack.
    (batch,) = [n for n in graph.graph.nodes if n.target is select_batch]
    stale, rows, ks, _, attn, attn_rows, ent, ent_rows, grid, row_ids = batch.args
    assert (stale.name, attn.name, ent.name) == ("toca_stale_n16", "toca_attn_n16", "toca_ent_n16")
    assert (rows, attn_rows, ent_rows, grid) == ((0, 1, 2, 3), (0, 0, 1, 1), (0, 0, 1, 1), (4, 4))
    assert [r.name for r in row_ids] == ["toca_row0", "toca_row1", "toca_row2", "toca_row3"]
    assert ks == (5, 5, 5, 5)  # ceil(0.3 x 16)
    assert not [n for n in graph.graph.nodes if n.target is select_tokens]
    buffers = _buffers(backend)
    assert all(buffers[name][row].norm() > 0.99 for name in ("attn_n16", "ent_n16") for row in (0, 1))
    assert [buffers[f"row{i}"].tolist() for i in range(4)] == [[0], [1], [2], [3]]


def test_a_map_refilled_in_the_step_is_read_after_it_is_filled():
    # Self-attention recomputes every token on partial steps (factor 4 x 0.3 clamps to 1): it refills its
    # map there, so the MLP of its block chooses after it, from the new map, not at the start of the step.
    config = ToCaConfig(interval=4, num_steps=4, inner="eager", scores=TOCA, self_attn="recompute",
                        kind_factors={"self_attn": 4.0})
    graph = _run(tiny_pixart("manual"), config)[0].graphs[0].variant_graph("partial")
    nodes = list(graph.graph.nodes)
    fills = [i for i, n in enumerate(nodes) if n.target is influence_from_map]
    picks = {str(n.args[1]): i for i, n in enumerate(nodes) if n.target is select_tokens}
    assert not [n for n in nodes if n.target is select_batch]
    assert len(fills) == 2 and len(picks) == 4
    assert all(i > fills[0] for i in picks.values()) and min(picks.values()) < fills[1]


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
    (stale,) = [s for s in graph.state.specs if s.name.startswith("stale_")]
    assert len(refs) == stale.shape[0] > 0
    stale = torch.zeros(16)
    idx = select_tokens(torch.full((2, 16, 8), float("nan")), stale, None, 4, (("staleness", 1.0),))
    assert idx.numel() == 4 and torch.isfinite(stale).all()  # a NaN stream is never read


def test_attention_map_in_half_precision_ranks_like_float32():
    from toca_fx.ops.scores import attention_influence

    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(2, 4, 64, 16, generator=g), torch.randn(2, 4, 64, 16, generator=g)
    exact, half = torch.zeros(64), torch.zeros(64)
    attention_influence(q, k, exact, 0, 0)
    attention_influence(q.bfloat16(), k.bfloat16(), half, 0, 0)
    assert half.dtype == torch.float32
    assert torch.nn.functional.cosine_similarity(exact, half, dim=0) > 0.999
    assert len(set(exact.topk(16).indices.tolist()) & set(half.topk(16).indices.tolist())) >= 14
