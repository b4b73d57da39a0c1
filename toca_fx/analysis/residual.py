"""Residual-stream detection: the `x = x + gate * branch(x)` adds of a transformer.

Matches: an add of two tensors of one shape [B, N, D] where one operand (the stream x) is an ancestor
of the other (the branch output). A trailing multiply by a tensor that does not depend on x and does
not vary along the token axis (the adaLN gate) is peeled off: the cache point is before the gate.
The stream may be read through a dtype cast (`(x.float() + gate * f(x)).type_as(x)`): the add's operand
is then a cast of the x the branch reads. Streams that no graph input of 3 or more axes reaches but
parameters (only vectors: timestep, labels, pooled embeddings; or per-sample 2-D features), such as a
modulation network over a few slots, carry no latent tokens and are left alone.
Produces: `Branch` records, classified by what they contain (see `classify`), and `Rejection`s with
the reason a residual add could not be cached, for `explain` and the warning. A branch that the token
propagation cannot prove token-local is still a `Branch` when it is closed (nothing outside reads its
intermediates): its output can be cached and added whole (`Branch.modes` lacks "rows"), with the reason
kept in `Branch.whole_only`.

A branch may read the stream through another branch's residual add (`x + g2 * mlp(norm(x + g1 * attn(x)))`,
the inner sum not carried on as the stream): it is then a branch of that sum.

Joint attention: the image and text streams are two residual streams whose branches share one
attention over both. Each side is a valid branch alone (the other's rows ride along whole); as both
cannot be gathered at once, the side with more tokens is cached and the other is its companion
(`Branch.companions`): recomputed wherever the cached side reuses (ToCa recomputes the text
side) or computes rows, cached and forecast beside it where it forecasts (as TaylorSeer does).
"""
from __future__ import annotations

import operator
from dataclasses import dataclass, field

import torch
import torch.fx as fx

from .axes import Axes, NotTokenLocal, Passengers, TokenCut, TokenFlow
from .collectives import restrict
from .graphs import ancestors, depends, op_name, positions, readable_name, shape, value
from .tokens import follow, propagate

_ADDS = {operator.add, operator.iadd, torch.add}
# Ops that change only a tensor's dtype or memory layout: the residual add may read the stream through them.
_CASTS = {"float", "half", "bfloat16", "double", "to", "type_as", "contiguous"}
ALL_MODES = ("fill", "rows", "reuse", "compute")
WHOLE_MODES = ("fill", "reuse", "compute")  # a branch not proven token-local: cached and added whole


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
    whole_only: str = ""  # why the branch cannot be computed on chosen tokens; empty when it can
    # Other-stream branches computed jointly with this one (joint attention's text side): recomputed
    # where this branch reuses or computes rows, cached and forecast beside it where it forecasts.
    companions: list["Branch"] = field(default_factory=list)

    @property
    def modes(self) -> tuple[str, ...]:
        """The plan modes the branch allows (`policies.plan.Mode` values)."""
        return WHOLE_MODES if self.whole_only else ALL_MODES

    @property
    def tokens(self) -> int:
        """The stream's rows that partial steps choose from (all of them unless it has other parts)."""
        return self.flow.tokens

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
    latent = _latent_inputs(graph)
    for node in graph.nodes:
        split = _residual_operands(node, order)
        if split is None:
            continue
        stream, addend = split
        if not ancestors(stream) & latent:
            result.rejected.append(Rejection(readable_name(node), "the stream carries no latent tokens: no graph "
                                             "input of 3 or more axes but parameters reaches it", by_design=True))
            continue
        try:
            candidates.append(_make_branch(node, stream, addend, order))
        except NotTokenLocal as err:
            whole = _whole_branch(node, stream, addend, order, str(err))
            if whole is None:
                result.rejected.append(Rejection(readable_name(node), str(err)))
            else:
                candidates.append(whole)
    adds = {c.add for c in candidates}
    for c in [c for c in candidates if c.out in adds]:  # e.g. a position embedding added after a block
        why = f"adds {c.stream.name} to the sum of another residual add ({c.out.name}), not to a branch of its own"
        result.rejected.append(Rejection(c.name, why, by_design=True))
        candidates.remove(c)
    candidates = [_past_inner_add(c, adds, order) for c in candidates]
    for branch in candidates:
        rival = _larger_sharer(branch, candidates)
        if rival is not None:
            why = (f"computed jointly with {rival.name} ({rival.tokens} tokens), whose rows are cached; "
                   f"these {branch.tokens} tokens are recomputed where it reuses or computes rows, forecast with it "
                   "where it forecasts")
            result.rejected.append(Rejection(branch.name, why, by_design=True))
            rival.companions.append(branch)
            continue
        branch.index = len(result.branches)
        result.branches.append(branch)
    restrict(result.branches)  # a branch that exchanges tokens between ranks is cached whole only
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
    for x, addend in ((a, b), (b, a)):
        for stream in _casts_of(x):
            if order[stream] < order[addend] and depends(addend, stream, order):
                return stream, addend
    return None


def _casts_of(node: fx.Node) -> list[fx.Node]:
    """`node`, the tensor it is a dtype or layout cast of, what that is a cast of, and so on."""
    chain = [node]
    while op_name(node) in _CASTS and node.args and isinstance(node.args[0], fx.Node) and shape(node.args[0]) == shape(node):
        node = node.args[0]
        chain.append(node)
    return chain


def _latent_inputs(graph: fx.Graph) -> set[fx.Node]:
    """Graph inputs that may carry a latent's tokens: not parameters, with at least [B, N, C] axes."""
    inputs = set()
    for node in graph.nodes:
        v = value(node)
        if node.op == "placeholder" and isinstance(v, torch.Tensor) and not isinstance(v, torch.nn.Parameter) and v.ndim >= 3:
            inputs.add(node)
    return inputs


def _make_branch(add: fx.Node, stream: fx.Node, addend: fx.Node, order: dict[fx.Node, int]) -> Branch:
    out, gate = _peel_gate(addend, stream, order)
    nodes = _between(stream, out, order)
    flow = _propagate_parts(nodes, stream)
    _check_closed(nodes, {addend, add}, flow)
    info, own = flow.info[out], flow.info[stream]
    if not isinstance(info, Axes) or info.key is not None or (info.start, info.extra) != (own.start, own.extra):
        raise NotTokenLocal(f"branch output {out.name} does not carry the tokens alone")
    named = out
    while (named.target is operator.getitem or op_name(named) in _CASTS) and named.args[0] in flow.info:
        named = named.args[0]  # a slice or a cast: name what it cuts or casts
    branch = Branch(add, stream, out, gate, nodes, flow, name=readable_name(out, named))
    branch.kind = _classify(branch)
    return branch


_MAX_PARTS = 4  # parts of a stream that slices cut it into, beyond which the branch is cached whole


def _propagate_parts(nodes: list[fx.Node], stream: fx.Node) -> TokenFlow:
    """The branch's token flow; where slices cut the stream's rows, again with the stream's largest
    part as its tokens and the other parts as rows recomputed whole (`Axes.extra`), until no slice
    cuts that part."""
    n, cuts = shape(stream)[1], set()
    while True:  # each cut is new (strictly inside the part): the parts grow until _MAX_PARTS
        bounds = sorted({0, n, *cuts})
        lo, hi = max(zip(bounds, bounds[1:]), key=lambda part: part[1] - part[0])
        try:
            return propagate(nodes, stream, Axes(1, start=lo, extra=n - (hi - lo)), hi - lo)
        except TokenCut as err:
            if len(bounds) > _MAX_PARTS:
                raise
            cuts |= {lo + c for c in err.cuts}


def _whole_branch(add: fx.Node, stream: fx.Node, addend: fx.Node, order: dict[fx.Node, int], why: str) -> Branch | None:
    """A branch not proven token-local, cached whole: its output is [B, N, D] and nothing outside it
    reads its intermediates. None where even that fails."""
    out, gate = _peel_gate(addend, stream, order)
    nodes = _between(stream, out, order)
    flow = TokenFlow(tokens=shape(stream)[1], info={stream: Axes(1)})
    try:
        _check_closed(nodes, {addend, add}, flow)
    except NotTokenLocal:
        return None
    if shape(out) != shape(add) or flow.passenger_outputs:
        return None
    flow.info[out] = Axes(1)  # the cache's rows: the output's layout, not a claim about how it is computed
    branch = Branch(add, stream, out, gate, nodes, flow, name=readable_name(out), whole_only=why)
    branch.kind = _whole_kind(branch, order)
    return branch


def _past_inner_add(branch: Branch, adds: set[fx.Node], order: dict[fx.Node, int]) -> Branch:
    """A branch that contains another branch's residual add (an attention output added to the stream
    only to be normalised for the MLP, whose output is then added to the stream itself) reads the
    stream through that add: made again from its last inner add, it shares no node with the inner
    branch, so both are cached. As it was, it would lose to the inner branch (`_larger_sharer`)."""
    inner = [n for n in branch.nodes if n in adds and n is not branch.out]
    if not inner:
        return branch
    _, addend = _residual_operands(branch.add, order)
    try:
        return _make_branch(branch.add, inner[-1], addend, order)
    except NotTokenLocal as err:
        return _whole_branch(branch.add, inner[-1], addend, order, str(err)) or branch


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
        node = todo.pop()
        writes = [u for u in node.users if u.target is operator.setitem and u.args[0] is node]
        for i in [*node.all_input_nodes, *writes]:  # a write into a value feeds what reads it
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


def _whole_kind(branch: Branch, order: dict[fx.Node, int]) -> str:
    """The kind of a branch the propagation could not follow, from its ops: attention whose keys
    depend on the stream, other attention, or neither."""
    stream, mixing = branch.stream, {"matmul", "bmm", "einsum", "baddbmm"}
    for n in branch.nodes:
        if op_name(n) == "scaled_dot_product_attention":
            key = n.kwargs.get("key", n.args[1] if len(n.args) > 1 else None)
            return "self_attn" if isinstance(key, fx.Node) and depends(key, stream, order) else "cross_attn"
        if op_name(n) in mixing and sum(depends(a, stream, order) for a in n.all_input_nodes) > 1:
            return "self_attn"
    return "cross_attn" if any(op_name(n) in ("softmax", "log_softmax") for n in branch.nodes) else "mlp"


def _classify(branch: Branch) -> str:
    flow = branch.flow
    if flow.joint_attention:
        return "joint_attn"
    if flow.self_attention:
        return "self_attn"
    if flow.cross_attention or any(op_name(n) in ("softmax", "log_softmax") for n in branch.nodes):
        return "cross_attn"
    return "mlp"
