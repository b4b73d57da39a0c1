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
family, by paired differences. Writes forecast_quality_<model>.json and .md after each setting, and the
per-sample records (forecast_quality_<model>_records.pt). The Frechet distance's bootstrap costs a
matrix square root per resample: --fd-resamples 0 gives its point estimates only, and --records
recomputes the tables from saved records (e.g. on another machine, with more resamples).
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from benchmarks.quality_curve import _ci, _commit, _diff
from toca_fx import FORAPolicy, ToCaBackend, ToCaConfig
from toca_fx.eval.intervals import (frechet_interval, frechet_to, mean_interval, paired_frechet_difference,
                                    paired_mean_difference)
from toca_fx.eval.quality import (MODELS, PAIRED_METRICS, eval_labels, load_quality_model, record, sample_in_chunks,
                                  shared_noise)


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
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples of the per-sample metrics")
    p.add_argument("--fd-resamples", type=int, default=1000, help="of the Frechet distance (0: point estimates)")
    p.add_argument("--records", type=Path, default=None, help="a run's _records.pt: tables from it, nothing sampled")
    p.add_argument("--cfg", type=float, default=1.5)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.steps, args.chunk, args.resamples, args.fora, args.toca = 8, 4, 8, 20, 2, 2
    torch.set_float32_matmul_precision("high")
    qm = load_quality_model(args.model, args.device, tiny=args.tiny)
    args.out.mkdir(parents=True, exist_ok=True)
    if args.records is not None:
        return _from_records(args, torch.load(args.records, weights_only=False), qm.classifier)
    labels, noise = eval_labels(args.samples, qm.num_classes), shared_noise(args.samples, qm.shape)

    def go(fn, steps: int = args.steps) -> torch.Tensor:
        return sample_in_chunks(fn, noise, labels, steps, args.chunk, qm.num_classes, args.device, cfg_scale=args.cfg)

    base = go(qm.model)
    records = {"uncached": record(base, base, labels, qm.classifier)}
    ratios = {"uncached": ("uncached", 1.0)}
    meta = {"model": args.model, "samples": args.samples, "steps": args.steps, "guidance": args.cfg,
            "resamples": args.resamples, "date": time.strftime("%Y-%m-%d"), "torch": str(torch.__version__),
            "device": torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu",
            "commit": _commit()}
    for name, family, what in settings(args):
        begin = time.time()
        if isinstance(what, int):
            images, ratio = go(qm.model, what), what / args.steps
        else:
            torch._dynamo.reset()
            backend = ToCaBackend(what)
            images, ratio = go(torch.compile(qm.model, backend=backend, dynamic=False)), backend.stats()["flops_ratio"]
        records[name], ratios[name] = record(images, base, labels, qm.classifier), (family, ratio)
        print(f"{name}: {1 / ratio:.2f}x, {time.time() - begin:.1f}s", flush=True)
        saved = {"meta": meta, "ratios": ratios, "records": records}
        torch.save(saved, args.out / f"forecast_quality_{args.model}_records.pt")
    return _from_records(args, saved, qm.classifier)


def _from_records(args, saved: dict, classifier) -> dict:
    """The rows and the paired comparisons of a run's records, with this run's resamples."""
    meta, ratios, records = saved["meta"], saved["ratios"], saved["records"]
    meta = {**meta, "resamples": args.resamples, "fd_resamples": args.fd_resamples}
    mu, cov = classifier.ref_mu.cpu(), classifier.ref_cov.cpu()
    rows = []
    for name, (family, ratio) in ratios.items():
        rec = records[name]
        summary = {m: mean_interval(_metric(rec, m), args.resamples) for m in PAIRED_METRICS}
        summary["frechet"] = (frechet_interval(rec["features"], mu, cov, args.fd_resamples) if args.fd_resamples
                              else (frechet_to(rec["features"], mu, cov),) * 3)
        rows.append({"setting": name, "family": family, "flops_ratio": ratio, "speedup": 1 / ratio,
                     **{k: list(v) for k, v in summary.items()}})
        _write(args, meta, rows, [])
    comparisons = []
    for a, b in _pairs(list(ratios)[1:]):
        diff = {m: paired_mean_difference(_metric(records[a], m), _metric(records[b], m), args.resamples)
                for m in PAIRED_METRICS}
        if args.fd_resamples:
            diff["frechet"] = paired_frechet_difference(records[a]["features"], records[b]["features"], mu, cov,
                                                        args.fd_resamples)
        comparisons.append({"a": a, "b": b, **{k: list(v) for k, v in diff.items()}})
        _write(args, meta, rows, comparisons)
    print(_table(meta, rows, comparisons))
    return {"meta": meta, "rows": rows, "comparisons": comparisons}


def _metric(rec: dict[str, torch.Tensor], name: str) -> torch.Tensor:
    return rec["correct" if name == "accuracy" else name]


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
             f"({m['resamples']} resamples, {m['fd_resamples']} of the Frechet distance)", "",
             "| setting | theoretical speedup | accuracy | Frechet distance | FD / uncached | PSNR vs uncached (dB) | rel L2 |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        paired = ("-", "-") if r["family"] == "uncached" else (_ci(r["psnr"], ".2f"), _ci(r["rel_l2"], ".4f"))
        lines.append(f"| {r['setting']} | {r['speedup']:.2f}x | {_ci(r['accuracy'], '.3f')} | {_ci(r['frechet'], '.1f')} | "
                     f"{r['frechet'][0] / base_fd:.3f} | " + " | ".join(paired) + " |")
    lines += ["", "| a - b | accuracy | Frechet distance | PSNR (dB) | rel L2 |", "|---|---|---|---|---|"]
    for c in comparisons:
        fd = _diff(c["frechet"], ".1f") if "frechet" in c else "-"
        lines.append(f"| {c['a']} - {c['b']} | {_diff(c['accuracy'], '.3f')} | {fd} | "
                     f"{_diff(c['psnr'], '.2f')} | {_diff(c['rel_l2'], '.4f')} |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
