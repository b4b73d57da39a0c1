"""Forecasting against reuse at the same FLOPs on an embedded trained DiT, with paired intervals.

    python benchmarks/forecast_quality.py --model glyphs --device cuda --samples 1000 --steps 20 --out results/
    python benchmarks/forecast_quality.py --model glyphs --tiny --out /tmp/fq     # harness path, CPU

Settings, each pair on one schedule (so at the same FLOPs): FORA (full every --fora steps, every branch
reused in between) against the same schedule forecasting (TaylorSeer's Taylor factors, order 1 and 2);
ToCa (interval --toca, ratio --ratio: self-attention reused, chosen MLP tokens recomputed) against the
hybrid (the same, every token not recomputed forecast at order 1); and as many DDIM steps as the FORA
schedule has full steps. FLOP ratios are counted from the rewritten graphs (`backend.stats()`, run
eagerly); every setting samples from the same noise. Metrics and their 95% bootstrap intervals as in
quality_curve.py; each forecasting row is compared with its reuse pair, and with the other reuse
family, by paired differences. Writes forecast_quality_<model>.json and .md after each setting.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.quality_curve import _ci, _commit, _diff
from toca_fx import FORAPolicy, ToCaBackend, ToCaConfig
from toca_fx.eval.quality import (MODELS, compare, eval_labels, load_quality_model, record, sample_in_chunks,
                                  shared_noise, summarize)


def settings(args: argparse.Namespace) -> list[tuple[str, str, ToCaConfig | int]]:
    """(name, family, config or DDIM step count) after the uncached row."""
    n, m, r, steps = args.fora, args.toca, args.ratio, args.steps
    fora = dict(num_steps=steps, inner="eager")
    return [
        (f"FORA N={n} (reuse)", "FORA reuse", ToCaConfig(policy=FORAPolicy(n), **fora)),
        (f"FORA N={n} forecast order 1", "forecast", ToCaConfig(policy=FORAPolicy(n, forecast=True), forecast_order=1, **fora)),
        (f"FORA N={n} forecast order 2", "forecast", ToCaConfig(policy=FORAPolicy(n, forecast=True), forecast_order=2, **fora)),
        (f"ToCa N={m} r={r} (reuse)", "ToCa reuse", ToCaConfig(interval=m, ratio=r, **fora)),
        (f"hybrid N={m} r={r} (order 1)", "hybrid", ToCaConfig(interval=m, ratio=r, forecast_order=1, **fora)),
        (f"{-(-steps // n)} DDIM steps", "fewer steps", -(-steps // n)),
    ]


# (forecasting row, reuse row) pairs compared: same schedule first, then the other reuse family.
def _pairs(names: list[str]) -> list[tuple[str, str]]:
    fora, fc1, fc2, toca, hybrid, fewer = names
    return [(fc1, fora), (fc2, fora), (hybrid, toca), (fc1, toca), (fc2, toca), (hybrid, fora), (fc1, fewer), (hybrid, fewer)]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="glyphs")
    p.add_argument("--tiny", action="store_true", help="random 8x8 models, 8 samples, 4 steps")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--fora", type=int, default=4, help="FORA's interval (20 steps: 5 full, 4x)")
    p.add_argument("--toca", type=int, default=5, help="ToCa's and the hybrid's interval")
    p.add_argument("--ratio", type=float, default=0.1, help="ToCa's and the hybrid's ratio")
    p.add_argument("--chunk", type=int, default=500)
    p.add_argument("--resamples", type=int, default=1000)
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.steps, args.chunk, args.resamples, args.fora, args.toca = 8, 4, 8, 20, 2, 2
    torch.set_float32_matmul_precision("high")
    qm = load_quality_model(args.model, args.device, tiny=args.tiny)
    labels, noise = eval_labels(args.samples, qm.num_classes), shared_noise(args.samples, qm.shape)

    def go(fn, steps: int = args.steps) -> torch.Tensor:
        return sample_in_chunks(fn, noise, labels, steps, args.chunk, qm.num_classes, args.device, cfg_scale=args.cfg)

    base = go(qm.model)
    records = {"uncached": record(base, base, labels, qm.classifier)}
    rows = [_row("uncached", "uncached", 1.0, summarize(records["uncached"], qm.classifier, args.resamples))]
    args.out.mkdir(parents=True, exist_ok=True)
    meta = {"model": args.model, "samples": args.samples, "steps": args.steps, "guidance": args.cfg,
            "resamples": args.resamples, "date": time.strftime("%Y-%m-%d"), "torch": torch.__version__,
            "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
            "commit": _commit()}
    chosen = settings(args)
    for name, family, what in chosen:
        begin = time.time()
        if isinstance(what, int):
            images, ratio = go(qm.model, what), what / args.steps
        else:
            torch._dynamo.reset()
            backend = ToCaBackend(what)
            images, ratio = go(torch.compile(qm.model, backend=backend, dynamic=False)), backend.stats()["flops_ratio"]
        records[name] = record(images, base, labels, qm.classifier)
        rows.append(_row(name, family, ratio, summarize(records[name], qm.classifier, args.resamples)))
        print(f"{name}: {1 / ratio:.2f}x, FD {rows[-1]['frechet'][0]:.1f}, PSNR {rows[-1]['psnr'][0]:.2f}, "
              f"{time.time() - begin:.1f}s", flush=True)
        _write(args, meta, rows, [])
    comparisons = []
    for a, b in _pairs([c[0] for c in chosen]):
        diff = compare(records[a], records[b], qm.classifier, args.resamples)
        comparisons.append({"a": a, "b": b, **{k: list(v) for k, v in diff.items()}})
        _write(args, meta, rows, comparisons)
    print(_table(meta, rows, comparisons))
    return {"meta": meta, "rows": rows, "comparisons": comparisons}


def _row(name: str, family: str, ratio: float, summary: dict) -> dict:
    return {"setting": name, "family": family, "flops_ratio": ratio, "speedup": 1 / ratio,
            **{k: list(v) for k, v in summary.items()}}


def _write(args, meta: dict, rows: list[dict], comparisons: list[dict]) -> None:
    stem = args.out / f"forecast_quality_{args.model}"
    Path(f"{stem}.json").write_text(json.dumps({"meta": meta, "rows": rows, "comparisons": comparisons}, indent=1))
    Path(f"{stem}.md").write_text(_table(meta, rows, comparisons) + "\n")


def _table(meta: dict, rows: list[dict], comparisons: list[dict]) -> str:
    """The rows (Frechet distance also as a ratio to the uncached one), then the paired differences."""
    m = meta
    base_fd = rows[0]["frechet"][0]
    lines = [f"{m['model']}: {m['samples']} samples, {m['steps']} DDIM steps, guidance {m['guidance']}, seed 0; "
             f"{m['date']}, {m['device']}, torch {m['torch']}, commit {m['commit']}; 95% bootstrap intervals "
             f"({m['resamples']} resamples)", "",
             "| setting | theoretical speedup | accuracy | Frechet distance | FD / uncached | PSNR vs uncached (dB) | rel L2 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paired = ("-", "-") if r["family"] == "uncached" else (_ci(r["psnr"], ".2f"), _ci(r["rel_l2"], ".4f"))
        lines.append(f"| {r['setting']} | {r['speedup']:.2f}x | {_ci(r['accuracy'], '.3f')} | {_ci(r['frechet'], '.1f')} | "
                     f"{r['frechet'][0] / base_fd:.3f} | " + " | ".join(paired) + " |")
    lines += ["", "| a - b | accuracy | Frechet distance | PSNR (dB) | rel L2 |", "|---|---|---|---|---|"]
    for c in comparisons:
        lines.append(f"| {c['a']} - {c['b']} | {_diff(c['accuracy'], '.3f')} | {_diff(c['frechet'], '.1f')} | "
                     f"{_diff(c['psnr'], '.2f')} | {_diff(c['rel_l2'], '.4f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
