"""Tiny diffusers transformers with random weights (nothing is downloaded), and the inputs of a
denoising-like loop for each: the latent drifts a little each step, the timestep counts down, the
conditions stay fixed.

`ZOO` holds every DiT-style transformer class of the installed diffusers that the zoo test runs;
`BUILDERS` the few that the diffusers, explain, CFG and shape tests run in depth."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import pytest
import torch

diffusers = pytest.importorskip("diffusers")

HEADS = dict(num_attention_heads=2, attention_head_dim=16)  # hidden size 32
Randn = Callable[..., torch.Tensor]


@dataclass(frozen=True)
class Spec:
    """`make()` builds the model; `conditions(batch, size, randn)` gives every keyword argument of a
    call but the timestep, the latent under `latent`; `time(t, dtype)` turns a float timestep in
    [0, 1000) into what the class's pipeline passes."""

    make: Callable[[], torch.nn.Module]
    conditions: Callable[[int, int, Randn], dict[str, Any]]
    latent: str = "hidden_states"
    time_key: str = "timestep"
    time: Callable[[torch.Tensor, torch.dtype], torch.Tensor] = lambda t, dtype: t.long()
    zero_init: bool = False  # adaLN-zero gates start at 0 (no branch adds anything): draw them at random


def _make(cls_name: str, **config: Any) -> Callable[[], torch.nn.Module]:
    return lambda: getattr(diffusers, cls_name)(**config)


def _image(channels: int) -> Callable[[int, int, Randn], dict]:
    return lambda b, s, randn: {"hidden_states": randn(b, channels, s, s)}


def _with(base: Callable[[int, int, Randn], dict], extra: Callable[[int, int, Randn], dict]) -> Callable:
    return lambda b, s, randn: {**base(b, s, randn), **extra(b, s, randn)}


def _text(length: int = 5, dim: int = 24, key: str = "encoder_hidden_states") -> Callable:
    return lambda b, s, randn: {key: randn(b, length, dim)}


def _flux_ids(b: int, s: int, randn: Randn) -> dict:
    side = s // 2
    img_ids = torch.zeros(side * side, 3)
    img_ids[:, 1], img_ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    return {"hidden_states": randn(b, side * side, 16), "img_ids": img_ids, "txt_ids": torch.zeros(5, 3)}


def _hunyuan(b: int, s: int, randn: Randn) -> dict:
    from diffusers.models.embeddings import get_2d_rotary_pos_embed

    side = s // 2
    rope = get_2d_rotary_pos_embed(16, ((0, 0), (side, side)), (side, side))
    return {
        "hidden_states": randn(b, 4, s, s),
        "encoder_hidden_states": randn(b, 5, 32), "text_embedding_mask": torch.ones(b, 5),
        "encoder_hidden_states_t5": randn(b, 6, 24), "text_embedding_mask_t5": torch.ones(b, 6),
        "image_rotary_emb": tuple(r.to(randn(1).dtype) for r in rope),
    }


def _ltx(b: int, s: int, randn: Randn) -> dict:
    side = s // 2
    return {"hidden_states": randn(b, 2 * side * side, 8), "encoder_hidden_states": randn(b, 5, 24),
            "encoder_attention_mask": torch.ones(b, 5), "num_frames": 2, "height": side, "width": side}


def _qwen(b: int, s: int, randn: Randn) -> dict:
    side = s // 2
    return {"hidden_states": randn(b, side * side, 16), "encoder_hidden_states": randn(b, 5, 24),
            "encoder_hidden_states_mask": torch.ones(b, 5), "img_shapes": [(1, side, side)] * b}


def _zimage(b: int, s: int, randn: Randn) -> dict:
    return {"x": [randn(16, 1, s, s) for _ in range(b)], "cap_feats": [randn(8, 24) for _ in range(b)]}


def _cogview4(b: int, s: int, randn: Randn) -> dict:
    size = torch.tensor([[8 * s, 8 * s]] * b)
    return {"hidden_states": randn(b, 4, s, s), "encoder_hidden_states": randn(b, 6, 24),
            "original_size": size, "target_size": size, "crop_coords": torch.zeros(b, 2)}


def _video(channels: int, frames: int = 2) -> Callable[[int, int, Randn], dict]:
    return lambda b, s, randn: {"hidden_states": randn(b, channels, frames, s, s)}


def _sizes(b: int, s: int, randn: Randn) -> dict:
    size = torch.tensor([[8 * s, 8 * s]] * b)
    return {"original_size": size, "target_size": size, "crop_coords": torch.zeros(b, 2)}


def _flux_like(channels: int, pooled: int = 0, ids: int = 3) -> Callable[[int, int, Randn], dict]:
    def conditions(b: int, s: int, randn: Randn) -> dict:
        side = s // 2
        img_ids = torch.zeros(side * side, ids)
        img_ids[:, 1], img_ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
        out = {"hidden_states": randn(b, side * side, channels), "encoder_hidden_states": randn(b, 5, 24),
               "img_ids": img_ids, "txt_ids": torch.zeros(5, ids)}
        return {**out, "pooled_projections": randn(b, pooled)} if pooled else out
    return conditions


def _hunyuan_video(b: int, s: int, randn: Randn) -> dict:
    return {"hidden_states": randn(b, 4, 1, s, s), "encoder_hidden_states": randn(b, 5, 24),
            "pooled_projections": randn(b, 16), "encoder_attention_mask": torch.ones(b, 5), "guidance": torch.full((b,), 3500.0)}


def _cosmos(b: int, s: int, randn: Randn) -> dict:
    return {"hidden_states": randn(b, 4, 1, s, s), "encoder_hidden_states": randn(b, 5, 24),
            "fps": 24}


def _stable_audio(b: int, s: int, randn: Randn) -> dict:
    return {"hidden_states": randn(b, 4, 4 * s), "encoder_hidden_states": randn(b, 5, 24),
            "global_hidden_states": randn(b, 1, 24)}


_WAN_LIKE = dict(**HEADS, patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=24, freq_dim=32, ffn_dim=64,
                 num_layers=2, rope_max_seq_len=32)
_WAN_INPUTS = _with(_video(4), _text())


def _kandinsky5(b: int, s: int, randn: Randn) -> dict:
    side = s // 2
    return {"hidden_states": randn(b, 1, s, s, 4), "encoder_hidden_states": randn(b, 5, 24),
            "pooled_projections": randn(b, 16), "visual_rope_pos": [torch.arange(1), torch.arange(side), torch.arange(side)],
            "text_rope_pos": torch.arange(5), "scale_factor": (1.0, 1.0, 1.0)}


_DIT_LIKE = dict(num_layers=2, sample_size=8, patch_size=2, norm_num_groups=1)
_HALF = lambda t, dtype: t / 1000  # noqa: E731  flow-matching pipelines pass the timestep in [0, 1)

ZOO: dict[str, Spec] = {
    "dit": Spec(  # 1000 classes: DiTPipeline's unconditional label is class 1000
        _make("DiTTransformer2DModel", **HEADS, **_DIT_LIKE, in_channels=4, out_channels=8, num_embeds_ada_norm=1000),
        _with(_image(4), lambda b, s, randn: {"class_labels": torch.arange(b) % 10})),
    "pixart": Spec(
        _make("PixArtTransformer2DModel", **HEADS, **_DIT_LIKE, in_channels=4, out_channels=8, cross_attention_dim=32,
              caption_channels=24, use_additional_conditions=False),
        _with(_with(_image(4), _text()),
              lambda b, s, randn: {"added_cond_kwargs": {"resolution": None, "aspect_ratio": None}})),
    "sd3": Spec(
        _make("SD3Transformer2DModel", **HEADS, sample_size=8, patch_size=2, in_channels=4, num_layers=2,
              joint_attention_dim=24, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4,
              pos_embed_max_size=8),
        _with(_with(_image(4), _text()), lambda b, s, randn: {"pooled_projections": randn(b, 16)})),
    "flux": Spec(
        _make("FluxTransformer2DModel", **HEADS, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
              joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)),
        _with(_with(_flux_ids, _text()), lambda b, s, randn: {"pooled_projections": randn(b, 16)}), time=_HALF),
    "cogvideox": Spec(
        _make("CogVideoXTransformer3DModel", **HEADS, in_channels=4, out_channels=4, time_embed_dim=32,
              text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
              temporal_compression_ratio=4, max_text_seq_length=5),
        _with(lambda b, s, randn: {"hidden_states": randn(b, 2, 4, s, s)}, _text())),
    "ltx": Spec(
        _make("LTXVideoTransformer3DModel", **HEADS, in_channels=8, out_channels=8, cross_attention_dim=32,
              num_layers=2, caption_channels=24),
        _ltx),
    "hunyuan": Spec(  # 4 layers: the last one takes the long skip connection from the first
        _make("HunyuanDiT2DModel", **HEADS, in_channels=4, patch_size=2, sample_size=8, hidden_size=32, num_layers=4,
              cross_attention_dim=32, cross_attention_dim_t5=24, pooled_projection_dim=16, text_len=5, text_len_t5=6,
              use_style_cond_and_image_meta_size=False),
        _hunyuan, time=lambda t, dtype: t.to(dtype)),
    "wan": Spec(
        _make("WanTransformer3DModel", **HEADS, patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=24,
              freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32),
        _with(lambda b, s, randn: {"hidden_states": randn(b, 4, 2, s, s)}, _text())),
    "qwenimage": Spec(
        _make("QwenImageTransformer2DModel", **HEADS, patch_size=2, in_channels=16, out_channels=4, num_layers=2,
              joint_attention_dim=24, axes_dims_rope=(4, 6, 6)),
        _qwen, time=_HALF),
    "lumina2": Spec(
        _make("Lumina2Transformer2DModel", sample_size=8, patch_size=2, in_channels=4, hidden_size=32, num_layers=2,
              num_refiner_layers=1, num_attention_heads=2, num_kv_heads=1, multiple_of=16, axes_dim_rope=(4, 6, 6),
              axes_lens=(32, 32, 32), cap_feat_dim=24),
        _with(_with(_image(4), _text()), lambda b, s, randn: {"encoder_attention_mask": torch.ones(b, 5, dtype=torch.bool)}),
        time=_HALF),
    "zimage": Spec(
        _make("ZImageTransformer2DModel", all_patch_size=(2,), all_f_patch_size=(1,), in_channels=16, dim=32,
              n_layers=2, n_refiner_layers=1, n_heads=2, n_kv_heads=2, cap_feat_dim=24, axes_dims=[4, 6, 6],
              axes_lens=[64, 32, 32]),
        _zimage, latent="x", time_key="t", time=_HALF),
    "cogview4": Spec(
        _make("CogView4Transformer2DModel", **HEADS, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
              text_embed_dim=24, time_embed_dim=32, condition_dim=8, rope_axes_dim=(8, 8)),
        _cogview4),
    "allegro": Spec(
        _make("AllegroTransformer3DModel", **HEADS, in_channels=4, out_channels=4, num_layers=2, cross_attention_dim=32,
              sample_height=8, sample_width=8, sample_frames=8, caption_channels=24),
        _with(_video(4), _text())),
    "auraflow": Spec(
        _make("AuraFlowTransformer2DModel", sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
              num_single_dit_layers=2, attention_head_dim=16, num_attention_heads=2, joint_attention_dim=24,
              caption_projection_dim=32, out_channels=4, pos_embed_max_size=64),
        _with(_image(4), _text()), time=_HALF),
    "cogview3plus": Spec(
        _make("CogView3PlusTransformer2DModel", **HEADS, patch_size=2, in_channels=4, out_channels=4, num_layers=2,
              text_embed_dim=24, time_embed_dim=32, condition_dim=8, pos_embed_max_size=8, sample_size=8),
        _with(_with(_image(4), _text(6)), _sizes)),
    "latte": Spec(
        _make("LatteTransformer3DModel", **HEADS, in_channels=4, out_channels=8, num_layers=2, sample_size=8,
              patch_size=2, cross_attention_dim=32, caption_channels=24, video_length=2, norm_type="ada_norm_single",
              norm_elementwise_affine=False, activation_fn="gelu-approximate", num_embeds_ada_norm=1000),
        _with(_video(4), _text())),
    "mochi": Spec(
        _make("MochiTransformer3DModel", **HEADS, patch_size=2, num_layers=2, pooled_projection_dim=16, in_channels=4,
              text_embed_dim=24, time_embed_dim=8, max_sequence_length=16),
        _with(_with(_video(4), _text()), lambda b, s, randn: {"encoder_attention_mask": torch.ones(b, 5)})),
    "hunyuan_video": Spec(
        _make("HunyuanVideoTransformer3DModel", **HEADS, in_channels=4, out_channels=4, num_layers=1,
              num_single_layers=1, num_refiner_layers=1, patch_size=2, text_embed_dim=24, pooled_projection_dim=16,
              rope_axes_dim=(4, 6, 6)),
        _hunyuan_video),
    "sana": Spec(
        _make("SanaTransformer2DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
              num_layers=2, num_cross_attention_heads=2, cross_attention_head_dim=16, cross_attention_dim=32,
              caption_channels=24, sample_size=8, patch_size=2),
        _with(_image(4), _text())),
    "chroma": Spec(
        _make("ChromaTransformer2DModel", **HEADS, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
              joint_attention_dim=24, axes_dims_rope=(4, 6, 6), approximator_num_channels=8,
              approximator_hidden_dim=32, approximator_layers=2),
        _flux_like(16), time=_HALF),
    "cosmos": Spec(
        _make("CosmosTransformer3DModel", in_channels=4, out_channels=4, num_attention_heads=2, attention_head_dim=16,
              num_layers=2, mlp_ratio=2, text_embed_dim=24, adaln_lora_dim=4, max_size=(4, 32, 32),
              patch_size=(1, 2, 2), rope_scale=(2.0, 1.0, 1.0), concat_padding_mask=False),
        _cosmos, time=_HALF),
    "skyreels_v2": Spec(_make("SkyReelsV2Transformer3DModel", **_WAN_LIKE), _WAN_INPUTS),
    "chronoedit": Spec(_make("ChronoEditTransformer3DModel", **_WAN_LIKE, rope_temporal_skip_len=2), _WAN_INPUTS),
    "wan_vace": Spec(
        _make("WanVACETransformer3DModel", **_WAN_LIKE, vace_layers=[0], vace_in_channels=8),
        _with(_WAN_INPUTS, lambda b, s, randn: {"control_hidden_states": randn(b, 8, 2, s, s)})),
    "bria": Spec(
        _make("BriaTransformer2DModel", **HEADS, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
              joint_attention_dim=24, axes_dims_rope=[4, 6, 6]),
        _flux_like(16), time=_HALF),
    "longcat_image": Spec(
        _make("LongCatImageTransformer2DModel", **HEADS, patch_size=1, in_channels=16, num_layers=1,
              num_single_layers=1, joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=[4, 6, 6]),
        _flux_like(16), time=_HALF),
    "ovis_image": Spec(
        _make("OvisImageTransformer2DModel", **HEADS, patch_size=1, in_channels=16, out_channels=16, num_layers=1,
              num_single_layers=1, joint_attention_dim=24, axes_dims_rope=(4, 6, 6)),
        _flux_like(16), time=_HALF),
    "flux2": Spec(
        _make("Flux2Transformer2DModel", **HEADS, patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
              joint_attention_dim=24, timestep_guidance_channels=32, axes_dims_rope=(2, 2, 6, 6), guidance_embeds=False),
        _flux_like(16, ids=4), time=_HALF),
    "stable_audio": Spec(
        _make("StableAudioDiTModel", sample_size=32, in_channels=4, num_layers=2, attention_head_dim=16,
              num_attention_heads=2, num_key_value_attention_heads=1, out_channels=4, cross_attention_dim=24,
              time_proj_dim=16, global_states_input_dim=24, cross_attention_input_dim=24),
        _stable_audio, time=lambda t, dtype: t.to(dtype)),
    "consisid": Spec(
        _make("ConsisIDTransformer3DModel", **HEADS, in_channels=4, out_channels=4, time_embed_dim=32,
              text_embed_dim=24, num_layers=2, sample_width=8, sample_height=8, sample_frames=5, patch_size=2,
              temporal_compression_ratio=4, max_text_seq_length=5),
        _with(lambda b, s, randn: {"hidden_states": randn(b, 2, 4, s, s)}, _text())),
    "easyanimate": Spec(
        _make("EasyAnimateTransformer3DModel", **HEADS, in_channels=4, out_channels=4, patch_size=2, sample_width=8,
              sample_height=8, num_layers=2, mmdit_layers=2, time_embed_dim=32, text_embed_dim=24,
              enable_text_attention_mask=False),
        _with(_video(4), _text())),
    "hunyuanimage": Spec(
        _make("HunyuanImageTransformer2DModel", **HEADS, in_channels=4, out_channels=4, num_layers=1,
              num_single_layers=1, num_refiner_layers=1, patch_size=(2, 2), text_embed_dim=24, rope_axes_dim=(8, 8)),
        _with(_with(_image(4), _text()), lambda b, s, randn: {"encoder_attention_mask": torch.ones(b, 5)}),
        time=lambda t, dtype: t.to(dtype)),
    "prx": Spec(
        _make("PRXTransformer2DModel", in_channels=4, patch_size=2, context_in_dim=24, hidden_size=32, mlp_ratio=2.0,
              num_heads=2, depth=2, axes_dim=[8, 8]),
        _with(_image(4), _text()), time=_HALF, zero_init=True),
    "transformer2d": Spec(  # the patched form of diffusers' generic 2D transformer (DiT's blocks)
        _make("Transformer2DModel", **HEADS, **_DIT_LIKE, in_channels=4, out_channels=8, norm_type="ada_norm_zero",
              num_embeds_ada_norm=1000),
        _with(_image(4), lambda b, s, randn: {"class_labels": torch.arange(b) % 10})),
    "temporal": Spec(  # frames of a UNet's feature map: the batch holds the frames
        _make("TransformerTemporalModel", **HEADS, in_channels=32, num_layers=1, norm_num_groups=1),
        lambda b, s, randn: {"hidden_states": randn(2 * b, 32, s, s), "num_frames": 2}),
    "prior": Spec(
        _make("PriorTransformer", **HEADS, num_layers=2, embedding_dim=16, num_embeddings=5, additional_embeddings=4),
        lambda b, s, randn: {"hidden_states": randn(b, 16), "proj_embedding": randn(b, 16),
                             "encoder_hidden_states": randn(b, 5, 16)}),
    "kandinsky5": Spec(
        _make("Kandinsky5Transformer3DModel", in_visual_dim=4, in_text_dim=24, in_text_dim2=16, time_dim=32,
              out_visual_dim=4, model_dim=32, ff_dim=64, num_text_blocks=1, num_visual_blocks=2, axes_dims=(4, 6, 6)),
        _kandinsky5, time=lambda t, dtype: t.to(dtype), zero_init=True),
}

# The residual branches the backend caches in each model of `ZOO` (tests/test_zoo.py asserts them).
CACHED: dict[str, int] = {
    "dit": 4,
    "pixart": 6,
    "sd3": 5,
    "flux": 4,
    "cogvideox": 4,
    "ltx": 6,
    "hunyuan": 12,
    "wan": 6,
    "qwenimage": 6,
    "lumina2": 8,
    "zimage": 6,
    "cogview4": 6,
    "allegro": 6,
    "auraflow": 7,
    "cogview3plus": 4,
    "latte": 10,
    "mochi": 3,
    "hunyuan_video": 6,
    "sana": 6,
    "chroma": 4,
    "cosmos": 6,
    "skyreels_v2": 6,
    "chronoedit": 6,
    "wan_vace": 9,
    "bria": 4,
    "longcat_image": 4,
    "ovis_image": 4,
    "flux2": 4,
    "stable_audio": 8,
    "consisid": 4,
    "easyanimate": 6,
    "hunyuanimage": 6,
    "prx": 4,
    "transformer2d": 4,
    "temporal": 3,
    "prior": 4,
    "kandinsky5": 8,
}

BUILDERS: dict[str, Callable[[], torch.nn.Module]] = {
    name: ZOO[name].make for name in ("dit", "pixart", "sd3", "flux", "cogvideox", "ltx", "hunyuan")
}


def build(name: str, seed: int = 0, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(seed)
    model = ZOO[name].make().eval()
    if ZOO[name].zero_init:
        with torch.no_grad():
            for p in model.parameters():
                if not p.any():
                    p.normal_(0, 0.1)
    return model if dtype == torch.float32 else model.to(dtype)


def loop_inputs(name: str, steps: int, batch: int = 2, size: int = 8, seed: int = 1,
                dtype: torch.dtype = torch.float32) -> list[dict]:
    """Keyword arguments of `steps` calls; `size` is the latent's height and width."""
    spec, g = ZOO[name], torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(dtype)

    fixed = spec.conditions(batch, size, randn)
    x = fixed.pop(spec.latent)
    drift = [randn(*t.shape) for t in x] if isinstance(x, list) else randn(*x.shape)
    calls = []
    for i in range(steps):
        t = spec.time(torch.full((batch,), 999.0 - 20 * i), dtype)
        latent = ([a + 0.05 * i * d for a, d in zip(x, drift)] if isinstance(x, list) else x + 0.05 * i * drift)
        calls.append({spec.latent: latent, spec.time_key: t, "return_dict": False, **fixed})
    return calls
