"""Variants compiled by `compile_inductor` reach Inductor's on-disk caches: compiled again with the
in-memory state gone, they load from both caches, with equal results."""
from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from toca_fx import ToCaConfig
from toca_fx.inductor import TensorMeta

from .helpers import tiny_dit_generation as _generation


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
