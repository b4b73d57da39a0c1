"""The backend: `torch.compile(model, backend=ToCaBackend(config))`.

Dynamo hands over one captured graph at a time. The backend analyses it; if residual branches are
found it returns a `CachedGraph`, a dispatcher that at each call asks the policy which variant this step
is, compiles that variant once (lazily), and runs it with the cache buffers of the graph's `CacheState`
as extra inputs. The step index never enters a graph, so steps never recompile. A graph without
branches is compiled as plain Inductor would, with one warning saying why.
"""
from __future__ import annotations

import logging
import time
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from functools import partial
from typing import Any, Callable, NamedTuple

import torch
import torch.fx as fx

from .compile import workers
from .analysis.residual import Analysis, find_branches
from .config import ToCaConfig
from .compile.cudagraphs import CudaGraphed
from .runtime.flops import graph_flops, shapes_of, spec_shape
from .compile.inductor import TensorMeta, compile_inductor
from .policies.toca import BranchPlan, ToCaPolicy, drop_dead_fills, plan_key
from .compile.regions import Regional, compile_graph, mark_stream
from .rewrite.variants import buffer_specs, build_variant, tag_branch
from .runtime.shapes import PerShape
from .runtime.state import CacheState
from .compile.store_placement import PlaceStores


log = logging.getLogger("toca_fx")  # INFO: each variant's compilation, as it ends (they can take minutes)


class ToCaWarning(UserWarning):
    """A graph, or part of it, is compiled without caching."""


class ToCaBackend:
    """A `torch.compile` backend that adds token-wise feature caching to any DiT."""

    def __init__(self, config: ToCaConfig | None = None):
        self.config = config if config is not None else ToCaConfig()
        self.graphs: list[CachedGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **options: Any) -> Callable:
        if _dynamic_inputs(gm):  # the token count must be static: a static graph per concrete shape
            return PerShape(gm, lambda static, inputs: self._static(static, inputs, options))
        return self._static(gm, example_inputs, options)

    def _static(self, gm: fx.GraphModule, example_inputs: list[Any], options: dict) -> Callable:
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
        graph = CachedGraph(gm, analysis, self.config, options)
        self.graphs.append(graph)
        return graph

    def reset(self, num_steps: int | None = None) -> None:
        """Start a new generation in every compiled graph; of `num_steps` calls per stream, if given."""
        if num_steps is not None:
            self.config = replace(self.config, num_steps=num_steps)
        for graph in self.graphs:
            graph.state.reset(num_steps)

    def reset_stats(self) -> None:
        """Count from zero again: `stats()` then describes only the calls after this one."""
        for graph in self.graphs:
            graph.state.clear_counters()

    def stats(self) -> dict[str, Any]:
        """Calls, compiles, cache bytes, the theoretical FLOPs of the calls so far relative to running
        them uncached, per branch the fraction of token rows recomputed and its own FLOP ratio (scoring
        and gathering included), and per variant compiled its compile time (`CachedGraph.compile_times`)."""
        branches = [row for i, g in enumerate(self.graphs) for row in g.branch_stats(i)]
        calls = sum((g.state.calls for g in self.graphs), start=Counter())
        return {
            "graphs": len(self.graphs),
            "calls": dict(calls),
            "compiles": sum(g.n_compiled for g in self.graphs),
            "cache_bytes": sum(g.state.nbytes for g in self.graphs),
            "computed_fraction": _fraction(sum(b["rows"] for b in branches), sum(b["capacity"] for b in branches)),
            "flops_ratio": _flops_ratio(self.graphs),
            "branches": branches,
            "compile_times": [{"graph": i, **row} for i, g in enumerate(self.graphs) for row in g.compile_times()],
        }

    def _plain(self, gm: fx.GraphModule, example_inputs: list[Any], options: dict, why: str) -> Callable:
        warnings.warn(f"toca_fx: graph compiled without caching: {why}", ToCaWarning, stacklevel=3)
        return _compile(gm, example_inputs, self.config.inner, options, wide_rows=False)


@dataclass(eq=False)
class _Variant:
    """One distinct plan and what running it takes, each part made on first use. Steps with equal
    plans share it, so the hot path finds everything here without hashing the plan key."""

    id: int  # its position in `CachedGraph._variants`: the key of `CacheState.plan_calls`
    key: tuple  # the plan key: ((branch index, BranchPlan), ...)
    rows: dict[int, tuple[int, int]]  # branch index -> (token rows computed, rows without cache) per call
    graph: fx.GraphModule | None = None
    used: frozenset[int] | None = None  # indices of the buffers its graph reads or writes
    fn: Callable | None = None  # compiled `graph`
    seconds: float = 0.0  # its first call's wait for `fn`: compiling it, or its worker and loading it
    worker: workers.WorkerTimes | None = None  # where a worker compiled it ahead
    regions: tuple[int, int] | None = None  # compiled by regions: (blocks, distinct forms compiled)


class _Step(NamedTuple):
    label: str
    variant: _Variant


class CachedGraph:
    """Dispatcher for one captured graph: picks, compiles and runs the variant of each step.

    Variants with the same plans (e.g. a partial step that recomputes every token) share one graph and
    one compilation.
    """

    def __init__(self, gm: fx.GraphModule, analysis: Analysis, config: ToCaConfig, options: dict):
        self.gm = gm
        self.analysis = analysis
        self.config = config
        self.options = options
        self.policy = config.policy if config.policy is not None else ToCaPolicy(config)
        self.state = CacheState(buffer_specs(analysis, config), config.num_steps, config.calls_per_step)
        self._generations: dict[int, list[_Step]] = {}  # num_steps -> each step's plan
        self._variants: dict[tuple, _Variant] = {}  # plan key -> its variant, one per distinct plan
        self._labels: dict[str, _Variant] = {}  # label -> variant of its first step (variant_graph, label_flops)
        self._compiled: list[_Variant] = []  # in the order compiled
        self._flops: dict[Any, Counter] = {}  # plan key or "uncached" -> FLOPs by branch index
        self._example: list[Any] | None = None
        self._pool = None
        self._ahead = workers.Prefetch()  # workers compiling variants before their first calls
        self._prefetched: set[int] = set()  # num_steps of the generations whose variants went to it
        for branch in analysis.branches:
            tag_branch(branch)
        mark_stream(analysis.branches)

    def __call__(self, *args: Any) -> Any:
        # The hot path: per call, no hashing of plan keys and no loop over branches.
        label, variant = self._plan(self.state.step)
        if variant.fn is None:
            self._compile(variant, args)
        out = variant.fn(*args, *self.state.buffers(variant.used))
        self.state.record(label, variant.id)
        return out

    def variant_graph(self, label: str) -> fx.GraphModule:
        """The rewritten graph of the first step the policy labels `label` ("full", "partial"), uncompiled."""
        if label not in self._labels:
            self._plan(0)
        return self._graph(self._labels[label])

    @property
    def flops(self) -> dict[Any, int]:
        """Theoretical FLOPs of one call of each plan compiled so far (by plan key), and "uncached"."""
        return {key: sum(by_branch.values()) for key, by_branch in self.flops_by_branch.items()}

    @property
    def flops_by_branch(self) -> dict[Any, Counter]:
        """As `flops`, split by branch index (None: the graph outside every branch)."""
        if self._example is not None:
            n_args = len(self._example) - len(self.state.specs)
            if "uncached" not in self._flops:
                self._flops["uncached"] = graph_flops(self.gm, self._example[:n_args])
            for variant in self._compiled:
                if variant.key not in self._flops:
                    self._flops[variant.key] = graph_flops(self._graph(variant), self._example)
        return self._flops

    def label_flops(self, label: str) -> int:
        """Theoretical FLOPs of one call of the step labelled `label` ("uncached" for the original)."""
        return self.flops["uncached"] if label == "uncached" else self.flops[self._labels[label].key]

    def branch_stats(self, graph_index: int) -> list[dict[str, Any]]:
        flops = self.flops_by_branch
        rows, capacity, done = Counter(), Counter(), Counter()  # per branch, over the calls so far
        for variant, n in self._plan_calls():
            for branch, (computed, total) in variant.rows.items():
                rows[branch] += n * computed
                capacity[branch] += n * total
            for branch, f in flops.get(variant.key, {}).items():
                done[branch] += n * f
        uncached = flops.get("uncached", Counter())
        calls = sum(self.state.plan_calls.values())
        return [
            {
                "graph": graph_index,
                "branch": b.index,
                "name": b.name,
                "kind": b.kind,
                "tokens": b.tokens,
                "rows": rows[b.index],
                "capacity": capacity[b.index],
                "computed_fraction": _fraction(rows[b.index], capacity[b.index]),
                "flops_ratio": _fraction(done[b.index], calls * uncached[b.index]),
            }
            for b in self.analysis.branches
        ]

    def compile_times(self) -> list[dict[str, Any]]:
        """Per variant compiled, in that order: the label and step of its first call, the seconds that
        call waited for it, and where a worker compiled it ahead, the worker's seconds."""
        rows = []
        for variant in self._compiled:
            label, step = self._first_call(variant)
            row = {"variant": variant.id, "label": label, "step": step, "seconds": variant.seconds}
            if variant.regions is not None:
                row["blocks"], row["forms"] = variant.regions
            if variant.worker is not None:
                row["worker"] = asdict(variant.worker)
            rows.append(row)
        return rows

    @property
    def n_compiled(self) -> int:
        return len(self._compiled)

    def _plan(self, step: int) -> _Step:
        """The policy's plan for a step: its label and variant."""
        num_steps = self.state.num_steps
        if num_steps not in self._generations:
            self._generations[num_steps] = self._plan_generation(num_steps)
        return self._generations[num_steps][step]

    def _plan_generation(self, num_steps: int) -> list[_Step]:
        branches = self.analysis.branches
        generation = drop_dead_fills([self.policy.plans(s, num_steps, branches) for s in range(num_steps)])
        steps = []
        for step, plans in enumerate(generation):
            label, variant = self.policy.label(step, num_steps), self._variant(plans)
            self._labels.setdefault(label, variant)
            steps.append(_Step(label, variant))
        return steps

    def _variant(self, plans: dict[int, BranchPlan]) -> _Variant:
        """The variant of `plans`, one per distinct plan: steps with equal plans share its graph."""
        key = plan_key(plans)
        if key not in self._variants:
            rows = {b.index: _rows(plans[b.index], b.tokens) for b in self.analysis.branches}
            self._variants[key] = _Variant(len(self._variants), key, rows)
        return self._variants[key]

    def _plan_calls(self) -> list[tuple[_Variant, int]]:
        """Each variant called since the counters were last cleared, with its calls."""
        variants = list(self._variants.values())  # in the order of their ids
        return [(variants[i], n) for i, n in self.state.plan_calls.items()]

    def _graph(self, variant: _Variant) -> fx.GraphModule:
        if variant.graph is None:
            variant.graph = build_variant(self.gm, dict(variant.key), self.config)
        return variant.graph

    def _buffers_used(self, gm: fx.GraphModule) -> frozenset[int]:
        """Indices of the buffers that `gm` reads or writes."""
        targets = {n.target for n in gm.graph.nodes if n.op == "placeholder" and n.users}
        return frozenset(i for i, s in enumerate(self.state.specs) if f"toca_{s.name}" in targets)

    def _compile(self, variant: _Variant, args: tuple) -> None:
        self._prefetch(variant, args)
        inputs = self._inputs(variant, args)
        if self._example is None:  # shapes only, for counting FLOPs on demand (buffers as allocated)
            self._example = shapes_of(list(args)) + [spec_shape(s) for s in self.state.specs]
        graphed = self._graphed(args)
        start = time.perf_counter()
        with self._ahead.compiling(variant.id):  # after its worker, if one compiles it into the caches
            fn = _compile(self._graph(variant), inputs, self.config.inner, self._options(variant, graphed), regional=self.config.regional)
        variant.regions = (fn.blocks, fn.forms) if isinstance(fn, Regional) else None
        variant.fn = self._cuda_graphed(fn, inputs) if graphed else fn
        variant.seconds, variant.worker = time.perf_counter() - start, self._ahead.times.get(variant.id)
        self._compiled.append(variant)
        if self.config.inner == "inductor":
            log.info(self._compiled_message(variant))

    def _compiled_message(self, variant: _Variant) -> str:
        """Progress: this generation's variants compiled so far, and where this one's time went."""
        label, step = self._first_call(variant)
        ours = {s.variant.id for s in self._generations[self.state.num_steps]}
        done = f"toca_fx: variant {sum(v.id in ours for v in self._compiled)} of {len(ours)} ({label}, first " \
               f"called at step {step}) ready in {variant.seconds:.1f} s"
        w = variant.worker
        by = "" if variant.regions is None else f" by regions: {variant.regions[0]} blocks of {variant.regions[1]} distinct form(s)"
        if w is None:
            return f"{done}, compiled here{by}"
        return (f"{done}, compiled ahead in a worker{by}: queued {w.queued:.1f} s, starting {w.starting:.1f} s, "
                f"compiling {w.compiling:.1f} s")

    def _first_call(self, variant: _Variant) -> tuple[str, int]:
        """The label and step of the first step that runs `variant`."""
        return next((s.label, i) for steps in self._generations.values() for i, s in enumerate(steps) if s.variant is variant)

    def _prefetch(self, first: _Variant, args: tuple) -> None:
        """At a generation's first compilation, its other variants go to workers that compile them into
        Inductor's caches meanwhile, where `workers.enabled`."""
        num_steps = self.state.num_steps
        if self.config.inner != "inductor" or num_steps in self._prefetched:
            return
        self._prefetched.add(num_steps)
        graphed = self._graphed(args)
        ahead = workers.enabled(self.config.parallel_compile, _patches(self._options(first, graphed)))
        order = list(dict.fromkeys(s.variant for s in self._generations[num_steps] if s.variant.fn is None))
        # By regions, a variant compiles here in about the time a worker takes to start (PixArt-alpha
        # 1024 on the H100: 6-13 s against 8-11 s), so the first two compile here, the rest ahead.
        here = order[: 2 if self.config.regional else 1] if first in order else []
        ahead = ahead and len(order) > len(here)
        log.info(
            f"toca_fx: a {num_steps}-step generation runs {len(order)} variant(s), each compiled at its first call"
            + (f"; {len(order) - len(here)} of them ahead in worker processes (at most {self._ahead.max_workers} at a time)"
               if ahead else "")
        )
        if not ahead:
            return
        metas = [TensorMeta.of(a) for a in args]  # the job made when a worker is free: no tensors kept
        self._ahead.add({v.id: partial(self._job, v, metas, graphed) for v in order if v not in here})

    def _job(self, variant: _Variant, metas: list[Any], graphed: bool) -> bytes:
        """A worker's job: compile `variant` as `_compile` will, from the metadata of its inputs."""
        used = self._used(variant)
        buffers = [TensorMeta.contiguous(s.shape if i in used else (0,), s.dtype, s.device) for i, s in enumerate(self.state.specs)]
        patches = _patches(self._options(variant, graphed))
        return workers.job(self._graph(variant), [*metas, *buffers], patches, self.config.regional)

    def _used(self, variant: _Variant) -> frozenset[int]:
        if variant.used is None:
            variant.used = self._buffers_used(self._graph(variant))
        return variant.used

    def _inputs(self, variant: _Variant, args: tuple) -> list[Any]:
        """`args`, the buffers `variant` uses and empty stand-ins for the others, whichever variants
        allocated them: its compilation, and so its cache key, is the same in any order of first calls
        (and a worker's, from `_job`, is this one's)."""
        used = self._used(variant)
        buffers = self.state.buffers(used)
        return [*args, *(b if i in used else b.new_empty(0) for i, b in enumerate(buffers))]

    def _graphed(self, args: tuple) -> bool:
        """Whether variants are captured as CUDA graphs here (`CudaGraphed`) rather than by Inductor."""
        # Captures assume fixed buffers; separate call streams pass different ones.
        return self.options.get("mode") == "reduce-overhead" and args[0].is_cuda and len(self.state.steps) == 1

    def _options(self, variant: _Variant, graphed: bool) -> dict:
        """The `torch.compile` options of a variant's compilation."""
        modes = {plan.mode for _, plan in variant.key}
        chains = "reuse" in modes and "rows" not in modes  # rows plans read the stream at every block
        options = {k: v for k, v in self.options.items() if not (graphed and k == "mode")}
        patches = {**(_CACHING_PATCHES if modes != {"compute"} else {}), **(_REUSE_PATCHES if chains else {})}
        options["options"] = {"post_grad_custom_post_pass": PlaceStores(), **patches, **(options.get("options") or {})}
        return options

    def _cuda_graphed(self, fn: Callable, inputs: list[Any]) -> CudaGraphed:
        if self._pool is None:
            self._pool = torch.cuda.graph_pool_handle()
        n_args = len(inputs) - len(self.state.specs)
        static = [i >= n_args or hasattr(x, "_dynamo_static_input_type") for i, x in enumerate(inputs)]
        return CudaGraphed(fn, static, self._pool)


# Inductor times each pointwise kernel's configs at its first run, on the critical path of a first
# generation. When a caching variant's kernels still differed from block to block (before blocks read
# their rows through row ids, rewrite/variants.py), PixArt-1024's preset timed 485 kernels for 28.0 s of
# its 98.1 s compile (plain Inductor 17 kernels, 1.1 s); without timing, 100 kernels (reductions) for
# 3.7 s, and a generation ran in 294.9 ms against 296.5 (H100, one run). Not measured again since
# blocks share kernels. The plain model's graph (ratio 1.0) keeps Inductor's.
_CACHING_PATCHES = {"triton.autotune_pointwise": False}

# With branches reused and none choosing rows, nothing reads the residual stream between the reused
# adds, and Inductor fuses the whole chain into the next reduction (DiT: 56 adds into the final layer
# norm, whose loop reads the patch embedding transposed): 6.1 ms for an all-reuse step of DiT-XL/2 on
# the H100, 1.2 ms with fused groups capped at 16 nodes. Other graphs keep Inductor's default: the cap
# slowed full steps (by 5% at 8) and the presets' partial steps with rows (by 8-18% at 16).
_REUSE_PATCHES = {"max_fusion_size": 16}


def _rows(plan: BranchPlan, tokens: int) -> tuple[int, int]:
    return {"fill": tokens, "compute": tokens, "rows": plan.k, "reuse": 0}[plan.mode], tokens


def _flops_ratio(graphs: list[CachedGraph]) -> float:
    """Theoretical FLOPs of all calls so far relative to running them without caching."""
    done = uncached = 0
    for g in graphs:
        flops = g.flops
        for variant, n in g._plan_calls():
            done += n * flops[variant.key]
            uncached += n * flops.get("uncached", 0)
    return _fraction(done, uncached)


def _fraction(num: int, den: int) -> float:
    return num / den if den else 1.0


def _compile(
    gm: fx.GraphModule, inputs: list[Any], inner: str, options: dict, wide_rows: bool = True, regional: bool = False
) -> Callable:
    """`gm` as `inner` runs it: by regions (`toca_fx.compile.regions`) where `regional` and blocks repeat, else whole."""
    if inner == "eager":
        return gm
    return compile_graph(gm, inputs, partial(compile_inductor, patches=_patches(options), wide_rows=wide_rows), regional)


def _patches(options: dict) -> dict:
    """The Inductor config patches of `torch.compile` options: its mode's, then its "options"."""
    patches = dict(torch._inductor.list_mode_options(options.get("mode")) if options.get("mode") else {})
    patches.update(options.get("options") or {})
    return patches


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
