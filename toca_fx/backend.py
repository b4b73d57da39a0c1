"""The backend: `torch.compile(model, backend=ToCaBackend(config))`.

Dynamo hands over one captured graph at a time. The backend analyses it; if residual branches are
found it returns a `runtime.dispatch.CachedGraph`, which runs each step's variant with the graph's
cache state. A graph without branches compiles as plain Inductor would, with one warning saying why.
"""
from __future__ import annotations

import sys
import warnings
from dataclasses import replace
from typing import Any, Callable

import torch
import torch.fx as fx

from .analysis.residual import find_branches
from .compile.autocast import CastParameters, lowered_parameters
from .compile.options import compile_variant
from .config import ToCaConfig
from .errors import ToCaWarning
from .runtime.dispatch import CachedGraph
from .runtime.registry import Runtime
from .runtime.shapes import PerShape
from .runtime.stats import summary


class ToCaBackend:
    """A `torch.compile` backend that adds token-wise feature caching to any DiT."""

    def __init__(self, config: ToCaConfig | None = None):
        if config is not None and not isinstance(config, ToCaConfig):
            raise TypeError(f"ToCaBackend takes a ToCaConfig (e.g. ToCaConfig(ratio=0.5)), got {type(config).__name__}")
        self.config = config if config is not None else ToCaConfig()
        self.graphs: list[CachedGraph] = []
        self.runtime = Runtime(self.config.num_steps)

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **options: Any) -> Callable:
        if _dynamic_inputs(gm):  # the token count must be static: a static graph per concrete shape
            return PerShape(gm, lambda static, inputs: self._static(static, inputs, options))
        return self._static(gm, example_inputs, options)

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation at the next call of every model, of `num_steps` steps if given (else as
        many as before); free the caches of the models and shapes not called since the last reset.
        `torch._dynamo.reset()` calls this too, to drop compiled code: that call changes nothing here."""
        if _from_dynamo_reset():
            return
        if num_steps is not None:
            self.config = replace(self.config, num_steps=num_steps)  # validated as the config's field
        self.runtime.reset(num_steps)

    def reset_stats(self) -> None:
        """Count from zero again: `stats()` then describes only the calls after this one."""
        for graph in self.graphs:
            graph.calls.clear()
            graph.plan_calls.clear()

    def stats(self) -> dict[str, Any]:
        """Calls, compiles, cache bytes, the theoretical FLOPs of the calls so far relative to running
        them uncached, per branch the fraction of token rows recomputed and its own FLOP ratio (scoring
        and gathering included), and per variant compiled its compile time."""
        return summary(self.graphs, self.runtime.nbytes)

    def _static(self, gm: fx.GraphModule, example_inputs: list[Any], options: dict) -> Callable:
        if torch.is_grad_enabled() and any(isinstance(x, torch.Tensor) and x.requires_grad for x in example_inputs):
            # Cached outputs would carry autograd graphs across steps; Dynamo compiles grad mode apart.
            return self._plain(gm, example_inputs, options, "gradients are enabled; use torch.no_grad() or "
                               "torch.inference_mode() around the denoising loop to cache")
        analysis = find_branches(gm.graph)
        if not analysis.branches:
            why = "; ".join(f"{r.name}: {r.reason}" for r in analysis.rejected) or "no x + f(x) adds of [B, N, D] tensors"
            return self._plain(gm, example_inputs, options, f"no cacheable residual branch ({why})")
        unexpected = [r for r in analysis.rejected if not r.by_design]
        if unexpected:
            warnings.warn(
                f"toca_fx: {len(unexpected)} residual branch(es) left uncached: "
                + "; ".join(f"{r.name}: {r.reason}" for r in unexpected),
                ToCaWarning,
                stacklevel=2,
            )
        lowered = lowered_parameters(gm, example_inputs)  # under autocast: weights cast once, not per call
        casts = CastParameters(None, lowered) if lowered else None
        examples = casts.substitute(example_inputs) if casts is not None else example_inputs
        graph = CachedGraph(gm, analysis, self.config, options, self.runtime, examples)
        self.graphs.append(graph)
        if casts is None:
            return graph
        casts.fn = graph
        return casts

    def _plain(self, gm: fx.GraphModule, example_inputs: list[Any], options: dict, why: str) -> Callable:
        warnings.warn(f"toca_fx: graph compiled without caching: {why}", ToCaWarning, stacklevel=3)
        return compile_variant(gm, example_inputs, self.config.inner, options, wide_rows=False)


def _dynamic_inputs(gm: fx.GraphModule) -> str:
    """Names of placeholders whose shapes Dynamo made symbolic."""
    names = []
    for node in gm.graph.nodes:
        value = node.meta.get("example_value")
        if node.op != "placeholder":
            continue
        if isinstance(value, torch.SymInt) or (
            isinstance(value, torch.Tensor) and any(not isinstance(s, int) for s in value.shape)
        ):
            names.append(node.name)
    return ", ".join(names)


def _from_dynamo_reset() -> bool:
    """Whether `reset()` was called by `torch._dynamo.reset()` (through torch.compile's wrapper of the
    backend): a reset of compiled code, not of a generation, so no schedule may shift."""
    frame = sys._getframe(2)
    for _ in range(3):
        if frame is None:
            return False
        if frame.f_code.co_name == "_reset_guarded_backend_cache" and frame.f_globals.get("__name__", "").startswith("torch._dynamo"):
            return True
        frame = frame.f_back
    return False
