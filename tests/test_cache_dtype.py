"""ToCaConfig.cache_dtype: caches stored narrower than the branch outputs, read back in their dtype."""
from __future__ import annotations

import pytest
import torch
import torch.fx as fx

from toca_fx import ToCaConfig
from toca_fx.ops.cache import load, scatter_rows, scatter_scaled, store_scaled
from toca_fx.ops.scores import refresh_scores
from toca_fx.rewrite.layout import BufferSpec
from toca_fx.rewrite.narrow_caches import narrow_caches

from tests.helpers import tiny_dit_generation

BASE = dict(interval=3, ratio=0.5, num_steps=7, self_attn="recompute")
F8 = torch.float8_e4m3fn


def test_float8_rows_round_within_the_formats_step():
    value = torch.randn(2, 5, 16) * torch.logspace(-3, 3, 5)[None, :, None]  # rows of very different scales
    cache, scale = torch.zeros(2, 5, 16, dtype=torch.uint8), torch.ones(2, 5, 1)
    store_scaled(cache, scale, value, F8)
    back = load(cache, scale, torch.float32, F8)
    rel = (back - value).abs() / value.abs().amax(-1, keepdim=True)
    assert rel.max() <= 2 ** -4  # e4m3: 3 mantissa bits, a row's largest element at 448
    # the bytes are e4m3's own: the reference rounding by torch's float8 conversion
    assert torch.equal(cache.view(F8).float(), (value / scale).to(F8).float())
    assert scale.shape == (2, 5, 1)


def test_scattered_rows_are_read_back_as_computed():
    cache, scale = torch.zeros(1, 6, 8, dtype=torch.uint8), torch.ones(1, 6, 1)
    store_scaled(cache, scale, torch.randn(1, 6, 8), F8)
    before = load(cache, scale, torch.float32, F8)
    idx, rows = torch.tensor([4, 1]), torch.randn(1, 2, 8)
    out = scatter_scaled(cache, scale, 1, idx, rows, torch.float32, F8)
    assert torch.equal(out[:, idx], rows)  # exact: not rounded through the cache
    keep = [0, 2, 3, 5]
    assert torch.equal(out[:, keep], before[:, keep])
    assert torch.allclose(load(cache, scale, torch.float32, F8)[:, idx], rows, rtol=2 ** -4, atol=1e-6)


def _writes_into(fn, cache: torch.Tensor, *args) -> list[str]:
    """What `fn(cache, *args)`'s functionalized aten graph copies back into `cache`: the op that made the
    copied value, and whether that op read the cache placeholder itself or a view of it."""
    from torch.fx.experimental.proxy_tensor import make_fx

    gm = make_fx(torch.func.functionalize(fn, remove="mutations_and_views"))(cache, *args)
    placeholder = next(n for n in gm.graph.nodes if n.op == "placeholder")
    made = []
    for node in gm.graph.nodes:
        if node.target is torch.ops.aten.copy_.default and node.args[0] is placeholder:
            src = node.args[1]
            while src.target in (torch.ops.aten.view.dtype, torch.ops.aten.view_copy.dtype):  # the value's own bitcast
                src = src.args[0]
            made.append(f"{src.target.__name__}({'cache' if src.args[0] is placeholder else src.args[0].target.__name__})")
    return made


def test_float8_rows_are_written_into_the_cache_bytes_not_a_view():
    """The rows' bytes go into the cache input itself, as into a cache of the model's dtype: written
    through a dtype view, the functionalized graph rebuilds the whole cache and copies it back."""
    cache, scale = torch.zeros(2, 6, 8, dtype=torch.uint8), torch.ones(2, 6, 1)
    idx, rows = torch.tensor([4, 1]), torch.randn(2, 2, 8)

    def partial(c, s, idx, rows):
        return scatter_scaled(c, s, 1, idx, rows, torch.float32, F8)

    assert _writes_into(partial, cache, scale, idx, rows) == ["index_copy.default(cache)"]
    wide = torch.zeros(2, 6, 8)
    assert _writes_into(lambda c, i, r: scatter_rows(c, 1, i, r), wide, idx, rows) == ["index_copy.default(cache)"]


@pytest.mark.parametrize("dtype,tol", [(torch.bfloat16, 2e-3), (F8, 2e-2)])
def test_narrow_caches_stay_close_and_take_fewer_bytes(dtype, tol):
    ref, wide = tiny_dit_generation(ToCaConfig(inner="eager", **BASE))
    torch._dynamo.reset()
    out, narrow = tiny_dit_generation(ToCaConfig(inner="eager", cache_dtype=dtype, **BASE))
    state, wide_state = narrow.graphs[0].state, wide.graphs[0].state
    caches = [(b, spec) for s in state.streams for b, spec in zip(s.buffers, state.specs) if spec.name.endswith("_cache")]
    stored = torch.uint8 if dtype == F8 else dtype  # a float8 cache holds its elements as bytes
    assert caches and all(c.dtype == stored and c.numel() and spec.holds == (F8 if dtype == F8 else None)
                          for c, spec in caches)
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
