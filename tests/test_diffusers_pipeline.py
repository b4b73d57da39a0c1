"""`toca_fx.enable(pipe, config)` on a diffusers pipeline built from tiny random parts."""
from __future__ import annotations

import numpy as np
import pytest
import torch

import toca_fx
from toca_fx import ToCaConfig
from toca_fx.pipeline import planned_steps

from tests.diffusers_zoo import build, diffusers


def _pipeline():
    torch.manual_seed(0)
    vae = diffusers.AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",), block_out_channels=(8,), latent_channels=4,
        norm_num_groups=4, layers_per_block=1,
    ).eval()
    pipe = diffusers.DiTPipeline(transformer=build("dit"), vae=vae, scheduler=diffusers.DDIMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _sample(pipe, steps):
    generator = torch.Generator().manual_seed(0)
    return pipe(class_labels=[1, 2], guidance_scale=1.5, num_inference_steps=steps, generator=generator,
                output_type="np").images


def test_enable_matches_the_pipeline_and_restarts_every_call():
    pipe = _pipeline()
    reference = {steps: _sample(pipe, steps) for steps in (6, 4)}
    config = ToCaConfig(interval=3, ratio=1.0, self_attn="recompute", inner="eager")
    backend = toca_fx.enable(pipe, config)
    for steps in (6, 4, 6):
        np.testing.assert_allclose(_sample(pipe, steps), reference[steps], atol=1e-5)
        assert backend.runtime.num_steps == steps  # set from the scheduler's timesteps
    # Each call starts with a full step: 6 steps are full at 0, 3; 4 steps at 0, 3.
    assert backend.stats()["calls"] == {"full": 6, "partial": 10}


def test_enable_caches_tokens():
    pipe = _pipeline()
    reference = _sample(pipe, 6)
    backend = toca_fx.enable(pipe, ToCaConfig(interval=3, ratio=0.5, inner="eager"))
    images = _sample(pipe, 6)
    assert np.isfinite(images).all() and not np.allclose(images, reference, atol=1e-6)
    # With 6 DDIM steps the timestep jumps by a sixth of the schedule per step, so rows cached two
    # steps earlier are far off (unlike the models' 10-step loops with small drift): the bound only
    # says that sampling stays on track (measured: 0.22).
    assert np.linalg.norm(images - reference) / np.linalg.norm(reference) < 0.5
    assert backend.stats()["computed_fraction"] < 1.0


def test_enable_twice_and_on_a_second_pipeline_keeps_one_backend():
    pipe = _pipeline()
    reference = _sample(pipe, 6)
    config = ToCaConfig(interval=3, ratio=0.5, inner="eager")
    backend = toca_fx.enable(pipe, config)
    once = _sample(pipe, 6)
    assert toca_fx.enable(pipe, config) is backend
    graphs = len(backend.graphs)
    np.testing.assert_allclose(_sample(pipe, 6), once, atol=1e-6)
    assert len(backend.graphs) == graphs  # no graph added per call
    twin = diffusers.DiTPipeline(transformer=pipe.transformer, vae=pipe.vae, scheduler=diffusers.DDIMScheduler())
    twin.set_progress_bar_config(disable=True)
    assert toca_fx.enable(twin) is backend
    np.testing.assert_allclose(_sample(twin, 6), once, atol=1e-6)  # its own calls restart too
    with pytest.raises(ValueError, match="enabled with another config"):
        toca_fx.enable(pipe, ToCaConfig(ratio=0.7))
    toca_fx.disable(twin)
    toca_fx.disable(pipe)
    assert type(pipe) is diffusers.DiTPipeline and "forward" not in vars(pipe.transformer)
    np.testing.assert_allclose(_sample(pipe, 6), reference, atol=1e-6)


def test_a_call_stopped_midway_does_not_shift_the_next_one():
    pipe = _pipeline()
    config = ToCaConfig(interval=3, ratio=0.5, inner="eager")
    backend = toca_fx.enable(pipe, config)
    first = _sample(pipe, 6)
    step, calls = pipe.scheduler.step, []

    def interrupted(*args, **kwargs):  # a user stopping the loop (an exception, a callback) at step 3
        calls.append(None)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step(*args, **kwargs)

    pipe.scheduler.step = interrupted
    with pytest.raises(KeyboardInterrupt):
        _sample(pipe, 6)
    pipe.scheduler.step = step
    np.testing.assert_allclose(_sample(pipe, 6), first, atol=1e-6)
    assert backend.stats()["calls"]["full"] == 2 + 1 + 2


def test_planned_steps_start_at_the_schedulers_begin_index():
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    assert planned_steps(scheduler) == 10
    scheduler.set_begin_index(6)  # img2img at strength 0.4
    assert planned_steps(scheduler) == 4
    heun = diffusers.HeunDiscreteScheduler()
    heun.set_timesteps(5)  # a second-order sampler calls the model twice at most timesteps
    assert len(heun.timesteps) > 5 and planned_steps(heun) == 5
