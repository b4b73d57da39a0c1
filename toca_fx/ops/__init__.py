"""The functions rewritten graphs call: the cache's (`cache`), the token scores' (`scores`) and the
Taylor forecast's (`forecast`).

`SIDE_EFFECTS` lists those that update buffers in place (caches, token state, attention maps):
dead-code elimination keeps them although nothing reads their results.
"""
from .cache import scatter_rows, scatter_scaled, store, store_scaled
from .forecast import taylor_fill, taylor_refresh_rows
from .scores import (
    attention_influence,
    cross_entropy,
    entropy_from_map,
    influence_from_map,
    refresh_scores,
    select_batch,
    select_tokens,
)

SIDE_EFFECTS = frozenset({
    scatter_rows, store, store_scaled, scatter_scaled, select_tokens, select_batch, refresh_scores, attention_influence, influence_from_map,
    cross_entropy, entropy_from_map, taylor_fill, taylor_refresh_rows,
})
