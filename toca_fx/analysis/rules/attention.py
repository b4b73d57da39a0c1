"""Rules for ops that mix tokens through attention: an attention map's second token axis runs over the
keys, which the rewrite computes over all tokens."""
from __future__ import annotations

from dataclasses import replace

import torch.fx as fx

from ..axes import Axes, Info, NotTokenLocal, TokenFlow
from ..graphs import shape
from .common import arg, check_external, info_of


def _matmul(node: fx.Node, flow: TokenFlow) -> Info:
    a, b = node.args[:2]
    ia, ib = info_of(flow, a), info_of(flow, b)
    out_ndim = len(shape(node))
    ra, rb = len(shape(a)), len(shape(b))
    if isinstance(ia, Axes) and ib is None and ia.key is None and ia.tok != ra - 1:
        return ia.moved(lambda d: d + out_ndim - ra)
    if isinstance(ia, Axes) and isinstance(ib, Axes) and ia.key is None and ib.key is None:
        if ia.tok == ra - 2 and ib.tok == rb - 1:  # q @ k^T: an attention map
            flow.full_inputs[node] = (b,)
            flow.self_attention.append(node)
            if ia.extra or ib.extra:
                flow.joint_attention.append(node)
            return replace(ia, tok=out_ndim - 2, key=out_ndim - 1)
    if isinstance(ia, Axes) and ia.key == ra - 1 and isinstance(ib, Axes) and ib.tok == rb - 2:
        flow.full_inputs[node] = (b,)  # attention map @ v
        return replace(ia, tok=out_ndim - 2, key=None)
    raise NotTokenLocal(f"matmul ({node.name}) mixes tokens in a way the pass does not know")


def _sdpa(node: fx.Node, flow: TokenFlow) -> Info:
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    iq, ik, iv = info_of(flow, q), info_of(flow, k), info_of(flow, v)
    ndim = len(shape(q))
    if not isinstance(iq, Axes) or iq.tok != ndim - 2:
        raise NotTokenLocal(f"attention ({node.name}) whose queries are not the tokens")
    if arg(node, 5, "is_causal", False):
        raise NotTokenLocal(f"causal attention ({node.name}) cannot recompute a subset of queries")
    mask = arg(node, 3, "attn_mask")
    if isinstance(mask, fx.Node):
        check_external(node, mask, iq, len(shape(node)), flow)
    if isinstance(ik, Axes) and ik == iv and ik.tok == ndim - 2 and ik.key is None:
        flow.full_inputs[node] = (k, v)
        flow.self_attention.append(node)
        if iq.extra or ik.extra:
            flow.joint_attention.append(node)
    elif ik is None and iv is None:
        flow.cross_attention.append(node)
        flow.context_kv.extend([k, v])
    else:
        raise NotTokenLocal(f"attention ({node.name}) with keys and values of different origins")
    return iq


def _einsum(node: fx.Node, flow: TokenFlow) -> Info:
    """`einsum` with an explicit output: per token (the token letter kept, externals constant along it
    or indexed by it), an attention map (queries' and keys' token letters both kept: first operand
    queries), or a map times values (the map's key letter summed against the values' token letter)."""
    subs, out, operands = _einsum_terms(node)
    tracked = [(s, info_of(flow, o), o) for s, o in zip(subs, operands) if info_of(flow, o) is not None]
    if not tracked or any(not isinstance(i, Axes) for _, i, _ in tracked):
        raise NotTokenLocal(f"einsum ({node.name}) of a value the pass does not track")
    letters = [(s[i.tok], None if i.key is None else s[i.key]) for s, i, _ in tracked]
    if len(tracked) == 2 and letters[0][1] is None and letters[1][1] is None and letters[0][0] != letters[1][0]:
        return _einsum_map(node, flow, tracked, out)
    if len(tracked) == 2 and letters[0][1] is not None and letters[0][1] == letters[1][0] and letters[1][1] is None:
        (_, info, _), (_, _, values) = tracked
        if letters[0][0] in out and letters[0][1] not in out:
            flow.full_inputs[node] = (values,)
            return replace(info, tok=out.index(letters[0][0]), key=None)
    tok, key = letters[0]
    if len(set(letters)) != 1 or tok not in out or (key is not None and key not in out):
        raise NotTokenLocal(f"einsum ({node.name}) contracts or mixes the token axis")
    info = tracked[0][1]
    for s, o in zip(subs, operands):
        if info_of(flow, o) is None and tok in s and shape(o)[s.index(tok)] != 1:
            rows = Axes(s.index(tok), start=info.start, extra=info.extra)
            if flow.external_rows.setdefault(o, rows) != rows:
                raise NotTokenLocal(f"{o.name} is indexed by token along two different axes")
    return replace(info, tok=out.index(tok), key=None if key is None else out.index(key))


def _einsum_terms(node: fx.Node) -> tuple[list[str], str, list]:
    equation, operands = node.args[0], list(node.args[1:])
    if len(operands) == 1 and isinstance(operands[0], (list, tuple)):
        operands = list(operands[0])
    equation = equation.replace(" ", "")
    if "->" not in equation or "." in equation:
        raise NotTokenLocal(f"einsum ({node.name}) with an implicit output or an ellipsis")
    inputs, out = equation.split("->")
    return inputs.split(","), out, operands


def _einsum_map(node: fx.Node, flow: TokenFlow, tracked: list, out: str) -> Info:
    (sq, iq, _), (sk, ik, keys) = tracked
    query, key = sq[iq.tok], sk[ik.tok]
    if query not in out or key not in out:
        raise NotTokenLocal(f"einsum ({node.name}) sums over a token axis")
    flow.full_inputs[node] = (keys,)
    flow.self_attention.append(node)
    if iq.extra or ik.extra:
        flow.joint_attention.append(node)
    return replace(iq, tok=out.index(query), key=out.index(key))
