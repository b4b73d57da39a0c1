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
        check_external(node, mask, iq, shape(node), flow)
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
