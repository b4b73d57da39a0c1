"""`enable(pipe, config)` / `disable(pipe)`: ToCa for a diffusers pipeline, one line each.

`enable` compiles `pipe.transformer`'s forward with a `ToCaBackend` (once per transformer: pipelines
that share it share the backend) and makes every call of the pipeline a new generation: at its start
the backend resets, and at its transformer's first call the generation is planned for the steps its
scheduler will run (the timesteps from the scheduler's begin index on, so img2img's shortened
schedules count right; a timestep repeated by a second-order sampler is one step). A generation
that stops early is no error: the model's timestep clock sees the next one start. Only the
pipeline's attributes `transformer` and `scheduler` are used.
"""
from __future__ import annotations

import contextlib
import threading
import weakref
from typing import Any, Iterator

import torch

from .backend import ToCaBackend
from .config import ToCaConfig


def enable(pipe: Any, config: ToCaConfig | None = None) -> ToCaBackend:
    """Cache `pipe.transformer` token-wise; returns the backend (for `stats()`). Enabling a pipeline
    twice, or a second pipeline with the same transformer, keeps the one backend (a different config
    is refused: `disable` first)."""
    hook = getattr(pipe.transformer, "_toca_fx", None)
    if hook is None:
        hook = _Hook(pipe.transformer, ToCaBackend(config))
    elif config is not None and config != hook.backend.config:
        raise ValueError("toca_fx.enable: this transformer is enabled with another config; call "
                         "toca_fx.disable(pipe) first")
    if not isinstance(pipe, _Enabled):
        pipe.__class__ = type(type(pipe).__name__, (_Enabled, type(pipe)), {"__module__": type(pipe).__module__})
    hook.pipes.add(pipe)
    return hook.backend


def disable(pipe: Any) -> None:
    """Undo `enable(pipe)`: the pipeline and (once no enabled pipeline uses it) its transformer run as
    before, uncompiled."""
    if isinstance(pipe, _Enabled):
        pipe.__class__ = type(pipe).__bases__[1]
    hook = getattr(pipe.transformer, "_toca_fx", None)
    if hook is not None:
        hook.pipes.discard(pipe)
        if not hook.pipes:
            hook.remove()


class _Enabled:
    """Mixed in before a pipeline's class: each call of the pipeline is one generation of its hook."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with self.transformer._toca_fx.calling(self):
            return super().__call__(*args, **kwargs)


class _Hook:
    """The compiled forward of one transformer and the pipeline calling it now (per thread)."""

    def __init__(self, transformer: torch.nn.Module, backend: ToCaBackend):
        self.transformer, self.backend = transformer, backend
        self.pipes: weakref.WeakSet = weakref.WeakSet()
        self._local = threading.local()
        compiled = torch.compile(transformer.forward, backend=backend, dynamic=False)

        def forward(*args: Any, **kwargs: Any) -> Any:
            pipe = getattr(self._local, "pipe", None)
            if pipe is not None and not self._local.planned:
                self._local.planned = True
                backend.runtime.num_steps = planned_steps(pipe.scheduler)
            return compiled(*args, **kwargs)

        transformer.forward = forward
        transformer._toca_fx = self

    @contextlib.contextmanager
    def calling(self, pipe: Any) -> Iterator[None]:
        outer = getattr(self._local, "pipe", None), getattr(self._local, "planned", False)
        self._local.pipe, self._local.planned = pipe, False
        self.backend.reset()
        try:
            yield
        finally:
            self._local.pipe, self._local.planned = outer

    def remove(self) -> None:
        del self.transformer.forward, self.transformer._toca_fx


def planned_steps(scheduler: Any) -> int:
    """The denoising steps a scheduler's loop runs: distinct timesteps from its begin index on."""
    timesteps = scheduler.timesteps
    begin = getattr(scheduler, "begin_index", None) or 0
    return max(1, len(torch.unique(torch.as_tensor(timesteps)[begin:])))
