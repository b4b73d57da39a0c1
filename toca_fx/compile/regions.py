"""Regional compilation: a rewritten graph cut into a prologue, its blocks and an epilogue, each block
compiled once per distinct form and that compilation reused by every block of the same form.

Inductor lowers, fuses and generates code for each of a DiT's identical blocks anew, and a caching
variant's scheduler and code generation take longer than plain Inductor's whole model
(docs/benchmarks.md). Compiled block by block, a variant costs one block per form plus its ends.

Matches: a graph whose residual adds are marked along the stream (`analysis.marks`: position j for the j-th
add, 0 for the stream's first input x0). What is cut comes from data flow alone:
- a node that reads the stream lies in the segment after the last residual add it reads, and P
  consecutive segments make a block (P: the period of the segments' forms; 1 when they have none);
- a node that does not read the stream goes into a block only where that block alone reads it and it
  reads an input only that block reads (its weights), or a node already in the block; every other such
  node (x0 and what computes it, shared embeddings, the batched token choice, views of shared state)
  goes to the prologue, whose values the blocks take as inputs;
- what reads the stream after its last residual add is the epilogue;
- each block's closing residual add and its addend go to the next region (`_hand_over`), where the add
  fuses with the layer norm that reads its sum, and so do the sums before it back to one that a matmul
  reads (or the block's first): those are computed again there, with the elementwise ops and views
  they read. So what leaves a block on the stream is what one graph writes out too, each sum rounded
  to the model's dtype where one graph would round it. The first block, which receives no add, has a
  form of its own, and a model of two blocks gains nothing.
Produces: `Regional`, a callable taking the graph's inputs, that runs the compiled regions in order and
frees each value after its last reader. Where no two blocks share a form, a value crossing a cut is
not a tensor, the adds are not marked 0..M along one stream, or a region would read a value of a
later one (blocks of different forms that one period cannot cut), `compile_regions` returns None and
the graph compiles whole, with a note in the "toca_fx" log. A step that reuses every
branch is cut too, after every add: one graph fuses its chain of cached-output adds into long
serial kernels (see `compile.options`), and cut it runs faster and compiles sooner (docs/benchmarks.md).

The cost: no fusion across a cut (the residual stream is written and read once more per block), and
without CUDA graphs, one more compiled call per block.
"""
from __future__ import annotations

import logging
import math
import operator
from collections import defaultdict
from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.fx as fx
from torch.fx.node import _get_qualified_name, map_arg
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.multiprocessing.reductions import StorageWeakRef

from ..analysis.fake import FakeRun, TensorMeta, fakes, new_fake_mode
from ..analysis.graphs import ancestors, op_name
from ..analysis.marks import on_stream, stream_marks
from ..analysis.rules import POINTWISE

log = logging.getLogger("toca_fx")
PROLOGUE = -1
# What a region may compute again: elementwise ops and views (not in place), cheap beside a block.
CHEAP = (POINTWISE - {"iadd", "imul", "isub", "itruediv"}) | {
    "getitem", "chunk", "split", "view", "reshape", "unsqueeze", "squeeze", "expand", "permute", "transpose", "flatten",
    "unflatten"}
# Ops whose inputs Inductor writes out (its matmul and convolution kernels read them from memory).
_MATERIALIZING = {"linear", "matmul", "bmm", "mm", "addmm", "baddbmm", "einsum", "scaled_dot_product_attention",
                  "conv1d", "conv2d", "conv3d"}


def compile_graph(
    gm: fx.GraphModule, inputs: list[Any], compile_one: Callable[[fx.GraphModule, list[Any]], Callable], regional: bool
) -> Callable:
    """`gm` compiled by regions where `regional` and `compile_regions` cuts it, else whole with
    `compile_one`: the one choice this process and a worker compiling ahead for it must both make."""
    fn = compile_regions(gm, inputs, compile_one) if regional else None
    return fn if fn is not None else compile_one(gm, inputs)


def compile_regions(
    gm: fx.GraphModule, inputs: list[Any], compile_one: Callable[[fx.GraphModule, list[Any]], Callable]
) -> Regional | None:
    """`gm` compiled region by region with `compile_one(region graph, input metadata)`, each form once;
    None where cutting it would not spare a compilation (see the module's doc)."""
    cut = cut_graph(gm.graph)
    if cut is None:
        return None
    metas, aliases = _leaves(gm, inputs)
    fake_mode = new_fake_mode()
    held = [set(nodes) for nodes in cut]
    placed = set().union(*held)
    output = next(n for n in gm.graph.nodes if n.op == "output")
    sent = {n for r in range(len(cut)) for u in cut[r] for n in u.all_input_nodes if n in placed and n not in held[r]}
    sent |= {n for n in output.all_input_nodes if n in placed}
    prologue, *blocks, epilogue = [_extract(nodes, sent & held[r], metas, aliases, fake_mode) for r, nodes in enumerate(cut)]
    forms = len({b.key for b in blocks})
    if forms == len(blocks):
        return None
    regions = [r for r in (prologue, *blocks, epilogue) if r.size]
    if any(not isinstance(metas.get(v), TensorMeta) for r in regions for v in (*r.inputs, *r.outputs)):
        return None  # a tuple or a number crossing a cut: Inductor's graphs take and return tensors
    compiled: dict[str, Callable] = {}
    for region in regions:
        if region.key not in compiled:
            compiled[region.key] = compile_one(region.gm, [metas[v] for v in region.inputs])
    return Regional(gm, regions, compiled, len(blocks), forms)


def cut_graph(graph: fx.Graph) -> list[list[fx.Node]] | None:
    """The graph's nodes as [prologue, block 0, ..., block B-1, epilogue], each in graph order; None
    without a marked stream of at least two blocks."""
    nodes = list(graph.nodes)
    marks = stream_marks(nodes)
    x0 = next((n for n, j in marks.items() if j == 0), None)
    adds = len(marks) - 1
    if x0 is None or adds < 2:
        return None
    if sorted(marks.values()) != list(range(adds + 1)):
        log.info("toca_fx: regions: the residual adds are not marked 0..%d along one stream; compiled whole", adds)
        return None
    segment = _segments(nodes, marks)
    period = _period(nodes, segment, adds)
    blocks = adds // period
    if blocks < 2:
        return None
    region = {n: min((s - 1) // period, blocks) for n, s in segment.items()}  # block, or `blocks`: the epilogue
    region.update(_off_stream(nodes, region, x0, blocks))
    copies: set[tuple[fx.Node, int]] = set()
    moved: set[fx.Node] = set()
    for j in range(period, adds + 1, period):
        copies |= _hand_over(next(n for n, m in marks.items() if m == j), region, segment, moved)
    cut: list[list[fx.Node]] = [[] for _ in range(blocks + 2)]
    for n in nodes:
        if n in region:
            cut[region[n] + 1].append(n)
        if (n, region.get(n)) in copies:
            cut[region[n] + 2].append(n)  # also computed in the next region (see `_hand_over`)
    if not _in_order(cut):
        log.info("toca_fx: regions: blocks of different forms read values of later regions; compiled whole")
        return None
    return cut


def _in_order(cut: list[list[fx.Node]]) -> bool:
    """Whether every region reads only graph inputs and values of itself or earlier regions (blocks of
    different forms, cut by one period, may not)."""
    done: set[fx.Node] = set()
    for nodes in cut:
        inside = set(nodes)
        for n in nodes:
            if any(i not in done and i not in inside and i.op not in ("placeholder", "get_attr") for i in n.all_input_nodes):
                return False
        done |= inside
    return True


class Regional:
    """A graph run as its compiled regions, in order; each value freed after its last reader."""

    def __init__(self, gm: fx.GraphModule, regions: list[_Region], compiled: dict[str, Callable], blocks: int, forms: int):
        self.blocks, self.forms = blocks, forms  # blocks, and distinct blocks compiled
        slot: dict[fx.Node, int] = {}
        leaves = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
        for n in leaves:
            slot[n] = len(slot)
        self._args = sum(n.op == "placeholder" for n in leaves)
        self._attrs = [(slot[n], operator.attrgetter(n.target)(gm)) for n in leaves if n.op == "get_attr"]
        for r in regions:
            for v in r.outputs:
                slot[v] = len(slot)
        output = next(n for n in gm.graph.nodes if n.op == "output")
        last = _last_reads(regions, output)
        self._steps = [
            (compiled[r.key], [slot[v] for v in r.inputs], [slot[v] for v in r.outputs],
             [slot[v] for v in r.inputs if last[v] == i and v.op != "get_attr"])
            for i, r in enumerate(regions)
        ]
        self._size = len(slot)
        self._result = map_arg(output.args[0], lambda n: _Slot(slot[n]))

    def __call__(self, *args: Any) -> Any:
        env: list[Any] = [None] * self._size
        env[: self._args] = args
        for i, value in self._attrs:
            env[i] = value
        for fn, ins, outs, dead in self._steps:
            values = fn(*[env[i] for i in ins])
            for i in dead:
                env[i] = None
            for i, v in zip(outs, values):
                env[i] = v
        return _map_slots(self._result, env)


# ---------------------------------------------------------------------------------------------

@dataclass
class _Region:
    gm: fx.GraphModule
    inputs: list[fx.Node]  # values read from outside, in order of first read
    outputs: list[fx.Node]  # values read outside, in graph order
    key: str  # its form: equal keys compile to the same code
    size: int  # nodes


def _segments(nodes: list[fx.Node], marks: dict[fx.Node, int]) -> dict[fx.Node, int]:
    """Each node that reads the stream (x0 excluded): 1 + the position of the last residual add it reads."""
    level: dict[fx.Node, int] = {}
    for n in nodes:
        reads = [marks[i] if i in marks else level[i] for i in n.all_input_nodes if i in marks or i in level]
        if reads and n.op != "output":
            level[n] = max(reads)
    return {n: j + 1 for n, j in level.items()}


def _period(nodes: list[fx.Node], segment: dict[fx.Node, int], adds: int) -> int:
    """The smallest P dividing the number of residual adds with which the segments' forms (the ops of
    their nodes) repeat from the second block on, or 1."""
    ops: dict[int, list[str]] = defaultdict(list)
    for n in nodes:
        if n in segment and segment[n] <= adds:
            ops[segment[n]].append(_target(n))
    forms = [tuple(ops[s]) for s in range(1, adds + 1)]
    for p in range(1, adds // 2 + 1):
        if adds % p == 0 and all(forms[j] == forms[j + p] for j in range(p, adds - p)):
            return p
    return 1


def _off_stream(nodes: list[fx.Node], region: dict[fx.Node, int], x0: fx.Node, epilogue: int) -> dict[fx.Node, int]:
    """Regions of the nodes that do not read the stream (see the module's doc)."""
    readers: dict[fx.Node, set[int]] = {}
    for n in reversed(nodes):
        if n in region or n.op == "output":
            continue
        readers[n] = set()
        for u in n.users:
            readers[n] |= readers.get(u, set()) if u not in region else {region[u]}
        if any(u.op == "output" for u in n.users):
            readers[n].add(epilogue)
    prologue = ancestors(x0)
    placed: dict[fx.Node, int] = {}
    for n in nodes:
        if n not in readers or n.op in ("placeholder", "get_attr"):
            continue
        own = readers[n] if readers[n] else {placed[i] for i in n.all_input_nodes if placed.get(i, PROLOGUE) != PROLOGUE}
        home = next(iter(own)) if len(own) == 1 and n not in prologue else PROLOGUE
        private = any(placed.get(i) == home or (i.op in ("placeholder", "get_attr") and readers.get(i) == {home})
                      for i in n.all_input_nodes)
        placed[n] = home if home != PROLOGUE and private else PROLOGUE
    return placed


def _hand_over(
    add: fx.Node, region: dict[fx.Node, int], segment: dict[fx.Node, int], moved: set[fx.Node]
) -> set[tuple[fx.Node, int]]:
    """Move a block's closing residual add and its addend (the gated branch output, where the add alone
    reads it) to the next region, with the stores of what those read: there the add fuses with the
    layer norm that reads its sum, as in one graph (cut after the add, the sum makes one more round
    trip through memory per block). Return, as (node, its region) pairs,
    what the next region computes again: the elementwise ops and views the moved nodes read in the
    block, back through the sums before the closing one to a sum a matmul reads (which one graph
    writes out for the matmul) or one that arrived from the block before (`moved`, which this extends).
    Passed over instead, such a value would be rounded to the model's dtype, where in one graph
    Inductor keeps it in float32, and a bf16 generation would drift from the model run in float32 as
    far as eager's does (tests/test_regions.py checks it stays as close as a whole graph's)."""
    home = region[add]
    addend = [i for i in add.all_input_nodes if region.get(i) == home and len(i.users) == 1 and i.op == "call_function"
              and i.target is not operator.getitem and not on_stream(i)]  # a tuple stays where it is made
    here = [add, *addend]
    for n in here:
        region[n] = home + 1
    moved.update(here)
    for n in here:
        for i in n.all_input_nodes:
            for u in i.users:
                if region.get(u) == home and not u.users:
                    region[u] = home + 1
    copies, todo = set(), [i for n in here for i in n.all_input_nodes]
    while todo:
        i = todo.pop()
        if region.get(i) != home or (i, home) in copies or op_name(i) not in CHEAP or i.op not in ("call_function", "call_method"):
            continue
        if i in segment and (i in moved or any(op_name(u) in _MATERIALIZING for u in i.users)):
            continue  # a sum that one graph writes out too (a matmul reads it), or one the block received
        copies.add((i, home))
        todo += i.all_input_nodes
    return copies


def _extract(
    nodes: list[fx.Node], sent: set[fx.Node], metas: dict[fx.Node, Any], aliases: set[fx.Node], fake_mode: FakeTensorMode
) -> _Region:
    """A region's nodes as a graph of their own, with its inputs, outputs and form. `metas` (each value's
    metadata) and `aliases` (values that are views of the graph's inputs) gain its outputs'.

    Outputs leave contiguous, unless they are views of the graph's inputs (the state a region updates
    in place): the layout eager PyTorch gives a value can be any (a patch embedding's transposed
    tokens, which every add after it keeps), and a value leaving a compiled graph keeps that layout,
    where inside one graph Inductor would have chosen its own."""
    inside = set(nodes)
    graph, env, inputs = fx.Graph(), {}, []

    def value(n: fx.Node) -> fx.Node:
        if n not in inside and n not in env:
            inputs.append(n)
            env[n] = graph.placeholder(f"in{len(inputs) - 1}")
        return env[n]

    for n in nodes:
        for i in n.all_input_nodes:
            value(i)
        env[n] = graph.node_copy(n, value)
        env[n].meta.pop("example_value", None)  # another fake mode's: the compilation makes its own
    outputs = [n for n in nodes if n in sent]
    out = graph.output(tuple(env[n] for n in outputs))
    ins = fakes([metas[i] for i in inputs], fake_mode)
    values = [*ins, *FakeRun(fx.GraphModule(torch.nn.Module(), graph), fake_mode).run_fakes(ins)]
    shared = {StorageWeakRef(x.untyped_storage()) for i, x in zip(inputs, values[: len(inputs)]) if i in aliases}
    results = []
    for n, v in zip(outputs, values[len(inputs):]):
        if isinstance(v, torch.Tensor) and StorageWeakRef(v.untyped_storage()) in shared:
            aliases.add(n)
        elif isinstance(v, torch.Tensor) and not v.is_contiguous():
            with graph.inserting_before(out):
                env[n] = graph.call_method("contiguous", (env[n],))
            v = v.contiguous()
        metas[n] = TensorMeta.of(v)
        results.append(env[n])
    out.args = (tuple(results),)
    text = _form(graph, [metas[i] for i in inputs])
    return _Region(fx.GraphModule(torch.nn.Module(), graph), inputs, outputs, text, len(nodes))


def _form(graph: fx.Graph, metas: list[Any]) -> str:
    """The graph's code with its nodes renamed in order, and its inputs' metadata."""
    names: dict[fx.Node, str] = {}
    lines = [repr(m) for m in metas]
    for n in graph.nodes:
        names[n] = f"v{len(names)}"
        args = map_arg((n.args, n.kwargs), lambda a: names[a])
        lines.append(f"{names[n]} = {n.op} {_target(n)} {args!r}")
    return "\n".join(lines)


def _target(n: fx.Node) -> str:
    if n.op in ("placeholder", "output") or not callable(n.target):
        return f"{n.op} {n.target}" if n.op not in ("placeholder", "output") else n.op
    try:
        return _get_qualified_name(n.target)
    except (RuntimeError, AttributeError):
        return repr(n.target)


def _leaves(gm: fx.GraphModule, inputs: list[Any]) -> tuple[dict[fx.Node, Any], set[fx.Node]]:
    """The metadata of the graph's inputs and constants (`TensorMeta`s, other values as they are), and
    those of them that are tensors (whose views the regions must pass on as views)."""
    leaves = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr")]
    values = iter(inputs)
    metas = {n: TensorMeta.of(next(values) if n.op == "placeholder" else operator.attrgetter(n.target)(gm)) for n in leaves}
    return metas, {n for n, m in metas.items() if isinstance(m, TensorMeta)}


def _last_reads(regions: list[_Region], output: fx.Node) -> dict[fx.Node, int]:
    """Each value's last reader: a region's position, or past the end for the graph's outputs."""
    last = {}
    for i, r in enumerate(regions):
        for v in r.inputs:
            last[v] = i
    for v in output.all_input_nodes:
        last[v] = math.inf
    return last


class _Slot(int):
    """A value's place in `Regional`'s environment, in the graph's output."""


def _map_slots(result: Any, env: list[Any]) -> Any:
    if isinstance(result, (tuple, list)):
        return type(result)(_map_slots(r, env) for r in result)
    if isinstance(result, dict):
        return {k: _map_slots(v, env) for k, v in result.items()}
    return env[result] if isinstance(result, _Slot) else result
