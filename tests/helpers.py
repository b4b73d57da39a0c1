"""Tiny reference models and a denoising-like input sequence shared by the tests."""
from __future__ import annotations

import torch

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.models import DiT, PixArt

SIZE = dict(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=2, num_heads=2)


def tiny_dit(attention: str = "sdpa", seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    return DiT(num_classes=10, attention=attention, **SIZE).eval()


def tiny_pixart(attention: str = "sdpa", seed: int = 0) -> PixArt:
    torch.manual_seed(seed)
    return PixArt(caption_channels=24, attention=attention, **SIZE).eval()


def step_inputs(model, steps: int, batch: int = 2, seed: int = 1) -> list[tuple]:
    """Inputs of a denoising loop: the latent drifts a little each step, t counts down, the
    condition (labels or text context) stays fixed."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, 8, 8, generator=g)
    drift = torch.randn(batch, 4, 8, 8, generator=g)
    cond = (
        torch.randint(0, 10, (batch,), generator=g)
        if isinstance(model, DiT)
        else torch.randn(batch, 5, 24, generator=g)
    )
    return [(x + 0.05 * i * drift, torch.full((batch,), 999.0 - 20 * i), cond) for i in range(steps)]


def tiny_dit_generation(config: ToCaConfig) -> tuple[list[torch.Tensor], ToCaBackend]:
    """The tiny DiT compiled with `config` and called for `config.num_steps` steps: each step's output,
    and the backend."""
    model = tiny_dit()
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        return [fast(*args) for args in step_inputs(model, config.num_steps)], backend


def captured_graph(fn, *inputs):
    """The one graph Dynamo captures of `fn(*inputs)`, as the backend would be handed it."""
    graphs = []

    def record(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    torch._dynamo.reset()
    with torch.no_grad():
        torch.compile(fn, backend=record, dynamic=False)(*inputs)
    (gm,) = graphs
    return gm
