"""A fused qkv projection, written as diffusers' fused `to_qkv` writes it (a chunk of the last axis): on a
partial step that recomputes the chosen queries, the queries' linear runs on those tokens only and the
keys' and values' over all tokens; the outputs match a hand-written cache that gathers the queries from
a projection of every token."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from expecttest import TestCase

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.analysis import rules
from toca_fx.analysis.graphs import op_name
from toca_fx.policies.plan import StepKind
from toca_fx.policies.toca import ToCaPolicy
from toca_fx.ops.scores import refresh_scores, select_tokens

from tests.graph_text import graph_text

DIM, HEADS, TOKENS, RATIO = 16, 2, 8, 0.5
CONFIG = dict(interval=2, ratio=RATIO, num_steps=4, self_attn="recompute", inner="eager")


class FusedBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(DIM), nn.LayerNorm(DIM)
        self.to_qkv, self.proj = nn.Linear(DIM, 3 * DIM), nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = nn.Linear(DIM, 2 * DIM), nn.Linear(2 * DIM, DIM)

    def attn(self, h: torch.Tensor, rows: torch.Tensor | None = None) -> torch.Tensor:
        """Self-attention of `h`; with `rows`, of those queries only (gathered after the projection)."""
        q, k, v = self.to_qkv(h).chunk(3, dim=-1)
        if rows is not None:
            q = q[:, rows]
        out = F.scaled_dot_product_attention(*(_heads(t) for t in (q, k, v)))
        return self.proj(out.transpose(1, 2).flatten(2))

    def mlp(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(h)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


def _heads(t: torch.Tensor) -> torch.Tensor:
    return t.unflatten(-1, (HEADS, -1)).transpose(1, 2)


def _compiled() -> tuple[FusedBlock, ToCaBackend]:
    torch._dynamo.reset()
    torch.manual_seed(0)
    block = FusedBlock().eval()
    backend = ToCaBackend(ToCaConfig(**CONFIG))
    return block, backend


class TestSplitProjection(TestCase):
    def test_queries_are_projected_for_the_chosen_tokens_only(self):
        block, backend = _compiled()
        with torch.no_grad():  # with gradients, the backend compiles without caching
            torch.compile(block, backend=backend, dynamic=False)(torch.randn(2, TOKENS, DIM))
        self.assertExpectedInline(graph_text(backend.graphs[0].variant_graph("partial")), """\
%0 = layer_norm(in2, (16,), in0, in1, 1e-05)
%1 = narrow(in3, 0, 0, 16)
%2 = narrow(in4, 0, 0, 16)
%3 = narrow(in3, 0, 16, 32)
%4 = narrow(in4, 0, 16, 32)
%5 = linear(%0, %3, %4)
%6 = split(%5, [16, 16], -1)
%7 = getitem(%6, 0)
%8 = getitem(%6, 1)
%9 = unflatten(%7, -1, (2, -1))
%10 = transpose(%9, 1, 2)
%11 = unflatten(%8, -1, (2, -1))
%12 = transpose(%11, 1, 2)
%13 = select_tokens(in2, toca_b0_stale, toca_b0_ref, 4)
%14 = gather_rows(%0, 1, %13)
%15 = linear(%14, %1, %2)
%16 = unflatten(%15, -1, (2, -1))
%17 = transpose(%16, 1, 2)
%18 = scaled_dot_product_attention(%17, %10, %12)
%19 = transpose(%18, 1, 2)
%20 = flatten(%19, 2)
%21 = linear(%20, in5, in6)
%22 = scatter_rows(toca_b0_cache, 1, %13, %21)
%23 = add(in2, %22)
%24 = select_tokens(%23, toca_b1_stale, toca_b1_ref, 4)
%25 = gather_rows(%23, 1, %24)
%26 = layer_norm(%25, (16,), in7, in8, 1e-05)
%27 = linear(%26, in9, in10)
%28 = gelu(%27)
%29 = linear(%28, in11, in12)
%30 = scatter_rows(toca_b1_cache, 1, %24, %29)
%31 = add(%23, %30)
return (%31,)""")

    def test_partial_steps_match_hand_written_cache(self):
        block, backend = _compiled()
        fast = torch.compile(block, backend=backend, dynamic=False)
        reference = _Reference(block)
        policy = ToCaPolicy(ToCaConfig(**CONFIG))
        g = torch.Generator().manual_seed(1)
        x, drift = torch.randn(2, TOKENS, DIM, generator=g), torch.randn(2, TOKENS, DIM, generator=g)
        with torch.no_grad():
            for step in range(CONFIG["num_steps"]):
                inputs = x + 0.05 * step * drift
                expected = reference(inputs, policy.label(step, CONFIG["num_steps"]) == StepKind.FULL)
                torch.testing.assert_close(fast(inputs), expected, rtol=1e-5, atol=1e-5, msg=f"step {step}")
        assert backend.stats()["calls"] == {"full": 2, "partial": 2}


class _Reference:
    """ToCa on `FusedBlock` by hand: the queries of the chosen tokens gathered from every token's."""

    def __init__(self, block: FusedBlock):
        self.block = block
        self.k = int(RATIO * TOKENS)
        self.cache, self.stale, self.ref = {}, {}, {}

    def __call__(self, x: torch.Tensor, full: bool) -> torch.Tensor:
        b = self.block
        x = x + self._branch("attn", full, x, lambda z, rows: b.attn(b.norm1(z), rows))
        return x + self._branch("mlp", full, x, lambda z, rows: b.mlp(b.norm2(z if rows is None else z[:, rows])))

    def _branch(self, name: str, full: bool, x: torch.Tensor, fn) -> torch.Tensor:
        if full:
            self.cache[name] = fn(x, None)
            self.stale[name], self.ref[name] = torch.zeros(TOKENS), torch.zeros(TOKENS)
            refresh_scores(x, self.stale[name], self.ref[name])
        else:
            rows = select_tokens(x, self.stale[name], self.ref[name], self.k)
            self.cache[name][:, rows] = fn(x, rows)
        return self.cache[name]


def test_a_split_the_analysis_cannot_follow_keeps_the_fused_projection(monkeypatch):
    # Without its rule for `split` the analysis would lose the attention branch of the split graph.
    monkeypatch.delitem(rules.RULES, "split")
    block, backend = _compiled()
    with torch.no_grad():
        torch.compile(block, backend=backend, dynamic=False)(torch.randn(2, TOKENS, DIM))
    partial = backend.graphs[0].variant_graph("partial")
    assert [n for n in partial.graph.nodes if op_name(n) == "narrow"] == []
    assert [n.args[0].name for n in partial.graph.nodes if op_name(n) == "scatter_rows"] == ["toca_b0_cache", "toca_b1_cache"]
