"""Hand-written token-wise caching for the reference models, independent of the FX pass.

It re-implements ToCa on the models' own modules: full steps fill per-branch caches (branch outputs
before their gates); partial steps reuse self-attention (or recompute chosen queries against all
keys/values, or against cached keys/values) and recompute the chosen tokens of cross-attention and
MLP. Token choice uses the same score function as the backend, so both pick the same tokens.
"""
from __future__ import annotations

import math

import torch


from toca_fx.models import DiT, PixArt
from toca_fx.models.layers import attend, modulate, unpatchify
from toca_fx.ops.scores import refresh_scores, select_tokens


class _Branch:
    def __init__(self):
        self.cache = None
        self.stale = None
        self.ref = None
        self.kv = None

    def choose(self, x: torch.Tensor, k: int) -> torch.Tensor:
        return select_tokens(x, self.stale, self.ref, k)

    def fill(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        self.cache = out.clone()
        self.stale = torch.zeros(x.shape[1])
        self.ref = torch.zeros(x.shape[1])
        refresh_scores(x, self.stale, self.ref)
        return out


class ReferenceCache:
    def __init__(self, model, interval: int, ratio: float, self_attn: str = "reuse"):
        self.model, self.interval, self.ratio, self.self_attn = model, interval, ratio, self_attn
        self.step = 0
        self.branches: dict[tuple[int, str], _Branch] = {}

    def __call__(self, *args):
        full = self.step % self.interval == 0
        self.step += 1
        with torch.no_grad():
            if isinstance(self.model, DiT):
                return self._dit(full, *args)
            return self._pixart(full, *args)

    # -- models -------------------------------------------------------------------------------
    def _dit(self, full, x, t, y):
        m = self.model
        tokens = m.x_embedder(x) + m.pos_embed
        c = m.t_embedder(t) + m.y_embedder(y)
        for i, blk in enumerate(m.blocks):
            sa, sc, ga, sm, scm, gm = blk.adaLN_modulation(c).chunk(6, dim=1)
            h = self._self_attn(i, full, tokens, blk.attn, lambda z: modulate(blk.norm1(z), sa, sc))
            tokens = tokens + ga.unsqueeze(1) * h
            h = self._local(i, "mlp", full, tokens, lambda z: blk.mlp(modulate(blk.norm2(z), sm, scm)))
            tokens = tokens + gm.unsqueeze(1) * h
        out = m.final_layer(tokens, c)
        return unpatchify(out, m.patch_size, m.out_channels)

    def _pixart(self, full, x, t, context):
        m = self.model
        tokens = m.x_embedder(x) + m.pos_embed
        temb = m.t_embedder(t)
        t6 = m.t_block(temb)
        ctx = m.y_embedder(context)
        b = x.shape[0]
        for i, blk in enumerate(m.blocks):
            mod = blk.scale_shift_table[None] + t6.reshape(b, 6, -1)
            sa, sc, ga, sm, scm, gm = mod.chunk(6, dim=1)
            h = self._self_attn(i, full, tokens, blk.attn, lambda z: blk.norm1(z) * (1 + sc) + sa)
            tokens = tokens + ga * h
            h = self._cross(i, full, tokens, blk.cross_attn, ctx)
            tokens = tokens + h
            h = self._local(i, "mlp", full, tokens, lambda z: blk.mlp(blk.norm2(z) * (1 + scm) + sm))
            tokens = tokens + gm * h
        shift, scale = (m.final_table[None] + temb[:, None]).chunk(2, dim=1)
        out = m.final_linear(m.final_norm(tokens) * (1 + scale) + shift)
        return unpatchify(out, m.patch_size, m.out_channels)

    # -- branches -----------------------------------------------------------------------------
    def _k(self, n: int) -> int:
        return min(n, max(1, math.ceil(self.ratio * n - 1e-9)))

    def _branch(self, i: int, kind: str) -> _Branch:
        return self.branches.setdefault((i, kind), _Branch())

    def _local(self, i, kind, full, x, fn):
        br = self._branch(i, kind)
        if full:
            return br.fill(x, fn(x))
        idx = br.choose(x, self._k(x.shape[1]))
        br.cache[:, idx] = fn(x[:, idx])
        return br.cache

    def _self_attn(self, i, full, x, attn, pre):
        br = self._branch(i, "attn")
        b, n, d = x.shape
        h = attn.num_heads

        def qkv(z):
            return attn.qkv(pre(z)).reshape(b, z.shape[1], 3, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)

        def finish(q, k, v, rows):
            out = attend(q, k, v, attn.manual)
            return attn.proj(out.transpose(1, 2).reshape(b, rows, d))

        if full:
            q, k, v = qkv(x)
            br.kv = (k.clone(), v.clone())
            return br.fill(x, finish(q, k, v, n))
        if self.self_attn == "reuse":
            return br.cache
        idx = br.choose(x, self._k(n))
        if self.self_attn == "recompute":
            q, k, v = qkv(x)
            q = q[:, :, idx]
        else:  # recompute_cached_kv
            q, k_rows, v_rows = qkv(x[:, idx])
            br.kv[0][:, :, idx] = k_rows
            br.kv[1][:, :, idx] = v_rows
            k, v = br.kv
        br.cache[:, idx] = finish(q, k, v, len(idx))
        return br.cache

    def _cross(self, i, full, x, attn, ctx):
        br = self._branch(i, "cross")
        b, n, d = x.shape
        h = attn.num_heads
        if full:
            kv = attn.kv(ctx).reshape(b, ctx.shape[1], 2, h, d // h).permute(2, 0, 3, 1, 4).unbind(0)
            br.kv = kv
        rows = x if full else x[:, (idx := br.choose(x, self._k(n)))]
        q = attn.q(rows).reshape(b, rows.shape[1], h, d // h).transpose(1, 2)
        out = attn.proj(attend(q, *br.kv, attn.manual).transpose(1, 2).reshape(b, rows.shape[1], d))
        if full:
            return br.fill(x, out)
        br.cache[:, idx] = out
        return br.cache



