"""Building blocks shared by the reference DiTs: embeddings, attention, MLP.

Written from the DiT and PixArt papers' descriptions; nothing here is special to toca_fx, which must
find these branches in the traced graph on its own.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """adaLN modulation with per-sample [B, D] shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


class PatchEmbed(nn.Module):
    """Image [B, C, H, W] to tokens [B, N, D] by a strided convolution."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


def sincos_pos_embed(hidden_size: int, grid: int) -> torch.Tensor:
    """Fixed 2-D sine-cosine position embedding, [1, grid*grid, hidden_size]."""
    half = hidden_size // 2
    omega = 1.0 / 10000 ** (np.arange(half // 2, dtype=np.float64) / (half / 2.0))
    coords = np.arange(grid, dtype=np.float64)
    gy, gx = np.meshgrid(coords, coords, indexing="ij")

    def embed(pos: np.ndarray) -> np.ndarray:
        out = np.outer(pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    emb = np.concatenate([embed(gy), embed(gx)], axis=1)
    return torch.from_numpy(emb).float().unsqueeze(0)


class TimestepEmbedder(nn.Module):
    """Scalar timesteps to vectors: sinusoidal features, then a two-layer MLP."""

    def __init__(self, hidden_size: int, freq_size: int = 256):
        super().__init__()
        self.freq_size = freq_size
        self.mlp = nn.Sequential(
            nn.Linear(freq_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        half = self.freq_size // 2
        freqs = torch.exp(
            -math.log(10000) * torch.arange(half, device=t.device, dtype=torch.float32) / half
        )
        args = t.float()[:, None] * freqs[None]
        emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
        return self.mlp(emb.to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class labels to vectors; index `num_classes` is the null class used by classifier-free guidance."""

    def __init__(self, num_classes: int, hidden_size: int):
        super().__init__()
        self.num_classes = num_classes
        self.table = nn.Embedding(num_classes + 1, hidden_size)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.table(y)


class Mlp(nn.Module):
    def __init__(self, hidden_size: int, mlp_ratio: float = 4.0):
        super().__init__()
        inner = int(hidden_size * mlp_ratio)
        self.fc1 = nn.Linear(hidden_size, inner)
        self.fc2 = nn.Linear(inner, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, manual: bool) -> torch.Tensor:
    """Attention over [B, H, N, d] tensors: fused SDPA, or written out as softmax(q k^T) v."""
    if not manual:
        return F.scaled_dot_product_attention(q, k, v)
    weights = (q @ k.transpose(-2, -1)) * q.shape[-1] ** -0.5
    return weights.softmax(dim=-1) @ v


class SelfAttention(nn.Module):
    """Multi-head self-attention with a fused qkv projection."""

    def __init__(self, hidden_size: int, num_heads: int, manual: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.manual = manual
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, self.manual)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class CrossAttention(nn.Module):
    """Queries from the image tokens, keys and values from a text context [B, M, D]."""

    def __init__(self, hidden_size: int, num_heads: int, manual: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.manual = manual
        self.q = nn.Linear(hidden_size, hidden_size)
        self.kv = nn.Linear(hidden_size, 2 * hidden_size)
        self.proj = nn.Linear(hidden_size, hidden_size)

    def forward(self, x: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        h = self.num_heads
        q = self.q(x).reshape(b, n, h, d // h).transpose(1, 2)
        kv = self.kv(context).reshape(b, context.shape[1], 2, h, d // h)
        k, v = kv.permute(2, 0, 3, 1, 4).unbind(0)
        out = attend(q, k, v, self.manual)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


def unpatchify(x: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Tokens [B, N, p*p*C] back to an image [B, C, H, W] (square grid)."""
    b, n, _ = x.shape
    g = int(round(math.sqrt(n)))
    x = x.reshape(b, g, g, patch_size, patch_size, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, g * patch_size, g * patch_size)
