"""Token-axis propagation: follow the residual stream's token axis through a branch.

Matches: the nodes of one branch, in graph order, starting from the stream tensor [B, N, D] whose token
axis is 1. Produces: for every node, where its token axis is (`axes.Axes`), or a `NotTokenLocal` error
naming the op that breaks per-token computation. Each op kind has a rule (`rules.RULES`); rules use
only op targets and the FakeTensor shapes that Dynamo records in `node.meta["example_value"]`.

An op on other-stream rows alone (`Passengers`, with tensors from outside) computes exact rows in a
gathered computation too, whatever it does along their axis: its output is `Passengers` again, along
the axis the op's rule puts them. Only a join along the token axis (`cat`) or a write into the rows
they are (`setitem`) may combine them with the stream's rows.
"""
from __future__ import annotations

import torch.fx as fx

from .axes import Axes, Info, NotTokenLocal, Passengers, TokenFlow
from .graphs import op_name, shape
from .rules import JOINS, POINTWISE, RULES, pointwise


def propagate(nodes: list[fx.Node], stream: fx.Node, axes: Axes = Axes(1), tokens: int | None = None) -> TokenFlow:
    """Token axes of every node in `nodes` (graph order), given the stream's `axes` (the tokens at
    axis 1, all `tokens` of them unless some rows are another part's)."""
    flow = TokenFlow(tokens=shape(stream)[1] if tokens is None else tokens, info={stream: axes})
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
    infos = [flow.info.get(a) for a in node.all_input_nodes]
    if not any(isinstance(i, Passengers) for i in infos):
        return rule(node, flow)
    if all(i is None or isinstance(i, Passengers) for i in infos):
        return _on_passengers(node, rule, flow)
    if name not in JOINS:
        raise NotTokenLocal(f"'{name}' ({node.name}) computes on the rows of another stream")
    return rule(node, flow)


def _on_passengers(node: fx.Node, rule, flow: TokenFlow) -> Info:
    """Where an op on other-stream rows alone puts them: its rule run on a scratch flow in which those
    rows are a stream of no choosable rows (so no part of them is cut), whose records are dropped."""
    scratch = TokenFlow(tokens=0)
    for a in node.all_input_nodes:
        if isinstance(flow.info.get(a), Passengers):
            scratch.info[a] = Axes(flow.info[a].tok, extra=shape(a)[flow.info[a].tok])
    return _as_passengers(rule(node, scratch))


def _as_passengers(info: Info) -> Info:
    if isinstance(info, tuple):
        return tuple(_as_passengers(i) for i in info)
    return Passengers(info.tok) if isinstance(info, (Axes, Passengers)) else info
