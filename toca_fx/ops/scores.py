"""Token scores: which tokens a partial step recomputes. Computed inside the compiled graph.

ToCa's four scores and two baselines, each a function of per-token state, combined by the weights of
`ToCaConfig.scores` (a weighted sum; "spatial" is a bonus on that sum):

- "attention": how much attention each token receives (column sums of its block's self-attention map,
  L2-normalised as in ToCa's code), taken when the self-attention runs over all tokens (full steps);
- "cross_entropy": entropy of each image token's cross-attention over the text, L2-normalised, taken on
  full steps;
- "staleness": cache frequency, steps since the token was last recomputed (every token gets its turn);
- "spatial": in each cell (2 tokens per grid axis) of the token grid, the best-scoring token gets
  `weight x its score` on top (ToCa: 0.6), which spreads the recomputed tokens over the image;
- "change": how far the token's norm moved since it was last recomputed, squashed to [0, 1);
- "random": uniform noise (a baseline).

The default, staleness + change, ranks by staleness first (change / (1 + change) < 1 breaks ties only).
One choice serves the whole batch, so both halves of a batched classifier-free-guidance call recompute
the same tokens.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ..kernels import attention_columns
from ..kernels import top_k

SCORES = ("attention", "cross_entropy", "staleness", "spatial", "change", "random")
DEFAULT_WEIGHTS = (("change", 1.0), ("staleness", 1.0))  # sorted, as ToCaConfig keeps weights
CELL = 2  # tokens per grid axis in one spatial cell


def token_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm of a [B, N, D] stream, averaged over the batch: [N] float32."""
    return x.float().norm(dim=-1).mean(dim=0)


def select_tokens(
    x: torch.Tensor,
    staleness: torch.Tensor,
    ref_norm: torch.Tensor | None,
    k: int,
    weights: tuple[tuple[str, float], ...] = DEFAULT_WEIGHTS,
    attention: torch.Tensor | None = None,
    entropy: torch.Tensor | None = None,
    grid: tuple[int, ...] | None = None,
) -> torch.Tensor:
    """Indices of the k tokens with the highest combined score; updates staleness and reference norms.

    `attention` and `entropy` are [N] maps kept from the last full step (None: that score is off).
    `ref_norm` is None when "change" is not weighted: the stream is then not read at all (a score from
    state alone costs no pass over the stream).
    """
    w = dict(weights)
    change = None
    if w.get("change"):
        norm = token_norm(x)
        change = (norm - ref_norm).abs()
    score = _combine(w, staleness, attention, entropy, grid, change)
    if top_k.supports(score):  # the choice and the state update in one kernel
        return top_k.top_k_refresh(score, k, staleness, *((ref_norm, norm) if change is not None else (None, None)))
    idx = top_indices(score, k)
    staleness.add_(1).index_fill_(0, idx, 0)
    if change is not None:
        ref_norm.index_copy_(0, idx, norm.index_select(0, idx))
    return idx


def select_batch(
    staleness: torch.Tensor,
    rows: tuple[int, ...],
    ks: tuple[int, ...],
    weights: tuple[tuple[str, float], ...],
    attention: torch.Tensor | None = None,
    attention_rows: tuple[int, ...] = (),
    entropy: torch.Tensor | None = None,
    entropy_rows: tuple[int, ...] = (),
    grid: tuple[int, ...] | None = None,
    row_ids: tuple[torch.Tensor, ...] = (),
) -> list[torch.Tensor]:
    """`select_tokens` for many branches at once, for scores that read no stream ("change" off): one
    batched top-k at the start of a step instead of a score, a top-k and a staleness update per branch.

    `staleness` [S, N] stacks the branches' staleness; branch i of the choice owns row `rows[i]` and
    picks `ks[i]` tokens. `attention` [A, N] and `entropy` [E, N] stack the maps, branch i reading
    their rows `attention_rows[i]` and `entropy_rows[i]`. Returns each branch's indices; updates the
    staleness rows as `select_tokens` would.

    `row_ids`, if given, holds i for branch i (an int64 [1] tensor each): its indices are then read from
    the row of the batched top-k that this tensor names at run time. A row fixed in the graph would be
    a constant offset in the code of every kernel that reads the indices, so each block's gather and
    scatter kernels would differ and Inductor would compile them block by block.
    """
    w = dict(weights)
    if w.get("change"):
        raise ValueError("select_batch: the 'change' score reads the stream; use select_tokens")
    stale = _stack_rows(staleness, rows)
    attn = _stack_rows(attention, attention_rows) if attention is not None else None
    ent = _stack_rows(entropy, entropy_rows) if entropy is not None else None
    score = _combine(w, stale, attn, ent, grid)
    k_max = max(ks)
    # Equal ks: any order. Unequal: ordered, so each row's first k are its top k.
    top = top_indices(score, k_max, ordered=len(set(ks)) > 1)
    keep = torch.arange(k_max, device=top.device) < torch.tensor(ks, device=top.device)[:, None]
    chosen = torch.zeros(score.shape, dtype=torch.bool, device=score.device).scatter_(1, top, keep)
    _put_rows(staleness, rows, torch.where(chosen, 0.0, stale + 1))
    if row_ids:
        return [torch.ops.aten._unsafe_index.Tensor(top, [r])[0, :k] for r, k in zip(row_ids, ks, strict=True)]
    return [top[i, :k] for i, k in enumerate(ks)]


def top_indices(score: torch.Tensor, k: int, ordered: bool = False) -> torch.Tensor:
    """Indices of the k highest entries of each row of a score ([N] -> [k], [R, N] -> [R, k]); `ordered`:
    highest first. On the GPU a Triton kernel ranks the scores (`toca_fx.kernels.top_k`: in rank order, ties to
    the lower index) where torch's top-k takes one thread block per row."""
    if top_k.supports(score):
        return top_k.top_k(score, k)
    return torch.topk(score, k, sorted=ordered).indices


def refresh_scores(x: torch.Tensor, staleness: torch.Tensor, ref_norm: torch.Tensor | None = None) -> torch.Tensor:
    """A full step recomputes every token: reset staleness and reference norms (if kept)."""
    if ref_norm is not None:
        ref_norm.copy_(token_norm(x))
    return staleness.zero_()


def _combine(
    w: dict[str, float],
    staleness: torch.Tensor,
    attention: torch.Tensor | None,
    entropy: torch.Tensor | None,
    grid: tuple[int, ...] | None,
    change: torch.Tensor | None = None,
) -> torch.Tensor:
    """The weighted score of per-token state [..., N] (and of the stream's `change`, if given)."""
    score = torch.zeros_like(staleness)
    if w.get("staleness"):
        score = score + w["staleness"] * staleness
    if change is not None:
        score = score + w["change"] * change / (1 + change)
    if w.get("attention") and attention is not None:
        score = score + w["attention"] * attention
    if w.get("cross_entropy") and entropy is not None:
        score = score + w["cross_entropy"] * entropy
    if w.get("random"):
        score = score + w["random"] * torch.rand(score.shape, device=score.device)
    if w.get("spatial") and grid is not None:
        score = score + w["spatial"] * spatial_bonus(score, grid)
    return score


def _span(rows: tuple[int, ...]) -> slice | None:
    """`rows` as a slice if they are consecutive and ascending (a view, no gather), else None."""
    return slice(rows[0], rows[-1] + 1) if list(rows) == list(range(rows[0], rows[0] + len(rows))) else None


def _stack_rows(stack: torch.Tensor, rows: tuple[int, ...]) -> torch.Tensor:
    span = _span(rows)
    return stack[span] if span is not None else stack.index_select(0, torch.tensor(rows, device=stack.device))


def _put_rows(stack: torch.Tensor, rows: tuple[int, ...], values: torch.Tensor) -> None:
    """The inverse of `_stack_rows`: write `values` into those rows of `stack`, in place."""
    span = _span(rows)
    if span is not None:
        stack[span].copy_(values)
    else:
        stack.index_copy_(0, torch.tensor(rows, device=stack.device), values)


def spatial_bonus(score: torch.Tensor, grid: tuple[int, ...]) -> torch.Tensor:
    """[..., N]: each grid cell's best-scoring token keeps its score, the others get 0 (ties: the first)."""
    lead, nd = score.shape[:-1], len(grid)
    pad = [p for size in reversed(grid) for p in (0, -size % CELL)]
    g = F.pad(score.reshape(*lead, *grid), pad, value=-math.inf)  # odd sizes: a padded position never wins its cell
    cells = [s // CELL for s in g.shape[len(lead):]]
    # [..., c0, CELL, c1, CELL, ...] -> [..., c0, c1, ..., CELL, CELL, ...]: each cell's tokens on the last axes.
    first = len(lead)
    order = [*range(first), *range(first, first + 2 * nd, 2), *range(first + 1, first + 2 * nd, 2)]
    blocks = g.reshape(*lead, *[d for c in cells for d in (c, CELL)]).permute(order)
    per_cell = blocks.reshape(*lead, *cells, -1)
    best = F.one_hot(per_cell.argmax(dim=-1), per_cell.shape[-1]).to(score.dtype).reshape(blocks.shape)
    mask = best.permute([order.index(i) for i in range(len(order))]).reshape(g.shape)
    return score * mask[(..., *(slice(0, s) for s in grid))].reshape(score.shape)


def attention_influence(
    q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, start: int, queries: int, scale: float | None = None
) -> torch.Tensor:
    """Fill `out` [N] with the attention each of the stream's N keys (from `start` on the key axis)
    receives, summed over queries, heads and batch and L2-normalised. q, k: [..., L, d]; `queries` > 0
    estimates the map from that many evenly spaced queries (fused attention keeps no map). On the GPU
    (bf16, fp16) Triton kernels (`toca_fx.kernels.attention_columns`) compute it without writing out the map."""
    if 0 < queries < q.shape[-2]:
        q = q[..., :: q.shape[-2] // queries, :][..., :queries, :]
    if attention_columns.supports(q, k):
        scale = q.shape[-1] ** -0.5 if scale is None else scale
        return _fill_influence(attention_columns.column_sums(q, k, scale).sum(dim=0), out, start)
    return influence_from_map(_probs(q, k, scale), out, start)


def influence_from_map(probs: torch.Tensor, out: torch.Tensor, start: int) -> torch.Tensor:
    """As `attention_influence`, from an attention map [..., L, L] whose last axis is the keys."""
    return _fill_influence(probs.float().sum(dim=-2).reshape(-1, probs.shape[-1]).sum(dim=0), out, start)


def _fill_influence(cols: torch.Tensor, out: torch.Tensor, start: int) -> torch.Tensor:
    """`out` [N] := the stream's N columns (from `start`) of the per-key sums `cols`, L2-normalised."""
    return out.copy_(F.normalize(cols[start : start + out.shape[0]], dim=0))


def cross_entropy(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Fill `out` [N] with each query token's entropy over the context keys (q: [..., N, d], k: [..., M, d])."""
    probs = _probs(q, k, scale)
    return entropy_from_map(probs, out, probs.dim() - 2)


def _probs(q: torch.Tensor, k: torch.Tensor, scale: float | None) -> torch.Tensor:
    """softmax(q k^T * scale) in float32, the product in the inputs' dtype: tensor cores for bf16 (which
    accumulate in float32), where a float32 product would take a large share of a full step."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    return ((q @ k.transpose(-2, -1)).float() * scale).softmax(dim=-1)


def entropy_from_map(probs: torch.Tensor, out: torch.Tensor, tok: int) -> torch.Tensor:
    """As `cross_entropy`, from a cross-attention map whose last axis is the context and `tok` the tokens."""
    p = probs.float()
    ent = -(p * p.clamp_min(1e-12).log()).sum(dim=-1)
    ent = ent.movedim(tok, -1).reshape(-1, out.shape[0]).mean(dim=0)
    return out.copy_(F.normalize(ent, dim=0))
