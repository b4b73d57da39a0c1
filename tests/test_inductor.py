"""Variants compiled by `compile_inductor` reach Inductor's on-disk caches: compiled again with the
in-memory state gone, they load from both caches, with equal results. They reduce rows of up to
PERSISTENT_ROWS elements in one pass, a choice in their cache keys; the plain fallback keeps Inductor's."""
from __future__ import annotations

import types

import pytest
import sympy
import torch
import torch.fx as fx
from torch._dynamo.utils import counters
from torch._inductor.choices import InductorChoices
from torch._inductor.runtime.hints import ReductionHint
from torch._inductor.sizevars import SizeVarAllocator
from torch._inductor.virtualized import V

import toca_fx
import toca_fx.compile.options
from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.analysis.fake import TensorMeta
from toca_fx.compile.inductor import PERSISTENT_ROWS, compile_inductor, wide_rows_choices

from tests.helpers import tiny_dit_generation as _generation


def test_a_second_compilation_loads_from_both_caches_with_equal_outputs(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # nothing cached by another run
    config = ToCaConfig(interval=2, ratio=0.5, num_steps=2)  # a full and a partial variant
    counters.clear()
    cold, backend = _generation(config)
    compiles = backend.stats()["compiles"]
    assert compiles == 2
    # Both variants call toca_fx's functions (the full one stores caches): each was cacheable.
    assert counters["aot_autograd"]["autograd_cache_saved"] == compiles
    assert counters["aot_autograd"]["autograd_cache_bypass"] == counters["inductor"]["fxgraph_cache_bypass"] == 0
    torch._dynamo.reset()  # a new backend and graphs: only the on-disk caches are left to hit
    counters.clear()
    warm, _ = _generation(config)
    assert counters["aot_autograd"]["autograd_cache_hit"] == counters["inductor"]["fxgraph_cache_hit"] == compiles
    assert counters["aot_autograd"]["autograd_cache_miss"] == counters["inductor"]["fxgraph_cache_miss"] == 0
    for step, (a, b) in enumerate(zip(cold, warm)):
        assert torch.equal(a, b), f"step {step}"


def test_tensor_meta_makes_tensors_like_the_original():
    weight = torch.nn.Parameter(torch.randn(4, 3))
    view = torch.randn(3, 4).t()  # strided
    for x in (weight, view, torch.zeros(0)):
        y = TensorMeta.of(x).fake()
        assert (y.shape, y.stride(), y.dtype, y.requires_grad, type(y)) == (x.shape, x.stride(), x.dtype, x.requires_grad, type(x))
    assert TensorMeta.of(3) == 3
    assert TensorMeta.contiguous((2, 0, 5), torch.float16, "cpu") == TensorMeta.of(torch.zeros(2, 0, 5, dtype=torch.float16))


class _Features:
    """What a choice of reduction reads of a kernel: its reduction hint and the row's length."""

    def __init__(self, hint: ReductionHint, row: int):
        self.hint, self.reduction_numel, self.numel = hint, sympy.Integer(row), sympy.Integer(4096 * row)

    def get_reduction_hint(self) -> ReductionHint:
        return self.hint

    def strict_sum_rblock(self) -> None:  # torch >= 2.14 asks: no fixed block for a sum here
        return None

    def has_strict_sum_multirow_reduction(self) -> bool:
        return False


def test_rows_up_to_the_limit_reduce_in_one_pass_where_inductor_would_loop():
    wide = wide_rows_choices()
    with V.set_graph_handler(types.SimpleNamespace(sizevars=SizeVarAllocator())):
        def persistent(choices, hint, row):
            return choices.should_use_persistent_reduction(_Features(hint, row), False)

        for row in (1152, 3072, PERSISTENT_ROWS):  # DiT / PixArt and FLUX hidden sizes
            assert persistent(wide, ReductionHint.INNER, row)
            assert not persistent(InductorChoices, ReductionHint.INNER, row)
        assert not persistent(wide, ReductionHint.INNER, PERSISTENT_ROWS + 1)
        assert persistent(wide, ReductionHint.INNER, 512) and persistent(InductorChoices, ReductionHint.INNER, 512)
        for hint, row in ((ReductionHint.OUTER, 1152), (ReductionHint.DEFAULT, 32), (ReductionHint.DEFAULT, 1152)):
            assert persistent(wide, hint, row) == persistent(InductorChoices, hint, row)  # other reductions: Inductor's


def test_variants_compile_with_wide_rows_keyed_and_the_plain_fallback_without(monkeypatch):
    seen = []

    def record(gm, inputs, config_patches):
        marked = config_patches["unsafe_marked_cacheable_functions"]
        seen.append((type(V.choices).__name__, marked.get("toca_fx.persistent_rows")))
        return gm

    monkeypatch.setattr("torch._inductor.compile_fx.compile_fx", record)
    gm = fx.symbolic_trace(torch.nn.LayerNorm(8))
    compile_inductor(gm, [torch.randn(2, 8)], {})
    compile_inductor(gm, [torch.randn(2, 8)], {}, wide_rows=False)
    assert seen == [("WideRows", str(PERSISTENT_ROWS)), ("InductorChoices", None)]
    assert type(V.choices).__name__ == "InductorChoices"  # the choice ends with the compilation

    flags = []
    monkeypatch.setattr(toca_fx.compile.options, "compile_inductor", lambda gm, inputs, patches, wide_rows: flags.append(wide_rows) or gm)
    torch._dynamo.reset()
    fast = torch.compile(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.ReLU()), backend=ToCaBackend(), dynamic=False)
    with torch.no_grad(), pytest.warns(toca_fx.ToCaWarning, match="no cacheable residual branch"):
        fast(torch.randn(2, 8))
    assert flags == [False]
