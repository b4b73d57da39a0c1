"""Tiny diffusers transformers with random weights (nothing is downloaded), and the inputs of a
denoising-like loop for each: the latent drifts a little each step, the timestep counts down, the
conditions stay fixed. Shared by the diffusers, explain, CFG and shape tests."""
from __future__ import annotations

from typing import Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

HEADS = dict(num_attention_heads=2, attention_head_dim=16)  # hidden size 32


def dit() -> torch.nn.Module:
    # 1000 classes: DiTPipeline's unconditional label is class 1000.
    return diffusers.DiTTransformer2DModel(
        **HEADS, in_channels=4, out_channels=8, num_layers=2, sample_size=8, patch_size=2,
        num_embeds_ada_norm=1000, norm_num_groups=1,
    )


def pixart() -> torch.nn.Module:
    return diffusers.PixArtTransformer2DModel(
        **HEADS, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=32, sample_size=8,
        patch_size=2, caption_channels=24, use_additional_conditions=False, norm_num_groups=1,
    )


def sd3() -> torch.nn.Module:
    return diffusers.SD3Transformer2DModel(
        **HEADS, sample_size=8, patch_size=2, in_channels=4, num_layers=2, joint_attention_dim=24,
        caption_projection_dim=32, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=8,
    )


def flux() -> torch.nn.Module:
    return diffusers.FluxTransformer2DModel(
        **HEADS, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, joint_attention_dim=24,
        pooled_projection_dim=16, axes_dims_rope=(4, 6, 6),
    )


def cogvideox() -> torch.nn.Module:
    return diffusers.CogVideoXTransformer3DModel(
        **HEADS, in_channels=4, out_channels=4, time_embed_dim=32, text_embed_dim=24, num_layers=2,
        sample_width=8, sample_height=8, sample_frames=5, patch_size=2, temporal_compression_ratio=4,
        max_text_seq_length=5,
    )


def ltx() -> torch.nn.Module:
    return diffusers.LTXVideoTransformer3DModel(
        **HEADS, in_channels=8, out_channels=8, cross_attention_dim=32, num_layers=2, caption_channels=24,
    )


def hunyuan() -> torch.nn.Module:
    # 4 layers: the last one takes the long skip connection from the first.
    return diffusers.HunyuanDiT2DModel(
        **HEADS, in_channels=4, patch_size=2, sample_size=8, hidden_size=32, num_layers=4,
        cross_attention_dim=32, cross_attention_dim_t5=24, pooled_projection_dim=16, text_len=5,
        text_len_t5=6, use_style_cond_and_image_meta_size=False,
    )


BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    "dit": dit, "pixart": pixart, "sd3": sd3, "flux": flux, "cogvideox": cogvideox, "ltx": ltx, "hunyuan": hunyuan,
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = BUILDERS[name]().eval()
    return model if dtype == torch.float32 else model.to(dtype)


def loop_inputs(name: str, steps: int, batch: int = 2, size: int = 8, seed: int = 1,
                dtype: torch.dtype = torch.float32) -> list[dict]:
    """Keyword arguments of `steps` calls; `size` is the latent's height and width."""
    g = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    latent_shape, fixed = _conditions(name, batch, size, randn, dtype)
    x, drift = randn(*latent_shape), randn(*latent_shape)
    calls = []
    for i in range(steps):
        t = torch.full((batch,), 999.0 - 20 * i)
        t = {"flux": t / 1000, "hunyuan": t.to(dtype)}.get(name, t.long())  # as their pipelines pass it
        calls.append({"hidden_states": x + 0.05 * i * drift, "timestep": t, "return_dict": False, **fixed})
    return calls


def _conditions(name: str, batch: int, size: int, randn: Callable, dtype: torch.dtype) -> tuple[tuple, dict]:
    text = randn(batch, 5, 24)
    if name == "dit":
        return (batch, 4, size, size), {"class_labels": torch.arange(batch) % 10}
    if name == "pixart":
        return (batch, 4, size, size), {
            "encoder_hidden_states": text, "added_cond_kwargs": {"resolution": None, "aspect_ratio": None}
        }
    if name == "sd3":
        return (batch, 4, size, size), {"encoder_hidden_states": text, "pooled_projections": randn(batch, 16)}
    if name == "flux":
        side = size // 2
        img_ids = torch.zeros(side * side, 3)
        img_ids[:, 1], img_ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
        return (batch, side * side, 16), {
            "encoder_hidden_states": text, "pooled_projections": randn(batch, 16),
            "img_ids": img_ids, "txt_ids": torch.zeros(5, 3),
        }
    if name == "cogvideox":
        return (batch, 2, 4, size, size), {"encoder_hidden_states": text}
    if name == "ltx":
        side = size // 2
        return (batch, 2 * side * side, 8), {
            "encoder_hidden_states": text, "encoder_attention_mask": torch.ones(batch, 5),
            "num_frames": 2, "height": side, "width": side,
        }
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    side = size // 2
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (side, side)), (side, side))
    return (batch, 4, size, size), {
        "encoder_hidden_states": randn(batch, 5, 32), "text_embedding_mask": torch.ones(batch, 5),
        "encoder_hidden_states_t5": randn(batch, 6, 24), "text_embedding_mask_t5": torch.ones(batch, 6),
        "image_rotary_emb": tuple(r.to(dtype) for r in rope),
    }
