"""Dead-code elimination that keeps the rewrite's in-place updates."""
from __future__ import annotations

import operator

import torch.fx as fx

from ..analysis.collectives import unread_exchange
from ..analysis.graphs import op_name
from ..analysis.rules.indexing import ALIASING
from ..ops import SIDE_EFFECTS


def eliminate_dead_code(graph: fx.Graph) -> None:
    """FX's dead-code elimination, keeping the cache updates that no node reads, and dropping writes
    into computed tensors that nothing reads (a branch's rotary written in place, once its rows are
    computed apart) and the exchanges between ranks of branches not run (a reused attention)."""
    for node in reversed(graph.nodes):
        if node.op in ("placeholder", "output") or node.users:
            continue
        if node.op == "call_function" and node.target in SIDE_EFFECTS:
            continue
        if node.op == "call_method" and node.target.endswith("_"):  # in place (FX deems methods pure)
            continue
        if node.is_impure() and not _unread_write(node) and not unread_exchange(node):
            continue
        graph.erase_node(node)


def _unread_write(node: fx.Node) -> bool:
    """A write into a tensor computed in the graph (not a view of another) that nothing else reads."""
    if node.target is not operator.setitem:
        return False
    target = node.args[0]
    return (target.op == "call_function" or target.op == "call_method") and op_name(target) not in ALIASING and all(
        u.target is operator.setitem for u in target.users)
