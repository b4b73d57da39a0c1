"""The student of router training: the model with every cacheable branch mixed per call,

    out_b = m_b * fresh_b + (1 - m_b) * cache_b,    cache_b <- out_b,

at the branch's cache point (before its adaLN gate), exactly where the backend's "reuse" mode adds the
cache. With m_b in {0, 1} this is the backend's "fill" / "reuse" numerically; a straight-through m_b
carries the gradient to the router. The branches are the ones `toca_fx.analysis` finds in the Dynamo
graph, so no model class or module name is involved. The graph runs eagerly (an `fx.Interpreter`), so
autograd works through it without `torch.compile`'s compilers.
"""
from __future__ import annotations

from typing import Any, Callable

import torch
import torch.fx as fx

from ..analysis.residual import Branch, find_branches


class Student:
    """`student(x, t, y)` runs the model with the current `gates` ([num_branches] or
    [num_branches, batch]; None computes every branch). `reset()` empties the caches."""

    def __init__(self, model: Callable[..., torch.Tensor]):
        self.branches: list[Branch] = []
        self.gates: torch.Tensor | None = None
        self._cache: dict[int, torch.Tensor] = {}
        self._mixed = 0  # branch outputs mixed in the current call: 0 means the graph did not run
        self._compiled = torch.compile(model, backend=self._backend, dynamic=False)

    def __call__(self, *args: Any) -> torch.Tensor:
        self._mixed = 0
        out = self._compiled(*args)
        if self.branches and not self._mixed:
            raise RuntimeError(
                "router training: the model ran without its caches (Dynamo ran it eagerly: recompile limit?)"
            )
        return out

    def reset(self) -> None:
        self._cache.clear()

    def branch_names(self, *args: Any) -> list[str]:
        """Names of the model's cacheable branches, one router column each (captures on first use)."""
        if not self.branches:
            with torch.no_grad():
                self(*args)
            self.reset()
        return [b.name for b in self.branches]

    def mix(self, index: int, fresh: torch.Tensor) -> torch.Tensor:
        self._mixed += 1
        cache = self._cache.get(index)
        if self.gates is None or cache is None:
            out = fresh
        else:
            m = self.gates[index].to(fresh.device, fresh.dtype)
            m = m.view(-1, *[1] * (fresh.dim() - 1)) if m.dim() else m
            out = m * fresh + (1 - m) * cache
        self._cache[index] = out.detach()  # the next step's cache; the router's gradient stays per step
        return out

    def _backend(self, gm: fx.GraphModule, example_inputs: list[Any]) -> Callable:
        analysis = find_branches(gm.graph)
        if not analysis.branches:
            return gm
        if self.branches and [b.name for b in self.branches] != [b.name for b in analysis.branches]:
            raise ValueError(
                "router training supports one graph with cacheable branches (a graph break split the model)"
            )
        self.branches = analysis.branches
        return _Mixed(gm, {b.out: b.index for b in analysis.branches}, self).run


class _Mixed(fx.Interpreter):
    """Runs the captured graph node by node, mixing each branch output with its cache."""

    def __init__(self, gm: fx.GraphModule, outs: dict[fx.Node, int], student: Student):
        super().__init__(gm)
        self.outs = outs
        self.student = student

    def run_node(self, n: fx.Node) -> Any:
        value = super().run_node(n)
        index = self.outs.get(n)
        return value if index is None else self.student.mix(index, value)
