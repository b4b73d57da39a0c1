"""Token scores: which tokens a partial step recomputes. Computed inside the compiled graph.

The score here: staleness first (steps since the token was last recomputed, so every token is
refreshed in turn), then change magnitude (how far the token's norm has moved since it was last
recomputed) to order tokens of equal staleness. One choice serves the whole batch, so both halves of
a batched classifier-free-guidance call recompute the same tokens.
"""
from __future__ import annotations

import torch

from .rewrite.ops import SIDE_EFFECTS


def token_norm(x: torch.Tensor) -> torch.Tensor:
    """Per-token L2 norm of a [B, N, D] stream, averaged over the batch: [N] float32."""
    return x.float().norm(dim=-1).mean(dim=0)


def select_tokens(x: torch.Tensor, staleness: torch.Tensor, ref_norm: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k tokens to recompute; updates the staleness and reference norms."""
    norm = token_norm(x)
    change = (norm - ref_norm).abs()
    # change / (1 + change) is in [0, 1) and keeps the order of changes: it breaks staleness ties only.
    score = staleness + change / (1 + change)
    idx = torch.topk(score, k, sorted=False).indices
    staleness.add_(1).index_fill_(0, idx, 0)
    ref_norm.index_copy_(0, idx, norm.index_select(0, idx))
    return idx


def refresh_scores(x: torch.Tensor, staleness: torch.Tensor, ref_norm: torch.Tensor) -> torch.Tensor:
    """A full step recomputes every token: reset staleness and reference norms."""
    ref_norm.copy_(token_norm(x))
    return staleness.zero_()


SIDE_EFFECTS.update({select_tokens, refresh_scores})
