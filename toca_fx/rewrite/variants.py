"""Variants of one captured graph: each is a copy of the graph in which every residual branch follows its
`BranchPlan` (`Mode.FILL`, `ROWS`, `REUSE`, `FORECAST` or `COMPUTE`), with the cache buffers as extra
trailing inputs (`layout`).

Forecasting (`ops.forecast`): where branches keep Taylor factors, a fill updates them with the cache; a
forecast adds the factors' extrapolation to the clock's step; the hybrid (a forecast with k chosen
tokens) scatters the chosen rows, computed exactly, into the forecast and refreshes their top factor.
With no factors kept (order 0) a forecast is the reuse, and the hybrid ToCa's rows, exactly. A branch's
companions (joint attention's other side) are filled with it and forecast where it forecasts every
token; where it reuses or computes rows they are computed, as their rows ride along.

Matches: the analysis of the captured graph (re-run on each copy, so node identities stay local).
Produces: `Rewritten`: the `GraphModule` taking (*original inputs, *buffers) and returning what the
original returned, and the indices of the buffers it reads or writes.

Token choices: where they read only per-token state (no "change" score), the choices of branches whose
maps no branch of the step refills are made at the start of the step in one batched top-k per state
stack (`select_batch`), not one score, top-k and update per branch; each reads its indices through a
row-id buffer, so blocks share their kernels.
"""
from __future__ import annotations

import copy
import operator
from collections import defaultdict
from typing import NamedTuple

import torch.fx as fx

from ..analysis.marks import tag_branch
from ..analysis.residual import Analysis, Branch, find_branches
from ..config import ToCaConfig
from ..ops.cache import no_rows, store
from ..ops.forecast import taylor_fill, taylor_forecast, taylor_refresh_rows
from ..ops.scores import DEFAULT_WEIGHTS, refresh_scores, select_batch, select_tokens
from ..policies.plan import BranchPlan, Mode
from .columns import narrow_dead_columns
from .dead_code import eliminate_dead_code
from .gather_scatter import cache_rows, gather_branch, insertion_point, own_rows
from .layout import Slots, add_placeholders, batched, kv_nodes
from .projections import split_projections
from .score_maps import fill_maps, readers, token_grid


class Rewritten(NamedTuple):
    gm: fx.GraphModule
    used: frozenset[int]  # indices of the buffers (`layout.buffer_specs`) the graph reads or writes


def build_variant(gm: fx.GraphModule, plans: dict[int, BranchPlan], config: ToCaConfig) -> Rewritten:
    """A copy of `gm` with each branch rewritten to its plan."""
    graph, analysis = _analysed_copy(gm, plans, config)
    placeholders = add_placeholders(graph, analysis, config)
    slots, rows, row_ids = placeholders.slots, placeholders.rows, placeholders.row_ids
    sources = readers(analysis)
    early = _choose_early(graph, analysis, plans, slots, rows, row_ids, sources, config)
    for branch in analysis.branches:
        score_args = _score_args(graph, branch, sources[branch.index], slots, config)
        before = set(graph.nodes)
        plan, queries = _lowered(plans[branch.index], branch, config), config.attention_queries
        _apply(graph, branch, plan, slots[branch.index], score_args, queries, early.get(branch.index), placeholders.clock)
        tag_branch(branch.index, [*branch.nodes, *(n for n in graph.nodes if n not in before)])
    eliminate_dead_code(graph)
    if narrow_dead_columns(graph):
        eliminate_dead_code(graph)
    return Rewritten(fx.GraphModule(gm, graph), placeholders.used())


# ---------------------------------------------------------------------------------------------

def _lowered(plan: BranchPlan, branch: Branch, config: ToCaConfig) -> BranchPlan:
    """A forecast where no factors are kept (order 0) is the reuse, or with chosen tokens ToCa's rows."""
    if plan.mode != Mode.FORECAST:
        return plan
    if config.forecast_order is None:
        raise ValueError(f"branch {branch.index} ({branch.name}): a '{Mode.FORECAST}' plan needs "
                         "ToCaConfig.forecast_order (the Taylor factors the branches keep)")
    if config.forecast_order == 0:
        return BranchPlan(Mode.ROWS, plan.k) if plan.k else BranchPlan(Mode.REUSE)
    return plan


def _apply(
    graph: fx.Graph, branch: Branch, plan: BranchPlan, slots: Slots, score_args: tuple, queries: int,
    idx: fx.Node | None, clock: fx.Node | None,
) -> None:
    """`score_args`: (weights, attention map, entropy map, grid), the trailing arguments of select_tokens;
    `idx`: the branch's tokens if chosen at the start of the step (else chosen here); `clock`: the
    call's step, where branches keep Taylor factors."""
    if plan.mode == Mode.COMPUTE:
        return
    taylor = (clock, slots.taylor, slots.cache, slots.factors)
    if plan.mode == Mode.FILL:
        fill_maps(graph, branch, slots.attention, slots.entropy, queries)
        with graph.inserting_before(branch.out):
            scored = own_rows(graph, branch)
        with graph.inserting_after(branch.out):
            if slots.taylor is None:
                graph.call_function(store, (slots.cache, branch.out))
            else:
                graph.call_function(taylor_fill, (*taylor, branch.out))
            if slots.staleness is not None:
                args = (scored, slots.staleness) + ((slots.ref_norm,) if slots.ref_norm is not None else ())
                graph.call_function(refresh_scores, args)
            for node, slot in slots.kv.items():
                graph.call_function(store, (slot, node))
        for companion, own in zip(branch.companions, slots.companions):
            with graph.inserting_after(companion.out):
                graph.call_function(taylor_fill, (clock, own.taylor, own.cache, own.factors, companion.out))
        return
    if plan.mode in (Mode.REUSE, Mode.FORECAST) and plan.k == 0:
        if branch.flow.passenger_outputs:  # another stream still reads the attention: run its rows only
            with graph.inserting_before(insertion_point(branch)):
                none = graph.call_function(no_rows, (branch.stream,))
            gather_branch(graph, branch, none, 0, None, {})
        branch.out.replace_all_uses_with(slots.cache if plan.mode == Mode.REUSE else _forecast(graph, branch, taylor))
        if plan.mode == Mode.FORECAST:  # the passengers' rows then die with the companions' computation
            for companion, own in zip(branch.companions, slots.companions):
                with graph.inserting_before(companion.out):
                    forecast = graph.call_function(taylor_forecast, (clock, own.taylor, own.cache, own.factors))
                companion.out.replace_all_uses_with(forecast)
        return
    if idx is None:
        with graph.inserting_before(insertion_point(branch)):
            args = (own_rows(graph, branch), slots.staleness, slots.ref_norm, plan.k, *score_args)
            idx = graph.call_function(select_tokens, args)
    if plan.mode == Mode.ROWS:
        branch.out.replace_all_uses_with(gather_branch(graph, branch, idx, plan.k, slots.cache, slots.kv))
        return
    updated = gather_branch(graph, branch, idx, plan.k, _forecast(graph, branch, taylor), slots.kv)
    with graph.inserting_before(updated):
        rows = cache_rows(graph, branch, idx)
    with graph.inserting_after(updated):
        graph.call_function(taylor_refresh_rows, (*taylor, branch.out_axes.tok, rows, updated))
    branch.out.replace_all_uses_with(updated)


def _forecast(graph: fx.Graph, branch: Branch, taylor: tuple) -> fx.Node:
    """The branch output's forecast (`taylor_forecast`), before the branch's first output."""
    with graph.inserting_before(insertion_point(branch)):
        return graph.call_function(taylor_forecast, taylor)


def _analysed_copy(
    gm: fx.GraphModule, plans: dict[int, BranchPlan], config: ToCaConfig, split: bool = True
) -> tuple[fx.Graph, Analysis]:
    """A copy of `gm`'s graph and its analysis; with `split`, the fused projections of branches that
    recompute chosen rows split where their pieces are wanted both as rows and over all tokens
    (`split_projection`), unless the split graph's analysis no longer finds the same branches with the
    same modes."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    analysis = find_branches(graph)
    partial = [b for b in analysis.branches if plans[b.index].chooses_rows]
    if not split or not split_projections(graph, partial, {b.index: set(kv_nodes(b, config)) for b in partial}):
        return graph, analysis
    eliminate_dead_code(graph)
    again = find_branches(graph)
    if [(b.out, b.modes) for b in again.branches] != [(b.out, b.modes) for b in analysis.branches]:
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
    if not batched(config):
        return {}
    groups: dict[tuple, list[tuple]] = defaultdict(list)  # (stacks read) -> (branch, its rows in them)
    for b in analysis.branches:
        attn, cross = sources[b.index]
        refilled = any(s is not None and plans[s.index].mode == Mode.FILL for s in (attn, cross))
        if not plans[b.index].chooses_rows or refilled:
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
