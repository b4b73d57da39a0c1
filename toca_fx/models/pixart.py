"""A PixArt-alpha-style text-conditioned transformer (Chen et al., 2023).

Each block: self-attention, cross-attention to a text context, MLP; the adaLN modulation comes from
one timestep projection shared by all blocks plus a per-block learned table (adaLN-single).
"""
from __future__ import annotations

import torch
import torch.nn as nn

from .layers import CrossAttention, Mlp, PatchEmbed, SelfAttention, TimestepEmbedder, sincos_pos_embed, unpatchify


class PixArtBlock(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, manual: bool):
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.attn = SelfAttention(hidden_size, num_heads, manual)
        self.cross_attn = CrossAttention(hidden_size, num_heads, manual)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, mlp_ratio)
        self.scale_shift_table = nn.Parameter(torch.randn(6, hidden_size) / hidden_size**0.5)

    def forward(self, x: torch.Tensor, context: torch.Tensor, t6: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        mod = self.scale_shift_table[None] + t6.reshape(b, 6, -1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=1)
        x = x + gate_msa * self.attn(self.norm1(x) * (1 + scale_msa) + shift_msa)
        x = x + self.cross_attn(x, context)
        x = x + gate_mlp * self.mlp(self.norm2(x) * (1 + scale_mlp) + shift_mlp)
        return x


class PixArt(nn.Module):
    """forward(x [B, C, H, W], t [B], context [B, M, caption_channels]) -> [B, C_out, H, W]."""

    def __init__(
        self,
        input_size: int = 128,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        caption_channels: int = 4096,
        learn_sigma: bool = True,
        attention: str = "sdpa",
    ):
        super().__init__()
        if attention not in ("sdpa", "manual"):
            raise ValueError(f"attention must be 'sdpa' or 'manual', got {attention!r}")
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(patch_size, in_channels, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))
        self.y_embedder = nn.Sequential(
            nn.Linear(caption_channels, hidden_size), nn.GELU(approximate="tanh"), nn.Linear(hidden_size, hidden_size)
        )
        grid = input_size // patch_size
        self.register_buffer("pos_embed", sincos_pos_embed(hidden_size, grid), persistent=False)
        manual = attention == "manual"
        self.blocks = nn.ModuleList(
            PixArtBlock(hidden_size, num_heads, mlp_ratio, manual) for _ in range(depth)
        )
        self.final_norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.final_table = nn.Parameter(torch.randn(2, hidden_size) / hidden_size**0.5)
        self.final_linear = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)

    @classmethod
    def alpha(cls, input_size: int = 128, **kwargs) -> "PixArt":
        """PixArt-alpha XL/2: 28 blocks, hidden 1152 (1024x1024 images: latent 128, 4096 tokens)."""
        return cls(input_size=input_size, patch_size=2, hidden_size=1152, depth=28, num_heads=16, **kwargs)

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        tokens = self.x_embedder(x) + self.pos_embed.to(x.dtype)
        temb = self.t_embedder(t)
        t6 = self.t_block(temb)
        ctx = self.y_embedder(context)
        for block in self.blocks:
            tokens = block(tokens, ctx, t6)
        shift, scale = (self.final_table[None] + temb[:, None]).chunk(2, dim=1)
        out = self.final_linear(self.final_norm(tokens) * (1 + scale) + shift)
        return unpatchify(out, self.patch_size, self.out_channels)
