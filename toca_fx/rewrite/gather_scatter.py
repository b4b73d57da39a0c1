"""Gather-compute-scatter: run a branch on the chosen tokens only and scatter the rows into its cache.

Matches: one analysed `Branch` (its token flow says where every node's token axis is).
Produces: new nodes, inserted before the branch output, that compute the branch output's rows for the
tokens `idx` and write them into the cache buffer; the caller adds the cache to the residual. The
original branch nodes that are no longer read die in dead-code elimination.

Which nodes run on the chosen rows and which run on all tokens is decided backwards from the output:
a node whose rows are wanted asks its inputs for rows, except at attention, whose keys and values are
wanted for all tokens (or, with `cached_kv`, as a cache updated with the chosen rows). A node wanted
both ways runs on all tokens and its rows are gathered from the result.
"""
from __future__ import annotations

import operator
from collections import defaultdict

import torch.fx as fx

from ..analysis.residual import Branch
from ..analysis.tokens import Axes, op_name, shape
from .ops import gather_rows, scatter_rows

ROWS, FULL = "rows", "full"
_SIZED = {"view", "reshape", "expand", "broadcast_to"}


def gather_branch(
    graph: fx.Graph,
    branch: Branch,
    idx: fx.Node,
    k: int,
    cache: fx.Node,
    kv_slots: dict[fx.Node, fx.Node],
) -> fx.Node:
    """Insert the partial computation of `branch`; return the updated cache node.

    `kv_slots` maps attention inputs consumed over all tokens (keys, values) and cross-attention
    context keys/values to cache placeholders; those not in it are computed in full.
    """
    needs = wanted(branch, cached_kv=set(kv_slots))
    flow = branch.flow
    rows: dict[fx.Node, fx.Node] = {}
    full: dict[fx.Node, fx.Node] = {}
    with graph.inserting_before(branch.out):

        def rows_of(node: fx.Node) -> fx.Node:
            if node not in rows:
                axis = flow.external_rows.get(node, None)
                axis = flow.info[node].tok if axis is None else axis
                rows[node] = graph.call_function(gather_rows, (node, axis, idx))
            return rows[node]

        def full_of(node: fx.Node) -> fx.Node:
            slot = kv_slots.get(node)
            if slot is None:
                return node
            if node not in flow.info:  # context keys/values: read the cache filled on full steps
                return slot
            if node not in full:
                full[node] = graph.call_function(scatter_rows, (slot, flow.info[node].tok, idx, rows_of(node)))
            return full[node]

        def arg(a: fx.Node, full_args: set[fx.Node]) -> fx.Node:
            if a in full_args:
                return full_of(a)
            if a in rows or a in flow.external_rows or isinstance(flow.info.get(a), (Axes, tuple)):
                return rows_of(a)
            return a

        for node in branch.nodes:
            if needs[node] != {ROWS}:
                continue
            if _reads_full_tuple(node, needs):
                rows_of(node)
                continue
            full_args = set(flow.full_inputs.get(node, ())) | set(flow.context_kv)
            new = graph.node_copy(node, lambda a: arg(a, full_args))
            new.meta.pop("example_value", None)  # the full-size shape no longer holds
            if op_name(node) in _SIZED:
                new.args = (new.args[0], _sized(node, branch, k))
            rows[node] = new
        return graph.call_function(scatter_rows, (cache, branch.out_axes.tok, idx, rows_of(branch.out)))


def wanted(branch: Branch, cached_kv: set[fx.Node]) -> dict[fx.Node, set[str]]:
    """For each branch node: its rows of the chosen tokens, its full value, or both."""
    inside = set(branch.nodes)
    needs: dict[fx.Node, set[str]] = defaultdict(set)
    needs[branch.out].add(ROWS)
    for node in reversed(branch.nodes):
        full_args = branch.flow.full_inputs.get(node, ())
        for a in node.all_input_nodes:
            if a not in inside:
                continue
            if FULL in needs[node] or (a in full_args and a not in cached_kv):
                needs[a].add(FULL)
            elif ROWS in needs[node]:
                needs[a].add(ROWS)
    return needs


def _reads_full_tuple(node: fx.Node, needs: dict[fx.Node, set[str]]) -> bool:
    """An element of a multi-output op (chunk, unbind) that also runs in full: gather the element."""
    source = node.args[0] if node.target is operator.getitem else None
    return isinstance(source, fx.Node) and FULL in needs.get(source, ())


def _sized(node: fx.Node, branch: Branch, k: int) -> tuple[int, ...]:
    """The output shape of a view/reshape/expand with the token axis shrunk to k rows."""
    dims = list(shape(node))
    dims[branch.flow.info[node].tok] = k
    return tuple(dims)
