"""The buffer layout of a graph's variants: which cache buffers and token state each branch has, their
order (the variants' trailing placeholders, `BufferSpec`s in the same order), and the placeholders
and per-branch `Slots` a variant's rewrite reads and writes.

Buffers: per branch its cache (and reference norms, key/value caches); per-token state (staleness,
attention and entropy maps). When token choices read only that state (no "change" score), the state
is one [branches, N] stack per kind and token count N, each branch a row, and choices are made at the
start of a step in one batched top-k per stack (`variants`). A row of a stack read at a constant offset
would be a constant in every kernel that reads it, so each block's kernels would differ and Inductor
would compile them block by block: a batched choice's rows are read through row-id buffers
(`toca_row{i}`, holding i, read at run time), and state that no batched choice reads is not stacked.

Forecasting (`ToCaConfig.forecast_order` n >= 1, `ops.forecast`): per branch its Taylor factors of
orders 1..n (`f{i}`, the cache is order 0) and `taylor` ([last fill's step, factors held]); per graph
one `clock` ([the call's step], written by the runtime before each call, `clock_index`). A branch's
companions (joint attention's other side, `Branch.companions`) keep the same cache, factors and
`taylor` beside its own (`cache_c{j}`, `f1_c{j}`, ...): filled with it, forecast with it.
"""
from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from ..analysis.fake import TensorMeta
from ..analysis.graphs import shape, value
from ..analysis.residual import Analysis, Branch
from ..config import ToCaConfig
from ..ops.cache import FLOAT8_MAX
from .score_maps import entropy_source, influence_source

_STAND_IN = (0,)  # the shape of a buffer a variant does not use: nothing to read or write


@dataclass(frozen=True)
class BufferSpec:
    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    fill: int = 0  # every element's value when allocated
    reads_as: torch.dtype | None = None  # a cache narrower than its branch output: the output's dtype
    holds: torch.dtype | None = None  # a float8 cache, stored as uint8 bytes (`ops.cache`): their format

    @property
    def nbytes(self) -> int:
        numel = 1
        for s in self.shape:
            numel *= s
        return numel * torch.empty((), dtype=self.dtype).element_size()

    def allocate(self) -> torch.Tensor:
        return torch.full(self.shape, self.fill, dtype=self.dtype, device=self.device)

    def stand_in(self) -> torch.Tensor:
        """The empty tensor passed in its place to a variant that does not use it."""
        return torch.empty(_STAND_IN, dtype=self.dtype, device=self.device)

    def meta(self, used: bool = True) -> TensorMeta:
        """Its metadata as a variant's input: allocated where `used`, else a stand-in's."""
        return TensorMeta.contiguous(self.shape if used else _STAND_IN, self.dtype, self.device)


@dataclass
class Slots:
    """One branch's buffers in a variant graph: placeholders, and its rows of the state stacks."""

    cache: fx.Node
    staleness: fx.Node | None = None
    ref_norm: fx.Node | None = None
    attention: fx.Node | None = None  # the self-attention map this branch fills on full steps
    entropy: fx.Node | None = None  # the cross-attention entropy this branch fills on full steps
    kv: dict[fx.Node, fx.Node] = field(default_factory=dict)
    factors: tuple[fx.Node, ...] = ()  # Taylor factors of orders 1..n (the cache is order 0)
    taylor: fx.Node | None = None  # [last fill's step, factors held]
    companions: tuple["Slots", ...] = ()  # the companions' forecast buffers, in `Branch.companions` order


@dataclass
class Placeholders:
    """A variant graph's buffer placeholders: `nodes` in `buffer_specs` order, each branch's `Slots`, for
    each state-row node (its stack's placeholder, the row), and the row ids."""

    nodes: list[fx.Node]
    slots: dict[int, Slots]
    rows: dict[fx.Node, tuple[fx.Node, int]]
    row_ids: list[fx.Node]
    clock: fx.Node | None = None  # [this call's step], where branches forecast

    def used(self) -> frozenset[int]:
        """Indices of the buffers the graph reads or writes (after dead-code elimination)."""
        return frozenset(i for i, n in enumerate(self.nodes) if n.users)


def buffer_specs(analysis: Analysis, config: ToCaConfig) -> list[BufferSpec]:
    """The buffers every variant of this graph shares, in placeholder order."""
    specs = []
    for b in analysis.branches:
        for name, node in _layout(b, config):
            full = f"b{b.index}_{name}"
            kind = name.split("_")[0]  # a companion's buffer is of its own kind
            specs.append(_spec(full, node, kind, config) if isinstance(node, fx.Node) else _state(full, node, b))
    stacks = state_stacks(analysis, config)
    for name, members in stacks.items():
        specs.append(_state(name, (len(members), members[0].tokens), members[0]))
    rows = row_id_count(stacks)  # > 0 only with branches
    device = value(analysis.branches[0].out).device if rows else None
    specs += [BufferSpec(f"row{i}", (1,), torch.long, device, fill=i) for i in range(rows)]
    return specs + ([_state("clock", (1,), analysis.branches[0])] if forecast_order(config) else [])


def clock_index(specs: tuple[BufferSpec, ...] | list[BufferSpec]) -> int | None:
    """The position of the `clock` buffer (the call's step, written by the runtime), if there is one."""
    return next((i for i, s in enumerate(specs) if s.name == "clock"), None)


def forecast_order(config: ToCaConfig) -> int:
    """The highest order of Taylor factor kept beside the cache (0: none)."""
    return config.forecast_order or 0


def branch_bytes(analysis: Analysis, config: ToCaConfig) -> dict[int, int]:
    """Bytes of buffers per branch index (its own buffers and its rows of the state stacks)."""
    specs = {s.name: s for s in buffer_specs(analysis, config)}
    nbytes = {b.index: sum(s.nbytes for n, s in specs.items() if n.startswith(f"b{b.index}_")) for b in analysis.branches}
    for name, members in state_stacks(analysis, config).items():
        for b in members:
            nbytes[b.index] += specs[name].nbytes // len(members)
    return nbytes


def add_placeholders(graph: fx.Graph, analysis: Analysis, config: ToCaConfig) -> Placeholders:
    """The buffers' placeholders after the graph's inputs, and the views of the stacks' rows."""
    anchor = [n for n in graph.nodes if n.op == "placeholder"][-1]
    made_nodes: list[fx.Node] = []

    def placeholder(name: str) -> fx.Node:
        nonlocal anchor
        with graph.inserting_after(anchor):
            anchor = graph.placeholder(f"toca_{name}")
        made_nodes.append(anchor)
        return anchor

    made = {b.index: {name: placeholder(f"b{b.index}_{name}") for name, _ in _layout(b, config)} for b in analysis.branches}
    members_of = state_stacks(analysis, config)
    stack_nodes = {name: (placeholder(name), members) for name, members in members_of.items()}
    row_ids = [placeholder(f"row{i}") for i in range(row_id_count(members_of))]
    clock = placeholder("clock") if forecast_order(config) else None
    rows = {}
    for name, (stack, members) in stack_nodes.items():
        for row, b in enumerate(members):
            with graph.inserting_after(anchor):
                anchor = graph.call_function(torch.select, (stack, 0, row))
            made[b.index][name.split("_")[0]] = anchor
            rows[anchor] = (stack, row)
    slots = {}
    for b in analysis.branches:
        own = made[b.index]
        kv = {node: own[f"kv{j}"] for j, node in enumerate(kv_nodes(b, config))}
        factors = tuple(own[name] for name in _FACTORS if name in own)
        companions = tuple(
            Slots(own[f"cache_c{j}"], factors=tuple(own[f"{n}_c{j}"] for n in _FACTORS if f"{n}_c{j}" in own),
                  taylor=own[f"taylor_c{j}"])
            for j in range(len(b.companions)) if f"cache_c{j}" in own)
        slots[b.index] = Slots(own["cache"], own.get("stale"), own.get("ref"), own.get("attn"), own.get("ent"), kv,
                               factors, own.get("taylor"), companions)
    return Placeholders(made_nodes, slots, rows, row_ids, clock)


_FACTORS = ("f1", "f2")


def _layout(branch: Branch, config: ToCaConfig) -> list[tuple[str, fx.Node | tuple[int, ...]]]:
    """A branch's own buffers: (name, node whose shape it has, or the shape of a float32 state buffer).
    Without a batched choice its per-token state is its own too (see `state_stacks`)."""
    names: list[tuple[str, fx.Node | tuple[int, ...]]] = [("cache", branch.out)]
    if config.cache_dtype in FLOAT8_MAX:
        names.append(("scale", branch.out))
    if _scored(branch, config) and not batched(config):
        names.append(("ref", (branch.tokens,)))
    if not batched(config):
        names += [(kind, (branch.tokens,)) for kind in _state_kinds(branch, config)]
    names += [(f"kv{j}", node) for j, node in enumerate(kv_nodes(branch, config))]
    order = forecast_order(config)
    if not order:
        return names
    names += [(name, branch.out) for name in _FACTORS[:order]] + [("taylor", (2,))]
    for j, companion in enumerate(branch.companions):
        names += [(f"{name}_c{j}", companion.out) for name in ("cache", *_FACTORS[:order])] + [(f"taylor_c{j}", (2,))]
    return names


def state_stacks(analysis: Analysis, config: ToCaConfig) -> dict[str, list[Branch]]:
    """Per-token float32 state, stacked by kind and token count for the batched choice: name -> the
    branches, one row each. Without one (the "change" score reads the stream), each branch keeps its
    own: a row of a stack is a constant offset in every kernel that reads or writes it, so each
    block's kernels would differ, and Inductor would compile them block by block."""
    if not batched(config):
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


def batched(config: ToCaConfig) -> bool:
    """Whether choices may be made at the start of a step, batched (`select_batch`): no score reads
    the stream."""
    return not dict(config.scores).get("change")


def row_id_count(stacks: dict[str, list[Branch]]) -> int:
    """Row-id buffers (int64 [1], buffer i holding i): as many as a batched choice may have rows, the
    rows of its staleness stack (of `state_stacks`)."""
    return max((len(m) for name, m in stacks.items() if name.startswith("stale")), default=0)


def _scored(branch: Branch, config: ToCaConfig) -> bool:
    """Whether partial steps recompute some of this branch's tokens (and so need token scores)."""
    return not branch.attends_tokens or config.self_attn != "reuse"


def kv_nodes(branch: Branch, config: ToCaConfig) -> list[fx.Node]:
    """Attention inputs cached across steps: context keys/values, and self-attention keys/values
    when configured."""
    nodes = list(branch.flow.context_kv)
    if branch.attends_tokens and config.self_attn == "recompute_cached_kv":
        nodes += [n for inputs in branch.flow.full_inputs.values() for n in inputs if n not in nodes]
    return nodes


def _state(name: str, shape: tuple[int, ...], branch: Branch) -> BufferSpec:
    return BufferSpec(name, shape, torch.float32, value(branch.out).device)


def _spec(name: str, node: fx.Node, kind: str = "", config: ToCaConfig | None = None) -> BufferSpec:
    """The buffer of `node`'s shape; a branch's cache in `config.cache_dtype` where that is narrower
    (a float8 cache as its bytes), a float8 cache's "scale" (one float32 per row), Taylor factors in
    `config.forecast_dtype`."""
    v = value(node)
    narrow = config is not None and config.cache_dtype is not None and config.cache_dtype != v.dtype
    if kind == "scale":
        return BufferSpec(name, (*shape(node)[:-1], 1), torch.float32, v.device, fill=1)
    if kind == "cache" and narrow and config.cache_dtype in FLOAT8_MAX:
        return BufferSpec(name, shape(node), torch.uint8, v.device, reads_as=v.dtype, holds=config.cache_dtype)
    if kind == "cache" and narrow:
        return BufferSpec(name, shape(node), config.cache_dtype, v.device, reads_as=v.dtype)
    if kind in _FACTORS and config is not None:
        return BufferSpec(name, shape(node), config.forecast_dtype, v.device)
    return BufferSpec(name, shape(node), v.dtype, v.device)
