"""What the attention scores read, found by graph structure alone.

Matches: in a self-attention branch, its fused attention (queries, keys) or its written-out softmax map
over the stream's keys; in a cross-attention branch, the same over the context. Which map a branch's
token choice reads: the nearest self-attention branch up the residual chain (the branch whose add made
this branch's stream, and so on), i.e. its block's self-attention, as ToCa reads the block's map for the
MLP and cross-attention; for cross-attention entropy, the branch itself or the nearest cross-attention
up the chain before that self-attention. Also the token grid of the "spatial" score.
Produces: nodes that fill the [N] map buffers on full steps (`fill_maps`) and the lookups.
"""
from __future__ import annotations

import math
import warnings

import torch.fx as fx

from ..analysis.residual import Analysis, Branch
from ..analysis.axes import Axes
from ..analysis.graphs import op_name, positions, shape
from ..errors import ToCaWarning
from ..ops.scores import attention_influence, cross_entropy, entropy_from_map, influence_from_map

_SDPA = "scaled_dot_product_attention"
_CONVS = {"conv2d", "conv3d", "convolution", "_convolution"}


def influence_source(branch: Branch) -> tuple | None:
    """(function, args before the buffer, args after) that fill the attention-received map, or None."""
    if not branch.attends_tokens or not branch.flow.self_attention:
        return None
    node = branch.flow.self_attention[0]
    if op_name(node) == _SDPA:
        q, k = _operand(node, 0, "query"), _operand(node, 1, "key")
        return attention_influence, (q, k), (branch.flow.info[k].start, _operand(node, 6, "scale"))
    for probs in _softmaxes(branch):
        info, ndim = branch.flow.info[probs], len(shape(probs))
        if info.key == ndim - 1 and info.tok == ndim - 2:
            return influence_from_map, (probs,), (info.start,)
    return None


def entropy_source(branch: Branch) -> tuple | None:
    """(function, args before the buffer, args after) that fill the cross-attention entropy, or None."""
    if branch.kind != "cross_attn":
        return None
    if branch.flow.cross_attention:
        node = branch.flow.cross_attention[0]
        return cross_entropy, (_operand(node, 0, "query"), _operand(node, 1, "key")), (_operand(node, 6, "scale"),)
    for probs in _softmaxes(branch):
        info = branch.flow.info[probs]
        if info.key is None and info.tok != len(shape(probs)) - 1:
            return entropy_from_map, (probs,), (info.tok,)
    return None


def readers(analysis: Analysis) -> dict[int, tuple[Branch | None, Branch | None]]:
    """Per branch index: (the branch whose attention map it reads, the one whose entropy it reads)."""
    made_by = {b.add: b for b in analysis.branches}
    result = {}
    for b in analysis.branches:
        attn = b if b.attends_tokens else None
        cross = b if b.kind == "cross_attn" else None
        up = made_by.get(b.stream)
        while attn is None and up is not None:
            if up.attends_tokens:
                attn = up
            elif up.kind == "cross_attn" and cross is None:
                cross = up
            up = made_by.get(up.stream)
        result[b.index] = (attn, cross)
    return result


def fill_maps(graph: fx.Graph, branch: Branch, attn: fx.Node | None, ent: fx.Node | None, queries: int) -> None:
    """Insert the nodes that fill this branch's map buffers (a full computation of the branch)."""
    for slot, source in ((attn, influence_source(branch)), (ent, entropy_source(branch))):
        if slot is None:
            continue
        fn, before, after = source
        if fn is attention_influence:
            after = (after[0], queries, after[1])
        anchor = max(before, key=positions(graph).__getitem__)
        with graph.inserting_after(anchor):
            graph.call_function(fn, (*before, slot, *after))


def token_grid(graph: fx.Graph, tokens: int, given: tuple[int, ...] | None) -> tuple[int, ...] | None:
    """The grid the stream's tokens lie on: `given` if it fits, else the spatial shape of a patch-embedding
    convolution with `tokens` outputs, else a square; None if none fits."""
    if given is not None and math.prod(given) == tokens:
        return given
    found = _inferred_grid(graph, tokens)
    if given is not None:
        warnings.warn(f"toca_fx: ToCaConfig.grid {given} holds {math.prod(given)} tokens, not the {tokens} of a "
                      f"cached stream; its spatial score uses {found if found else 'no grid'} (found in the graph)",
                      ToCaWarning, stacklevel=2)
    return found


def _inferred_grid(graph: fx.Graph, tokens: int) -> tuple[int, ...] | None:
    for node in graph.nodes:
        out = shape(node)
        if op_name(node) in _CONVS and out is not None and len(out) in (4, 5) and math.prod(out[2:]) == tokens:
            return out[2:]
    side = math.isqrt(tokens)
    return (side, side) if side * side == tokens else None


def _softmaxes(branch: Branch) -> list[fx.Node]:
    return [
        n for n in branch.nodes
        if op_name(n) == "softmax" and isinstance(branch.flow.info.get(n), Axes) and shape(n) is not None
    ]


def _operand(node: fx.Node, pos: int, key: str):
    return node.args[pos] if len(node.args) > pos else node.kwargs.get(key)
