"""The token-axis rules, one small branch per op pattern, each captured by Dynamo (so nodes carry the
FakeTensor shapes the rules read): token-local (the branch allows "rows") or not, with the reason."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from expecttest import TestCase

from tests.helpers import captured_graph
from toca_fx.analysis.residual import find_branches

from tests.graph_text import graph_text

B, N, D, H = 2, 8, 16, 2
W = torch.randn(D, D) / 4
W3 = torch.randn(3 * D, D) / 4
FREQS = torch.polar(torch.ones(N, D // 2), torch.randn(N, D // 2))  # a rotary table, one row per token
COS, SIN = torch.randn(1, N, 1, D // H // 2), torch.randn(1, N, 1, D // H // 2)


def _heads(t):
    return t.unflatten(-1, (H, -1)).transpose(1, 2)


def _attention(q, k, v):
    return F.scaled_dot_product_attention(_heads(q), _heads(k), _heads(v)).transpose(1, 2).flatten(2)


def type_as(x):
    return (F.linear(x.float(), W) * 2).type_as(x)


def to_dtype_of(x):
    return F.linear(x.double(), W.double()).to(x.dtype)


def complex_rotary(x):
    c = torch.view_as_complex(F.linear(x, W).float().reshape(B, N, D // 2, 2)) * FREQS
    return torch.view_as_real(c).flatten(2)


def movedim_qkv(x):
    q, k, v = F.linear(x, W3).reshape(B, N, 3, H, D // H).movedim(2, 0)
    return F.scaled_dot_product_attention(*(t.transpose(1, 2) for t in (q, k, v))).transpose(1, 2).flatten(2)


def einsum_attention(x):
    q, k, v = (_heads(t) for t in F.linear(x, W3).chunk(3, dim=-1))
    p = torch.einsum("bhid,bhjd->bhij", q, k).softmax(dim=-1)
    return torch.einsum("bhij,bhjd->bhid", p, v).transpose(1, 2).flatten(2)


def grouped_query_attention(x):
    q = _heads(F.linear(x, W))
    kv = F.linear(x, W3[: D // H]).unflatten(-1, (1, -1)).transpose(1, 2)  # one key/value head
    out = F.scaled_dot_product_attention(q, kv.repeat_interleave(H, dim=1), kv.repeat(1, H, 1, 1))
    return out.transpose(1, 2).flatten(2)


def rotary_written_in_place(x):
    q = F.linear(x, W).unflatten(-1, (H, -1))
    x1, x2 = q.unflatten(-1, (-1, 2)).unbind(-1)
    out = torch.empty_like(q)
    out[..., 0::2] = x1 * COS - x2 * SIN
    out[..., 1::2] = x1 * SIN + x2 * COS
    return out.type_as(q).flatten(2)


def rotary_written_into_a_slice(x):
    q = F.linear(x, W)
    q[:, :, : D // 2] = q[:, :, : D // 2] * 2  # a computed tensor no other value aliases
    return q


T = 3  # the stream's last T rows: another part (text), sliced off inside the branch and joined again
ROPE = torch.randn(2, 1, N - T, 1, D // H)  # per-token tables of the first part
W_OUT = torch.randn(D, 2 * D) / 4


def sliced_and_joined(x):
    """A joint stream cut into its parts inside the branch: rotary on the first part's queries and keys,
    one attention over both parts, the parts' outputs joined again beside a parallel MLP."""
    h = F.layer_norm(x, (D,))
    img, txt = h[:, :-T], h[:, -T:]

    def project(w):
        head = F.linear(img, w).unflatten(-1, (H, -1))
        rotated = head * ROPE[0] + head.sin() * ROPE[1]
        return torch.cat([rotated, F.linear(txt, w).unflatten(-1, (H, -1))], dim=1).transpose(1, 2)

    out = F.scaled_dot_product_attention(project(W), project(W.T), project(W * 2)).transpose(1, 2).flatten(2)
    out = torch.cat([out[:, :-T], F.gelu(out[:, -T:])], dim=1)
    return F.linear(torch.cat([out, F.gelu(F.linear(h, W))], dim=2), W_OUT)


def write_into_the_stream(x):
    h = x.view(B, N, D)
    h[:, :, :2] = 0
    return F.linear(h, W)


def tokens_mixed_by_linear(x):
    return F.linear(x.transpose(1, 2), torch.randn(N, N)).transpose(1, 2)


def repeat_along_tokens(x):
    return F.linear(x, W).repeat_interleave(2, dim=1)[:, :N]


def cumulative_sum(x):
    return F.linear(x, W).cumsum(dim=1)


def softmax_over_tokens(x):
    return F.linear(x, W).softmax(dim=1)


def mean_over_tokens(x):
    return F.linear(x, W) - F.linear(x, W).mean(dim=1, keepdim=True)


def causal_attention(x):
    q, k, v = (_heads(t) for t in F.linear(x, W3).chunk(3, dim=-1))
    return F.scaled_dot_product_attention(q, k, v, is_causal=True).transpose(1, 2).flatten(2)


def einsum_summing_tokens(x):
    return torch.einsum("bnd,bmd->bmd", F.linear(x, W), x)


TOKEN_LOCAL = {  # branch -> its kind
    type_as: "mlp", to_dtype_of: "mlp", complex_rotary: "mlp", movedim_qkv: "self_attn",
    einsum_attention: "self_attn", grouped_query_attention: "self_attn", rotary_written_in_place: "mlp",
    rotary_written_into_a_slice: "mlp", sliced_and_joined: "joint_attn",
}
NOT_TOKEN_LOCAL = {  # branch -> words of the reason
    write_into_the_stream: "alias", tokens_mixed_by_linear: "token axis", repeat_along_tokens: "repeats along",
    cumulative_sum: "not known", softmax_over_tokens: "normalises over the token axis",
    mean_over_tokens: "reduces over the token axis", causal_attention: "causal",
    einsum_summing_tokens: "token axis",
}


def analyse(branch):
    return find_branches(captured_graph(lambda x: x + branch(x), torch.randn(B, N, D)).graph)


@pytest.mark.parametrize("branch", list(TOKEN_LOCAL), ids=lambda f: f.__name__)
def test_token_local(branch):
    (found,) = analyse(branch).branches
    assert found.modes == ("fill", "rows", "reuse", "compute") and not found.whole_only
    assert found.kind == TOKEN_LOCAL[branch]


@pytest.mark.parametrize("branch", list(NOT_TOKEN_LOCAL), ids=lambda f: f.__name__)
def test_not_token_local_is_cached_whole(branch):
    (found,) = analyse(branch).branches
    assert found.modes == ("fill", "reuse", "compute")
    assert NOT_TOKEN_LOCAL[branch] in found.whole_only, found.whole_only


def test_rotary_written_in_place_computes_chosen_rows_exactly():
    """The rows path copies the writes after the fresh tensor they fill (`gather_scatter.wanted`)."""
    from toca_fx import ToCaBackend, ToCaConfig

    torch._dynamo.reset()
    backend = ToCaBackend(ToCaConfig(interval=2, ratio=0.5, num_steps=2, inner="eager", timestep_clock=False))
    fast = torch.compile(lambda x: x + rotary_written_in_place(x), backend=backend, dynamic=False)
    x = torch.randn(B, N, D)
    with torch.no_grad():
        full, partial = fast(x), fast(x)  # a partial step on an unchanged input: rows equal the cache
    torch.testing.assert_close(partial, full, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(full, x + rotary_written_in_place(x), rtol=1e-6, atol=1e-6)
    assert backend.stats()["computed_fraction"] < 1.0


def test_sliced_stream_chooses_rows_of_its_largest_part():
    """The parts that slices cut the stream into: the largest part's rows are chosen, the other part
    is recomputed whole. A partial step on a changed input: the other part's rows and k of the first
    part's rows are exact, every other row is the cached one."""
    from toca_fx import ToCaBackend, ToCaConfig

    (found,) = analyse(sliced_and_joined).branches
    assert found.tokens == N - T and found.out_axes.extra == T
    torch._dynamo.reset()
    config = ToCaConfig(interval=2, ratio=0.5, num_steps=2, inner="eager", timestep_clock=False, self_attn="recompute")
    backend = ToCaBackend(config)
    fast = torch.compile(lambda x: x + sliced_and_joined(x), backend=backend, dynamic=False)
    x, x2 = torch.randn(B, N, D), torch.randn(B, N, D)
    with torch.no_grad():
        fast(x)
        partial = fast(x2)
        fresh, stale = x2 + sliced_and_joined(x2), x2 + sliced_and_joined(x)
    rows_fresh = torch.isclose(partial, fresh, rtol=1e-5, atol=1e-5).all(-1).all(0)
    rows_stale = torch.isclose(partial, stale, rtol=1e-5, atol=1e-5).all(-1).all(0)
    assert rows_fresh[N - T:].all(), "the other part is recomputed whole"
    assert int(rows_fresh[: N - T].sum()) == 3 and (rows_fresh | rows_stale)[: N - T].all()  # k = ceil(0.5 * 5)


class TestRotarySnapshot(TestCase):
    def test_partial_step_writes_the_chosen_rows_of_the_fresh_tensor(self):
        from toca_fx import ToCaBackend, ToCaConfig

        torch._dynamo.reset()
        backend = ToCaBackend(ToCaConfig(interval=2, ratio=0.5, num_steps=2, inner="eager", timestep_clock=False))
        with torch.no_grad():
            torch.compile(lambda x: x + rotary_written_in_place(x), backend=backend, dynamic=False)(torch.randn(B, N, D))
        self.assertExpectedInline(graph_text(backend.graphs[0].variant_graph("partial")), """\
%0 = select_tokens(in0, toca_b0_stale, toca_b0_ref, 4)
%1 = gather_rows(in0, 1, %0)
%2 = linear(%1, in1)
%3 = unflatten(%2, -1, (2, -1))
%4 = unflatten(%3, -1, (-1, 2))
%5 = unbind(%4, -1)
%6 = getitem(%5, 0)
%7 = getitem(%5, 1)
%8 = empty_like(%3)
%9 = gather_rows(in2, 1, %0)
%10 = mul(%6, %9)
%11 = gather_rows(in3, 1, %0)
%12 = mul(%7, %11)
%13 = sub(%10, %12)
%14 = setitem(%8, (slice(None, None, None), slice(0, 4, None), slice(None, None, None), slice(0, None, 2)), %13)
%15 = mul(%6, %11)
%16 = mul(%7, %9)
%17 = add(%15, %16)
%18 = setitem(%8, (slice(None, None, None), slice(0, 4, None), slice(None, None, None), slice(1, None, 2)), %17)
%19 = type_as(%8, %3)
%20 = flatten(%19, 2)
%21 = scatter_rows(toca_b0_cache, 1, %0, %20)
%22 = add(in0, %21)
return (%22,)""")
