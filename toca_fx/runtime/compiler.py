"""Compiling a graph's variants: each at its first call, the rest of its generation ahead in workers.

A variant's graph is built from its plan (`rewrite.variants`), compiled with its options
(`compile.options`), and on CUDA replayed as a CUDA graph in any mode (`runtime.replay`). Its inputs
are the call's and the buffers it uses, with stand-ins for the others, so its compilation, and its
cache keys, are the same in any order of first calls and in a worker's.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import asdict
from functools import partial
from typing import Any

import torch
import torch.fx as fx

from ..analysis.fake import metas_of
from ..compile import workers
from ..compile.autocast import autocast_dtype
from ..compile.options import compile_variant, inductor_patches, variant_options
from ..compile.regions import Regional
from ..config import ToCaConfig
from ..rewrite.variants import build_variant
from ..rewrite.layout import BufferSpec
from ..rewrite.narrow_caches import narrow_caches
from .planner import Planner, Step, Variant
from .replay import Replays
from .state import CacheState, Stream

log = logging.getLogger("toca_fx")  # INFO: each variant's compilation, as it ends (they can take minutes)

# By regions a variant compiles here in about the time a worker takes to start, so the first two of a
# generation compile here and the rest ahead; compiled whole, only the first.
_HERE_REGIONAL, _HERE_WHOLE = 2, 1


class VariantCompiler:
    def __init__(self, gm: fx.GraphModule, config: ToCaConfig, options: dict, specs: tuple[BufferSpec, ...],
                 planner: Planner):
        self.gm, self.config, self.options, self.specs, self.planner = gm, config, options, specs, planner
        self.compiled: list[Variant] = []  # in the order compiled
        self.replays = Replays(config, options, len(specs))
        self._ahead = workers.Prefetch()  # workers compiling variants before their first calls
        self._prefetched: set[int] = set()  # num_steps of the generations whose variants went to it
        self._amp: list[tuple[str, torch.dtype]] = []  # (device type, dtype) of the calls' autocast

    def graph(self, variant: Variant) -> fx.GraphModule:
        """The variant's rewritten graph, built on first use."""
        if variant.graph is None:
            variant.graph, variant.used = build_variant(self.gm, dict(variant.key), self.config)
            if self.config.cache_dtype is not None:
                variant.used = narrow_caches(variant.graph, self.specs, variant.used)
        return variant.graph

    def used(self, variant: Variant) -> frozenset[int]:
        self.graph(variant)
        return variant.used

    def inputs(self, variant: Variant, args: tuple, state: CacheState, stream: Stream) -> list[Any]:
        """`args`, the buffers `variant` uses and stand-ins for the others (see the module's doc)."""
        used = self.used(variant)
        buffers = state.buffers(stream, used)
        return [*args, *(b if i in used else s.stand_in() for i, (b, s) in enumerate(zip(buffers, self.specs)))]

    def example(self, args: tuple) -> list[Any]:
        """The metadata of a call's inputs, the buffers as allocated: what FLOPs are counted on (under
        the autocast of that call, `amp`)."""
        devices = {a.device.type for a in args if isinstance(a, torch.Tensor)}
        self._amp = [(d, autocast_dtype(torch.device(d))) for d in sorted(devices) if autocast_dtype(torch.device(d))]
        return metas_of(list(args)) + [s.meta() for s in self.specs]

    def amp(self) -> contextlib.ExitStack:
        """The autocast the calls run under (as `example` saw it), to run the graphs elsewhere as they run."""
        stack = contextlib.ExitStack()
        for device, dtype in self._amp:
            stack.enter_context(torch.autocast(device, dtype=dtype))
        return stack

    def compile(self, variant: Variant, args: tuple, state: CacheState, stream: Stream, generation: list[Step]) -> None:
        """Compile `variant` (due now, at a step of `generation`), first sending the generation's
        others to workers where that is on."""
        if not self.compiled:
            self.replays.decide(args)
        self._prefetch(variant, args, generation)
        inputs = self.inputs(variant, args, state, stream)
        graphed = self.graphed
        start = time.perf_counter()
        with self._ahead.compiling(variant.id):  # after its worker, if one compiles it into the caches
            options = variant_options(self.options, variant.modes, graphed)
            fn = compile_variant(self.graph(variant), inputs, self.config.inner, options, regional=self.config.regional)
        variant.regions = (fn.blocks, fn.forms) if isinstance(fn, Regional) else None
        variant.fn = fn
        variant.seconds, variant.worker = time.perf_counter() - start, self._ahead.times.get(variant.id)
        self.compiled.append(variant)
        if self.config.inner == "inductor":
            log.info(self._message(variant, generation))

    @property
    def graphed(self) -> bool:
        """Variants replayed as CUDA graphs here (decided at the first compilation)."""
        return self.replays.on

    def compile_times(self) -> list[dict[str, Any]]:
        """Per variant compiled, in that order: the label and step of its first call, the seconds that
        call waited for it, and where a worker compiled it ahead, the worker's seconds."""
        rows = []
        for variant in self.compiled:
            label, step = self.planner.first_call(variant)
            row = {"variant": variant.id, "label": str(label), "step": step, "seconds": variant.seconds}
            if variant.regions is not None:
                row["blocks"], row["forms"] = variant.regions
            if variant.worker is not None:
                row["worker"] = asdict(variant.worker)
            rows.append(row)
        return rows

    def _message(self, variant: Variant, generation: list[Step]) -> str:
        """Progress: this generation's variants compiled so far, and where this one's time went."""
        label, step = self.planner.first_call(variant)
        ours = {s.variant.id for s in generation}
        done = f"toca_fx: variant {sum(v.id in ours for v in self.compiled)} of {len(ours)} ({label}, first " \
               f"called at step {step}) ready in {variant.seconds:.1f} s"
        w = variant.worker
        by = "" if variant.regions is None else f" by regions: {variant.regions[0]} blocks of {variant.regions[1]} distinct form(s)"
        if w is None:
            return f"{done}, compiled here{by}"
        return (f"{done}, compiled ahead in a worker{by}: queued {w.queued:.1f} s, starting {w.starting:.1f} s, "
                f"compiling {w.compiling:.1f} s")

    def _prefetch(self, first: Variant, args: tuple, generation: list[Step]) -> None:
        """At a generation's first compilation, its other variants go to workers that compile them into
        Inductor's caches meanwhile, where `workers.enabled`."""
        num_steps = len(generation)
        if self.config.inner != "inductor" or num_steps in self._prefetched:
            return
        self._prefetched.add(num_steps)
        graphed = self.graphed
        patches = inductor_patches(variant_options(self.options, first.modes, graphed))
        # A worker traces without this thread's autocast: its graphs would not be the ones called here.
        autocast = any(autocast_dtype(a.device) for a in args if isinstance(a, torch.Tensor))
        ahead = workers.enabled(self.config.parallel_compile, patches) and not autocast
        order = list(dict.fromkeys(s.variant for s in generation if s.variant.fn is None))
        here = order[: _HERE_REGIONAL if self.config.regional else _HERE_WHOLE] if first in order else []
        ahead = ahead and len(order) > len(here)
        log.info(
            f"toca_fx: a {num_steps}-step generation runs {len(order)} variant(s), each compiled at its first call"
            + (f"; {len(order) - len(here)} of them ahead in worker processes (at most {self._ahead.max_workers} at a time)"
               if ahead else "")
        )
        if ahead:
            metas = metas_of(list(args))  # the job is made when a worker is free: no tensors kept
            self._ahead.add({v.id: partial(self._job, v, metas, graphed) for v in order if v not in here})

    def _job(self, variant: Variant, metas: list[Any], graphed: bool) -> bytes:
        """A worker's job: compile `variant` as `compile` will, from the metadata of its inputs."""
        used = self.used(variant)
        buffers = [s.meta(used=i in used) for i, s in enumerate(self.specs)]
        patches = inductor_patches(variant_options(self.options, variant.modes, graphed))
        return workers.job(self.graph(variant), [*metas, *buffers], patches, self.config.regional)
