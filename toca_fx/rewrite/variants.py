"""Variants of one captured graph: each is a copy of the graph in which every residual branch follows its
`BranchPlan` ("fill", "rows", "reuse" or "compute"), with the cache buffers as extra trailing inputs.

Matches: the analysis of the captured graph (re-run on each copy, so node identities stay local).
Produces: a `GraphModule` taking (*original inputs, *buffers), returning what the original returned.

Buffers: per branch its cache (and reference norms, key/value caches); per-token state (staleness,
attention and entropy maps). When token choices read only that state (no "change" score), the state
is one [branches, N] stack per kind and token count N, each branch a row, and the choices of branches
whose maps no branch of the step refills are made at the start of the step in one batched top-k per
stack (`select_batch`), not one score, top-k and update per branch: on DiT-XL/2 those were about 5
kernels a branch, 28 a step. Otherwise each branch keeps its state in buffers of its own.

Kernels alike from block to block: Inductor compiles each distinct kernel source once per graph, and
a constant offset into a shared tensor (a block's row of a stack, or of the batched top-k) is written
into the source. So a block reads its chosen indices through a row-id buffer (`toca_row{i}`, holding
i) and state that is not batched is not stacked: PixArt-alpha 1024's preset then compiled in 52.6 s
against 99.4 (H100), its partial variants loading in 2.0-3.0 s against 10.6-12.6.
"""
from __future__ import annotations

import copy
import operator
from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.residual import Analysis, Branch, find_branches
from ..analysis.tokens import shape
from ..config import ToCaConfig
from ..runtime.flops import BRANCH
from ..policies.toca import BranchPlan
from ..ops.scores import DEFAULT_WEIGHTS, refresh_scores, select_batch, select_tokens
from ..runtime.state import BufferSpec
from .columns import narrow_dead_columns
from .gather_scatter import gather_branch, insertion_point
from ..ops.cache import eliminate_dead_code, no_rows, store
from .score_maps import entropy_source, fill_maps, influence_source, readers, token_grid
from .projections import split_projections


@dataclass
class Slots:
    """One branch's buffers in a variant graph: placeholders, and its rows of the state stacks."""

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
        for name, node in _layout(b, config):
            full = f"b{b.index}_{name}"
            specs.append(_spec(full, node) if node is not None else _state(full, (b.tokens,), b))
    stacks = _stacks(analysis, config)
    for name, members in stacks.items():
        specs.append(_state(name, (len(members), members[0].tokens), members[0]))
    rows = _row_ids(stacks)  # > 0 only with branches
    device = _value(analysis.branches[0].out).device if rows else None
    return specs + [BufferSpec(f"row{i}", (1,), torch.long, device, fill=i) for i in range(rows)]


def branch_bytes(analysis: Analysis, config: ToCaConfig) -> dict[int, int]:
    """Bytes of buffers per branch index (its own buffers and its rows of the state stacks)."""
    specs = {s.name: s for s in buffer_specs(analysis, config)}
    nbytes = {b.index: sum(s.nbytes for n, s in specs.items() if n.startswith(f"b{b.index}_")) for b in analysis.branches}
    for name, members in _stacks(analysis, config).items():
        for b in members:
            nbytes[b.index] += specs[name].nbytes // len(members)
    return nbytes


def build_variant(gm: fx.GraphModule, plans: dict[int, BranchPlan], config: ToCaConfig) -> fx.GraphModule:
    """A copy of `gm` with each branch rewritten to its plan."""
    graph, analysis = _analysed_copy(gm, plans, config)
    slots, rows, row_ids = _add_placeholders(graph, analysis, config)
    sources = readers(analysis)
    early = _choose_early(graph, analysis, plans, slots, rows, row_ids, sources, config)
    for branch in analysis.branches:
        score_args = _score_args(graph, branch, sources[branch.index], slots, config)
        before = set(graph.nodes)
        plan, queries = plans[branch.index], config.attention_queries
        _apply(graph, branch, plan, slots[branch.index], score_args, queries, early.get(branch.index))
        tag_branch(branch, [n for n in graph.nodes if n not in before])
    eliminate_dead_code(graph)
    if narrow_dead_columns(graph):
        eliminate_dead_code(graph)
    return fx.GraphModule(gm, graph)


def tag_branch(branch: Branch, extra: list[fx.Node] = ()) -> None:
    """Mark the branch's nodes (and `extra`, the nodes its rewrite made) as its own, for FLOP counting."""
    for node in [*branch.nodes, *extra]:
        node.meta[BRANCH] = branch.index


# ---------------------------------------------------------------------------------------------

def _apply(
    graph: fx.Graph, branch: Branch, plan: BranchPlan, slots: Slots, score_args: tuple, queries: int,
    idx: fx.Node | None,
) -> None:
    """`score_args`: (weights, attention map, entropy map, grid), the trailing arguments of select_tokens;
    `idx`: the branch's tokens if chosen at the start of the step (else chosen here)."""
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
    if idx is None:
        with graph.inserting_before(insertion_point(branch)):
            args = (branch.stream, slots.staleness, slots.ref_norm, plan.k, *score_args)
            idx = graph.call_function(select_tokens, args)
    branch.out.replace_all_uses_with(gather_branch(graph, branch, idx, plan.k, slots.cache, slots.kv))


def _analysed_copy(
    gm: fx.GraphModule, plans: dict[int, BranchPlan], config: ToCaConfig, split: bool = True
) -> tuple[fx.Graph, Analysis]:
    """A copy of `gm`'s graph and its analysis; with `split`, the fused projections of branches that
    recompute chosen rows split where their pieces are wanted both as rows and over all tokens
    (`split_projection`), unless the split graph's analysis no longer finds the same branches."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    analysis = find_branches(graph)
    partial = [b for b in analysis.branches if plans[b.index].mode == "rows"]
    if not split or not split_projections(graph, partial, {b.index: set(_kv_nodes(b, config)) for b in partial}):
        return graph, analysis
    eliminate_dead_code(graph)
    again = find_branches(graph)
    if [b.out for b in again.branches] != [b.out for b in analysis.branches]:
        return _analysed_copy(gm, plans, config, split=False)
    return graph, again


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


def _choose_early(
    graph: fx.Graph,
    analysis: Analysis,
    plans: dict[int, BranchPlan],
    slots: dict[int, Slots],
    rows: dict[fx.Node, tuple[fx.Node, int]],
    row_ids: list[fx.Node],
    sources: dict[int, tuple],
    config: ToCaConfig,
) -> dict[int, fx.Node]:
    """Insert one `select_batch` per staleness stack at the start of the graph for the branches whose
    choice reads only state that no branch of this step refills; return their index nodes. Each reads
    its indices through a row-id buffer (`row_ids`), so blocks share their kernels."""
    weights = dict(config.scores)
    if not _batched(config):
        return {}
    groups: dict[tuple, list[tuple]] = defaultdict(list)  # (stacks read) -> (branch, its rows in them)
    for b in analysis.branches:
        attn, cross = sources[b.index]
        refilled = any(s is not None and plans[s.index].mode == "fill" for s in (attn, cross))
        if plans[b.index].mode != "rows" or refilled:
            continue
        a = rows.get(slots[attn.index].attention) if attn is not None and weights.get("attention") else None
        e = rows.get(slots[cross.index].entropy) if cross is not None and weights.get("cross_entropy") else None
        stale, stale_row = rows[slots[b.index].staleness]
        groups[(stale, a and a[0], e and e[0])].append((b, stale_row, a and a[1], e and e[1]))
    chosen = {}
    first = next(n for n in graph.nodes if n.op != "placeholder")
    for (stale, attn, ent), members in groups.items():
        branch = members[0][0]
        grid = token_grid(graph, branch.tokens, config.grid) if weights.get("spatial") else None
        args = (
            stale, tuple(m[1] for m in members), tuple(plans[m[0].index].k for m in members), config.scores,
            attn, tuple(m[2] for m in members) if attn is not None else (),
            ent, tuple(m[3] for m in members) if ent is not None else (), grid, tuple(row_ids[: len(members)]),
        )
        with graph.inserting_before(first):
            batch = graph.call_function(select_batch, args)
            for i, (b, *_) in enumerate(members):
                chosen[b.index] = graph.call_function(operator.getitem, (batch, i))
    return chosen


def _add_placeholders(
    graph: fx.Graph, analysis: Analysis, config: ToCaConfig
) -> tuple[dict[int, Slots], dict, list[fx.Node]]:
    """Each branch's `Slots`; for each state-row node, (its stack's placeholder, the row); the row ids."""
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]

    def placeholder(name: str) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"toca_{name}")
        return anchor

    made = {b.index: {name: placeholder(f"b{b.index}_{name}") for name, _ in _layout(b, config)} for b in analysis.branches}
    members_of = _stacks(analysis, config)
    stacks = {name: (placeholder(name), members) for name, members in members_of.items()}
    row_ids = [placeholder(f"row{i}") for i in range(_row_ids(members_of))]
    rows = {}
    for name, (stack, members) in stacks.items():
        for row, b in enumerate(members):
            with graph.inserting_after(anchor):
                anchor = graph.call_function(torch.select, (stack, 0, row))
            made[b.index][name.split("_")[0]] = anchor
            rows[anchor] = (stack, row)
    slots = {}
    for b in analysis.branches:
        own = made[b.index]
        kv = {node: own[f"kv{j}"] for j, node in enumerate(_kv_nodes(b, config))}
        slots[b.index] = Slots(own["cache"], own.get("stale"), own.get("ref"), own.get("attn"), own.get("ent"), kv)
    return slots, rows, row_ids


def _layout(branch: Branch, config: ToCaConfig) -> list[tuple[str, fx.Node | None]]:
    """A branch's own buffers: (name, node whose shape it has; None for a per-token [N] float32 vector).
    Without a batched choice its per-token state is its own too (see `_stacks`)."""
    names = [("cache", branch.out)]
    if _scored(branch, config) and not _batched(config):
        names.append(("ref", None))
    if not _batched(config):
        names += [(kind, None) for kind in _state_kinds(branch, config)]
    return names + [(f"kv{j}", node) for j, node in enumerate(_kv_nodes(branch, config))]


def _stacks(analysis: Analysis, config: ToCaConfig) -> dict[str, list[Branch]]:
    """Per-token float32 state, stacked by kind and token count for the batched choice: name -> the
    branches, one row each. Without one (the "change" score reads the stream), each branch keeps its
    own: a row of a stack is a constant offset in every kernel that reads or writes it, so each
    block's kernels would differ, and Inductor would compile them block by block."""
    if not _batched(config):
        return {}
    stacks: dict[str, list[Branch]] = defaultdict(list)
    for b in analysis.branches:
        for kind in _state_kinds(b, config):
            stacks[f"{kind}_n{b.tokens}"].append(b)
    return dict(stacks)


def _state_kinds(branch: Branch, config: ToCaConfig) -> list[str]:
    """The per-token state this branch keeps: staleness if scored; the attention map (self-attention)
    and the entropy (cross-attention) that choices read, if their scores are on."""
    weights = dict(config.scores)
    kinds = ["stale"] if _scored(branch, config) else []
    if weights.get("attention") and influence_source(branch) is not None:
        kinds.append("attn")
    if weights.get("cross_entropy") and entropy_source(branch) is not None:
        kinds.append("ent")
    return kinds


def _batched(config: ToCaConfig) -> bool:
    """Whether choices may be made at the start of a step, batched (`select_batch`): no score reads
    the stream."""
    return not dict(config.scores).get("change")


def _row_ids(stacks: dict[str, list[Branch]]) -> int:
    """Row-id buffers (int64 [1], buffer i holding i): as many as a batched choice may have rows, the
    rows of its staleness stack (of `_stacks`)."""
    return max((len(m) for name, m in stacks.items() if name.startswith("stale")), default=0)


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


def _state(name: str, shape: tuple[int, ...], branch: Branch) -> BufferSpec:
    return BufferSpec(name, shape, torch.float32, _value(branch.out).device)


def _spec(name: str, node: fx.Node) -> BufferSpec:
    value = _value(node)
    return BufferSpec(name, shape(node), value.dtype, value.device)
