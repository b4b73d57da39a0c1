"""Which token score caches best: final-sample error against the uncached model, per score, at equal
recomputed fraction, on the trained digits DiT (CPU, a few minutes).

    python benchmarks/scores_quality.py                 # writes the tables to stdout (markdown)

Every setting shares the schedule (full step every `--interval` steps, self-attention reused on partial
steps, MLPs recompute ceil(ratio * N) tokens), so all scores recompute the same number of tokens and
cost the same FLOPs; only which tokens differ. Also times a full step with the self-attention map
taken from all queries or from a sample (CPU: a smoke measurement only).
"""
from __future__ import annotations

import argparse
import time

import torch

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.eval.metrics import classifier_accuracy, digits_frechet_distance, psnr, relative_l2
from toca_fx.models.digits import load_digits_classifier, load_digits_dit
from toca_fx.eval.sampling import ddim_sample

SCORES = {
    "staleness": {"staleness": 1.0},
    "change": {"change": 1.0},
    "attention": {"attention": 1.0},
    "random": {"random": 1.0},
    "spatial (on staleness)": {"staleness": 1.0, "spatial": 0.6},
    "staleness + change (old default)": {"staleness": 1.0, "change": 1.0},
    "attention + staleness": {"attention": 1.0, "staleness": 0.25},
    "ToCa: attention + staleness + spatial": {"attention": 1.0, "staleness": 0.25, "spatial": 0.6},
}


def sample(model: torch.nn.Module, labels: torch.Tensor, args: argparse.Namespace, config: ToCaConfig | None):
    torch._dynamo.reset()
    fn = model if config is None else torch.compile(model, backend=ToCaBackend(config), dynamic=False)
    return ddim_sample(fn, labels, (1, 16, 16), steps=args.steps, seed=args.seed)


def quality_table(model, classifier, labels, args) -> list[str]:
    reference = sample(model, labels, args, None)

    def row(ratio: str, name: str, out: torch.Tensor) -> str:
        error = f"{relative_l2(out, reference).mean():.4f} | {psnr(out, reference).mean():.2f}"
        accuracy = classifier_accuracy(classifier, out, labels)
        return f"| {ratio} | {name} | {error} | {accuracy:.3f} | {digits_frechet_distance(classifier, out):.2f} |"

    rows = ["| ratio | score | rel. L2 | PSNR (dB) | accuracy | FD |", "|---|---|---|---|---|---|"]
    rows.append(row("-", "uncached", reference).replace("| 0.0000 | inf |", "| 0 | inf |"))
    for ratio in args.ratios:
        for name, weights in SCORES.items():
            config = ToCaConfig(
                interval=args.interval, ratio=ratio, num_steps=args.steps, inner="eager", scores=weights
            )
            rows.append(row(str(ratio), name, sample(model, labels, args, config)))
    return rows


def map_cost_table(model, labels, args) -> list[str]:
    """Full-step time and FLOPs with no map, the map from all queries, and from sampled queries."""
    rows = ["| attention map | full-step FLOPs (G) | full-step time, CPU (ms) |", "|---|---|---|"]
    b = 2 * len(labels)  # both guidance halves
    x, t, y = torch.randn(b, 1, 16, 16), torch.full((b,), 500), torch.cat([labels, labels])
    settings = [("none (staleness)", {"staleness": 1.0}, 0), ("all queries", {"attention": 1.0}, 0)]
    settings += [(f"{q} sampled queries", {"attention": 1.0}, q) for q in args.queries]
    for name, scores, queries in settings:
        torch._dynamo.reset()
        config = ToCaConfig(interval=1, num_steps=1, inner=args.inner, scores=scores, attention_queries=queries)
        backend = ToCaBackend(config)
        fn = torch.compile(model, backend=backend, dynamic=False)
        with torch.no_grad():
            fn(x, t, y)  # compile
            times = []
            for _ in range(args.repeats):
                start = time.perf_counter()
                fn(x, t, y)
                times.append(time.perf_counter() - start)
        flops = backend.graphs[0].label_flops("full")
        rows.append(f"| {name} | {flops / 1e9:.3f} | {1e3 * sorted(times)[len(times) // 2]:.1f} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--interval", type=int, default=4)
    parser.add_argument("--ratios", type=lambda s: [float(r) for r in s.split(",")], default=[0.1, 0.25])
    parser.add_argument("--per-class", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--queries", type=lambda s: [int(q) for q in s.split(",")], default=[16, 64])
    parser.add_argument("--inner", default="eager", choices=("inductor", "eager"), help="for the map cost timing")
    parser.add_argument("--tables", default="quality,cost", help="which tables: quality, cost or both")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.manual_seed(args.seed)
    model, classifier = load_digits_dit(), load_digits_classifier()
    labels = torch.arange(10).repeat_interleave(args.per_class)
    if "quality" in args.tables:
        print("\n".join(quality_table(model, classifier, labels, args)) + "\n")
    if "cost" in args.tables:
        print("\n".join(map_cost_table(model, labels, args)))


if __name__ == "__main__":
    main()
