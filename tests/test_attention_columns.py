"""The Triton kernel of the "attention" score against float64 and against the torch path. It runs only
where CUDA and Triton are (the GPU machine); elsewhere `attention_influence` takes the torch path,
which tests/test_scores.py and tests/test_scores_graph.py cover."""
from __future__ import annotations

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig, attention_columns

from .helpers import step_inputs, tiny_dit

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and attention_columns.triton is not None),
    reason="the kernel needs CUDA and Triton",
)


def _sampled(q: torch.Tensor, queries: int) -> torch.Tensor:
    return q[..., :: q.shape[-2] // queries, :][..., :queries, :] if 0 < queries < q.shape[-2] else q


def _reference(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return ((q.double() @ k.double().transpose(-2, -1)) * scale).softmax(dim=-1).sum(dim=(0, 1, 2))


@pytest.mark.parametrize("queries", [0, 16, 100])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_column_sums_match_float64(queries: int, dtype: torch.dtype):
    g = torch.Generator(device="cuda").manual_seed(0)
    # 300 keys (not a multiple of the tile), head dim 72 (DiT-XL/2's), strided views of a fused projection.
    qkv = torch.randn(2, 300, 3, 3, 72, device="cuda", generator=g).to(dtype)
    q, k, _ = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    q = _sampled(q, queries)
    got = attention_columns.column_sums(q, k, 72 ** -0.5)
    torch.testing.assert_close(got.double(), _reference(q, k, 72 ** -0.5), rtol=1e-4, atol=1e-5)
    assert got.sum().item() == pytest.approx(2 * 3 * (queries or 300), rel=1e-5)  # each query's row sums to 1


def test_the_kernel_is_taken_only_where_its_grid_fills_the_gpu():
    sms = torch.cuda.get_device_properties(0).multi_processor_count
    q = torch.zeros(1, sms, 64, 72, device="cuda", dtype=torch.bfloat16)  # one program per head
    assert attention_columns.supports(q, q)
    assert not attention_columns.supports(q[:, 1:], q[:, 1:])
    assert not attention_columns.supports(q.float(), q.float())


def test_compiled_map_matches_the_torch_path():
    # Inductor compiles the kernel into the full step (bf16 on the GPU, a batch that gives every
    # multiprocessor a program: 2 heads, 8 sampled queries, one tile each); the CPU float32 run takes
    # the torch path. The maps agree to bf16 precision.
    batch = -(-torch.cuda.get_device_properties(0).multi_processor_count // 2)
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
            fast(x.to(device, dtype), t.to(device, dtype), y.to(device))
        state = backend.graphs[0].state
        (attn,) = [b for s, b in zip(state.specs, state.stream_buffers[0]) if s.name.startswith("attn_")]
        maps.append(attn.cpu())
        torch._dynamo.reset()
    assert maps[0].norm(dim=-1).sub(1).abs().max() < 1e-5  # L2-normalised rows
    assert torch.nn.functional.cosine_similarity(maps[0], maps[1], dim=-1).min() > 0.999
