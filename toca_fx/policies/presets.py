"""Presets: the settings of ToCa's and TaylorSeer's papers and public code, by model family
(`ToCaConfig.preset`)."""
from __future__ import annotations

from typing import Any

from .taylorseer import TaylorSeerPolicy

# ToCa (arXiv 2410.05317) and its public DiT-ToCa code, as recorded in docs/scores.md. The code's step
# factor 1.4 - 0.8 s/S counts s down from S - 1: 0.6 on the first step, 1.4 on the last; its layer
# factor 1.8 - 1.6 l/(L - 1) is 1.8 on the first block, 0.2 on the last. Module factor 0 for attention
# is ToCa's reuse of the self-attention output; 2.5 moves that budget to the MLP. Score: attention
# (L2-normalised column sums) + 0.25 x staleness / N, then the 0.6 spatial bonus. Interval (the code's
# force_scheduler): N / f, f from 0.6 to 1.4 (step weight 0.4) for DiT, from 0.8 to 1.2 (0.2) for
# PixArt, reset at each full step; DiT's is 2 for countdown steps 50-99 of 250, i.e. 60-80% through.
_TOCA_SCORES = {"attention": 1.0, "staleness": 0.25 / 4, "spatial": 0.6}
PRESETS: dict[str, dict[str, Any]] = {
    # DiT-XL/2 256, 250 DDPM steps (the code's default schedule): N = 4, base ratio 0.07.
    "dit": dict(
        interval=4, interval_stretch=0.4, dense_steps=(0.6, 0.8),
        ratio=0.07, num_steps=250, self_attn="reuse", scores=_TOCA_SCORES,
        kind_factors={"self_attn": 0.0, "cross_attn": 2.5, "mlp": 2.5},
        depth_factors=(1.8, 0.2), step_factors=(0.6, 1.4),
    ),
    # PixArt-alpha: N = 3, base ratio 0.10, same score and schedule (staleness / N with N = 3). The
    # cross-attention factor is not recorded; chosen here equal to the MLP's (both run on chosen rows).
    "pixart": dict(
        interval=3, interval_stretch=0.2, ratio=0.10, num_steps=20, self_attn="reuse",
        scores={**_TOCA_SCORES, "staleness": 0.25 / 3},
        kind_factors={"self_attn": 0.0, "cross_attn": 2.5, "mlp": 2.5},
        depth_factors=(1.8, 0.2), step_factors=(0.6, 1.4),
    ),
    # OpenSora: values chosen here (not in the recorded code): PixArt's, as OpenSora's blocks are
    # PixArt-like (self-, cross-attention, MLP); the grid is 3-D (T, H, W), inferred from the conv3d
    # patch embedding. No depth ramp: spatial and temporal blocks alternate, so depth is not monotone.
    "opensora": dict(
        interval=3, interval_stretch=0.2, ratio=0.10, num_steps=30, self_attn="reuse",
        scores={**_TOCA_SCORES, "staleness": 0.25 / 3},
        kind_factors={"self_attn": 0.0, "cross_attn": 2.5, "mlp": 2.5},
        step_factors=(0.6, 1.4),
    ),
    # FLUX: values chosen here. Joint attention is reused whole like ToCa's self-attention (single
    # blocks fuse attention and MLP in one joint branch, reused too); the MLPs recompute 0.10 x 2.5 of
    # their tokens on average; interval 3 as PixArt's for a short (28-step) schedule; no depth ramp.
    "flux": dict(
        interval=3, ratio=0.10, num_steps=28, self_attn="reuse", scores=_TOCA_SCORES,
        kind_factors={"self_attn": 0.0, "cross_attn": 2.5, "mlp": 2.5},
        step_factors=(0.6, 1.4),
    ),
    # TaylorSeer (arXiv 2503.06923), its public FLUX code (TaylorSeer-FLUX cache_init, mode 'Taylor'):
    # fresh_threshold 6, max_order 1, first_enhance 3, i.e. steps 0-2 full, then one every 6; every
    # other step forecasts every cached feature. 50 steps is the paper's FLUX.1-dev setting (10 full
    # steps: the 4.99x it reports). The code's FLUX factors skip the divided difference of the fill at
    # step 1 (differences start at step 2); at order 1 that changes nothing, here it is not copied.
    "taylorseer-flux": dict(num_steps=50, policy=TaylorSeerPolicy(6, first_full=3), forecast_order=1),
    # The same schedule over 28 steps (full at 0, 1, 2, 8, 14, 20, 26): not a published setting, the
    # published one applied to FLUX.1-dev's common 28-step schedule.
    "taylorseer-flux-28": dict(num_steps=28, policy=TaylorSeerPolicy(6, first_full=3), forecast_order=1),
    # TaylorSeer-DiT (its README's recommended setting): 50 DDIM steps, interval 4, first_enhance 2;
    # max_order 4 there, capped here at the highest order toca_fx keeps (2).
    "taylorseer-dit": dict(num_steps=50, policy=TaylorSeerPolicy(4, first_full=2), forecast_order=2),
}
