"""The Triton kernel of the "attention" score against float64 and against the torch path. It runs only
where CUDA and Triton are (the GPU machine); elsewhere `attention_influence` takes the torch path,
which tests/test_scores.py and tests/test_scores_graph.py cover."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.kernels import attention_columns

from tests.helpers import step_inputs, tiny_dit

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and attention_columns.triton is not None),
    reason="the kernel needs CUDA and Triton",
)


def _sampled(q: torch.Tensor, queries: int) -> torch.Tensor:
    return q[..., :: q.shape[-2] // queries, :][..., :queries, :] if 0 < queries < q.shape[-2] else q


def _reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q.double() @ k.double().transpose(-2, -1)) * scale).softmax(dim=-1).sum(dim=(0, 1, 2))


@pytest.mark.parametrize("keys", [200, 300])  # one tile of keys (one pass), or chunks of tiles
@pytest.mark.parametrize("queries", [0, 16, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_column_sums_match_float64(keys: int, queries: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    # Key counts not a multiple of the tile, head dim 72 (DiT-XL/2's), strided views of a fused projection.
    qkv = torch.randn(2, keys, 3, 3, 72, device="cuda", generator=g).to(dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = _sampled(q, queries)
    got = attention_columns.column_sums(q, k, 72 ** -0.5).sum(dim=0)
    torch.testing.assert_close(got.double(), _reference(q, k, 72 ** -0.5), rtol=1e-4, atol=1e-5)
    assert got.sum().item() == pytest.approx(2 * 3 * (queries or keys), rel=1e-5)  # each query's row sums to 1


@pytest.mark.parametrize("heads, keys", [(1, 1000), (64, 4160)])
def test_key_chunks_merge_exactly(heads: int, keys: int):
    # One head over 1000 keys: the statistics are split into many chunks of keys to fill the GPU; 64
    # heads over 4160: fewer chunks, the last one part of a tile. Both merge to the exact softmax.
    g = torch.Generator(device="cuda").manual_seed(1)
    q = torch.randn(1, heads, 64, 64, device="cuda", generator=g).to(torch.bfloat16)
    k = torch.randn(1, heads, keys, 64, device="cuda", generator=g).to(torch.bfloat16)
    assert attention_columns.column_sums(q, k, 0.125).sum(dim=0).double().sub(_reference(q, k, 0.125)).abs().max() < 1e-4


def test_any_layout_is_read_as_it_is():
    # Keys whose last axis is strided (a transposed view) and queries offset into their storage.
    g = torch.Generator(device="cuda").manual_seed(2)
    q = torch.randn(2, 2, 40, 32, device="cuda", generator=g).to(torch.float16)[:, :, 8:]
    k = torch.randn(2, 2, 32, 100, device="cuda", generator=g).to(torch.float16).transpose(-2, -1)
    torch.testing.assert_close(attention_columns.column_sums(q, k, 0.2).sum(dim=0).double(), _reference(q, k, 0.2), rtol=1e-4, atol=1e-5)
    assert not attention_columns.supports(q.float(), k.float())


def test_compiled_map_matches_the_torch_path():
    # Inductor compiles the kernel into the full step (bf16 on the GPU); the CPU float32 run takes the
    # torch path. The maps agree to bf16 precision.
    batch = 2
    q = torch.zeros(batch, 2, 8, 16, device="cuda", dtype=torch.bfloat16)  # tiny_dit's 8 sampled queries
    k = torch.zeros(batch, 2, 16, 16, device="cuda", dtype=torch.bfloat16)  # and its 16 keys
    assert attention_columns.supports(q, k)
    config = ToCaConfig(interval=4, num_steps=4, scores={"attention": 1.0}, attention_queries=8)
    maps = []
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", torch.float32)):
        model = tiny_dit().to(device, dtype)
        backend = ToCaBackend(config)
        fast = torch.compile(model, backend=backend, dynamic=False)
        x, t, y = step_inputs(model, 1, batch=batch)[0]
        with torch.no_grad():
            _, code = run_and_get_code(fast, x.to(device, dtype), t.to(device, dtype), y.to(device))
        assert ("toca_fx.kernels.attention_columns" in "".join(code)) == (device == "cuda")
        state = backend.graphs[0].state
        (attn,) = [b for s, b in zip(state.specs, state.streams[0].buffers) if s.name.startswith("attn_")]
        maps.append(attn.cpu())
        torch._dynamo.reset()
    assert maps[0].norm(dim=-1).sub(1).abs().max() < 1e-5  # L2-normalised rows
    assert torch.nn.functional.cosine_similarity(maps[0], maps[1], dim=-1).min() > 0.999
