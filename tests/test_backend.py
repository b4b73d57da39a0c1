"""End-to-end behaviour of the backend on the reference models."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import toca_fx
from toca_fx import ToCaBackend, ToCaConfig

from tests.helpers import step_inputs, tiny_dit, tiny_pixart
from tests.reference import ReferenceCache

MODELS = {
    "dit_sdpa": lambda: tiny_dit("sdpa"),
    "dit_manual": lambda: tiny_dit("manual"),
    "pixart_sdpa": lambda: tiny_pixart("sdpa"),
    "pixart_manual": lambda: tiny_pixart("manual"),
}


def _run(model, backend, inputs):
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        return [fast(*args) for args in inputs]


def test_every_token_recomputed_matches_plain_compile():
    model = tiny_dit()
    inputs = step_inputs(model, 10)
    backend = ToCaBackend(ToCaConfig(interval=3, ratio=1.0, num_steps=10, self_attn="recompute"))
    cached = _run(model, backend, inputs)
    plain = _run(model, "inductor", inputs)
    for step, (a, b) in enumerate(zip(cached, plain)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert backend.stats()["calls"] == {"full": 4, "partial": 6}
    # No cache is ever read, so no step stores one: one compiled graph, the model's own computation.
    graph = backend.graphs[0]
    assert graph.n_compiled == 1
    assert not [n for n in graph.variant_graph("full").graph.nodes if n.op == "call_function" and "toca" in str(n.target.__module__)]
    assert backend.stats()["cache_bytes"] == 0  # and no cache buffer is allocated


def test_only_the_caches_some_step_uses_are_allocated():
    model = tiny_dit()
    backend = ToCaBackend(ToCaConfig(interval=2, ratio=0.5, num_steps=4, inner="eager"))  # attention reused
    _run(model, backend, step_inputs(model, 4))
    state = backend.graphs[0].state
    allocated = {s.name for s, b in zip(state.specs, state.streams[0].buffers) if b.numel()}
    assert allocated == {s.name for s in state.specs}
    assert backend.stats()["cache_bytes"] == sum(s.nbytes for s in state.specs)
    # Whole-MLP reuse, attention recomputed in full: the attention branches' buffers are never touched.
    backend = ToCaBackend(ToCaConfig(interval=2, ratio=1.0, num_steps=4, inner="eager", self_attn="recompute",
                                     kind_factors={"mlp": 0.0}))
    _run(model, backend, step_inputs(model, 4))
    state = backend.graphs[0].state
    allocated = {s.name for s, b in zip(state.specs, state.streams[0].buffers) if b.numel()}
    mlp = {s.name for s in state.specs if any(s.name.startswith(f"b{b.index}_") for b in backend.graphs[0].analysis.branches if b.kind == "mlp")}
    # The default score reads the stream (no batched choice): each branch keeps its own staleness.
    assert {"b1_cache", "b1_stale"} <= mlp and allocated == mlp


@pytest.mark.parametrize("name", list(MODELS))
@pytest.mark.parametrize("self_attn", ["reuse", "recompute", "recompute_cached_kv"])
def test_partial_steps_match_hand_written_cache(name, self_attn):
    model = MODELS[name]()
    inputs = step_inputs(model, 8)
    backend = ToCaBackend(ToCaConfig(interval=4, ratio=0.4, num_steps=8, self_attn=self_attn, inner="eager"))
    cached = _run(model, backend, inputs)
    reference = ReferenceCache(model, interval=4, ratio=0.4, self_attn=self_attn)
    with torch.no_grad():
        uncached = [model(*args) for args in inputs]
    for step, args in enumerate(inputs):
        torch.testing.assert_close(cached[step], reference(*args), rtol=1e-5, atol=1e-5, msg=f"step {step}")
    # The cache matters: partial steps differ from the uncached model, full steps equal it exactly.
    assert all(torch.equal(cached[s], uncached[s]) for s in (0, 4))
    assert not torch.allclose(cached[2], uncached[2], atol=1e-4)


def test_partial_steps_match_hand_written_cache_under_inductor():
    model = tiny_pixart()
    inputs = step_inputs(model, 4)
    backend = ToCaBackend(ToCaConfig(interval=4, ratio=0.4, num_steps=4))
    cached = _run(model, backend, inputs)
    reference = ReferenceCache(model, interval=4, ratio=0.4)
    for step, args in enumerate(inputs):
        torch.testing.assert_close(cached[step], reference(*args), rtol=1e-4, atol=1e-5, msg=f"step {step}")


@pytest.mark.parametrize("self_attn", ["reuse", "recompute"])
def test_full_steps_match_model_exactly(self_attn):
    model = tiny_pixart()
    inputs = step_inputs(model, 7)
    backend = ToCaBackend(ToCaConfig(interval=3, ratio=0.25, num_steps=7, self_attn=self_attn, inner="eager"))
    cached = _run(model, backend, inputs)
    with torch.no_grad():
        for step in (0, 3, 6):
            assert torch.equal(cached[step], model(*inputs[step])), f"step {step}"


def test_no_recompilation_over_fifty_steps():
    from torch._dynamo.utils import counters

    model = tiny_dit()
    inputs = step_inputs(model, 10) * 5  # five generations of ten steps: the timestep restarts
    backend = ToCaBackend(ToCaConfig(interval=3, ratio=0.5, num_steps=10, inner="eager"))
    counters.clear()
    _run(model, backend, inputs)
    stats = backend.stats()
    assert counters["stats"]["unique_graphs"] == 1
    assert stats["graphs"] == 1 and stats["compiles"] == 2
    # num_steps=10 restarts the schedule every 10 calls: full at 0, 3, 6, 9 of each generation.
    assert stats["calls"] == {"full": 20, "partial": 30}


def test_reset_starts_a_new_generation_with_a_full_step():
    model = tiny_dit()
    inputs = step_inputs(model, 3)
    backend = ToCaBackend(ToCaConfig(interval=10, ratio=0.5, num_steps=50, inner="eager"))
    _run(model, backend, inputs[:2])
    backend.reset()
    out = _run(model, backend, inputs[2:])[0]
    with torch.no_grad():
        assert torch.equal(out, model(*inputs[2]))
    assert backend.stats()["calls"] == {"full": 2, "partial": 1}


def test_new_shape_gets_new_graph_and_fresh_state():
    model = tiny_dit()
    backend = ToCaBackend(ToCaConfig(interval=5, ratio=0.5, num_steps=50, inner="eager"))
    small, large = step_inputs(model, 2, batch=2), step_inputs(model, 2, batch=3, seed=7)
    _run(model, backend, small)
    out = _run(model, backend, large)
    with torch.no_grad():
        assert torch.equal(out[0], model(*large[0]))  # first call of the new shape: a full step
    assert len(backend.graphs) == 2
    assert [g.calls["full"] for g in backend.graphs] == [1, 1]


def test_stats_count_recomputed_tokens():
    model = tiny_dit()
    backend = ToCaBackend(ToCaConfig(interval=2, ratio=0.25, num_steps=4, inner="eager"))
    _run(model, backend, step_inputs(model, 4))
    kinds = {b["kind"]: b for b in backend.stats()["branches"]}
    assert set(kinds) == {"self_attn", "mlp"}
    # 2 full steps (16 tokens each) and 2 partial ones (4 of 16 for the MLP, none for reused attention).
    assert kinds["mlp"]["computed_fraction"] == pytest.approx((16 + 4 + 16 + 4) / 64)
    assert kinds["self_attn"]["computed_fraction"] == pytest.approx(32 / 64)
    assert backend.stats()["cache_bytes"] > 0


class SmallCNN(nn.Module):
    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Conv2d(8, 4, 3, padding=1))

    def forward(self, x):
        return self.net(x).mean(dim=(2, 3))


def test_model_without_branches_compiles_plainly_with_one_warning():
    torch.manual_seed(0)
    model = SmallCNN().eval()
    x = torch.randn(2, 3, 8, 8)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = _run(model, ToCaBackend(), [(x,)])[0]
    toca_warnings = [w for w in caught if issubclass(w.category, toca_fx.ToCaWarning)]
    assert len(toca_warnings) == 1
    assert "no cacheable residual branch" in str(toca_warnings[0].message)
    torch._dynamo.reset()
    torch.testing.assert_close(out, _run(model, "inductor", [(x,)])[0], rtol=1e-6, atol=1e-6)


def test_default_backend_is_ready():
    assert isinstance(toca_fx.toca_backend, ToCaBackend)
    assert toca_fx.toca_backend.config == ToCaConfig()


def test_theoretical_flops_follow_the_skipped_work():
    from torch.utils.flop_counter import FlopCounterMode

    model = tiny_dit("manual")  # written-out attention: PyTorch's own counter sees its matmuls
    inputs = step_inputs(model, 2)
    backend = ToCaBackend(ToCaConfig(interval=2, ratio=0.25, num_steps=2, inner="eager"))
    _run(model, backend, inputs)
    graph = backend.graphs[0]

    def flops(fn, *args):
        with torch.no_grad(), FlopCounterMode(display=False) as counter:
            fn(*args)
        return counter.get_total_flops()

    tokens = torch.randn(2, 16, 32)
    attn = sum(flops(b.attn, tokens) for b in model.blocks)
    mlp = sum(flops(b.mlp, tokens) for b in model.blocks)
    uncached = flops(model, *inputs[0])
    # The shift and scale of a reused attention (2 of each block's 6 adaLN pieces) are not computed.
    unread = sum(flops(torch.nn.functional.linear, torch.randn(2, 32), b.adaLN_modulation[1].weight[:64]) for b in model.blocks)
    assert graph.label_flops("uncached") == uncached == graph.label_flops("full")
    # Partial: attention skipped, MLP on 4 of 16 tokens, the rest unchanged but for the unread pieces.
    assert graph.label_flops("partial") == uncached - attn - mlp + mlp * 4 // 16 - unread
    assert backend.stats()["flops_ratio"] == pytest.approx((uncached + graph.label_flops("partial")) / (2 * uncached))
    # Per branch: attention reused (no FLOPs on the partial step), the MLP at 4 of 16 tokens.
    by_kind = {(b["kind"], b["branch"]): b["flops_ratio"] for b in backend.stats()["branches"]}
    for (kind, _), ratio in by_kind.items():
        assert ratio == pytest.approx((1 + (0 if kind == "self_attn" else 4 / 16)) / 2), kind


def test_graphs_with_reused_branches_compile_with_capped_fusion(monkeypatch):
    import toca_fx.runtime.compiler as compiler_module

    seen = []
    real = compiler_module.compile_variant
    monkeypatch.setattr(compiler_module, "compile_variant", lambda gm, inputs, inner, options, **kw: seen.append(options) or real(gm, inputs, inner, options, **kw))
    model = tiny_dit()
    fora = ToCaBackend(ToCaConfig(policy=toca_fx.FORAPolicy(2), num_steps=4, inner="eager"))  # whole-branch reuse
    _run(model, fora, step_inputs(model, 4))
    toca = ToCaBackend(ToCaConfig(interval=2, ratio=0.5, num_steps=4, inner="eager"))  # attention reused, MLP rows
    _run(model, toca, step_inputs(model, 4))
    caps = [o["options"].get("max_fusion_size") for o in seen]
    assert caps == [None, 16, None, None]  # FORA's reuse step only; full steps and rows steps keep the default


def test_caching_graphs_compile_without_timing_pointwise_configs(monkeypatch):
    import toca_fx.runtime.compiler as compiler_module

    seen = []
    real = compiler_module.compile_variant
    monkeypatch.setattr(compiler_module, "compile_variant", lambda gm, inputs, inner, options, **kw: seen.append(options) or real(gm, inputs, inner, options, **kw))
    model = tiny_dit()
    toca = ToCaBackend(ToCaConfig(interval=2, ratio=0.5, num_steps=4, inner="eager"))
    _run(model, toca, step_inputs(model, 4))
    every_token = ToCaBackend(ToCaConfig(interval=4, ratio=1.0, self_attn="recompute", num_steps=4, inner="eager"))
    _run(model, every_token, step_inputs(model, 4))
    tuning = [o["options"].get("triton.autotune_pointwise") for o in seen]
    assert tuning == [False, False, None]  # full and partial steps; the plain model's graph keeps Inductor's
    # A user's own choice wins.
    seen.clear()
    mine = ToCaBackend(ToCaConfig(interval=2, ratio=0.5, num_steps=4, inner="eager"))
    fast = torch.compile(model, backend=mine, dynamic=False, options={"triton.autotune_pointwise": True})
    with torch.no_grad():
        [fast(*args) for args in step_inputs(model, 4)]
    assert {o["options"]["triton.autotune_pointwise"] for o in seen} == {True}


@pytest.mark.parametrize("choice", [
    dict(scores={"attention": 1.0, "staleness": 0.25}),  # batched at the start of the step
    dict(self_attn="recompute"),  # the default score reads the stream: a choice per branch
])
def test_blocks_share_their_kernels(monkeypatch, tmp_path, choice):
    # A block's state and chosen rows are read through pointers of their own, not at constant offsets of
    # one stacked tensor: a deeper model adds no kernel source to a partial step (before, 2 a block
    # with the batched choice and 4.5 with a choice per branch, here). CPU kernels; with Triton the
    # first and last blocks' kernels may be fused differently at small depths.
    import torch._inductor.codecache as codecache

    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    written = []
    real = codecache.PyCodeCache.write
    monkeypatch.setattr(codecache.PyCodeCache, "write", staticmethod(lambda src, extra="": written.append(src) or real(src, extra)))

    def kernels(depth: int) -> list[int]:
        torch.manual_seed(0)
        model = toca_fx.models.PixArt(caption_channels=24, input_size=8, patch_size=2, hidden_size=32, depth=depth, num_heads=2).eval()
        written.clear()
        # Each step compiled whole: by regions, the blocks would share one compilation anyway.
        config = ToCaConfig(interval=2, ratio=0.5, num_steps=2, parallel_compile=False, regional=False, **choice)
        with torch._inductor.config.patch(fx_graph_cache=False):
            _run(model, ToCaBackend(config), step_inputs(model, 2))
        torch._dynamo.reset()
        wrappers = [src for src in written if "async_compile.wait" in src]
        assert len(wrappers) == 2, f"{len(wrappers)} graphs compiled, not the full and the partial step's"
        return wrappers[1].count("= async_compile.")

    assert kernels(3) == kernels(5) > 0
