"""Residual-stream detection: the `x = x + gate * branch(x)` adds of a transformer.

Matches: an add of two tensors of one shape [B, N, D] where one operand (the stream x) is an ancestor
of the other (the branch output). A trailing multiply by a tensor that does not depend on x and does
not vary along the token axis (the adaLN gate) is peeled off: the cache point is before the gate.
Produces: `Branch` records, classified by what they contain (see `classify`), and `Rejection`s with
the reason a residual add could not be cached, for `explain` and the warning.

Joint attention: the image and text streams are two residual streams whose branches share one
attention over both. Each side is a valid branch alone (the other's rows ride along whole); as both
cannot be gathered at once, the side with more tokens is cached and the other recomputed every step.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .axes import Axes, NotTokenLocal, Passengers, TokenFlow
from .graphs import depends, op_name, positions, readable_name, shape
from .tokens import follow, propagate

_ADDS = {operator.add, operator.iadd, torch.add}


@dataclass
class Branch:
    add: fx.Node          # the residual add
    stream: fx.Node       # x, the branch input
    out: fx.Node          # cache point: the branch output before its gate
    gate: fx.Node | None  # the per-sample gate multiplied onto `out`, if any
    nodes: list[fx.Node]  # the branch, in graph order, `out` last
    flow: TokenFlow
    kind: str = "mlp"     # "self_attn" | "joint_attn" | "cross_attn" | "mlp"
    name: str = ""
    index: int = 0

    @property
    def tokens(self) -> int:
        return shape(self.stream)[1]

    @property
    def attends_tokens(self) -> bool:
        """Self- or joint attention: keys and values come from the stream itself."""
        return self.kind in ("self_attn", "joint_attn")

    @property
    def out_axes(self) -> Axes:
        return self.flow.info[self.out]


@dataclass
class Rejection:
    name: str
    reason: str
    by_design: bool = False  # the text side of a joint attention: recomputed, as the method intends


@dataclass
class Analysis:
    branches: list[Branch] = field(default_factory=list)
    rejected: list[Rejection] = field(default_factory=list)


def find_branches(graph: fx.Graph) -> Analysis:
    """Every residual branch of `graph`, token-analysed and classified; what failed, with why."""
    order = positions(graph)
    result = Analysis()
    candidates = []
    for node in graph.nodes:
        split = _residual_operands(node, order)
        if split is None:
            continue
        stream, addend = split
        try:
            candidates.append(_make_branch(node, stream, addend, order))
        except NotTokenLocal as err:
            result.rejected.append(Rejection(readable_name(node), str(err)))
    for branch in candidates:
        rival = _larger_sharer(branch, candidates)
        if rival is not None:
            why = (f"computed jointly with {rival.name} ({rival.tokens} tokens), whose rows are cached; "
                   f"these {branch.tokens} tokens are recomputed every step")
            result.rejected.append(Rejection(branch.name, why, by_design=True))
            continue
        branch.index = len(result.branches)
        result.branches.append(branch)
    return result


# ---------------------------------------------------------------------------------------------

def _residual_operands(node: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node] | None:
    """(stream, addend) if `node` adds a branch output onto the tensor it was computed from."""
    is_add = (node.op == "call_function" and node.target in _ADDS) or (
        node.op == "call_method" and node.target in ("add", "add_", "__add__")
    )
    if not is_add or len(node.args) < 2 or node.kwargs:
        return None
    a, b = node.args[:2]
    out = shape(node)
    if out is None or len(out) != 3 or shape(a) != out or shape(b) != out:
        return None
    if order[a] < order[b] and depends(b, a, order):
        return a, b
    if order[b] < order[a] and depends(a, b, order):
        return b, a
    return None


def _make_branch(add: fx.Node, stream: fx.Node, addend: fx.Node, order: dict[fx.Node, int]) -> Branch:
    out, gate = _peel_gate(addend, stream, order)
    nodes = _between(stream, out, order)
    flow = propagate(nodes, stream)
    _check_closed(nodes, {addend, add}, flow)
    info = flow.info[out]
    if not isinstance(info, Axes) or info.key is not None or info.extra:
        raise NotTokenLocal(f"branch output {out.name} does not carry the tokens alone")
    named = out
    while named.target is operator.getitem and named.args[0] in flow.info:  # a slice: name what it cuts
        named = named.args[0]
    branch = Branch(add, stream, out, gate, nodes, flow, name=readable_name(out, named))
    branch.kind = _classify(branch)
    return branch


def _peel_gate(addend: fx.Node, stream: fx.Node, order: dict[fx.Node, int]) -> tuple[fx.Node, fx.Node | None]:
    """Split `gate * out` when the gate is independent of the stream and constant along tokens."""
    if op_name(addend) != "mul" or len(addend.args) != 2 or len(addend.users) != 1:
        return addend, None
    for gate, out in (addend.args, addend.args[::-1]):
        gate_shape = shape(gate)
        if gate_shape is None or not isinstance(out, fx.Node) or depends(gate, stream, order):
            continue
        axis = 1 - (3 - len(gate_shape))
        if (axis < 0 or gate_shape[axis] == 1) and depends(out, stream, order):
            return out, gate
    return addend, None


def _between(stream: fx.Node, out: fx.Node, order: dict[fx.Node, int]) -> list[fx.Node]:
    """Nodes that depend on `stream` and feed `out` (inclusive of `out`), in graph order."""
    feeds, todo = {out}, [out]
    while todo:
        for i in todo.pop().all_input_nodes:
            if i not in feeds and order[i] > order[stream]:
                feeds.add(i)
                todo.append(i)
    dependent = {stream}
    for node in sorted(feeds, key=order.__getitem__):
        if any(i in dependent for i in node.all_input_nodes):
            dependent.add(node)
    return sorted(dependent - {stream}, key=order.__getitem__)


def _check_closed(nodes: list[fx.Node], ends: set[fx.Node], flow: TokenFlow) -> None:
    """A branch can be skipped or gathered only if nothing else reads its intermediates, except
    other-stream rows of a joint attention (`Passengers`), which a gathered computation still yields."""
    inside = set(nodes) | ends
    for node in nodes:
        for user in node.users:
            if user in inside or user in flow.passenger_outputs:
                continue
            if not _reads_passengers(user, flow):
                raise NotTokenLocal(f"{node.name} inside the branch is also used by {user.name}")
            flow.passenger_outputs.append(user)
        if node.op == "call_method" and node.target.endswith("_"):
            raise NotTokenLocal(f"in-place op {node.target} ({node.name}) inside the branch")


def _reads_passengers(user: fx.Node, flow: TokenFlow) -> bool:
    try:
        return isinstance(follow(user, flow), Passengers)
    except NotTokenLocal:
        return False


def _larger_sharer(branch: Branch, branches: list[Branch]) -> Branch | None:
    """The branch that shares nodes with `branch` and wins the tie: more tokens, then earlier."""
    mine, rank = set(branch.nodes), {id(b): (b.tokens, -i) for i, b in enumerate(branches)}
    for other in branches:
        if other is not branch and not mine.isdisjoint(other.nodes) and rank[id(other)] > rank[id(branch)]:
            return other
    return None


def _classify(branch: Branch) -> str:
    flow = branch.flow
    if flow.joint_attention:
        return "joint_attn"
    if flow.self_attention:
        return "self_attn"
    if flow.cross_attention or any(op_name(n) in ("softmax", "log_softmax") for n in branch.nodes):
        return "cross_attn"
    return "mlp"
