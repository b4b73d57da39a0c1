"""The "attention" score on the GPU in one Triton kernel: how much attention each key receives, summed
over (sampled) queries, heads and batch, without writing out the map.

In torch the score is a product, a softmax over the keys and sums over the other axes: on DiT-XL/2
(H100, 64 sampled queries) about 9 kernels and 26 us a block, 0.7 ms of a full step. Here one program per
(batch and head, tile of queries) takes its queries' softmax statistics over all keys (pass 1), then
sums their probabilities over its queries for each key (pass 2), the products on tensor cores, into one
row of partial sums; one reduction adds the rows. Used where `supports` holds (CUDA tensors, Triton
importable, [B, H, L, d] queries and keys, a grid that fills the GPU); `toca_fx.scores` falls back to
torch elsewhere.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_Q, BLOCK_K = 64, 64
_DTYPES = (torch.bfloat16, torch.float16)  # float32 would run its products in tf32: torch's path instead


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `column_sums` takes these queries and keys, and has a program for every multiprocessor:
    each program walks all keys twice, so a grid smaller than the GPU is slower than torch's path
    (PixArt-1024: 32 programs for 4096 keys, 1.9x over Inductor against 2.0x with torch's)."""
    if not (
        triton is not None and q.is_cuda and q.dim() == 4 and k.dim() == 4
        and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1] <= 256
        and q.dtype == k.dtype and q.dtype in _DTYPES
    ):
        return False
    programs = q.shape[0] * q.shape[1] * triton.cdiv(q.shape[-2], BLOCK_Q)
    return programs >= torch.cuda.get_device_properties(q.device).multi_processor_count


def column_sums(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[L_k] float32: softmax(q k^T * scale) over the keys, summed over batch, heads and queries (the
    caller samples the queries)."""
    batch, heads, _, dim = q.shape
    # Contiguous, so the kernel's addressing holds whatever layout Inductor gives the inputs.
    q, k = q.contiguous(), k.contiguous()
    n, keys = q.shape[-2], k.shape[-2]
    tiles = triton.cdiv(n, BLOCK_Q)
    partial = torch.empty(batch * heads * tiles, keys, dtype=torch.float32, device=q.device)
    torch.library.wrap_triton(_columns_kernel)[(batch * heads, tiles)](
        q, k, partial, n, keys, dim, scale,
        BLOCK_Q=BLOCK_Q, BLOCK_K=BLOCK_K, BLOCK_D=max(16, triton.next_power_of_2(dim)),
    )
    return partial.sum(dim=0)


if triton is not None:

    @triton.jit
    def _columns_kernel(
        q_ptr, k_ptr, out_ptr, n, keys, dim, scale,
        BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh, tile = tl.program_id(0), tl.program_id(1)
        rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
        d = tl.arange(0, BLOCK_D)
        q_mask = (rows < n)[:, None] & (d < dim)[None, :]
        q = tl.load(q_ptr + (bh * n + rows)[:, None] * dim + d[None, :], mask=q_mask, other=0.0)
        # Pass 1: each query's running max and sum of exponentials over all keys.
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        s_sum = tl.zeros([BLOCK_Q], tl.float32)
        for start in range(0, keys, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            k_mask = (cols < keys)[:, None] & (d < dim)[None, :]
            k = tl.load(k_ptr + (bh * keys + cols)[:, None] * dim + d[None, :], mask=k_mask, other=0.0)
            s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # Inductor may pass the scale as float64
            s = tl.where((cols < keys)[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            s_sum = s_sum * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        # Pass 2: the probabilities, summed over this tile's queries, for each key.
        out_row = out_ptr + (bh * tl.num_programs(1) + tile) * keys
        for start in range(0, keys, BLOCK_K):
            cols = start + tl.arange(0, BLOCK_K)
            k_mask = (cols < keys)[:, None] & (d < dim)[None, :]
            k = tl.load(k_ptr + (bh * keys + cols)[:, None] * dim + d[None, :], mask=k_mask, other=0.0)
            s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)  # Inductor may pass the scale as float64
            p = tl.exp(s - m[:, None]) / s_sum[:, None]
            p = tl.where((rows < n)[:, None] & (cols < keys)[None, :], p, 0.0)
            tl.store(out_row + cols, tl.sum(p, axis=0), mask=cols < keys)
