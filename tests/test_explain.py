"""`toca_fx.explain`: branches found per model, counted independently from the model's own modules."""
from __future__ import annotations

import pytest
import torch

import toca_fx

from tests.diffusers_zoo import BUILDERS, build, loop_inputs

attention_modules = pytest.importorskip("diffusers.models.attention")
processors = pytest.importorskip("diffusers.models.attention_processor")
ATTENTION = (attention_modules.AttentionModuleMixin, processors.Attention)
FEED_FORWARD = attention_modules.FeedForward


def _modules(model, kind):
    return {name: m for name, m in model.named_modules() if isinstance(m, kind)}


@pytest.mark.parametrize("name", list(BUILDERS))
def test_explain_finds_every_attention_and_mlp(name):
    model = build(name)
    report = toca_fx.explain(model, **loop_inputs(name, 1)[0])
    kinds = report.kinds()
    attention = _modules(model, ATTENTION)
    # Each attention module is one branch; joint attention counts once (its image side is cached).
    assert kinds["self_attn"] + kinds["cross_attn"] + kinds["joint_attn"] == len(attention)
    assert kinds["cross_attn"] == sum(1 for path in attention if path.endswith("attn2"))  # diffusers' naming
    assert kinds["mlp"] == len(_modules(model, FEED_FORWARD))
    assert report.graphs == 1 and report.graph_breaks == 0
    for b in report.branches:
        assert b["hidden"] == 32 and b["tokens"] >= 5  # text-stream MLPs (SD3, FLUX) have 5
        assert b["cache_bytes"] >= 2 * b["tokens"] * 32 * 4  # at least the [B, N, D] fp32 output cache
    # Joint blocks: each text-stream residual add computed with the image stream is listed as
    # recomputed, with why. SD3's last block drops its text side; CogVideoX's MLP is joint too.
    joint = [n for n in report.not_cached if "computed jointly" in n["why"]]
    assert len(joint) == {"sd3": 1, "flux": 1, "cogvideox": 4}.get(name, 0)


def test_report_prints_as_a_table():
    report = toca_fx.explain(build("pixart"), **loop_inputs("pixart", 1)[0])
    text = str(report)
    assert text.splitlines()[1].split() == ["graph", "branch", "kind", "tokens", "hidden", "cache", "modes"]
    assert "transformer_blocks.0.attn2" in text and "cross_attn" in text
    assert all(b["modes"] == ("fill", "rows", "reuse", "compute") for b in report.branches)


class TokenMixingBranch(torch.nn.Module):
    """A residual branch that mixes tokens (a linear along the token axis): cacheable only whole."""

    def __init__(self):
        super().__init__()
        self.mix, self.mlp = torch.nn.Linear(16, 16), torch.nn.Linear(8, 8)

    def forward(self, x):
        x = x + self.mix(x.transpose(1, 2)).transpose(1, 2)
        return x + self.mlp(x)


def test_branch_not_token_local_is_cached_whole_and_says_why():
    report = toca_fx.explain(TokenMixingBranch(), torch.randn(2, 16, 8))
    modes = [b["modes"] for b in report.branches]
    assert modes == [("fill", "reuse", "compute"), ("fill", "rows", "reuse", "compute")]
    assert "token axis" in report.branches[0]["why_whole"]
    assert "cached whole only" in str(report)


class WithGraphBreak(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.mlp = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8))
        self.mix = torch.nn.Linear(4, 4)

    def forward(self, x):
        x = x + self.mlp(x)
        torch._dynamo.graph_break()
        return x + self.mix(x.transpose(1, 2)).transpose(1, 2)  # mixes tokens: cached only whole


def test_explain_lists_graph_breaks_and_branches_cached_whole():
    report = toca_fx.explain(WithGraphBreak(), torch.randn(2, 4, 8))
    assert report.graphs == 2 and report.graph_breaks == 1
    assert [(b["kind"], "rows" in b["modes"]) for b in report.branches] == [("mlp", True), ("mlp", False)]
    whats = " | ".join(f"{n['what']}: {n['why']}" for n in report.not_cached)
    assert "graph break at test_explain.py" in whats and "graph_break" in whats
    why = report.branches[1]["why_whole"]
    assert "'linear'" in why and "token axis" in why  # the token-mixing linear, and why
