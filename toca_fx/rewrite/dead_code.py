"""Dead-code elimination that keeps the rewrite's in-place updates."""
from __future__ import annotations

import torch.fx as fx

from ..ops import SIDE_EFFECTS


def eliminate_dead_code(graph: fx.Graph) -> None:
    """FX's dead-code elimination, keeping the cache updates that no node reads."""
    for node in reversed(graph.nodes):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and node.target in SIDE_EFFECTS:
            continue
        if node.op == "call_method" and node.target.endswith("_"):  # in place (FX deems methods pure)
            continue
        if node.is_impure():
            continue
        graph.erase_node(node)
