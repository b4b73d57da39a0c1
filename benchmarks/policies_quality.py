"""Quality against theoretical speedup for ToCa, FORA and a learned router (HarmoniCa), on CPU.

    python benchmarks/policies_quality.py                 # ~minutes on 2 cores; markdown table to stdout
    python benchmarks/policies_quality.py --compile-cost  # Inductor compile seconds per distinct plan
    python benchmarks/policies_quality.py --model glyphs --device cuda --cfg 4 --train 3.0 --train-only \
        --router benchmarks/results/routers/router_glyphs     # routers only, for quality_curve.py --routers

The embedded digits or glyphs DiT (`--model`) samples `--samples` images (labels 0, 1, ... in turn) by DDIM with guidance, from
the same noise for every policy, with the rewritten graphs run eagerly (inner="eager": no Inductor
compile time). Speedup = 1 / backend.stats()["flops_ratio"]. Quality: digit-classifier accuracy,
Frechet distance of classifier features to the real data, PSNR against the uncached samples.
HarmoniCa: one router per target speedup, started from FORA's schedule at the nearest interval (2 or
3) and trained (`--iterations`) with every forward reusing the fraction of (step, branch) pairs that
the target implies (`TrainConfig.target_reuse`), then thresholded (`Router.with_threshold`) at the gate
level whose speedup, estimated from per-branch FLOPs (`flop_model`), is closest to the target; the
table's speedup is measured. Routers are saved as `<--router>_<target>x.pt`. A second table gives, per
target, HarmoniCa's Frechet distance minus FORA's with a paired-bootstrap 95% interval.
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

import torch

from toca_fx import FORAPolicy, Router, ToCaBackend, ToCaConfig
from toca_fx.eval.metrics import (classifier_accuracy, classifier_features, digits_frechet_distance,
                             features_frechet_distance, psnr)
from toca_fx.eval.quality import MODELS, load_quality_model, sample_shape
from toca_fx.router import TrainConfig, train
from toca_fx.eval.sampling import DEFAULT_CFG_SCALE, ddim_sample

TARGETS = (1.5, 2.0, 3.0)
TOCA_GRID = [(i, r) for i in (2, 3, 4, 6) for r in (0.1, 0.3, 0.5)]
FORA_INTERVALS = (2, 3, 4)


def sample(
    model: torch.nn.Module, config: ToCaConfig | None, labels: torch.Tensor, steps: int,
    cfg_scale: float = DEFAULT_CFG_SCALE, dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, ToCaBackend | None]:
    """Samples (the model fed `dtype`), and the backend that cached them (None: uncached)."""
    torch._dynamo.reset()
    backend = None if config is None else ToCaBackend(config)
    fn = model if backend is None else torch.compile(model, backend=backend, dynamic=False)
    return ddim_sample(fn, labels, sample_shape(model), steps=steps, seed=0, cfg_scale=cfg_scale, dtype=dtype), backend


def generate(
    model: torch.nn.Module, config: ToCaConfig | None, labels: torch.Tensor, steps: int,
    cfg_scale: float = DEFAULT_CFG_SCALE,
) -> tuple[torch.Tensor, float]:
    """Samples and theoretical speedup (1.0 uncached)."""
    images, backend = sample(model, config, labels, steps, cfg_scale)
    return images, 1.0 if backend is None else 1.0 / backend.stats()["flops_ratio"]


def speedup(model: torch.nn.Module, config: ToCaConfig, steps: int) -> float:
    """Theoretical speedup of a policy, from a one-sample generation (FLOPs do not depend on the batch
    nor on the guidance scale)."""
    return generate(model, config, _one_label(model), steps)[1]


def _one_label(model: torch.nn.Module) -> torch.Tensor:
    return torch.zeros(1, dtype=torch.long, device=_device(model))


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def nearest(candidates: list[tuple[float, Any]], target: float) -> tuple[float, Any]:
    return min(candidates, key=lambda c: abs(c[0] - target))


def flop_model(model: torch.nn.Module, steps: int, dtype: torch.dtype = torch.float32) -> tuple[int, torch.Tensor]:
    """Uncached FLOPs of one call outside every branch, and of each branch by index (a router's column,
    as `Router.plans` reads it), summed over the captured graphs. From a one-sample generation with
    FORA: any policy captures the same branches, and FORA has two plans to count, a router up to one
    per step (re-tracing and counting each took minutes on the device)."""
    config = ToCaConfig(policy=FORAPolicy(2), num_steps=steps, inner="eager")
    _, backend = sample(model, config, _one_label(model), steps, dtype=dtype)
    outside, branch = 0, Counter()
    for graph in backend.graphs:
        counts = Counter(graph.flops_by_branch["uncached"])
        outside += counts.pop(None, 0)
        branch.update(counts)
    return outside, torch.tensor([branch[i] for i in range(max(branch) + 1)], dtype=torch.float64)


def estimated_speedup(router: Router, outside: int, branch: torch.Tensor) -> float:
    """T (O + sum_b U_b) / sum_s (O + sum_b C[s, b] U_b): a reused branch costs nothing, a computed one
    its uncached FLOPs U_b, and the rest of the graph O runs every step (C = `Router.computes()`)."""
    per_step = outside + router.computes().double() @ branch
    return router.num_steps * (outside + branch.sum()).item() / per_step.sum().item()


def calibrate(router: Router, target: float, outside: int, branch: torch.Tensor) -> tuple[float, Router]:
    """(estimated speedup, router) at the gate level, or the trained threshold, whose estimated speedup
    is closest to `target` (a tie keeps the trained threshold)."""
    levels = sorted(set(router.gates[1:].flatten().tolist()))
    candidates = [router] + [router.with_threshold(level) for level in levels]
    best = min(candidates, key=lambda r: abs(estimated_speedup(r, outside, branch) - target))
    return estimated_speedup(best, outside, branch), best


def evaluate(images: torch.Tensor, reference: torch.Tensor, labels: torch.Tensor, classifier: Any) -> dict[str, float]:
    return {
        "accuracy": classifier_accuracy(classifier, images, labels),
        "fd": digits_frechet_distance(classifier, images),
        "psnr": psnr(images, reference).mean().item(),
    }


def policies(model: torch.nn.Module, routers: dict[float, Router], steps: int, tiny: bool = False
             ) -> tuple[list[tuple[str, float, ToCaConfig]], list[tuple[float, str, str]]]:
    """(name, speedup, config) for each method at each target speedup, and (target, HarmoniCa's row,
    FORA's row) for each target with a router (`tiny`: one ToCa setting and one FORA interval)."""
    toca = [(speedup(model, c, steps), c) for c in
            (ToCaConfig(interval=i, ratio=r, num_steps=steps, inner="eager") for i, r in TOCA_GRID[:1 if tiny else None])]
    fora = [(speedup(model, c, steps), c) for c in
            (ToCaConfig(policy=FORAPolicy(i), num_steps=steps, inner="eager") for i in FORA_INTERVALS[:1 if tiny else None])]
    outside, branch = flop_model(model, steps) if routers else (0, torch.zeros(0))
    rows, pairs = [], []
    for target in TARGETS:
        s, c = nearest(toca, target)
        rows.append((f"ToCa interval={c.interval} ratio={c.ratio}", s, c))
        s, c = nearest(fora, target)
        rows.append((f"FORA interval={c.policy.interval}", s, c))
        fora_name = rows[-1][0]
        if target not in routers:
            continue
        s, r = calibrate(routers[target], target, outside, branch)
        print(f"router for {target}x: threshold {routers[target].threshold:.4f} -> {r.threshold:.4f}, "
              f"estimated speedup {estimated_speedup(routers[target], outside, branch):.3f}x -> {s:.3f}x",
              file=sys.stderr)
        name = f"HarmoniCa (router for {target}x) threshold={r.threshold:.3f}"
        rows.append((name, s, ToCaConfig(policy=r, num_steps=steps, inner="eager")))
        pairs.append((target, name, fora_name))
    return rows, pairs


def paired_fd_gap(classifier: Any, images: torch.Tensor, baseline: torch.Tensor, resamples: int = 1000,
                  seed: int = 0) -> tuple[float, float, float]:
    """FD(images) - FD(baseline), and its 95% interval from a paired bootstrap: both sets are resampled
    at the same sample indices (sample i of each comes from the same noise and label), so the interval
    is that of the difference, much narrower than that of either distance."""
    a, b = classifier_features(classifier, images), classifier_features(classifier, baseline)

    def gap(index: torch.Tensor) -> float:
        return features_frechet_distance(classifier, a[index]) - features_frechet_distance(classifier, b[index])

    gen = torch.Generator().manual_seed(seed)
    gaps = torch.tensor([gap(torch.randint(0, len(a), (len(a),), generator=gen)) for _ in range(resamples)])
    low, high = torch.quantile(gaps, torch.tensor([0.025, 0.975], dtype=gaps.dtype)).tolist()
    return gap(torch.arange(len(a))), low, high


def target_reuse(target: float, steps: int) -> float:
    """Fraction of (step >= 1, branch) pairs to reuse for a FLOP speedup `target`, counting every FLOP
    as branch FLOPs (step 0 always computes): 1 + (T - 1)(1 - u) = T / target."""
    return min(0.99, max(0.01, 1 - (steps / target - 1) / (steps - 1)))


def train_routers(model: torch.nn.Module, args: argparse.Namespace, targets: list[float]) -> dict[float, Router]:
    routers = {}
    Path(args.router).parent.mkdir(parents=True, exist_ok=True)
    for target in targets:
        start = time.time()
        config = TrainConfig(num_steps=args.steps, iterations=args.iterations, beta=args.beta, batch=args.batch,
                             lr=args.lr, target_reuse=target_reuse(target, args.steps),
                             init_interval=max(2, round(target)), cfg_scale=args.cfg)
        result = train(model, sample_shape(model), config=config, path=f"{args.router}_{target}x.pt")
        routers[target] = result.router
        reused = 1 - result.router.computes()[1:].float().mean().item()
        print(f"router for {target}x: reuses {reused:.1%} of steps >= 1 (target {config.target_reuse:.1%}), "
              f"{time.time() - start:.0f} s, objective {result.objectives[0]:.4g} (first iteration) -> "
              f"{result.objectives[-1]:.4g} (last), "
              f"validation error {result.validation[0]:.4g} at the start, {result.validation[result.best_iteration]:.4g} "
              f"at iteration {result.best_iteration} (kept); all: {result.validation}", file=sys.stderr)
    return routers


def quality_table(args: argparse.Namespace) -> None:
    qm = load_quality_model(args.model, args.device, tiny=args.tiny, checkpoint_dir=args.checkpoints)
    model, classifier = qm.model, qm.classifier
    labels = torch.arange(args.samples, device=args.device) % qm.num_classes
    start = time.time()
    trained = [] if args.load_routers or args.no_router else [float(t) for t in args.train.split(",")] if args.train else list(TARGETS)
    if any(t not in TARGETS for t in trained):
        raise ValueError(f"--train takes targets among {TARGETS}, got {args.train!r}")
    routers = {} if args.no_router or args.train_only else {t: Router.load(f"{args.router}_{t}x.pt") for t in TARGETS if t not in trained}
    routers.update(train_routers(model, args, trained))
    if args.train_only:
        return
    reference, _ = generate(model, None, labels, args.steps, args.cfg)
    candidates, pairs = policies(model, routers, args.steps, args.tiny)
    unique = {name: (name, s, c) for name, s, c in candidates}
    rows = [("uncached", 1.0, None)] + sorted(unique.values(), key=lambda r: (r[1], r[0]))
    print("| policy | speedup (FLOPs) | accuracy | Frechet distance | PSNR vs uncached (dB) |")
    print("|---|---|---|---|---|")
    samples, speedups = {}, {}
    for name, _, config in rows:
        images, s = generate(model, config, labels, args.steps, args.cfg)
        samples[name], speedups[name] = images, s
        q = evaluate(images, reference, labels, classifier)
        psnr_text = "inf" if config is None else f"{q['psnr']:.1f}"
        print(f"| {name} | {s:.2f}x | {q['accuracy']:.1%} | {q['fd']:.2f} | {psnr_text} |", flush=True)
    print("\n| target | HarmoniCa (speedup) | FORA (speedup) | HarmoniCa FD - FORA FD | 95% interval (paired bootstrap) |")
    print("|---|---|---|---|---|")
    for target, harmonica, fora in pairs:
        gap, low, high = paired_fd_gap(classifier, samples[harmonica], samples[fora])
        print(f"| {target}x | {speedups[harmonica]:.2f}x | {fora} ({speedups[fora]:.2f}x) | {gap:+.2f} | "
              f"[{low:+.2f}, {high:+.2f}] |", flush=True)
    print(f"total {time.time() - start:.0f} s", file=sys.stderr)


def compile_cost(args: argparse.Namespace) -> None:
    """Distinct plans per generation and Inductor compile seconds of each (first call of a plan minus
    a later call of it), for ToCa's defaults, FORA and a router."""
    model = load_quality_model(args.model, tiny=args.tiny, checkpoint_dir=args.checkpoints).model
    x, t, y = torch.randn(2, *sample_shape(model)), torch.full((2,), 500), torch.tensor([3, model.num_classes])
    saved = Path(f"{args.router}_{TARGETS[1]}x.pt")
    router = Router.load(saved) if saved.exists() else Router(torch.rand(args.steps, 12))
    print("| policy | distinct plans in a generation | compile seconds (each plan compiled) |")
    print("|---|---|---|")
    for name, config in [("ToCa defaults", ToCaConfig(num_steps=args.steps)),
                         ("FORA interval=3", ToCaConfig(policy=FORAPolicy(3), num_steps=args.steps)),
                         ("HarmoniCa router", ToCaConfig(policy=router, num_steps=args.steps))]:
        torch._dynamo.reset()
        backend = ToCaBackend(config)
        fast = torch.compile(model, backend=backend, dynamic=False)
        seconds, seen = [], 0
        with torch.no_grad():
            for _ in range(args.steps):
                start = time.time()
                fast(x, t, y)
                if backend.stats()["compiles"] > seen and len(seconds) < args.max_compiles:
                    seen = backend.stats()["compiles"]
                    seconds.append(time.time() - start)
        plans = len(backend.graphs[0].plan_calls)
        print(f"| {name} | {plans} | {', '.join(f'{s:.1f}' for s in seconds)} |", flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", choices=MODELS, default="digits")
    parser.add_argument("--tiny", action="store_true",
                        help="random 8x8 models, 4 samples, 4 steps, 2 router iterations (the harness path)")
    parser.add_argument("--checkpoints", default=None, help="folder with <model>_dit.pt, <model>_classifier.pt")
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--device", default="cpu", help="quality table only; compile cost is measured on CPU")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--cfg", type=float, default=DEFAULT_CFG_SCALE, help="classifier-free guidance scale")
    parser.add_argument("--iterations", type=int, default=30, help="router training iterations")
    parser.add_argument("--batch", type=int, default=4, help="router training batch")
    parser.add_argument("--beta", type=float, default=1e-3, help="router training: cache-use coefficient")
    parser.add_argument("--lr", type=float, default=TrainConfig.lr, help="router training: SGD learning rate")
    parser.add_argument("--router", default="router_digits", help="trained routers go to <this>_<target>x.pt")
    parser.add_argument("--no-router", action="store_true", help="ToCa and FORA only (no HarmoniCa rows)")
    parser.add_argument("--load-routers", action="store_true", help="evaluate the routers saved at --router")
    parser.add_argument("--train-only", action="store_true",
                        help="train the routers of --train and stop (quality_curve.py --routers evaluates them)")
    parser.add_argument("--train", help="comma-separated targets to train (default: all); the others load from --router")
    parser.add_argument("--compile-cost", action="store_true", help="measure Inductor compile time per plan")
    parser.add_argument("--max-compiles", type=int, default=4, help="compile-cost: plans timed per policy")
    args = parser.parse_args(argv)
    if args.tiny:
        args.samples, args.steps, args.iterations, args.batch = 4, 4, 2, 2
    if args.compile_cost:
        compile_cost(args)
    else:
        quality_table(args)


if __name__ == "__main__":
    main()
