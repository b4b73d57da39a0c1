"""Forecasting against reuse on the embedded digits DiT, at matched theoretical speedups.

    python benchmarks/forecast_quality.py --samples 50 --out benchmarks/results/

Per interval N (in the order given), settings at the same FLOPs, each pair on one schedule: FORA (whole branches reused between full steps
every N) against the same schedule forecasting (order 1 and 2, TaylorSeer's Taylor factors); ToCa
(interval N, ratio r: self-attention reused, chosen MLP tokens recomputed) against the hybrid (the
same, every token not recomputed forecast at order 1, r = 0.1); and 25 / N DDIM steps. FLOP ratios are counted
from the rewritten graphs (`backend.stats()`); quality as in quality_curve.py (accuracy, Frechet
distance in the classifier's features, PSNR and relative L2 against the uncached sample from the same
noise). Writes forecast_quality.json and forecast_quality.md after each setting.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.quality_curve import _row  # noqa: E402
from toca_fx import FORAPolicy, ToCaBackend, ToCaConfig  # noqa: E402
from toca_fx.eval.sampling import ddim_sample  # noqa: E402
from toca_fx.models.digits import RESOLUTION, load_digits_classifier, load_digits_dit  # noqa: E402

RATIO = 0.1  # ToCa's and the hybrid's base ratio


def settings(steps: int, intervals: list[int]) -> list[tuple[str, str, ToCaConfig]]:
    """(name, family, config) of every cached setting, interval by interval."""
    rows = []
    for n in intervals:
        rows.append((f"FORA N={n} (reuse)", "FORA reuse", ToCaConfig(policy=FORAPolicy(n), num_steps=steps)))
        for order in (1, 2):
            policy = FORAPolicy(n, forecast=True)
            rows.append((f"FORA N={n} forecast order {order}", f"forecast order {order}",
                         ToCaConfig(policy=policy, num_steps=steps, forecast_order=order)))
        r = RATIO
        rows.append((f"ToCa N={n} r={r} (reuse)", "ToCa reuse", ToCaConfig(interval=n, ratio=r, num_steps=steps)))
        rows.append((f"hybrid N={n} r={r} (order 1)", "hybrid",
                     ToCaConfig(interval=n, ratio=r, num_steps=steps, forecast_order=1)))
        rows.append((f"{round(steps / n)} DDIM steps", "fewer steps", None))
    return rows


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=50)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--intervals", default="4,6,2", help="comma-separated full-step intervals, run in this order")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = p.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_digits_dit(device=device).eval()
    classifier = load_digits_classifier(device=device)
    labels = torch.arange(10, device=device).repeat(args.samples // 10)
    shape = (1, RESOLUTION, RESOLUTION)

    def sample(fn: Callable, steps: int = args.steps) -> torch.Tensor:
        return ddim_sample(fn, labels, shape, steps=steps, seed=0, null_label=model.num_classes)

    base = sample(model)
    rows = [_row("uncached", "uncached", 1.0, base, base, labels, classifier)]
    for name, family, config in settings(args.steps, [int(n) for n in args.intervals.split(",")]):
        rows.append(_run(name, family, config, model, sample, args.steps, (base, labels, classifier)))
        print(json.dumps(rows[-1]), flush=True)
        (args.out / "forecast_quality.json").write_text(json.dumps(rows, indent=1))  # what is done, as it is done
        (args.out / "forecast_quality.md").write_text(_table(rows, args) + "\n")
    print(_table(rows, args))


def _run(name: str, family: str, config: ToCaConfig | None, model, sample: Callable, steps: int, ref: tuple) -> dict:
    """One setting's row: a cached one (config), or fewer DDIM steps (None; `name` starts with their count)."""
    if config is None:
        fewer = int(name.split()[0])
        return _row(name, family, fewer / steps, sample(model, fewer), *ref)
    backend = ToCaBackend(replace(config, inner="eager"))
    torch._dynamo.reset()
    out = sample(torch.compile(model, backend=backend, dynamic=False))
    return _row(name, family, backend.stats()["flops_ratio"], out, *ref)

def _table(rows: list[dict], args) -> str:
    head = (f"digits DiT, {args.samples} samples, {args.steps} DDIM steps, guidance 1.5, seed 0; "
            f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}; python benchmarks/forecast_quality.py "
            f"--samples {args.samples} --steps {args.steps}")
    lines = [head, "", "| setting | family | theoretical speedup | accuracy | Frechet distance | PSNR vs uncached (dB) | rel L2 |",
             "|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["speedup"] > 1.0, round(r["speedup"], 1), r["family"])):
        lines.append(f"| {r['setting']} | {r['family']} | {r['speedup']:.2f}x | {r['accuracy']:.3f} | "
                     f"{r['frechet']:.1f} | {r['psnr']:.1f} | {r['rel_l2']:.4f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
