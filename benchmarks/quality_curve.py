"""Quality against theoretical speedup on an embedded trained DiT: toca_fx (ToCa settings, FORA) and two
naive alternatives, with bootstrap intervals.

    python benchmarks/quality_curve.py --model glyphs --samples 1000 --steps 20 --out docs/
    python benchmarks/quality_curve.py --model digits --samples 1000 --steps 25 --out docs/
    python benchmarks/quality_curve.py --model glyphs --tiny --out /tmp/q      # harness path, seconds on CPU

- toca_fx at several ToCa (interval, ratio) settings, and FORA (whole branches reused between full
  steps); FLOP ratio from `backend.stats()` (counted from the rewritten graphs, run eagerly).
- fewer sampling steps: DDIM with k < S steps (FLOP ratio k / S).
- whole-step reuse: every 2nd (3rd, ...) call returns the previous call's output unchanged.
- learned router (HarmoniCa, `--routers PREFIX`): each `PREFIX_<target>x.pt` that
  benchmarks/policies_quality.py trained, thresholded to its target as that script does; a target
  without its file (not trained yet) is skipped with a note.
Every setting starts from the same noise (labels 0, 1, ... in turn). Metrics: classifier accuracy,
Frechet distance of classifier features to the real data's reference statistics, and PSNR, SSIM and
relative L2 against the uncached sample from the same noise, each with a 95% bootstrap interval; at
`--compare-at` x the best-matching ToCa, FORA and fewer-steps rows are compared pairwise with paired
intervals. Writes quality_<model>.json, quality_<model>_table.md, quality_<model>.png (matplotlib) and
the per-sample records quality_<model>_records.pt.

Parts of one curve can run as separate processes (`--families`, each with its own `--out`), and
`--merge DIR,DIR,...` joins their rows and records into one table, plot and comparison; `--max-seconds`
starts no further setting once that much time has passed (the skipped ones are listed in the json).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.policies_quality import TARGETS as ROUTER_TARGETS, calibrate, flop_model  # noqa: E402
from toca_fx import FORAPolicy, Router, ToCaBackend, ToCaConfig  # noqa: E402
from toca_fx.eval.intervals import excludes_zero  # noqa: E402
from toca_fx.eval.quality import (MODELS, QualityModel, compare, eval_labels, load_quality_model,  # noqa: E402
                                  record, sample_in_chunks, shared_noise, summarize)

TOCA_SETTINGS = [(2, 0.5), (3, 0.3), (4, 0.3), (4, 0.1), (5, 0.2), (6, 0.1), (8, 0.1), (10, 0.05)]
FORA_INTERVALS = (2, 3, 4, 5, 6)
STEP_FRACTIONS = (0.15, 0.2, 0.3, 0.4, 0.5, 0.7)
REUSE_EVERY = (2, 3, 4)
FAMILIES = ("ToCa", "FORA", "fewer steps", "learned router", "whole-step reuse")
COMPARED = ("ToCa", "FORA", "fewer steps", "learned router")


class StepReuse:
    """Whole-step reuse: compute step s of each `steps`-call generation when s % every == 0, return the
    last computed output otherwise."""

    def __init__(self, model: Callable, every: int, steps: int):
        self.model, self.every, self.steps = model, every, steps
        self.calls, self.computed, self.last = 0, 0, None

    def __call__(self, *args):
        if (self.calls % self.steps) % self.every == 0:
            self.last = self.model(*args)
            self.computed += 1
        self.calls += 1
        return self.last


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", choices=MODELS, default="digits")
    p.add_argument("--tiny", action="store_true", help="random 8x8 models, 8 samples, 4 steps, one or two settings per family")
    p.add_argument("--samples", type=int, default=1000)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--chunk", type=int, default=500, help="samples per generation")
    p.add_argument("--resamples", type=int, default=1000, help="bootstrap resamples")
    p.add_argument("--compare-at", type=float, default=3.0, help="theoretical speedup of the pairwise comparison")
    p.add_argument("--checkpoints", type=Path, default=None, help="folder with <model>_dit.pt, <model>_classifier.pt")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="model weights and inputs")
    p.add_argument("--cfg", type=float, default=1.5, help="classifier-free guidance scale")
    p.add_argument("--only", default=None, help="comma-separated setting names to run, in this order (default: all)")
    p.add_argument("--families", default=None, help=f"comma-separated families to run, among {FAMILIES}")
    p.add_argument("--routers", default=None, help="learned routers: PREFIX_<target>x.pt for targets "
                   f"{ROUTER_TARGETS} (from benchmarks/policies_quality.py)")
    p.add_argument("--max-seconds", type=float, default=None, help="start no setting after this many seconds")
    p.add_argument("--merge", default=None, help="comma-separated --out folders of parts of one curve: join them")
    p.add_argument("--out", type=Path, default=Path("docs"))
    args = p.parse_args(argv)
    if args.tiny:
        args.samples, args.steps, args.chunk, args.resamples = 8, 4, 8, 20
    return args


def settings(args: argparse.Namespace) -> list[tuple[str, str, object]]:
    """(name, family, what to run) for every row after the uncached one."""
    rows = _all_settings(args)
    if args.families is not None:
        families = [f.strip() for f in args.families.split(",")]
        if set(families) - set(FAMILIES):
            raise ValueError(f"--families takes names among {FAMILIES}, got {args.families!r}")
        rows = [r for r in rows if r[1] in families]
    if args.only is None:
        return rows
    wanted = [w.strip() for w in args.only.split(",")]
    unknown = set(wanted) - {r[0] for r in rows}
    if unknown:
        raise ValueError(f"--only names unknown settings {sorted(unknown)}")
    by_name = {r[0]: r for r in rows}
    return [by_name[w] for w in wanted]  # in the order asked for: a time budget cuts the last ones


def _all_settings(args: argparse.Namespace) -> list[tuple[str, str, object]]:
    toca = TOCA_SETTINGS[:1] if args.tiny else TOCA_SETTINGS
    fora = FORA_INTERVALS[:1] if args.tiny else FORA_INTERVALS
    steps = sorted({max(2, round(args.steps * f)) for f in STEP_FRACTIONS} - {args.steps})
    rows = [(f"ToCa N={i} r={r}", "ToCa", ToCaConfig(interval=i, ratio=r, num_steps=args.steps, inner="eager"))
            for i, r in toca]
    rows += [(f"FORA N={i}", "FORA", ToCaConfig(policy=FORAPolicy(i), num_steps=args.steps, inner="eager"))
             for i in fora]
    rows += [(f"{k} DDIM steps", "fewer steps", k) for k in (steps[:2] if args.tiny else steps)]
    if args.routers is not None:
        rows += [(f"HarmoniCa (router for {t}x)", "learned router", (t, Path(f"{args.routers}_{t}x.pt")))
                 for t in ROUTER_TARGETS]
    rows += [(f"whole-step reuse 1 in {e}", "whole-step reuse", e) for e in (REUSE_EVERY[:1] if args.tiny else REUSE_EVERY)]
    return rows


def router_config(qm: QualityModel, target: float, path: Path, args: argparse.Namespace,
                  flops: dict) -> ToCaConfig | None:
    """The saved router for `target`, thresholded as benchmarks/policies_quality.py does (the gate level
    whose speedup estimated from per-branch FLOPs is closest to the target); None, with a note, when
    the file is missing or serves another step count. `flops` caches the FLOP model across routers."""
    if not path.exists():
        print(f"{path}: no router for {target}x (not trained), row skipped", flush=True)
        return None
    router = Router.load(path)
    if router.num_steps != args.steps:
        print(f"{path}: router for {router.num_steps} steps, the curve has {args.steps}: row skipped", flush=True)
        return None
    if not flops:
        flops["outside"], flops["branch"] = flop_model(qm.model, args.steps, qm.dtype)
    estimate, router = calibrate(router, target, flops["outside"], flops["branch"])
    print(f"router for {target}x: threshold {router.threshold:.4f}, estimated speedup {estimate:.2f}x", flush=True)
    return ToCaConfig(policy=router, num_steps=args.steps, inner="eager")


def run_setting(qm: QualityModel, family: str, what: object, noise: torch.Tensor, labels: torch.Tensor,
                args: argparse.Namespace) -> tuple[torch.Tensor, float]:
    """Samples (CPU) and FLOP ratio of one setting (`what`: a ToCaConfig for the cached families)."""
    def go(fn: Callable, steps: int = args.steps) -> torch.Tensor:
        return sample_in_chunks(fn, noise, labels, steps, args.chunk, qm.num_classes, args.device,
                                cfg_scale=args.cfg, dtype=qm.dtype)

    if family in ("ToCa", "FORA", "learned router"):
        torch._dynamo.reset()
        backend = ToCaBackend(what)
        images = go(torch.compile(qm.model, backend=backend, dynamic=False))
        return images, backend.stats()["flops_ratio"]
    if family == "fewer steps":
        return go(qm.model, what), what / args.steps
    reuse = StepReuse(qm.model, what, args.steps)
    images = go(reuse)
    return images, reuse.computed / reuse.calls


def _row(name: str, family: str, flops_ratio: float, summary: dict, seconds: float) -> dict:
    return {"setting": name, "family": family, "flops_ratio": flops_ratio, "speedup": 1 / flops_ratio,
            "seconds": seconds, **{k: list(v) for k, v in summary.items()}}


def comparisons(rows: list[dict], records: dict[str, dict], qm: QualityModel, args) -> list[dict]:
    """Pairwise paired differences between the ToCa, FORA and fewer-steps rows nearest `--compare-at`."""
    chosen = []
    for family in COMPARED:
        candidates = [r for r in rows if r["family"] == family]
        if candidates:
            chosen.append(min(candidates, key=lambda r: abs(r["speedup"] - args.compare_at)))
    out = []
    for i, a in enumerate(chosen):
        for b in chosen[i + 1:]:
            diff = compare(records[a["setting"]], records[b["setting"]], qm.classifier, args.resamples)
            out.append({"a": a["setting"], "b": b["setting"], "a_speedup": a["speedup"], "b_speedup": b["speedup"],
                        **{k: list(v) for k, v in diff.items()}})
    return out


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    torch.set_float32_matmul_precision("high")
    qm = load_quality_model(args.model, args.device, tiny=args.tiny, checkpoint_dir=args.checkpoints,
                            dtype=getattr(torch, args.dtype))
    args.out.mkdir(parents=True, exist_ok=True)
    if args.merge is not None:
        result, records = merge([Path(d) for d in args.merge.split(",")], args)
    else:
        result, records = measure(qm, args)
    result["comparisons"] = comparisons(result["rows"], records, qm, args)
    stem = args.out / f"quality_{args.model}"
    Path(f"{stem}.json").write_text(json.dumps(result, indent=1))
    torch.save(records, f"{stem}_records.pt")
    table = tables(result)
    Path(f"{stem}_table.md").write_text(table + "\n")
    print(table)
    plot(result, Path(f"{stem}.png"))
    return result


def measure(qm: QualityModel, args: argparse.Namespace) -> tuple[dict, dict[str, dict]]:
    """The uncached row and every setting's, with the per-sample records (the json is rewritten after
    each row, so a run cut short keeps what it measured)."""
    start = time.time()
    labels = eval_labels(args.samples, qm.num_classes)
    noise = shared_noise(args.samples, qm.shape)
    base = sample_in_chunks(qm.model, noise, labels, args.steps, args.chunk, qm.num_classes, args.device,
                            cfg_scale=args.cfg, dtype=qm.dtype)
    records = {"uncached": record(base, base, labels, qm.classifier)}
    rows = [_row("uncached", "uncached", 1.0, summarize(records["uncached"], qm.classifier, args.resamples),
                 time.time() - start)]
    print(f"uncached: accuracy {rows[0]['accuracy'][0]:.3f}, FD {rows[0]['frechet'][0]:.2f}, "
          f"{time.time() - start:.1f}s", flush=True)
    result = {"meta": _meta(args), "rows": rows}
    flops: dict = {}
    for name, family, what in settings(args):
        if args.max_seconds is not None and time.time() - start > args.max_seconds:
            result["meta"]["skipped"].append(name)
            continue
        begin = time.time()
        if family == "learned router":
            what = router_config(qm, *what, args, flops)
            if what is None:
                result["meta"]["skipped"].append(name)
                continue
        images, ratio = run_setting(qm, family, what, noise, labels, args)
        records[name] = record(images, base, labels, qm.classifier)
        rows.append(_row(name, family, ratio, summarize(records[name], qm.classifier, args.resamples),
                         time.time() - begin))
        print(f"{name}: {1 / ratio:.2f}x, accuracy {rows[-1]['accuracy'][0]:.3f}, FD {rows[-1]['frechet'][0]:.2f}, "
              f"{rows[-1]['seconds']:.1f}s", flush=True)
        (args.out / f"quality_{args.model}.json").write_text(json.dumps(result, indent=1))  # so far
    if result["meta"]["skipped"]:
        print(f"skipped: {result['meta']['skipped']}", flush=True)
    return result, {k: {m: v.float() for m, v in r.items()} for k, r in records.items()}


def merge(folders: list[Path], args: argparse.Namespace) -> tuple[dict, dict[str, dict]]:
    """One curve from parts measured apart (same model, samples, steps, guidance and noise): the first
    part's uncached row, every part's other rows and records. The parts' uncached samples must agree:
    the largest difference between their classifier features is kept in the meta."""
    parts = [(json.loads((d / f"quality_{args.model}.json").read_text()),
              torch.load(d / f"quality_{args.model}_records.pt", weights_only=True)) for d in folders]
    meta, rows, records = dict(parts[0][0]["meta"]), list(parts[0][0]["rows"]), dict(parts[0][1])
    same = ("model", "samples", "steps", "guidance", "dtype", "seed")
    for part, recs in parts[1:]:
        if any(part["meta"][k] != meta[k] for k in same):
            raise ValueError(f"--merge: parts differ in {[k for k in same if part['meta'][k] != meta[k]]}")
        rows += [r for r in part["rows"] if r["family"] != "uncached"]
        records.update({k: v for k, v in recs.items() if k != "uncached"})
    rows.sort(key=lambda r: ("uncached", *FAMILIES).index(r["family"]))  # stable: each part's order within
    meta["merged"] = [str(d) for d in folders]
    meta["uncached_feature_gap"] = max((recs["uncached"]["features"] - records["uncached"]["features"]).abs().max().item()
                                       for _, recs in parts)
    meta["skipped"] = [name for part, _ in parts for name in part["meta"].get("skipped", [])]
    return {"meta": meta, "rows": rows}, records


def _meta(args: argparse.Namespace) -> dict:
    device = torch.cuda.get_device_name() if str(args.device).startswith("cuda") else "cpu"
    return {"model": args.model, "tiny": args.tiny, "samples": args.samples, "steps": args.steps,
            "guidance": args.cfg, "dtype": args.dtype, "seed": 0, "resamples": args.resamples, "date": time.strftime("%Y-%m-%d"),
            "device": device, "torch": torch.__version__, "commit": _commit(), "skipped": []}


def _commit() -> str:
    """The checkout's commit (with + when files differ from it), or "unknown" outside git."""
    import subprocess

    root = Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+" if dirty else "")


def _ci(v: list[float], fmt: str) -> str:
    return f"{v[0]:{fmt}} [{v[1]:{fmt}}, {v[2]:{fmt}}]"


def _diff(v: list[float], fmt: str) -> str:
    mark = " *" if excludes_zero(tuple(v)) else ""
    return f"{v[0]:+{fmt}} [{v[1]:+{fmt}}, {v[2]:+{fmt}}]{mark}"


def tables(result: dict) -> str:
    """The markdown tables: one row per setting, then the pairwise comparisons (* : interval excludes 0)."""
    m = result["meta"]
    lines = [f"{m['model']}: {m['samples']} samples, {m['steps']} DDIM steps, guidance {m['guidance']}, seed "
             f"{m['seed']}, {m['dtype']}; {m['date']}, {m['device']}, torch {m['torch']}, commit "
             f"{m.get('commit', 'unknown')}; 95% bootstrap intervals "
             f"({m['resamples']} resamples)", "",
             "| setting | theoretical speedup | accuracy | Frechet distance | PSNR vs uncached (dB) | SSIM | rel L2 |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pairwise = ("-", "-", "-") if r["family"] == "uncached" else (
            _ci(r["psnr"], ".1f"), _ci(r["ssim"], ".3f"), _ci(r["rel_l2"], ".3f"))
        lines.append(f"| {r['setting']} | {r['speedup']:.2f}x | {_ci(r['accuracy'], '.3f')} | "
                     f"{_ci(r['frechet'], '.1f')} | " + " | ".join(pairwise) + " |")
    lines += ["", "| a - b | accuracy | Frechet distance | PSNR (dB) | SSIM | rel L2 |", "|---|---|---|---|---|---|"]
    for c in result["comparisons"]:
        lines.append(f"| {c['a']} ({c['a_speedup']:.2f}x) - {c['b']} ({c['b_speedup']:.2f}x) | "
                     f"{_diff(c['accuracy'], '.3f')} | {_diff(c['frechet'], '.1f')} | {_diff(c['psnr'], '.1f')} | "
                     f"{_diff(c['ssim'], '.3f')} | {_diff(c['rel_l2'], '.3f')} |")
    return "\n".join(lines)


def plot(result: dict, path: Path) -> None:
    """Accuracy, Frechet distance and PSNR against theoretical speedup, with interval bars."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no plot")
        return
    rows = result["rows"]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    metrics = (("accuracy", "classifier accuracy"), ("frechet", "Frechet distance (lower is better)"),
               ("psnr", "PSNR vs uncached, dB"))
    for family, marker in zip(FAMILIES, ("o-", "D-", "s--", "P-", "^:")):
        pts = sorted((r for r in rows if r["family"] == family), key=lambda r: r["speedup"])
        if not pts:
            continue
        for ax, (key, _) in zip(axes, metrics):
            xs = [p["speedup"] for p in pts]
            ys = [p[key][0] for p in pts]
            # A bootstrap FD interval can lie above its estimate (see tables): bars clipped at the point.
            err = [[max(0.0, p[key][0] - p[key][1]) for p in pts], [max(0.0, p[key][2] - p[key][0]) for p in pts]]
            ax.errorbar(xs, ys, yerr=err, fmt=marker, capsize=2, label=family)
    base = rows[0]
    for ax, (key, label) in zip(axes, metrics):
        if key != "psnr":
            ax.axhline(base[key][0], color="grey", lw=0.8, label="uncached")
        ax.set(xlabel="theoretical speedup", ylabel=label)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
    m = result["meta"]
    fig.suptitle(f"{m['model']} DiT: {m['samples']} samples, {m['steps']} steps ({m['date']}, {m['device']})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


if __name__ == "__main__":
    main()
