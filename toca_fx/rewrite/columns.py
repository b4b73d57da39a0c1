"""Linears whose output is split and only partly read compute only the columns that are read.

Matches: `linear(x, W, b)` whose only user is a chunk or split of its last axis, some of whose pieces
nothing reads. In a variant, a reused branch leaves its adaLN shift and scale unread: DiT's modulation
`linear(c, W).chunk(6)` of a block whose attention is reused needs 4 of the 6 pieces, and 2 when both
branches are reused.
Produces: per run of consecutive read pieces, a linear over those rows of W and b (views, no copies),
and each read piece as a slice of it. A modulation GEMV reads all its weights: at DiT-XL/2's sizes
16 MB a block, 28 times a step, so the bytes not read are time saved on every partial step.
"""
from __future__ import annotations

import operator

import torch
import torch.fx as fx

from ..analysis.graphs import op_name, shape
from .projections import narrow_linear, split_pieces


def narrow_dead_columns(graph: fx.Graph) -> int:
    """Rewrite every matching linear of a graph without dead nodes, in place; the caller then removes
    the full linears left dead. Returns how many matched."""
    matches = [(node, m) for node in graph.nodes if (m := _match(node)) is not None]
    for node, match in matches:
        _narrow(graph, node, *match)
    return len(matches)


# ---------------------------------------------------------------------------------------------

def _match(node: fx.Node) -> tuple[fx.Node, list[tuple[int, int]], dict[int, list[fx.Node]]] | None:
    """(split node, each piece's column range, read piece index -> its getitems) if `node` matches."""
    if op_name(node) != "linear" or len(node.args) < 2 or len(node.users) != 1:  # input, weight positional
        return None
    (split,) = node.users
    out = shape(node)
    if out is None or op_name(split) not in ("chunk", "split") or split.args[0] is not node:
        return None
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    if not isinstance(dim, int) or dim % len(out) != len(out) - 1:
        return None
    pieces = split_pieces(op_name(split), split.args[1], out[-1])
    items = [u for u in split.users if u.target is operator.getitem and isinstance(u.args[1], int)]
    if pieces is None or len(items) != len(split.users):
        return None
    reads: dict[int, list[fx.Node]] = {}
    for item in items:
        if item.users:
            reads.setdefault(item.args[1] % len(pieces), []).append(item)
    return (split, pieces, reads) if len(reads) < len(pieces) else None


def _narrow(graph: fx.Graph, linear: fx.Node, split: fx.Node, pieces: list, reads: dict[int, list[fx.Node]]) -> None:
    for run in _runs(sorted(reads)):
        lo, hi = pieces[run[0]][0], pieces[run[-1]][1]
        with graph.inserting_before(split):
            part = narrow_linear(graph, linear, lo, hi)[-1]
            for i in run:
                start, end = pieces[i]
                piece = part if len(run) == 1 else graph.call_function(torch.narrow, (part, -1, start - lo, end - start))
                for item in reads[i]:
                    item.replace_all_uses_with(piece)


def _runs(indices: list[int]) -> list[list[int]]:
    """Consecutive runs: [2, 3, 5] -> [[2, 3], [5]]."""
    runs: list[list[int]] = []
    for i in indices:
        if runs and runs[-1][-1] == i - 1:
            runs[-1].append(i)
        else:
            runs.append([i])
    return runs
