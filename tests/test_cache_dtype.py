"""ToCaConfig.cache_dtype: caches stored narrower than the branch outputs, read back in their dtype."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from toca_fx import ToCaConfig
from toca_fx.ops.cache import load, scatter_scaled, store_scaled
from toca_fx.ops.scores import refresh_scores
from toca_fx.rewrite.layout import BufferSpec
from toca_fx.rewrite.narrow_caches import narrow_caches

from tests.helpers import tiny_dit_generation

BASE = dict(interval=3, ratio=0.5, num_steps=7, self_attn="recompute")
F8 = torch.float8_e4m3fn


def test_float8_rows_round_within_the_formats_step():
    value = torch.randn(2, 5, 16) * torch.logspace(-3, 3, 5)[None, :, None]  # rows of very different scales
    cache, scale = torch.zeros(2, 5, 16, dtype=F8), torch.ones(2, 5, 1)
    store_scaled(cache, scale, value)
    back = load(cache, scale, torch.float32)
    rel = (back - value).abs() / value.abs().amax(-1, keepdim=True)
    assert rel.max() <= 2 ** -4  # e4m3: 3 mantissa bits, a row's largest element at 448
    assert cache.dtype == F8 and scale.shape == (2, 5, 1)


def test_scattered_rows_are_read_back_as_computed():
    cache, scale = torch.zeros(1, 6, 8, dtype=F8), torch.ones(1, 6, 1)
    store_scaled(cache, scale, torch.randn(1, 6, 8))
    before = load(cache, scale, torch.float32)
    idx, rows = torch.tensor([4, 1]), torch.randn(1, 2, 8)
    out = scatter_scaled(cache, scale, 1, idx, rows, torch.float32)
    assert torch.equal(out[:, idx], rows)  # exact: not rounded through the cache
    keep = [0, 2, 3, 5]
    assert torch.equal(out[:, keep], before[:, keep])
    assert torch.allclose(load(cache, scale, torch.float32)[:, idx], rows, rtol=2 ** -4, atol=1e-6)


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-3), (F8, 2e-2)])
def test_narrow_caches_stay_close_and_take_fewer_bytes(dtype, tol):
    ref, wide = tiny_dit_generation(ToCaConfig(inner="eager", **BASE))
    torch._dynamo.reset()
    out, narrow = tiny_dit_generation(ToCaConfig(inner="eager", cache_dtype=dtype, **BASE))
    state, wide_state = narrow.graphs[0].state, wide.graphs[0].state
    caches = [b for s in state.streams for b, spec in zip(s.buffers, state.specs) if spec.name.endswith("_cache")]
    assert caches and all(c.dtype == dtype and c.numel() for c in caches)
    assert state.nbytes < wide_state.nbytes
    for step, (a, r) in enumerate(zip(out, ref)):
        err = ((a - r).norm() / r.norm()).item()
        if step % 3 == 0:
            assert err == 0, f"full step {step} reads no cache"
        else:
            assert 0 < err < tol, f"step {step}: {err}"


def test_float8_caches_under_inductor_match_eager():
    config = ToCaConfig(cache_dtype=F8, **BASE)
    eager, _ = tiny_dit_generation(ToCaConfig(inner="eager", cache_dtype=F8, **BASE))
    torch._dynamo.reset()
    compiled, _ = tiny_dit_generation(config)
    for step, (a, b) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4, msg=f"step {step}")


def test_another_in_place_update_of_a_narrow_cache_is_refused():
    graph = fx.Graph()
    x, cache = graph.placeholder("x"), graph.placeholder("toca_b0_cache")
    graph.placeholder("toca_b0_scale")
    graph.output(graph.call_function(refresh_scores, (x, cache)))
    specs = (BufferSpec("b0_cache", (1, 4, 8), F8, torch.device("cpu"), reads_as=torch.float32),
             BufferSpec("b0_scale", (1, 4, 1), torch.float32, torch.device("cpu")))
    with pytest.raises(NotImplementedError, match="refresh_scores"):
        narrow_caches(fx.GraphModule(torch.nn.Module(), graph), specs, frozenset({0}))
