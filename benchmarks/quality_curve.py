"""Quality against theoretical speedup on the embedded digits DiT: toca_fx and two naive alternatives.

    python benchmarks/quality_curve.py --samples 1000 --out docs/

- toca_fx at several (interval, ratio) settings; FLOP ratio from `backend.stats()` (counted from graphs).
- fewer sampling steps: DDIM with k < S steps (FLOP ratio k / S).
- whole-step reuse: every other (third, ...) call returns the previous call's output unchanged.
Every sample starts from the same noise; PSNR and relative L2 compare with the uncached S-step sample.
Writes quality.json, a markdown table (quality_table.md) and a plot (quality_curve.png, with matplotlib).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Callable

import torch

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.eval.metrics import classifier_accuracy, digits_frechet_distance, psnr, relative_l2
from toca_fx.models.digits import RESOLUTION, load_digits_classifier, load_digits_dit
from toca_fx.eval.sampling import ddim_sample

TOCA_SETTINGS = [(2, 0.5), (3, 0.3), (4, 0.3), (5, 0.2), (6, 0.1), (8, 0.1)]


class StepReuse:
    """Whole-step reuse: compute every `every`-th call, return the last output in between."""

    def __init__(self, model: Callable, every: int):
        self.model, self.every, self.calls, self.last = model, every, 0, None
        self.computed = 0

    def __call__(self, *args):
        if self.calls % self.every == 0:
            self.last = self.model(*args)
            self.computed += 1
        self.calls += 1
        return self.last


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_digits_dit(device=device).eval()
    classifier = load_digits_classifier(device=device)
    labels = torch.arange(10, device=device).repeat(args.samples // 10)
    shape = (1, RESOLUTION, RESOLUTION)

    def sample(fn: Callable, steps: int = args.steps) -> torch.Tensor:
        return ddim_sample(fn, labels, shape, steps=steps, seed=0, null_label=model.num_classes)

    base = sample(model)
    rows = [_row("uncached", "uncached", 1.0, base, base, labels, classifier)]
    for interval, ratio in TOCA_SETTINGS:
        backend = ToCaBackend(ToCaConfig(interval=interval, ratio=ratio, num_steps=args.steps, inner="eager"))
        torch._dynamo.reset()
        out = sample(torch.compile(model, backend=backend, dynamic=False))
        name = f"toca_fx N={interval} r={ratio}" + (" (default)" if (interval, ratio) == (4, 0.3) else "")
        rows.append(_row(name, "toca_fx", backend.stats()["flops_ratio"], out, base, labels, classifier))
    for steps in sorted({max(2, round(args.steps * f)) for f in (0.2, 0.3, 0.4, 0.5, 0.7)}):
        rows.append(_row(f"{steps} DDIM steps", "fewer steps", steps / args.steps, sample(model, steps), base, labels, classifier))
    for every in (2, 3, 4):
        reuse = StepReuse(model, every)
        out = sample(reuse)
        rows.append(_row(f"reuse whole step, compute 1 in {every}", "whole-step reuse", reuse.computed / args.steps, out, base, labels, classifier))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "quality.json").write_text(json.dumps(rows, indent=1))
    table = _table(rows, args)
    (args.out / "quality_table.md").write_text(table + "\n")
    print(table)
    _plot(rows, args.out / "quality_curve.png")


def _row(name, family, flops_ratio, images, base, labels, classifier) -> dict:
    return {
        "setting": name,
        "family": family,
        "flops_ratio": flops_ratio,
        "speedup": 1.0 / flops_ratio,
        "accuracy": classifier_accuracy(classifier, images, labels),
        "frechet": digits_frechet_distance(classifier, images),
        "psnr": psnr(images, base).clamp(max=100).mean().item(),
        "rel_l2": relative_l2(images, base).mean().item(),
    }


def _table(rows: list[dict], args) -> str:
    head = (f"{args.samples} samples, {args.steps} DDIM steps, guidance 1.5, seed 0; "
            f"{time.strftime('%Y-%m-%d')}; torch {torch.__version__}; "
            f"command: python benchmarks/quality_curve.py --samples {args.samples} --steps {args.steps}")
    lines = [head, "", "| setting | FLOP ratio | theoretical speedup | accuracy | Frechet distance | PSNR vs uncached (dB) | rel L2 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['flops_ratio']:.3f} | {r['speedup']:.2f}x | {r['accuracy']:.3f} | "
                     f"{r['frechet']:.1f} | {r['psnr']:.1f} | {r['rel_l2']:.4f} |")
    return "\n".join(lines)


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for family, marker in (("toca_fx", "o-"), ("fewer steps", "s--"), ("whole-step reuse", "^:")):
        pts = sorted((r["speedup"], r["frechet"], r["psnr"]) for r in rows if r["family"] == family)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker, label=family)
        axes[1].plot([p[0] for p in pts], [p[2] for p in pts], marker, label=family)
    base = next(r for r in rows if r["family"] == "uncached")
    axes[0].axhline(base["frechet"], color="grey", lw=0.8, label="uncached")
    axes[0].set(xlabel="theoretical speedup", ylabel="Frechet distance (lower is better)")
    axes[1].set(xlabel="theoretical speedup", ylabel="PSNR vs uncached, dB (higher is better)")
    for ax in axes:
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == "__main__":
    main()
