"""`find_branches` on small graphs captured by Dynamo: each residual form, gate forms, the stream read
through a cast, streams without latent tokens, and rejections with their reasons; plus a snapshot of
one analysis as text."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from expecttest import TestCase

from tests.helpers import captured_graph
from toca_fx.analysis.graphs import op_name
from toca_fx.analysis.residual import find_branches

B, N, D = 2, 8, 16
W, W2 = torch.randn(D, D) / 4, torch.randn(D, 2 * D) / 4


def analyse(fn, *inputs):
    return find_branches(captured_graph(fn, *inputs).graph)


def summary(analysis) -> str:
    """One line per branch (kind, cache point's op, gate's op, modes) and per rejection."""
    lines = [f"{b.kind}: out={op_name(b.out)} gate={b.gate and op_name(b.gate)} tokens={b.tokens} "
             f"nodes={len(b.nodes)} modes={','.join(b.modes)}" for b in analysis.branches]
    lines += [f"rejected: {r.reason}{' (by design)' if r.by_design else ''}" for r in analysis.rejected]
    return "\n".join(lines)


def mlp(h):
    return F.linear(F.gelu(F.linear(F.layer_norm(h, (D,)), W2.T)), W2)


def gated(x, c):
    shift, scale, gate = F.linear(F.silu(c), torch.randn(3 * D, D)).chunk(3, dim=-1)
    h = x + gate.unsqueeze(1) * mlp(F.layer_norm(x, (D,)) * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1))
    return h


def cast_residual(x, c):
    g = c.unsqueeze(1)
    return (x.float() + mlp(x) * g).type_as(x)


def in_place_add(x):
    x += mlp(x)
    return x


def not_closed(x):
    h = F.linear(x, W)
    return x + F.gelu(h), h  # an intermediate of the branch leaves the graph


def gate_read_from_the_stream(x):
    return x + x.mean(dim=1, keepdim=True).sigmoid() * mlp(x)


def modulation_stream(t, x):
    """A residual stream over 4 slots computed from the timestep alone, then a latent stream."""
    slots = torch.sin(t[:, None, None] * torch.arange(4 * D).view(1, 4, D))
    slots = slots + mlp(slots)
    return x + mlp(x + slots.mean(dim=1, keepdim=True))


def attention(x):
    q, k, v = (t.unflatten(-1, (2, -1)).transpose(1, 2) for t in F.linear(x, torch.randn(3 * D, D) / 4).chunk(3, -1))
    return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)


def nested_add(x, c):
    """The attention output added to the stream only to be normalised for the MLP, whose output is
    added to the stream itself."""
    g1, g2 = c.unsqueeze(1).chunk(2, dim=-1)
    h = F.layer_norm(x + g1 * attention(F.layer_norm(x, (D,))), (D,))
    return x + g2 * mlp(h)


def position_added_after_a_block(x, pos):
    x = x + pos
    x = x + mlp(x)
    return pos + x  # adds pos onto a residual sum: no branch of its own


def text_rows_rotated_in_place(x, txt, rope):
    """Joint attention over [text, image] written into the stream's rows of the joint queries; seen from
    the text stream, the rotary acts on the other stream's (image) rows alone."""
    joint = torch.cat([F.layer_norm(txt, (D,)), F.layer_norm(x, (D,))], dim=1)
    q, k, v = (F.linear(joint, w).unflatten(-1, (2, -1)).transpose(1, 2) for w in (W, W.T, 2 * W))
    q[:, :, txt.shape[1]:] = q[:, :, txt.shape[1]:] * rope
    out = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).flatten(2)
    return x + out[:, txt.shape[1]:], txt + out[:, : txt.shape[1]]


class TestFindBranches(TestCase):
    def test_branch_past_an_inner_residual_add(self):
        self.assertExpectedInline(summary(analyse(nested_add, torch.randn(B, N, D), torch.randn(B, 2 * D))), """\
self_attn: out=flatten gate=getitem tokens=8 nodes=15 modes=fill,rows,reuse,compute
mlp: out=linear gate=getitem tokens=8 nodes=5 modes=fill,rows,reuse,compute""")

    def test_add_onto_a_residual_sum_is_no_branch(self):
        self.assertExpectedInline(summary(analyse(position_added_after_a_block, torch.randn(B, N, D), torch.randn(B, N, D))), """\
mlp: out=linear gate=None tokens=8 nodes=4 modes=fill,rows,reuse,compute
rejected: adds l_pos_ to the sum of another residual add (x_1), not to a branch of its own (by design)""")

    def test_text_side_computing_on_image_rows_is_the_joint_attention_smaller_side(self):
        inputs = torch.randn(B, N, D), torch.randn(B, 3, D), torch.randn(1, 1, N, D // 2)
        self.assertExpectedInline(summary(analyse(text_rows_rotated_in_place, *inputs)), """\
joint_attn: out=getitem gate=None tokens=8 nodes=18 modes=fill,rows,reuse,compute
rejected: computed jointly with getitem_1 (8 tokens), whose rows are cached; these 3 tokens are recomputed where it reuses or computes rows, forecast with it where it forecasts (by design)""")


    def test_gated_branch_is_cut_before_its_gate(self):
        self.assertExpectedInline(summary(analyse(gated, torch.randn(B, N, D), torch.randn(B, D))), """mlp: out=linear gate=unsqueeze tokens=8 nodes=7 modes=fill,rows,reuse,compute""")

    def test_stream_read_through_a_cast(self):
        self.assertExpectedInline(summary(analyse(cast_residual, torch.randn(B, N, D), torch.randn(B, D))), """mlp: out=linear gate=unsqueeze tokens=8 nodes=4 modes=fill,rows,reuse,compute""")

    def test_in_place_add(self):
        self.assertExpectedInline(summary(analyse(in_place_add, torch.randn(B, N, D))), """mlp: out=linear gate=None tokens=8 nodes=4 modes=fill,rows,reuse,compute""")

    def test_branch_read_outside_is_rejected(self):
        self.assertExpectedInline(summary(analyse(not_closed, torch.randn(B, N, D))), """\
rejected: h inside the branch is also used by output""")

    def test_gate_computed_from_the_stream_stays_in_the_branch(self):
        analysis = analyse(gate_read_from_the_stream, torch.randn(B, N, D))
        (branch,) = analysis.branches
        assert branch.gate is None and "reduces over the token axis" in branch.whole_only

    def test_stream_without_latent_tokens_is_left_alone(self):
        analysis = analyse(modulation_stream, torch.rand(B), torch.randn(B, N, D))
        assert [b.tokens for b in analysis.branches] == [N]
        assert [(r.by_design, "no latent tokens" in r.reason) for r in analysis.rejected] == [(True, True)]
