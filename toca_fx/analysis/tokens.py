"""Token-axis propagation: follow the residual stream's token axis through a branch.

Matches: the nodes of one branch, in graph order, starting from the stream tensor [B, N, D] whose token
axis is 1. Produces: for every node, where its token axis is (`axes.Axes`), or a `NotTokenLocal` error
naming the op that breaks per-token computation. Each op kind has a rule (`rules.RULES`); rules use
only op targets and the FakeTensor shapes that Dynamo records in `node.meta["example_value"]`.
"""
from __future__ import annotations

import torch.fx as fx

from .axes import Axes, Info, NotTokenLocal, Passengers, TokenFlow
from .graphs import op_name, shape
from .rules import POINTWISE, RULES, pointwise


def propagate(nodes: list[fx.Node], stream: fx.Node) -> TokenFlow:
    """Token axes of every node in `nodes` (graph order), given the stream [B, N, D] at axis 1."""
    flow = TokenFlow(tokens=shape(stream)[1], info={stream: Axes(1)})
    for node in nodes:
        flow.info[node] = follow(node, flow)
    return flow


def follow(node: fx.Node, flow: TokenFlow) -> Info:
    """The token axes of one node's output, from those of its inputs already in `flow`."""
    name = op_name(node)
    rule = RULES.get(name)
    if rule is None and name in POINTWISE:
        rule = pointwise
    if rule is None:
        raise NotTokenLocal(f"op '{name}' ({node.name}) is not known to act per token")
    if any(isinstance(flow.info.get(a), Passengers) for a in node.all_input_nodes):
        raise NotTokenLocal(f"'{name}' ({node.name}) computes on the rows of another stream")
    return rule(node, flow)

