"""`explain(model, *args, **kwargs)`: what the pass finds in a model, and why anything is left uncached.

It captures the model's graphs with `torch._dynamo.explain` (which also reports graph breaks and
their reasons; like it, this resets Dynamo's caches), runs the residual analysis on each graph, and
returns a `Report`: the cached branches (kind, tokens, hidden size, cache bytes under the default
config) and what was not cached, with why.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx as fx

from .analysis.residual import find_branches
from .analysis.graphs import shape
from .config import ToCaConfig
from .rewrite.layout import branch_bytes


@dataclass
class Report:
    """`branches`: one dict per cached branch (graph, name, kind, tokens, hidden, cache_bytes, modes: the
    plan modes it allows, and why_whole: why it is cached only whole, empty if it can recompute rows).
    `not_cached`: one dict per residual branch, graph or graph break left out (what, why)."""

    graphs: int = 0
    graph_breaks: int = 0
    branches: list[dict[str, Any]] = field(default_factory=list)
    not_cached: list[dict[str, str]] = field(default_factory=list)

    def kinds(self) -> Counter[str]:
        """Number of cached branches of each kind."""
        return Counter(b["kind"] for b in self.branches)

    @property
    def cache_bytes(self) -> int:
        return sum(b["cache_bytes"] for b in self.branches)

    def __str__(self) -> str:
        head = (f"toca_fx.explain: {self.graphs} graph(s), {self.graph_breaks} graph break(s), "
                f"{len(self.branches)} cached branch(es), {_size(self.cache_bytes)} of cache")
        rows = [("graph", "branch", "kind", "tokens", "hidden", "cache", "modes")]
        rows += [(str(b["graph"]), b["name"], b["kind"], str(b["tokens"]), str(b["hidden"]), _size(b["cache_bytes"]),
                  ",".join(b["modes"])) for b in self.branches]
        widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
        lines = [head, *("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)]
        whole = [b for b in self.branches if b["why_whole"]]
        if whole:
            lines.append("cached whole only (reused, never recomputed by rows):")
            lines += [f"  {b['name']}: {b['why_whole']}" for b in whole]
        if self.not_cached:
            lines.append("not cached:")
            lines += [f"  {n['what']}: {n['why']}" for n in self.not_cached]
        return "\n".join(lines)


def explain(model: Any, *args: Any, **kwargs: Any) -> Report:
    """Analyse `model` as `torch.compile(model, backend=toca_backend)` would on these inputs."""
    with torch.no_grad():
        captured = torch._dynamo.explain(model)(*args, **kwargs)
    report = Report(graphs=captured.graph_count, graph_breaks=captured.graph_break_count)
    for i, gm in enumerate(captured.graphs):
        _add_graph(report, i, gm)
    for reason in captured.break_reasons:
        why = " ".join(line.strip() for line in reason.reason.strip().splitlines()[:2])  # what, and why
        report.not_cached.append({"what": f"graph break at {_where(reason.user_stack)}", "why": why})
    return report


# ---------------------------------------------------------------------------------------------

def _add_graph(report: Report, index: int, gm: fx.GraphModule) -> None:
    analysis = find_branches(gm.graph)
    nbytes = branch_bytes(analysis, ToCaConfig())
    for b in analysis.branches:
        report.branches.append({
            "graph": index,
            "name": b.name,
            "kind": b.kind,
            "tokens": b.tokens,
            "hidden": shape(b.out)[-1],
            "cache_bytes": nbytes[b.index],
            "modes": b.modes,
            "why_whole": b.whole_only,
        })
    for r in analysis.rejected:
        report.not_cached.append({"what": f"graph {index} {r.name}", "why": r.reason})
    if not analysis.branches and not analysis.rejected:
        ops = sum(1 for n in gm.graph.nodes if n.op in ("call_function", "call_method"))
        report.not_cached.append({"what": f"graph {index} ({ops} ops)", "why": "no x + f(x) adds of [B, N, D] tensors"})


def _where(stack: list[Any]) -> str:
    if not stack:
        return "?"
    frame = stack[-1]
    return f"{frame.filename.rsplit('/', 1)[-1]}:{frame.lineno} in {frame.name}"


def _size(nbytes: int) -> str:
    for unit in ("B", "KiB", "MiB"):
        if nbytes < 1024:
            return f"{nbytes:.0f} {unit}" if unit == "B" else f"{nbytes:.1f} {unit}"
        nbytes /= 1024
    return f"{nbytes:.1f} GiB"
