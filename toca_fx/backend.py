"""The backend: `torch.compile(model, backend=ToCaBackend(config))`.

Dynamo hands over one captured graph at a time. The backend analyses it; if residual branches are
found it returns a `CachedGraph`, a dispatcher that at each call asks the policy which variant this step
is, compiles that variant once (lazily), and runs it with the cache buffers of the graph's `CacheState`
as extra inputs. The step index never enters a graph, so steps never recompile. A graph without
branches is compiled as plain Inductor would, with one warning saying why.
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import torch
import torch.fx as fx

from .analysis.residual import Analysis, find_branches
from .config import ToCaConfig
from .policies.toca import BranchPlan, ToCaPolicy
from .rewrite.variants import buffer_specs, build_variant
from .state import CacheState


class ToCaWarning(UserWarning):
    """A graph, or part of it, is compiled without caching."""


class ToCaBackend:
    """A `torch.compile` backend that adds token-wise feature caching to any DiT."""

    def __init__(self, config: ToCaConfig | None = None):
        self.config = config if config is not None else ToCaConfig()
        self.graphs: list[CachedGraph] = []

    def __call__(self, gm: fx.GraphModule, example_inputs: list[Any], **options: Any) -> Callable:
        dynamic = _dynamic_inputs(gm)
        if dynamic:
            return self._plain(gm, example_inputs, options, f"its inputs have dynamic shapes ({dynamic}); "
                               "toca_fx needs a static token count: use torch.compile(..., dynamic=False)")
        analysis = find_branches(gm.graph)
        if not analysis.branches:
            why = "; ".join(f"{r.name}: {r.reason}" for r in analysis.rejected) or "no x + f(x) adds of [B, N, D] tensors"
            return self._plain(gm, example_inputs, options, f"no cacheable residual branch ({why})")
        if analysis.rejected:
            warnings.warn(
                f"toca_fx: {len(analysis.rejected)} residual branch(es) left uncached: "
                + "; ".join(f"{r.name}: {r.reason}" for r in analysis.rejected),
                ToCaWarning,
                stacklevel=2,
            )
        graph = CachedGraph(gm, analysis, self.config, options)
        self.graphs.append(graph)
        return graph

    def reset(self) -> None:
        """Start a new generation in every compiled graph."""
        for graph in self.graphs:
            graph.state.reset()

    def stats(self) -> dict[str, Any]:
        """Calls, compiles, cache bytes, and per branch the fraction of token rows recomputed."""
        branches = [row for i, g in enumerate(self.graphs) for row in g.branch_stats(i)]
        calls = sum((g.state.calls for g in self.graphs), start=__import__("collections").Counter())
        return {
            "graphs": len(self.graphs),
            "calls": dict(calls),
            "compiles": sum(len(g.compiled) for g in self.graphs),
            "cache_bytes": sum(g.state.nbytes for g in self.graphs),
            "computed_fraction": _fraction(sum(b["rows"] for b in branches), sum(b["capacity"] for b in branches)),
            "branches": branches,
        }

    def _plain(self, gm: fx.GraphModule, example_inputs: list[Any], options: dict, why: str) -> Callable:
        warnings.warn(f"toca_fx: graph compiled without caching: {why}", ToCaWarning, stacklevel=3)
        return _compile(gm, example_inputs, self.config.inner, options)


class CachedGraph:
    """Dispatcher for one captured graph: picks, compiles and runs the variant of each step."""

    def __init__(self, gm: fx.GraphModule, analysis: Analysis, config: ToCaConfig, options: dict):
        self.gm = gm
        self.analysis = analysis
        self.config = config
        self.options = options
        self.policy = ToCaPolicy(config)
        self.state = CacheState(buffer_specs(analysis, config), config.num_steps)
        self.compiled: dict[str, Callable] = {}
        self.variants: dict[str, fx.GraphModule] = {}

    def __call__(self, *args: Any) -> Any:
        variant = self.policy.variant(self.state.step)
        plans = self.policy.plans(variant, self.analysis.branches)
        buffers = self.state.ensure_buffers()
        fn = self.compiled.get(variant)
        if fn is None:
            fn = self.compiled[variant] = _compile(
                self.variant_graph(variant), [*args, *buffers], self.config.inner, self.options
            )
        out = fn(*args, *buffers)
        self.state.record(variant, {i: _rows(p, b.tokens) for (i, p), b in zip(plans.items(), self.analysis.branches)})
        return out

    def variant_graph(self, variant: str) -> fx.GraphModule:
        """The rewritten graph of a variant ("full" or "partial"), before compilation."""
        if variant not in self.variants:
            plans = self.policy.plans(variant, self.analysis.branches)
            self.variants[variant] = build_variant(self.gm, plans, self.config)
        return self.variants[variant]

    def branch_stats(self, graph_index: int) -> list[dict[str, Any]]:
        rows, capacity = self.state.rows, self.state.row_capacity
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
            }
            for b in self.analysis.branches
        ]


def _rows(plan: BranchPlan, tokens: int) -> tuple[int, int]:
    return {"fill": tokens, "rows": plan.k, "reuse": 0}[plan.mode], tokens


def _fraction(num: int, den: int) -> float:
    return num / den if den else 1.0


def _compile(gm: fx.GraphModule, inputs: list[Any], inner: str, options: dict) -> Callable:
    if inner == "eager":
        return gm
    from torch._inductor.compile_fx import compile_fx

    patches = dict(torch._inductor.list_mode_options(options.get("mode")) if options.get("mode") else {})
    patches.update(options.get("options") or {})
    return compile_fx(gm, inputs, config_patches=patches)


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
