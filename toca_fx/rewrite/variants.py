"""Variants of one captured graph: each is a copy of the graph in which every residual branch follows its
`BranchPlan` ("fill", "rows" or "reuse"), with the cache buffers as extra trailing inputs.

Matches: the analysis of the captured graph (re-run on each copy, so node identities stay local).
Produces: a `GraphModule` taking (*original inputs, *buffers), returning what the original returned.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.residual import Analysis, Branch, find_branches
from ..analysis.tokens import shape
from ..config import ToCaConfig
from ..policies.toca import BranchPlan
from ..scores import refresh_scores, select_tokens
from ..state import BufferSpec
from .gather_scatter import gather_branch, insertion_point
from .ops import eliminate_dead_code, no_rows, store


@dataclass
class Slots:
    """One branch's buffers, as placeholders of a variant graph."""

    cache: fx.Node
    staleness: fx.Node | None = None
    ref_norm: fx.Node | None = None
    kv: dict[fx.Node, fx.Node] = field(default_factory=dict)


def buffer_specs(analysis: Analysis, config: ToCaConfig) -> list[BufferSpec]:
    """The buffers every variant of this graph shares, in placeholder order."""
    specs = []
    for b in analysis.branches:
        specs.append(_spec(f"b{b.index}_cache", b.out))
        if _scored(b, config):
            n, device = b.tokens, _value(b.out).device
            specs.append(BufferSpec(f"b{b.index}_stale", (n,), torch.float32, device))
            specs.append(BufferSpec(f"b{b.index}_ref", (n,), torch.float32, device))
        specs.extend(_spec(f"b{b.index}_kv{j}", node) for j, node in enumerate(_kv_nodes(b, config)))
    return specs


def build_variant(gm: fx.GraphModule, plans: dict[int, BranchPlan], config: ToCaConfig) -> fx.GraphModule:
    """A copy of `gm` with each branch rewritten to its plan."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    analysis = find_branches(graph)
    slots = _add_placeholders(graph, analysis, config)
    for branch in analysis.branches:
        _apply(graph, branch, plans[branch.index], slots[branch.index])
    eliminate_dead_code(graph)
    return fx.GraphModule(gm, graph)


# ---------------------------------------------------------------------------------------------

def _apply(graph: fx.Graph, branch: Branch, plan: BranchPlan, slots: Slots) -> None:
    if plan.mode == "fill":
        with graph.inserting_after(branch.out):
            graph.call_function(store, (slots.cache, branch.out))
            if slots.staleness is not None:
                graph.call_function(refresh_scores, (branch.stream, slots.staleness, slots.ref_norm))
            for node, slot in slots.kv.items():
                graph.call_function(store, (slot, node))
        return
    if plan.mode == "reuse":
        if branch.flow.passenger_outputs:  # another stream still reads the attention: run its rows only
            with graph.inserting_before(insertion_point(branch)):
                none = graph.call_function(no_rows, (branch.stream,))
            gather_branch(graph, branch, none, 0, None, {})
        branch.out.replace_all_uses_with(slots.cache)
        return
    with graph.inserting_before(insertion_point(branch)):
        idx = graph.call_function(select_tokens, (branch.stream, slots.staleness, slots.ref_norm, plan.k))
    branch.out.replace_all_uses_with(gather_branch(graph, branch, idx, plan.k, slots.cache, slots.kv))


def _add_placeholders(graph: fx.Graph, analysis: Analysis, config: ToCaConfig) -> dict[int, Slots]:
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def placeholder(name: str) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"toca_{name}")
        return anchor

    slots = {}
    for b in analysis.branches:
        s = Slots(placeholder(f"b{b.index}_cache"))
        if _scored(b, config):
            s.staleness, s.ref_norm = placeholder(f"b{b.index}_stale"), placeholder(f"b{b.index}_ref")
        s.kv = {node: placeholder(f"b{b.index}_kv{j}") for j, node in enumerate(_kv_nodes(b, config))}
        slots[b.index] = s
    return slots


def _scored(branch: Branch, config: ToCaConfig) -> bool:
    """Whether partial steps recompute some of this branch's tokens (and so need token scores)."""
    return not branch.attends_tokens or config.self_attn != "reuse"


def _kv_nodes(branch: Branch, config: ToCaConfig) -> list[fx.Node]:
    """Attention inputs cached across steps: context keys/values, and self-attention keys/values
    when configured."""
    nodes = list(branch.flow.context_kv)
    if branch.attends_tokens and config.self_attn == "recompute_cached_kv":
        nodes += [n for inputs in branch.flow.full_inputs.values() for n in inputs if n not in nodes]
    return nodes


def _value(node: fx.Node) -> torch.Tensor:
    return node.meta["example_value"]


def _spec(name: str, node: fx.Node) -> BufferSpec:
    value = _value(node)
    return BufferSpec(name, shape(node), value.dtype, value.device)
