"""Linears split into pieces of which some are unread compute only the read columns
(`toca_fx.rewrite.columns`): the rewritten graph, its results, and what it leaves alone."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx
from expecttest import TestCase

from toca_fx import FORAPolicy, ToCaBackend, ToCaConfig
from toca_fx.rewrite import variants
from toca_fx.rewrite.columns import narrow_dead_columns
from toca_fx.rewrite.dead_code import eliminate_dead_code

from tests.graph_text import graph_text
from tests.helpers import step_inputs, tiny_dit


class Modulation(torch.nn.Module):
    def __init__(self, split: str):
        super().__init__()
        self.linear = torch.nn.Linear(8, 24)
        self.split = split

    def forward(self, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        out = self.linear(c)
        if self.split == "chunk":
            a, b, g, s, t, h = out.chunk(6, dim=-1)
            return x * g + s + h  # pieces 2, 3 and 5 read
        if self.split == "sizes":
            a, b, g = out.split([4, 16, 4], dim=1)
            return x[..., :4] * g  # piece 2 read
        a, b = out.reshape(2, 12, 2).unbind(-1)  # not a split of the linear's last axis
        return a


def _traced(module: torch.nn.Module, *inputs: torch.Tensor) -> fx.GraphModule:
    """The graph as Dynamo gives it, with example values in node meta."""
    graphs = []
    torch._dynamo.reset()
    torch.compile(module, backend=lambda gm, _: graphs.append(gm) or gm, dynamic=False)(*inputs)
    return graphs[0]


def _narrowed(gm: fx.GraphModule) -> tuple[fx.GraphModule, int]:
    eliminate_dead_code(gm.graph)
    matched = narrow_dead_columns(gm.graph)
    eliminate_dead_code(gm.graph)
    return fx.GraphModule(gm, gm.graph), matched


class TestDeadColumns(TestCase):
    def test_runs_of_read_pieces_become_narrow_linears(self):
        torch.manual_seed(0)
        module, c, x = Modulation("chunk"), torch.randn(2, 8), torch.randn(2, 4)
        gm, matched = _narrowed(_traced(module, c, x))
        self.assertEqual(matched, 1)
        # Pieces 2-3 are one run (rows 8..16 of the weight), piece 5 another (rows 20..24).
        self.assertExpectedInline(graph_text(gm), """\
%0 = narrow(in0, 0, 8, 8)
%1 = narrow(in1, 0, 8, 8)
%2 = linear(in2, %0, %1)
%3 = narrow(%2, -1, 0, 4)
%4 = narrow(%2, -1, 4, 4)
%5 = narrow(in0, 0, 20, 4)
%6 = narrow(in1, 0, 20, 4)
%7 = linear(in2, %5, %6)
%8 = mul(in3, %3)
%9 = add(%8, %4)
%10 = add(%9, %7)
return (%10,)""")
        torch.testing.assert_close(_call(gm, module, c, x), module(c, x), rtol=1e-6, atol=1e-6)  # any BLAS

    def test_split_sizes_and_what_is_left_alone(self):
        torch.manual_seed(0)
        c, x = torch.randn(2, 8), torch.randn(2, 4)
        module = Modulation("sizes")
        gm, matched = _narrowed(_traced(module, c, x))
        self.assertEqual(matched, 1)
        self.assertIn("narrow(in1, 0, 20, 4)", graph_text(gm))
        torch.testing.assert_close(_call(gm, module, c, x), module(c, x), rtol=1e-6, atol=1e-6)  # any BLAS
        self.assertEqual(_narrowed(_traced(Modulation("reshape"), c, x))[1], 0)


def _call(gm: fx.GraphModule, module: Modulation, c: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """`gm` on the module's inputs and parameters, matched to its placeholders by name."""
    by_name = {"weight": module.linear.weight, "bias": module.linear.bias, "L_c_": c, "L_x_": x}
    inputs = [next(v for k, v in by_name.items() if k in n.name or k in str(n.target)) for n in gm.graph.nodes if n.op == "placeholder"]
    return gm(*inputs)[0]


@pytest.mark.parametrize("preset", ["dit", "fora"])
def test_every_variant_of_a_dit_computes_what_it_did_unnarrowed(preset: str, monkeypatch):
    # The partial steps of the presets reuse branches and so leave adaLN pieces unread; each step's
    # output with the narrow linears equals the output with the full ones.
    def run() -> list[torch.Tensor]:
        torch._dynamo.reset()
        model = tiny_dit()
        policy = FORAPolicy(3) if preset == "fora" else None  # FORA: steps that reuse every branch
        config = ToCaConfig.preset("dit", inner="eager", num_steps=8, policy=policy)
        fast = torch.compile(model, backend=ToCaBackend(config))
        with torch.no_grad():
            return [fast(*a) for a in step_inputs(model, 8)]

    narrowed = run()
    monkeypatch.setattr(variants, "narrow_dead_columns", lambda graph: 0)
    full = run()
    for a, b in zip(narrowed, full):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
