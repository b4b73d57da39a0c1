"""Variants of one captured graph: each is a copy of the graph in which every residual branch follows its
`BranchPlan` ("fill", "rows", "reuse" or "compute"), with the cache buffers as extra trailing inputs.

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
from ..flops import BRANCH
from ..policies.toca import BranchPlan
from ..scores import DEFAULT_WEIGHTS, refresh_scores, select_tokens
from ..state import BufferSpec
from .gather_scatter import gather_branch, insertion_point
from .score_maps import entropy_source, fill_maps, influence_source, readers, token_grid
from .ops import eliminate_dead_code, no_rows, store


@dataclass
class Slots:
    """One branch's buffers, as placeholders of a variant graph."""

    cache: fx.Node
    staleness: fx.Node | None = None
    ref_norm: fx.Node | None = None
    attention: fx.Node | None = None  # the self-attention map this branch fills on full steps
    entropy: fx.Node | None = None  # the cross-attention entropy this branch fills on full steps
    kv: dict[fx.Node, fx.Node] = field(default_factory=dict)


def buffer_specs(analysis: Analysis, config: ToCaConfig) -> list[BufferSpec]:
    """The buffers every variant of this graph shares, in placeholder order."""
    specs = []
    for b in analysis.branches:
        n, device = b.tokens, _value(b.out).device
        for name, node in _layout(b, config):
            full = f"b{b.index}_{name}"
            specs.append(_spec(full, node) if node is not None else BufferSpec(full, (n,), torch.float32, device))
    return specs


def build_variant(gm: fx.GraphModule, plans: dict[int, BranchPlan], config: ToCaConfig) -> fx.GraphModule:
    """A copy of `gm` with each branch rewritten to its plan."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    analysis = find_branches(graph)
    slots = _add_placeholders(graph, analysis, config)
    sources = readers(analysis)
    for branch in analysis.branches:
        score_args = _score_args(graph, branch, sources[branch.index], slots, config)
        before = set(graph.nodes)
        _apply(graph, branch, plans[branch.index], slots[branch.index], score_args, config.attention_queries)
        tag_branch(branch, [n for n in graph.nodes if n not in before])
    eliminate_dead_code(graph)
    return fx.GraphModule(gm, graph)


def tag_branch(branch: Branch, extra: list[fx.Node] = ()) -> None:
    """Mark the branch's nodes (and `extra`, the nodes its rewrite made) as its own, for FLOP counting."""
    for node in [*branch.nodes, *extra]:
        node.meta[BRANCH] = branch.index


# ---------------------------------------------------------------------------------------------

def _apply(graph: fx.Graph, branch: Branch, plan: BranchPlan, slots: Slots, score_args: tuple, queries: int) -> None:
    """`score_args`: (weights, attention map, entropy map, grid), the trailing arguments of select_tokens."""
    if plan.mode == "compute":
        return
    if plan.mode == "fill":
        fill_maps(graph, branch, slots.attention, slots.entropy, queries)
        with graph.inserting_after(branch.out):
            graph.call_function(store, (slots.cache, branch.out))
            if slots.staleness is not None:
                args = (branch.stream, slots.staleness) + ((slots.ref_norm,) if slots.ref_norm is not None else ())
                graph.call_function(refresh_scores, args)
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
        idx = graph.call_function(select_tokens, (branch.stream, slots.staleness, slots.ref_norm, plan.k, *score_args))
    branch.out.replace_all_uses_with(gather_branch(graph, branch, idx, plan.k, slots.cache, slots.kv))


def _score_args(graph: fx.Graph, branch: Branch, sources: tuple, slots: dict[int, Slots], config: ToCaConfig) -> tuple:
    """The trailing arguments of `select_tokens` (weights, attention map, entropy map, grid); those left
    at their defaults are dropped, so the default score prints as it always did."""
    attn, cross = sources
    spatial = dict(config.scores).get("spatial")
    args = [
        config.scores,
        slots[attn.index].attention if attn is not None else None,
        slots[cross.index].entropy if cross is not None else None,
        token_grid(graph, branch.tokens, config.grid) if spatial else None,
    ]
    while args and args[-1] is None:
        args.pop()
    return () if args == [DEFAULT_WEIGHTS] else tuple(args)


def _add_placeholders(graph: fx.Graph, analysis: Analysis, config: ToCaConfig) -> dict[int, Slots]:
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def placeholder(name: str) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"toca_{name}")
        return anchor

    slots = {}
    for b in analysis.branches:
        made = {name: placeholder(f"b{b.index}_{name}") for name, _ in _layout(b, config)}
        slots[b.index] = Slots(
            made["cache"], made.get("stale"), made.get("ref"), made.get("attn"), made.get("ent"),
            {node: made[f"kv{j}"] for j, node in enumerate(_kv_nodes(b, config))},
        )
    return slots


def _layout(branch: Branch, config: ToCaConfig) -> list[tuple[str, fx.Node | None]]:
    """A branch's buffers: (name, node whose shape it has; None for a per-token [N] float32 vector)."""
    weights = dict(config.scores)
    names = [("cache", branch.out)]
    if _scored(branch, config):
        names += [("stale", None), ("ref", None)] if weights.get("change") else [("stale", None)]
    if weights.get("attention") and influence_source(branch) is not None:
        names.append(("attn", None))
    if weights.get("cross_entropy") and entropy_source(branch) is not None:
        names.append(("ent", None))
    return names + [(f"kv{j}", node) for j, node in enumerate(_kv_nodes(branch, config))]


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
