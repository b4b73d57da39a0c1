"""A fused projection whose pieces are wanted differently runs as one linear per run of pieces.

Matches: in a branch that recomputes its chosen tokens, a `linear(x, W, b)` wanted both for the chosen
rows and over all tokens, whose output is cut along its last axis into pieces by one of
  - a reshape of the last axis into (P, ...), permutes or transposes, and an unbind of the P axis
    (timm's fused qkv, as DiT and PixArt write it);
  - a chunk or split of the last axis (diffusers' fused `to_qkv`);
with some pieces wanted only as rows (the self-attention's queries) and others over all tokens (its
keys and values).
Produces: per run of consecutive pieces wanted alike, a linear over those rows of W and b (views, no
copies) and the same chain with P cut to the run's length. The gather then moves before the queries'
linear: they are projected for the chosen tokens only, not for every token and gathered after.
"""
from __future__ import annotations

import itertools
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from ..analysis.fake import fake_value
from ..analysis.residual import Branch
from ..analysis.graphs import op_name, shape
from .gather_scatter import Want, wanted

_AXIS_MOVES = {"permute", "transpose"}


def split_projections(graph: fx.Graph, branches: list[Branch], cached_kv: dict[int, set[fx.Node]]) -> int:
    """Rewrite every matching linear of the `branches` (those recomputing chosen rows; `cached_kv`: each
    one's attention inputs read from a cache) in place; return how many matched. The replaced nodes
    are left dead and the analysis is stale: the caller removes them and analyses again."""
    count = 0
    for branch in branches:
        needs = wanted(branch, cached_kv.get(branch.index, set()))
        for node in branch.nodes:
            if op_name(node) == "linear" and Want.ALL in needs[node]:
                match = _match(node)
                if match is not None and _split(graph, node, match, needs):
                    count += 1
    return count


def narrow_linear(graph: fx.Graph, linear: fx.Node, lo: int, hi: int) -> list[fx.Node]:
    """Insert a linear over rows [lo, hi) of `linear`'s weight and bias (views, no copies), with the full
    linear's meta but its shape; return the new nodes, the linear last."""
    x, weight, bias = (list(linear.args) + [linear.kwargs.get("bias")])[:3]
    w = graph.call_function(torch.narrow, (weight, 0, lo, hi - lo))
    b = graph.call_function(torch.narrow, (bias, 0, lo, hi - lo)) if bias is not None else None
    part = graph.call_function(linear.target, (x, w, b))
    part.meta.update({k: v for k, v in linear.meta.items() if k != "example_value"})
    return [n for n in (w, b, part) if n is not None]


def split_pieces(kind: str, how: object, size: int) -> list[tuple[int, int]] | None:
    """Column ranges of `chunk(how)` or `split(how)` of an axis of `size`."""
    if kind == "chunk" and isinstance(how, int):
        how = math.ceil(size / how)
    if isinstance(how, int):
        return [(s, min(s + how, size)) for s in range(0, size, how)]
    if isinstance(how, (list, tuple)) and all(isinstance(s, int) for s in how) and sum(how) == size:
        ends = [sum(how[: i + 1]) for i in range(len(how))]
        return [(e - s, e) for s, e in zip(how, ends)]
    return None


# ---------------------------------------------------------------------------------------------

class _Match:
    """How a linear's output is cut: the nodes from the linear to the cut (`chain`: a reshape and axis
    moves, or empty), the cut node, each piece's column range and each piece's getitems."""

    def __init__(self, chain: list[fx.Node], cut: fx.Node, pieces: list[tuple[int, int]], items: dict[int, list[fx.Node]]):
        self.chain, self.cut, self.pieces, self.items = chain, cut, pieces, items


def _match(linear: fx.Node) -> _Match | None:
    if len(linear.args) < 2 or len(linear.users) != 1 or shape(linear) is None:
        return None
    (user,) = linear.users
    if op_name(user) in ("chunk", "split"):
        return _match_split(linear, user)
    if op_name(user) in ("reshape", "view"):
        return _match_unbind(linear, user)
    return None


def _match_split(linear: fx.Node, cut: fx.Node) -> _Match | None:
    """`linear(...).chunk(n, -1)` or `.split(sizes, -1)`, read through int getitems only."""
    out = shape(linear)
    if cut.args[0] is not linear or _dim_arg(cut, 2, len(out)) != len(out) - 1:
        return None
    pieces = split_pieces(op_name(cut), cut.args[1] if len(cut.args) > 1 else None, out[-1])
    items = _items(cut, len(pieces) if pieces else 0)
    return _Match([], cut, pieces, items) if pieces and items is not None else None


def _match_unbind(linear: fx.Node, reshape: fx.Node) -> _Match | None:
    """`linear(...).reshape(*lead, P, *rest)`, permutes or transposes, `.unbind(the P axis)`."""
    out, cut_shape = shape(linear), shape(reshape)
    axis = len(out) - 1
    if cut_shape is None or cut_shape[:axis] != out[:axis] or math.prod(cut_shape[axis:]) != out[-1]:
        return None
    parts, chain, node = cut_shape[axis], [reshape], reshape
    while len(node.users) == 1 and op_name(next(iter(node.users))) in _AXIS_MOVES:
        node = next(iter(node.users))
        axis = _moved(node, axis, len(cut_shape))
        if axis is None:
            return None
        chain.append(node)
    if len(node.users) != 1:
        return None
    (cut,) = node.users
    if op_name(cut) != "unbind" or _dim_arg(cut, 1, len(cut_shape)) != axis:
        return None
    width = out[-1] // parts
    items = _items(cut, parts)
    return _Match(chain, cut, [(i * width, (i + 1) * width) for i in range(parts)], items) if items is not None else None


def _split(graph: fx.Graph, linear: fx.Node, match: _Match, needs: dict[fx.Node, set[Want]]) -> bool:
    """Replace the linear by one per run of pieces wanted alike; False (graph untouched) if one run."""
    want = [_kind(needs, match.items.get(i, [])) for i in range(len(match.pieces))]
    if set(want) != {Want.ROWS, Want.ALL}:
        return False
    for run in _runs_by(want):
        lo, hi = match.pieces[run[0]][0], match.pieces[run[-1]][1]
        with graph.inserting_before(match.cut):
            made = narrow_linear(graph, linear, lo, hi)
            for node in made:
                fake_value(node)
            outputs = _cut_run(graph, made[-1], match, run, lo)
        for i, out in zip(run, outputs):
            for item in match.items.get(i, []):
                item.replace_all_uses_with(out)
    return True


def _cut_run(graph: fx.Graph, part: fx.Node, match: _Match, run: list[int], lo: int) -> list[fx.Node]:
    """The run's pieces, from its linear `part`: through the chain with P cut to the run's length, or
    split as the pieces were."""
    if not match.chain:
        if len(run) == 1:
            return [part]
        pieces = _call(graph, "call_method", "split", (part, [e - s for s, e in (match.pieces[i] for i in run)], -1))
        return [_call(graph, "call_function", operator.getitem, (pieces, j)) for j in range(len(run))]
    reshape, *moves = match.chain
    sizes = list(shape(reshape))
    sizes[len(shape(part)) - 1] = len(run)
    node = _call(graph, "call_method", "reshape", (part, tuple(sizes)))
    for move in moves:
        node = _call(graph, move.op, move.target, (node, *move.args[1:]), move.kwargs)
    cut = _call(graph, match.cut.op, match.cut.target, (node, *match.cut.args[1:]), match.cut.kwargs)
    return [_call(graph, "call_function", operator.getitem, (cut, j)) for j in range(len(run))]


def _call(graph: fx.Graph, op: str, target: Any, args: tuple, kwargs: dict | None = None) -> fx.Node:
    """A new node with its example value (the analysis reads shapes), computed on the inputs' fakes."""
    node = graph.create_node(op, target, args, kwargs or {})
    fake_value(node)
    return node


def _items(cut: fx.Node, parts: int) -> dict[int, list[fx.Node]] | None:
    """Piece index -> the getitems reading it, if every user of `cut` is an int getitem."""
    items: dict[int, list[fx.Node]] = {}
    for user in cut.users:
        if user.target is not operator.getitem or not isinstance(user.args[1], int):
            return None
        items.setdefault(user.args[1] % parts, []).append(user)
    return items


def _kind(needs: dict[fx.Node, set[Want]], items: list[fx.Node]) -> Want | None:
    """Want.ROWS if a piece is wanted as rows only, Want.ALL if over all tokens too, None if not read."""
    want = set().union(*(needs[item] for item in items))
    return Want.ALL if Want.ALL in want else Want.ROWS if want else None


def _runs_by(want: list[Want | None]) -> list[list[int]]:
    """Consecutive pieces wanted alike: [rows, full, full] -> [[0], [1, 2]]."""
    return [[i for i, _ in run] for _, run in itertools.groupby(enumerate(want), key=operator.itemgetter(1))]


def _moved(node: fx.Node, axis: int, ndim: int) -> int | None:
    """Where `axis` goes through a permute or transpose (None: arguments not plain ints)."""
    dims = node.args[1:]
    if len(dims) == 1 and isinstance(dims[0], (tuple, list)):
        dims = tuple(dims[0])
    if not all(isinstance(d, int) for d in dims):
        return None
    dims = [d % ndim for d in dims]
    if op_name(node) == "permute":
        return dims.index(axis) if len(dims) == ndim else None
    a, b = dims
    return b if axis == a else a if axis == b else axis


def _dim_arg(node: fx.Node, pos: int, ndim: int) -> int | None:
    dim = node.args[pos] if len(node.args) > pos else node.kwargs.get("dim", 0)
    return dim % ndim if isinstance(dim, int) else None
