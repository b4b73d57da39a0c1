"""`enable(pipe, config)`: ToCa for a diffusers pipeline, one line.

It compiles `pipe.transformer`'s forward with a `ToCaBackend` and starts a new generation whenever
the pipeline's scheduler has new timesteps (every pipeline call sets them), with `num_steps` set to
their number. Only the pipeline's attributes `transformer` and `scheduler` are used.
"""
from __future__ import annotations

from typing import Any

import torch

from .backend import ToCaBackend
from .config import ToCaConfig


def enable(pipe: Any, config: ToCaConfig | None = None) -> ToCaBackend:
    """Cache `pipe.transformer` token-wise; returns the backend (for `stats()`)."""
    backend = ToCaBackend(config)
    transformer = pipe.transformer
    compiled = torch.compile(transformer.forward, backend=backend, dynamic=False)
    seen = None

    def forward(*args: Any, **kwargs: Any) -> Any:
        nonlocal seen
        timesteps = pipe.scheduler.timesteps
        if timesteps is not seen:  # set_timesteps makes a new tensor: a new pipeline call
            seen = timesteps
            backend.reset(num_steps=len(timesteps))
        return compiled(*args, **kwargs)

    transformer.forward = forward
    return backend
