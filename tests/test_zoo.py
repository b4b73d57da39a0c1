"""Every DiT-style transformer class of the installed diffusers (tests/diffusers_zoo.py), tiny, through
one short loop: exact at ratio 1.0, cached at ratio 0.5, with the number of branches each caches.

The model is traced once: both backends compile the same Dynamo graphs (`_Both`), so the suite pays
one trace per class. `python -m tests.test_zoo` writes the table of docs/supported_models.md."""
from __future__ import annotations

import re
import sys
from typing import Any

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig

from tests.diffusers_zoo import CACHED, ZOO, build, loop_inputs

STEPS, INTERVAL = 3, 2  # a full step, a partial step, a full step
# At ratio 0.5 the partial step serves rows cached one step before, while the latent drifts by 5% of a
# unit Gaussian: a stale row is off by about one step's change of its branch.
REL_ERROR_BOUND = 0.2


class _Both:
    """A Dynamo backend that compiles each graph with several backends and runs the one selected."""

    def __init__(self, backends: dict[str, ToCaBackend]):
        self.backends, self.current = backends, next(iter(backends))

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]):
        compiled = {name: backend(gm, example_inputs) for name, backend in self.backends.items()}
        return lambda *args: compiled[self.current](*args)


def run_zoo(name: str) -> dict[str, Any]:
    """Outputs of the uncached model and of both ratios over the loop, and the branches cached."""
    model, inputs = build(name), loop_inputs(name, STEPS)
    config = dict(interval=INTERVAL, num_steps=STEPS, self_attn="recompute", inner="eager")
    both = _Both({"exact": ToCaBackend(ToCaConfig(ratio=1.0, **config)),
                  "half": ToCaBackend(ToCaConfig(ratio=0.5, **config))})
    torch._dynamo.reset()
    fast = torch.compile(model, backend=both, dynamic=False)
    out: dict[str, Any] = {}
    with torch.no_grad():
        out["eager"] = [_first(model(**kwargs)) for kwargs in inputs]
        for which in both.backends:
            both.current = which
            out[which] = [_first(fast(**kwargs)) for kwargs in inputs]
    # The branches, read off the graphs: stats() would also count FLOPs, which is slow to do per class.
    out["branches"] = [b for g in both.backends["half"].graphs for b in g.analysis.branches]
    return out


def _first(result: Any) -> torch.Tensor:
    while isinstance(result, (tuple, list)):
        result = result[0]
    return result


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).float().norm() / b.float().norm()).item()


@pytest.mark.parametrize("name", list(ZOO))
def test_zoo_class(name):
    run = run_zoo(name)
    branches = run["branches"]
    assert len(branches) == CACHED[name], [b.name for b in branches]
    for step, (a, b) in enumerate(zip(run["exact"], run["eager"])):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"ratio 1.0, step {step}")
    half, eager = run["half"], run["eager"]
    for step in (0, 2):
        torch.testing.assert_close(half[step], eager[step], rtol=1e-5, atol=1e-5, msg=f"full step {step}")
    error = relative_error(half[1], eager[1])
    assert torch.isfinite(half[1]).all() and error < REL_ERROR_BOUND
    if branches:
        assert error > 0, "the partial step must serve cached values"


def table_row(name: str) -> str:
    """One line of docs/supported_models.md: what is cached, how, and the error at ratio 0.5."""
    import toca_fx
    from collections import Counter

    report = toca_fx.explain(build(name), **loop_inputs(name, 1)[0])
    run = run_zoo(name)
    adds = [n for n in report.not_cached if not n["what"].startswith("graph break") and not n["what"].endswith("ops)")]
    kinds = Counter(b["kind"] for b in report.branches)
    whole = [b for b in report.branches if "rows" not in b["modes"]]
    reasons = sorted({re.sub(r" \(\w+\)|\b\w+_\d+\b|transformer_blocks\S*", "", n["why"]).split(";")[0] for n in adds})
    cls = type(build(name)).__name__
    return (f"| {cls} | {len(report.branches)} / {len(report.branches) + len(adds)} | "
            f"{', '.join(f'{k} {v}' for k, v in sorted(kinds.items()))} | {len(whole)} | "
            f"{relative_error(run['half'][1], run['eager'][1]):.4f} | {report.graphs} | "
            f"{'; '.join(reasons)} |")


if __name__ == "__main__":
    print("| class | cached / residual adds | kinds | whole only | error at 0.5 | graphs | not cached |")
    print("|---|---|---|---|---|---|---|")
    for name in sys.argv[1:] or list(ZOO):
        print(table_row(name), flush=True)
