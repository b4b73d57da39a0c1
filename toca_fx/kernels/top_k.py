"""The k highest scores of each row, on the GPU in Triton, by ranking.

Torch's top-k of one row runs in one thread block, and a partial step chooses tokens for every cached
branch, one row each (`benchmarks/top_k_kernel.py` compares the two). Here a score's rank is
the number of scores ahead of it (higher, or equal at a lower index), and the token of rank r is written
to slot r if r < k. Each program ranks one tile of a row's tokens against the whole row, read once per
tile, so a row of N tokens has N / BLOCK_I programs. The result is in rank order (highest first, ties to
the lower index), deterministic, and equal to a stable descending sort's first k. NaN ranks as -inf,
so every slot is written whatever the scores hold. Used where `supports` holds (CUDA, Triton); elsewhere
`toca_fx.ops.scores` takes torch's top-k.

`top_k_refresh` is one branch's whole token choice in that one launch: as each program knows its
tokens' ranks, it also resets the chosen tokens' staleness (the others' goes up by one) and keeps their
norms as the reference of the "change" score: apart, that update would be one more kernel per branch.
"""
from __future__ import annotations

import torch

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs
    triton = None

BLOCK_I = 16  # tokens ranked by one program
MAX_PAIRS = 2**24  # comparisons (rows x N^2) up to which ranking beats torch's top-k


def supports(score: torch.Tensor) -> bool:
    """Whether `top_k` takes this score: CUDA, Triton, and few enough comparisons (`MAX_PAIRS`, where
    ranking stops beating torch's top-k in `benchmarks/top_k_kernel.py`)."""
    pairs = score.shape[-1] ** 2 * (score.shape[0] if score.dim() == 2 else 1)
    return (
        triton is not None and score.is_cuda and score.dim() in (1, 2) and score.is_floating_point()
        and pairs <= MAX_PAIRS
    )


@torch.library.custom_op("toca_fx::top_k", mutates_args=())
def top_k(score: torch.Tensor, k: int) -> torch.Tensor:
    """Indices (int64) of the k highest entries of each row of `score` ([N] -> [k], [R, N] -> [R, k]),
    highest first, ties to the lower index."""
    rows = score if score.dim() == 2 else score[None]
    r, n = rows.shape
    _check_k("top_k", n, k)
    out = torch.empty(r, k, dtype=torch.long, device=score.device)
    _rank_kernel[(triton.cdiv(n, BLOCK_I), r)](
        rows, out, n, k, *rows.stride(), None, 0, None, 0, None, 0, REFRESH=False, REF=False, **_tiles(n)
    )
    return out if score.dim() == 2 else out[0]


@top_k.register_fake
def _(score: torch.Tensor, k: int) -> torch.Tensor:
    return score.new_empty(*score.shape[:-1], k, dtype=torch.long)


@torch.library.custom_op("toca_fx::top_k_refresh", mutates_args=("staleness", "ref_norm"))
def top_k_refresh(
    score: torch.Tensor, k: int, staleness: torch.Tensor, ref_norm: torch.Tensor | None, norm: torch.Tensor | None
) -> torch.Tensor:
    """`top_k` of one row [N], and in the same pass the choice's state update: staleness [N] of the k
    chosen tokens := 0, of the others += 1; `ref_norm`[chosen] := `norm`[chosen] (if given). `score`
    must not share memory with the state, which other programs update while ranking."""
    (n,) = score.shape
    _check_k("top_k_refresh", n, k)
    if (ref_norm is None) != (norm is None):
        raise ValueError("top_k_refresh: ref_norm and norm go together")
    state = [t for t in (staleness, ref_norm, norm) if t is not None]
    if any(t.shape != score.shape for t in state):
        raise ValueError(f"top_k_refresh: state shapes {[tuple(t.shape) for t in state]} differ from the score's {n}")
    if any(t.untyped_storage().data_ptr() == score.untyped_storage().data_ptr() for t in state[:2]):
        raise ValueError("top_k_refresh: score shares memory with the state it updates")
    out = torch.empty(k, dtype=torch.long, device=score.device)
    ref, norm_ = (ref_norm, norm) if ref_norm is not None else (staleness, staleness)  # unread when REF is off
    _rank_kernel[(triton.cdiv(n, BLOCK_I), 1)](
        score, out, n, k, 0, score.stride(0), staleness, staleness.stride(0), ref, ref.stride(0), norm_, norm_.stride(0),
        REFRESH=True, REF=ref_norm is not None, **_tiles(n),
    )
    return out


@top_k_refresh.register_fake
def _(score, k, staleness, ref_norm, norm):
    return score.new_empty(k, dtype=torch.long)


def _check_k(op: str, n: int, k: int) -> None:
    if not 0 < k <= n:
        raise ValueError(f"{op}: k must be in [1, {n}] (the row length), got {k}")


def _tiles(n: int) -> dict[str, int]:
    """The rank kernel's launch configuration for rows of n scores (`benchmarks/top_k_kernel.py --sweep`)."""
    block_j = min(512, max(16, triton.next_power_of_2(n)))  # scores compared per iteration
    return dict(BLOCK_I=BLOCK_I, BLOCK_J=block_j, num_warps=8 if block_j >= 512 else 4)


if triton is not None:

    @triton.jit
    def _row(ptr, at, stride, n):
        """Scores at positions `at` of one row as float32, -inf past the end and for NaN."""
        s = tl.load(ptr + at * stride, mask=at < n, other=float("-inf")).to(tl.float32)
        return tl.where(s == s, s, float("-inf"))

    @triton.jit
    def _rank_kernel(
        score_ptr, out_ptr, n, k, s_r, s_n, stale_ptr, s_stale, ref_ptr, s_ref, norm_ptr, s_norm,
        BLOCK_I: tl.constexpr, BLOCK_J: tl.constexpr, REFRESH: tl.constexpr, REF: tl.constexpr,
    ):
        tile, row = tl.program_id(0), tl.program_id(1)
        base = score_ptr + row.to(tl.int64) * s_r
        i = tile * BLOCK_I + tl.arange(0, BLOCK_I)
        mine = _row(base, i, s_n, n)[:, None]
        # Counts per (token, lane), summed once at the end: a sum per iteration would put a reduction
        # across threads on every iteration's critical path.
        ahead = tl.zeros([BLOCK_I, BLOCK_J], tl.int32)
        for start in range(0, n, BLOCK_J):
            j = start + tl.arange(0, BLOCK_J)
            other = _row(base, j, s_n, n)[None, :]
            # Past the end: -inf at j > i, never ahead.
            ahead += ((other > mine) | ((other == mine) & (j[None, :] < i[:, None]))).to(tl.int32)
        rank = tl.sum(ahead, axis=1)
        chosen = (i < n) & (rank < k)
        tl.store(out_ptr + row.to(tl.int64) * k + rank, i.to(tl.int64), mask=chosen)
        if REFRESH:  # one row: this program's tokens' state, which no other program reads
            stale = tl.load(stale_ptr + i * s_stale, mask=i < n)
            tl.store(stale_ptr + i * s_stale, tl.where(chosen, 0, stale + 1), mask=i < n)
            if REF:
                tl.store(ref_ptr + i * s_ref, tl.load(norm_ptr + i * s_norm, mask=chosen), mask=chosen)
