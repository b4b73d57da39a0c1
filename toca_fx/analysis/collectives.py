"""Collectives in a traced graph: the exchanges of context (sequence) parallelism.

Under diffusers' context parallelism (`enable_parallelism(config=ContextParallelConfig(...))`) each
rank holds a slice of the tokens, and Dynamo traces the exchanges around attention as functional
collectives (`torch.ops._c10d_functional.all_to_all_single` of q, k, v and the output for Ulysses,
`all_gather_into_tensor` for ring attention and the final gather, each followed by `wait_tensor`).
Every rank of a group must run the same collectives in the same order, with the same shapes, or the
group hangs. The pass keeps that true without communication:

- the plan of each step comes from the schedule (the step count and the replicated timestep), so every
  rank runs the same variant;
- a branch reused whole is not run, so its exchanges are dropped on every rank at once;
- rows are chosen per rank, k = ceil(ratio * N_local) from the rank's own token count, which is equal
  on every rank (equal shards), so any exchange downstream keeps its shape;
- a branch whose exchanges the token rules would have to see through (rows of a branch containing a
  collective) is not proven: it is cached whole only (`restrict`), never computed on rows.

Exchanges outside every branch run in every variant, as in the captured graph.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable

import torch
import torch.fx as fx

from .graphs import shape, value

if TYPE_CHECKING:
    from .residual import Branch

_NAMESPACES = ("_c10d_functional", "_c10d_functional_autograd", "c10d")
_WAITS = ("wait_tensor",)
_OPS = (torch._ops.OpOverload, torch._ops.OpOverloadPacket)  # printed "namespace.op[.overload]"


@dataclass(frozen=True)
class Exchange:
    """One collective: its node, op name and the bytes one rank receives from the others."""

    node: fx.Node
    op: str
    nbytes: int


def is_collective(node: fx.Node) -> bool:
    """Whether `node` calls a c10d collective (functional or not), its wait included."""
    if node.op != "call_function" or not isinstance(node.target, _OPS):
        return False
    return str(node.target).split(".")[0] in _NAMESPACES


def collective_name(node: fx.Node) -> str:
    """`all_to_all_single`, `wait_tensor`, ...: the op's name without namespace or overload."""
    return str(node.target).split(".")[1]


def unread_exchange(node: fx.Node) -> bool:
    """A wait that nothing reads, on a collective that only it reads: the exchange of a branch the
    variant does not run. FX deems the wait impure and keeps it; dropping it drops the collective too,
    on every rank alike, since every rank runs the same variant."""
    if not is_collective(node) or collective_name(node) not in _WAITS or node.users:
        return False
    source = node.args[0] if node.args else None
    return isinstance(source, fx.Node) and is_collective(source) and set(source.users) == {node}


def exchanges(nodes: Iterable[fx.Node]) -> list[Exchange]:
    """The collectives among `nodes` that move data (their waits left out), in the given order."""
    found = []
    for node in nodes:
        if not is_collective(node) or collective_name(node) in _WAITS:
            continue
        op = collective_name(node)
        found.append(Exchange(node, op, _received_bytes(node, op, _group_size(node, op))))
    return found


def exchanged_bytes(graph: fx.Graph) -> int:
    """Bytes one rank receives from the other ranks in one call of `graph` (shapes from its fakes;
    a collective without one counts 0)."""
    return sum(e.nbytes for e in exchanges(graph.nodes))


def restrict(branches: list[Branch]) -> list[str]:
    """Cache whole only (no rows) every branch that contains a collective: the token rules do not see
    through an exchange between ranks, so rows through it are not proven. Returns the names of the
    branches restricted here (those the propagation had already refused rows are not)."""
    restricted = []
    for branch in branches:
        inside = exchanges(branch.nodes)
        if not inside or branch.whole_only:
            continue
        ops = ", ".join(sorted({e.op for e in inside}))
        branch.whole_only = f"exchanges tokens between ranks ({ops}): rows across the exchange are not proven"
        restricted.append(branch.name)
    return restricted


def _group_size(node: fx.Node, op: str) -> int:
    """The group's size as the graph states it: the split sizes of an all-to-all, the `group_size`
    argument of a gather or scatter; 1 where the graph does not say."""
    args = node.args
    if op == "all_to_all_single" and len(args) > 1 and isinstance(args[1], (list, tuple)):
        return len(args[1])
    if op in ("all_gather_into_tensor", "reduce_scatter_tensor") and len(args) > 2 and isinstance(args[-2], int):
        return args[-2]  # (input, [reduce op,] group_size, group_name)
    return 1


def _received_bytes(node: fx.Node, op: str, size: int) -> int:
    """Bytes one rank receives from the others: an all-to-all keeps 1/size of its input local, a
    gather receives size - 1 inputs, a reduce-scatter size - 1 outputs, an all-reduce (as reduce-
    scatter then all-gather) twice (size - 1)/size of its input; an op whose group size the graph does
    not state (an all-reduce states none) counts its input once."""
    source = node.args[0] if node.args and isinstance(node.args[0], fx.Node) else None
    sent, made = _nbytes(source), _nbytes(node)
    if op == "all_to_all_single":
        return sent * (size - 1) // size
    if op == "all_gather_into_tensor":
        return sent * (size - 1)
    if op == "reduce_scatter_tensor":
        return made * (size - 1)
    if op == "all_reduce" and size > 1:
        return 2 * sent * (size - 1) // size
    return sent


def _nbytes(node: fx.Node | None) -> int:
    v = value(node) if node is not None else None
    dims = shape(node) if node is not None else None
    if not isinstance(v, torch.Tensor) or dims is None:
        return 0
    numel = 1
    for d in dims:
        numel *= d
    return numel * v.element_size()
