"""Marks the analysis leaves on graph nodes for later stages, each read and written only here.

- the stream position of a residual add (`mark_stream`, `stream_marks`): regions cut the graph there;
- the branch a node belongs to (`tag_branch`, `branch_of`): FLOPs are counted per branch.
Marks live in `node.meta`, so they survive graph copies (`graph_copy`, `node_copy`).
"""
from __future__ import annotations

from typing import Iterable

import torch.fx as fx

_STREAM = "toca_stream"  # a residual add's position along the stream (0: the stream's first input)
_BRANCH = "toca_branch"  # the index of the branch a node belongs to


def mark_stream(adds: list[fx.Node], first_input: fx.Node) -> None:
    """Mark the residual adds along the stream, in graph order (1, 2, ...), and the stream's input (0)."""
    first_input.meta[_STREAM] = 0
    for j, add in enumerate(adds, 1):
        add.meta[_STREAM] = j


def stream_marks(nodes: Iterable[fx.Node]) -> dict[fx.Node, int]:
    """The marked nodes among `nodes`, with their positions along the stream."""
    return {n: n.meta[_STREAM] for n in nodes if _STREAM in n.meta}


def set_stream_mark(node: fx.Node, position: int) -> None:
    """Restore a mark on a graph rebuilt from plain data (a worker's copy)."""
    node.meta[_STREAM] = position


def on_stream(node: fx.Node) -> bool:
    return _STREAM in node.meta


def tag_branch(index: int, nodes: Iterable[fx.Node]) -> None:
    """Mark `nodes` as branch `index`'s own."""
    for node in nodes:
        node.meta[_BRANCH] = index


def branch_of(node: fx.Node) -> int | None:
    """The branch that owns `node`, or None outside every branch."""
    return node.meta.get(_BRANCH)
