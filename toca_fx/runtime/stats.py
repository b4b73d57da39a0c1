"""What `ToCaBackend.stats()` reports, from the graphs' plans, counters and FLOP counts.

FLOPs are counted once per plan, on demand (`flops.graph_flops` on fakes of the inputs' metadata), so
they cost no compile time and never touch the caches.
"""
from __future__ import annotations

from collections import Counter
from typing import TYPE_CHECKING, Any

from ..analysis.collectives import exchanged_bytes
from .flops import graph_flops

if TYPE_CHECKING:
    from .dispatch import CachedGraph
    from .planner import Variant

UNCACHED = "uncached"  # the key of the captured graph's own FLOPs


class FlopTable:
    """Theoretical FLOPs of one call of each plan (by plan key) and of the captured graph (`UNCACHED`),
    split by branch index (None: the graph outside every branch)."""

    def __init__(self) -> None:
        self.example: list[Any] | None = None  # input metadata: the call's, then the buffers as allocated
        self._by_branch: dict[Any, Counter] = {}

    def by_branch(self, graph: CachedGraph) -> dict[Any, Counter]:
        if self.example is not None:
            with graph.compiler.amp():
                self._count(graph)
        return self._by_branch

    def _count(self, graph: CachedGraph) -> None:
        n_args = len(self.example) - len(graph.layout)
        if UNCACHED not in self._by_branch:
            self._by_branch[UNCACHED] = graph_flops(graph.gm, self.example[:n_args])
        for variant in graph.compiler.compiled:
            if variant.key not in self._by_branch:
                self._by_branch[variant.key] = graph_flops(graph.compiler.graph(variant), self.example)


def plan_calls(graph: CachedGraph) -> list[tuple[Variant, int]]:
    """Each variant called since the counters were last cleared, with its calls."""
    return [(graph.planner.variants[i], n) for i, n in graph.plan_calls.items()]


def branch_rows(graph: CachedGraph, graph_index: int) -> list[dict[str, Any]]:
    """Per branch: token rows computed over the calls so far, of how many, and its own FLOP ratio."""
    flops = graph.flops_by_branch
    rows, capacity, done = Counter(), Counter(), Counter()
    for variant, n in plan_calls(graph):
        for branch, (computed, total) in variant.rows.items():
            rows[branch] += n * computed
            capacity[branch] += n * total
        for branch, f in flops.get(variant.key, {}).items():
            done[branch] += n * f
    uncached = flops.get(UNCACHED, Counter())
    calls = sum(graph.plan_calls.values())
    return [
        {
            "graph": graph_index,
            "branch": b.index,
            "name": b.name,
            "kind": b.kind,
            "tokens": b.tokens,
            "rows": rows[b.index],
            "capacity": capacity[b.index],
            "computed_fraction": fraction(rows[b.index], capacity[b.index]),
            "flops_ratio": fraction(done[b.index], calls * uncached[b.index]),
        }
        for b in graph.analysis.branches
    ]


def summary(graphs: list[CachedGraph], cache_bytes: int) -> dict[str, Any]:
    """`ToCaBackend.stats()` of these graphs, whose caches hold `cache_bytes`."""
    branches = [row for i, g in enumerate(graphs) for row in branch_rows(g, i)]
    calls = sum((g.calls for g in graphs), start=Counter())
    return {
        "graphs": len(graphs),
        "calls": {str(label): n for label, n in calls.items()},
        "compiles": sum(len(g.compiler.compiled) for g in graphs),
        "cache_bytes": cache_bytes,
        "computed_fraction": fraction(sum(b["rows"] for b in branches), sum(b["capacity"] for b in branches)),
        "flops_ratio": flops_ratio(graphs),
        "exchanged_bytes": exchanges(graphs),
        "branches": branches,
        "compile_times": [{"graph": i, **row} for i, g in enumerate(graphs) for row in g.compiler.compile_times()],
    }


def flops_ratio(graphs: list[CachedGraph]) -> float:
    """Theoretical FLOPs of all calls so far relative to running them without caching."""
    done = uncached = 0
    for g in graphs:
        flops = g.flops
        for variant, n in plan_calls(g):
            done += n * flops[variant.key]
            uncached += n * flops.get(UNCACHED, 0)
    return fraction(done, uncached)


def exchanges(graphs: list[CachedGraph]) -> dict[str, int]:
    """Bytes this rank received from the other ranks (context parallelism's collectives) over the calls
    so far, and as many calls of the captured graphs would have received: 0 and 0 without collectives."""
    done = uncached = 0
    for g in graphs:
        captured = exchanged_bytes(g.gm.graph)
        for variant, n in plan_calls(g):
            done += n * exchanged_bytes(g.compiler.graph(variant).graph)
            uncached += n * captured
    return {"calls": done, "uncached": uncached}


def fraction(num: int, den: int) -> float:
    return num / den if den else 1.0
