"""The "attention" score on the GPU in Triton: how much attention each key receives, summed over
(sampled) queries and heads, without writing out the map.

In torch the score is a product, a softmax over the keys and sums over the other axes, about 9
kernels. Here, where every key fits one tile (DiT-XL/2's 256), one program per (batch and head, tile
of queries) takes the softmax and sums each key's probabilities in one pass. With more keys, as in
split-key (flash-decoding) attention, the keys are cut into chunks so that both kernels have work for
every multiprocessor: `_stats_kernel` takes each query's softmax maximum and sum of exponentials over
one chunk; `_columns_kernel`, one program per (batch and head, tile of keys), merges the chunks'
statistics and sums its keys' probabilities over the queries. Products run on tensor cores.
`column_sums` is a custom operator that reads its inputs' strides when it runs, so Inductor passes the
views of the fused QKV projection as they are (no copies). `benchmarks/score_kernel.py` times it
against torch's (docs/scores.md). Used where `supports` holds (CUDA tensors, Triton importable,
[B, H, L, d] queries and keys in bf16 or fp16); `toca_fx.ops.scores` falls back to torch elsewhere.
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
_WAVES = 2  # the statistics kernel's programs per multiprocessor, where the keys allow it
ONE_TILE = 256  # keys up to this many are taken in one tile, in one pass
# Warps, from a sweep with each kernel timed right after the QKV projection that writes its input, as
# in the model (`benchmarks/score_kernel.py --warps`; docs/scores.md): one tile of 128 keys or more
# takes 8 (fewer keys keep 4); the split kernels (statistics, columns) take 4 each.
ONE_TILE_WARPS = 8
SPLIT_WARPS = (4, 4)


def supports(q: torch.Tensor, k: torch.Tensor) -> bool:
    """Whether `column_sums` takes these queries and keys."""
    return (
        triton is not None and q.is_cuda and q.dim() == 4 and k.dim() == 4
        and q.shape[:2] == k.shape[:2] and q.shape[-1] == k.shape[-1] <= 256
        and q.dtype == k.dtype and q.dtype in _DTYPES
        and max(q.shape[-2] * q.stride(-2), k.shape[-2] * k.stride(-2)) < 2**31  # int32 row offsets
    )


@torch.library.custom_op("toca_fx::attention_columns", mutates_args=(), tags=(torch.Tag.flexible_layout,))
def column_sums(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    """[B * H, L_k] float32: softmax(q k^T * scale) over the keys, summed over the queries (the caller
    samples them, and sums the rows, which Inductor fuses with what follows). q: [B, H, L_q, d],
    k: [B, H, L_k, d], any strides."""
    q, k = (t if t.stride(-1) == 1 else t.contiguous() for t in (q, k))
    batch, heads, n, dim = q.shape
    keys = k.shape[-2]
    tiles = triton.cdiv(n, BLOCK_Q)
    # The head dim as a constant: its masks then leave whole 16-byte vectors (72 = 9 x 8 bf16), not
    # one load per element.
    blocks = dict(DIM=dim, BLOCK_Q=BLOCK_Q, BLOCK_D=max(16, triton.next_power_of_2(dim)))
    strides = (*q.stride()[:3], *k.stride()[:3])
    partial = torch.empty(_partial_rows(q, k), keys, dtype=torch.float32, device=q.device)
    if keys <= ONE_TILE:
        block_k = max(16, triton.next_power_of_2(keys))
        warps = ONE_TILE_WARPS if block_k >= 128 else 4
        _one_tile_kernel[(batch * heads, tiles)](
            q, k, partial, heads, n, keys, scale, *strides, BLOCK_K=block_k, num_warps=warps, **blocks
        )
        return partial
    chunk = _chunk(batch * heads * tiles, keys, q.device)
    splits = triton.cdiv(keys, chunk)
    m = torch.empty(batch * heads, splits, n, dtype=torch.float32, device=q.device)
    l = torch.empty_like(m)
    stats_warps, columns_warps = SPLIT_WARPS
    _stats_kernel[(batch * heads, tiles, splits)](
        q, k, m, l, heads, n, keys, chunk, splits, scale, *strides, BLOCK_K=BLOCK_K, num_warps=stats_warps, **blocks
    )
    _columns_kernel[(batch * heads, triton.cdiv(keys, BLOCK_K))](
        q, k, m, l, partial, heads, n, keys, splits, scale, *strides, BLOCK_K=BLOCK_K, num_warps=columns_warps, **blocks
    )
    return partial


@column_sums.register_fake
def _(q: torch.Tensor, k: torch.Tensor, scale: float) -> torch.Tensor:
    return q.new_empty(_partial_rows(q, k), k.shape[-2], dtype=torch.float32)


def _partial_rows(q: torch.Tensor, k: torch.Tensor) -> int:
    """Rows of `column_sums`' result: one per (batch and head, tile of queries) in one pass, one per
    batch and head from the split kernels (which sum over the query tiles)."""
    per_head = -(-q.shape[2] // BLOCK_Q) if k.shape[-2] <= ONE_TILE else 1
    return q.shape[0] * q.shape[1] * per_head


def _chunk(programs: int, keys: int, device: torch.device) -> int:
    """Keys per chunk of the statistics kernel: whole tiles, as few chunks as give `_WAVES` programs
    per multiprocessor."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    splits = max(1, min(triton.cdiv(_WAVES * sms, programs), triton.cdiv(keys, BLOCK_K)))
    return triton.cdiv(triton.cdiv(keys, splits), BLOCK_K) * BLOCK_K


if triton is not None:

    @triton.jit
    def _tile(ptr, bh, heads, start, count, s_b, s_h, s_l, BLOCK: tl.constexpr, DIM: tl.constexpr, BLOCK_D: tl.constexpr):
        """Rows start..start+BLOCK of head `bh`'s [L, d] matrix (zeros past `count` and `DIM`)."""
        rows = start + tl.arange(0, BLOCK)
        d = tl.arange(0, BLOCK_D)
        base = ptr + (bh // heads).to(tl.int64) * s_b + (bh % heads).to(tl.int64) * s_h
        mask = (rows < count)[:, None] & (d < DIM)[None, :]
        return tl.load(base + rows[:, None] * s_l + d[None, :], mask=mask, other=0.0)

    @triton.jit
    def _scores(q, k, cols, keys, scale):
        """q k^T * scale in float32, -inf past the last key (Inductor may pass the scale as float64)."""
        s = (tl.dot(q, tl.trans(k)) * scale).to(tl.float32)
        return tl.where((cols < keys)[None, :], s, float("-inf"))

    @triton.jit
    def _one_tile_kernel(
        q_ptr, k_ptr, out_ptr, heads, n, keys, scale, sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
        DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh, tile = tl.program_id(0), tl.program_id(1)
        rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
        cols = tl.arange(0, BLOCK_K)
        q = _tile(q_ptr, bh, heads, tile * BLOCK_Q, n, sq_b, sq_h, sq_l, BLOCK_Q, DIM, BLOCK_D)
        k = _tile(k_ptr, bh, heads, 0, keys, sk_b, sk_h, sk_l, BLOCK_K, DIM, BLOCK_D)
        s = _scores(q, k, cols, keys, scale)
        p = tl.exp(s - tl.max(s, axis=1)[:, None])
        p = tl.where((rows < n)[:, None], p / tl.sum(p, axis=1)[:, None], 0.0)
        tl.store(out_ptr + (bh * tl.num_programs(1) + tile) * keys + cols, tl.sum(p, axis=0), mask=cols < keys)

    @triton.jit
    def _stats_kernel(
        q_ptr, k_ptr, m_ptr, l_ptr, heads, n, keys, chunk, splits, scale,
        sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
        DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh, tile, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        q = _tile(q_ptr, bh, heads, tile * BLOCK_Q, n, sq_b, sq_h, sq_l, BLOCK_Q, DIM, BLOCK_D)
        m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
        total = tl.zeros([BLOCK_Q], tl.float32)
        for start in range(split * chunk, tl.minimum(keys, split * chunk + chunk), BLOCK_K):
            k = _tile(k_ptr, bh, heads, start, keys, sk_b, sk_h, sk_l, BLOCK_K, DIM, BLOCK_D)
            s = _scores(q, k, start + tl.arange(0, BLOCK_K), keys, scale)
            m_new = tl.maximum(m, tl.max(s, axis=1))
            total = total * tl.exp(m - m_new) + tl.sum(tl.exp(s - m_new[:, None]), axis=1)
            m = m_new
        rows = tile * BLOCK_Q + tl.arange(0, BLOCK_Q)
        at = (bh * splits + split) * n + rows
        tl.store(m_ptr + at, m, mask=rows < n)
        tl.store(l_ptr + at, total, mask=rows < n)

    @triton.jit
    def _columns_kernel(
        q_ptr, k_ptr, m_ptr, l_ptr, out_ptr, heads, n, keys, splits, scale,
        sq_b, sq_h, sq_l, sk_b, sk_h, sk_l,
        DIM: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ):
        bh, key_tile = tl.program_id(0), tl.program_id(1)
        cols = key_tile * BLOCK_K + tl.arange(0, BLOCK_K)
        k = _tile(k_ptr, bh, heads, key_tile * BLOCK_K, keys, sk_b, sk_h, sk_l, BLOCK_K, DIM, BLOCK_D)
        acc = tl.zeros([BLOCK_K], tl.float32)
        for start in range(0, n, BLOCK_Q):
            rows = start + tl.arange(0, BLOCK_Q)
            # Each query's statistics over all keys, merged from its chunks'.
            m = tl.full([BLOCK_Q], float("-inf"), tl.float32)
            total = tl.zeros([BLOCK_Q], tl.float32)
            for split in range(0, splits):
                at = (bh * splits + split) * n + rows
                m_s = tl.load(m_ptr + at, mask=rows < n, other=float("-inf"))
                l_s = tl.load(l_ptr + at, mask=rows < n, other=0.0)
                m_new = tl.maximum(m, m_s)
                total = total * tl.exp(m - m_new) + l_s * tl.exp(m_s - m_new)
                m = m_new
            m = tl.where(rows < n, m, 0.0)  # padded queries: no -inf - -inf
            total = tl.where(rows < n, total, 1.0)
            q = _tile(q_ptr, bh, heads, start, n, sq_b, sq_h, sq_l, BLOCK_Q, DIM, BLOCK_D)
            p = tl.exp(_scores(q, k, cols, keys, scale) - m[:, None]) / total[:, None]
            acc += tl.sum(tl.where((rows < n)[:, None], p, 0.0), axis=0)
        tl.store(out_ptr + bh * keys + cols, acc, mask=cols < keys)
