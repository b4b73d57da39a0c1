"""Gather-compute-scatter: run a branch on the chosen tokens only and scatter the rows into its cache.

Matches: one analysed `Branch` (its token flow says where every node's token axis is).
Produces: new nodes that compute the branch output's rows for the tokens `idx` and write them into the
cache buffer; the caller adds the cache to the residual. The original branch nodes that are no longer
read die in dead-code elimination.

Which nodes run on the chosen rows and which run on all tokens is decided backwards from the output:
a node whose rows are wanted asks its inputs for rows, except at attention, whose keys and values are
wanted for all tokens (or, with `cached_kv`, as a cache updated with the chosen rows). A node wanted
both ways runs on all tokens and its rows are gathered from the result.

Joint attention: along a token axis that also holds another stream's rows (`Axes.extra`), or the
stream's own parts other than its tokens, those rows are kept whole and only the stream's rows are
gathered (the cache's rows too), so the other stream's outputs read off the
gathered computation (`passenger_outputs`) are exact; they are rewired to it. New nodes go before the
first output (branch output or passenger output) that comes after the node they copy.
"""
from __future__ import annotations

import operator
from collections import defaultdict
from enum import Enum

import torch
import torch.fx as fx

from ..analysis.residual import Branch
from ..analysis.axes import Axes, Passengers
from ..analysis.graphs import op_name, positions, shape
from ..analysis.rules import index_items
from ..ops.cache import gather_rows, joint_rows, scatter_rows



class Want(Enum):
    """How a branch node's value is wanted in a partial computation."""

    ROWS = "rows"  # only its rows of the chosen tokens
    ALL = "all"  # over every token (attention keys and values, or a value wanted both ways)

_SIZED = {"view", "reshape", "expand", "broadcast_to"}
_SPLITS = {"split", "split_with_sizes", "chunk"}


def gather_branch(
    graph: fx.Graph,
    branch: Branch,
    idx: fx.Node,
    k: int,
    cache: fx.Node | None,
    kv_slots: dict[fx.Node, fx.Node],
) -> fx.Node | None:
    """Insert the partial computation of `branch`; return the updated cache node (none without a
    cache: then only the passenger outputs are rewired).

    `kv_slots` maps attention inputs consumed over all tokens (keys, values) and cross-attention
    context keys/values to cache placeholders; those not in it are computed in full.
    """
    rewrite = _Rows(graph, branch, idx, k, kv_slots)
    passengers = branch.flow.passenger_outputs
    for node in [*branch.nodes, *passengers]:
        rewrite.node(node)
    updated = None
    if cache is not None:
        with graph.inserting_before(branch.out):
            rows = rewrite.rows_of(branch.out)
            updated = graph.call_function(scatter_rows, (cache, branch.out_axes.tok, rewrite.index(branch.out_axes), rows))
    for node in passengers:
        if node in rewrite.rows:
            node.replace_all_uses_with(rewrite.rows[node])
    return updated


def own_rows(graph: fx.Graph, branch: Branch) -> fx.Node:
    """The stream's rows that partial steps choose from (what scores read): the stream itself unless it
    has other parts (`Axes.extra`). Insert where the stream is read."""
    axes = branch.flow.info[branch.stream]
    if not axes.extra:
        return branch.stream
    rows = (slice(None), slice(axes.start, axes.start + branch.tokens))
    return graph.call_function(operator.getitem, (branch.stream, rows))


def cache_rows(graph: fx.Graph, branch: Branch, idx: fx.Node) -> fx.Node:
    """Where the rows computed for tokens `idx` lie in the branch output (and its cache): with other
    parts of the stream, those parts' rows too. Insert where `idx` is known."""
    axes, n = branch.out_axes, branch.tokens
    if not axes.extra:
        return idx
    return graph.call_function(joint_rows, (idx, axes.start, n, n + axes.extra))


def insertion_point(branch: Branch) -> fx.Node:
    """The first node that the partial computation of `branch` must precede."""
    return min([branch.out, *branch.flow.passenger_outputs], key=positions(branch.out.graph).__getitem__)


def wanted(branch: Branch, cached_kv: set[fx.Node]) -> dict[fx.Node, set[Want]]:
    """For each branch node (and passenger output): its rows of the chosen tokens, its full value, or both."""
    inside = set(branch.nodes)
    needs: dict[fx.Node, set[Want]] = defaultdict(set)
    needs[branch.out].add(Want.ROWS)
    passengers = branch.flow.passenger_outputs
    for node in passengers:
        needs[node].add(Want.ROWS)
    for node in [*passengers, *reversed(branch.nodes)]:
        if node.target is operator.setitem:  # a write into a value is wanted as that value is
            needs[node] |= needs[node.args[0]]
        full_args = branch.flow.full_inputs.get(node, ())
        for a in node.all_input_nodes:
            if a not in inside:
                continue
            if Want.ALL in needs[node] or (a in full_args and a not in cached_kv):
                needs[a].add(Want.ALL)
            elif Want.ROWS in needs[node]:
                needs[a].add(Want.ROWS)
    written = [n.args[0] for n in branch.nodes if n.target is operator.setitem]
    if any(needs[t] == {Want.ROWS, Want.ALL} for t in written):
        # Rows gathered from a full value are read where the copy needs them, possibly before a write
        # into it lands: such a branch runs over all tokens and only its output's rows are taken.
        return defaultdict(set, {n: {Want.ALL} for n in [*branch.nodes, *passengers]})
    return needs


# ---------------------------------------------------------------------------------------------

class _Rows:
    """Builds the chosen-rows copy of a branch, node by node in graph order."""

    def __init__(self, graph: fx.Graph, branch: Branch, idx: fx.Node, k: int, kv_slots: dict[fx.Node, fx.Node]):
        self.graph, self.branch, self.idx, self.k, self.kv_slots = graph, branch, idx, k, kv_slots
        self.flow = branch.flow
        self.needs = wanted(branch, cached_kv=set(kv_slots))
        position = positions(branch.out.graph)
        sinks = sorted([branch.out, *self.flow.passenger_outputs], key=position.__getitem__)
        self.sink_of = {n: next(s for s in sinks if position[s] >= position[n]) for n in [*branch.nodes, *sinks]}
        self.rows: dict[fx.Node, fx.Node] = {}
        self.full: dict[fx.Node, fx.Node] = {}
        self.joint: dict[tuple[int, int], fx.Node] = {}

    def node(self, node: fx.Node) -> None:
        if self.needs[node] != {Want.ROWS}:
            return
        # An element of a multi-output op (chunk, unbind) that runs on all tokens anyway.
        reads_full = node.target is operator.getitem and Want.ALL in self.needs.get(node.args[0], ())
        if reads_full and node in self.flow.passenger_outputs:
            return  # other-stream rows of a full value: leave them as they are
        with self.graph.inserting_before(self.sink_of[node]):
            if reads_full:
                self.rows_of(node)
            else:
                self.rows[node] = self._copy(node)

    def rows_of(self, node: fx.Node) -> fx.Node:
        if node not in self.rows:
            axes = self.flow.external_rows.get(node) or self.flow.info[node]
            self.rows[node] = self.graph.call_function(gather_rows, (node, axes.tok, self.index(axes)))
        return self.rows[node]

    def index(self, axes: Axes) -> fx.Node:
        """Positions to gather along `axes.tok`: the chosen tokens, plus other-stream rows whole."""
        if not axes.extra:
            return self.idx
        key = (axes.start, axes.extra)
        if key not in self.joint:
            n = self.flow.tokens
            self.joint[key] = self.graph.call_function(joint_rows, (self.idx, axes.start, n, n + axes.extra))
        return self.joint[key]

    def _full_of(self, node: fx.Node) -> fx.Node:
        slot = self.kv_slots.get(node)
        if slot is None:
            return node
        if node not in self.flow.info:  # context keys/values: read the cache filled on full steps
            return slot
        if node not in self.full:
            axes = self.flow.info[node]
            self.full[node] = self.graph.call_function(
                scatter_rows, (slot, axes.tok, self.index(axes), self.rows_of(node))
            )
        return self.full[node]

    def _arg(self, a: fx.Node, full_args: set[fx.Node]) -> fx.Node:
        if a in full_args:
            return self._full_of(a)
        if a in self.rows or a in self.flow.external_rows or isinstance(self.flow.info.get(a), (Axes, tuple)):
            return self.rows_of(a)
        return a

    def _copy(self, node: fx.Node) -> fx.Node:
        if _passengers(self.flow.info.get(node)):  # other-stream rows, whole: read the copies of its inputs
            return self.graph.node_copy(node, lambda a: self.rows.get(a, a))
        full_args = set(self.flow.full_inputs.get(node, ())) | set(self.flow.context_kv)
        source = node.args[0] if node.args else None
        source_axes = self.flow.info.get(source) if isinstance(source, fx.Node) else None
        if op_name(node) in _SPLITS and isinstance(source_axes, Axes) and _dim(node) == source_axes.tok:
            return self.graph.call_function(torch.split, (self._arg(source, full_args), self._pieces(node), _dim(node)))
        new = self.graph.node_copy(node, lambda a: self._arg(a, full_args))
        new.meta.pop("example_value", None)  # the full-size shape no longer holds
        if op_name(node) in _SIZED:
            new.args = (new.args[0], self._sized(node))
            new.kwargs = {key: v for key, v in new.kwargs.items() if key not in ("size", "shape")}
        elif node.target in (operator.getitem, operator.setitem) and isinstance(source_axes, Axes):
            new.args = (new.args[0], self._index(node, source_axes), *new.args[2:])
        return new

    def _sized(self, node: fx.Node) -> tuple[int, ...]:
        """The output shape of a view/reshape/expand with the stream's rows cut to k."""
        dims, axes = list(shape(node)), self.flow.info[node]
        dims[axes.tok] = self.k + axes.extra
        return tuple(dims)

    def _index(self, node: fx.Node, axes: Axes) -> tuple:
        """A basic index with its part of the token axis moved to where it lands among k rows."""
        src = shape(node.args[0])
        items = index_items(node, len(src), node.args[1])
        slot = [i for i, item in enumerate(items) if item is not None][axes.tok]
        kept = range(src[axes.tok])[items[slot]]
        n = self.flow.tokens
        items[slot] = slice(axes.rows_pos(kept.start, n, self.k), axes.rows_pos(kept.stop, n, self.k))
        return tuple(items)

    def _pieces(self, node: fx.Node) -> list[int]:
        """Sizes of a split along the token axis once the stream's rows are cut to k."""
        axes, n, bounds = self.flow.info[node.args[0]], self.flow.tokens, [0]
        for value in node.meta["example_value"]:
            bounds.append(bounds[-1] + int(value.shape[_dim(node)]))
        moved = [axes.rows_pos(b, n, self.k) for b in bounds]
        return [hi - lo for lo, hi in zip(moved, moved[1:])]


def _passengers(info: object) -> bool:
    return isinstance(info, Passengers) or (isinstance(info, tuple) and all(isinstance(i, Passengers) for i in info))


def _dim(node: fx.Node) -> int:
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    return dim + len(shape(node.args[0])) if dim < 0 else dim
