"""`Replays`: whether one graph's variants are replayed as CUDA graphs here, and each cache stream's
replays (`compile.cudagraphs.CudaGraphed`, bound to that stream's buffers).

Decided at the graph's first compilation (`ToCaConfig.cuda_graphs`, `compile.cudagraphs.decide`):
Inductor's own capture skips graphs that update inputs in place, as every variant does. Where the
graphs cannot be used, one `ToCaWarning` per graph says why.
"""
from __future__ import annotations

import warnings
from typing import Callable

import torch

from ..compile.cudagraphs import CudaGraphed, decide
from ..config import ToCaConfig
from ..errors import ToCaWarning
from .planner import Variant
from .state import Stream


class Replays:
    def __init__(self, config: ToCaConfig, options: dict, buffers: int):
        self.config, self.options, self.buffers = config, options, buffers
        self.on = False
        self._pool = None
        self._warned = False

    def decide(self, args: tuple) -> bool:
        """Whether this graph's variants are captured here rather than by Inductor."""
        self.on, why = decide(self.config.cuda_graphs, self.config.inner, self.options, args)
        if why is not None:
            self.fallback(why)
        return self.on

    def runner(self, owner: int, variant: Variant, stream: Stream, args: tuple) -> Callable:
        """The variant replayed as a CUDA graph bound to `stream`'s buffers (captured at its second call)."""
        key = (owner, variant.id)
        runner = stream.runners.get(key)
        if runner is None:
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            static = [hasattr(x, "_dynamo_static_input_type") for x in args] + [True] * self.buffers
            runner = stream.runners[key] = CudaGraphed(variant.fn, static, self._pool, self.fallback)
        return runner

    def fallback(self, why: str) -> None:
        """One warning per graph where its variants run without CUDA graphs (or one of them does)."""
        if not self._warned:
            self._warned = True
            warnings.warn(f"toca_fx: CUDA graphs not used: {why}; such calls launch each kernel from Python "
                          "(slower at small token counts)", ToCaWarning, stacklevel=2)

