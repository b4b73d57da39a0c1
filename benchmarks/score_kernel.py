"""The "attention" score of one block at each benchmark model's size: torch's path against the Triton
kernel (`toca_fx.kernels.attention_columns`), each compiled by Inductor, from the views of a fused QKV
projection as the models produce them.

    python benchmarks/score_kernel.py --out DIR            # on the GPU machine
    python benchmarks/score_kernel.py --warps --out DIR    # the kernels' warps, swept

Each timed call first runs the QKV projection that writes the score's input, as in the model (a call on
an input that no kernel just wrote ran the DiT kernel at 4 warps in half its in-model time); the
projection's own time is subtracted. The calls run in a CUDA graph, as in the benchmarks, timed with
CUDA events (median of `--repeats` replays); the paths' maps are checked against each other. Markdown
to stdout, JSON to `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from pathlib import Path
from typing import Callable, Iterator

import torch

from toca_fx.kernels import attention_columns
from toca_fx.ops.scores import _fill_influence, _probs, influence_from_map

# (model, batch incl. CFG, heads, tokens, head dim): DiT-XL/2-256 batch 8 + CFG, PixArt-alpha at
# 1024 and 2048 (batch 1 + CFG), FLUX.1-dev at 1024 (4096 image + 512 text tokens, no CFG).
SHAPES = [
    ("DiT-XL/2 256x256", 16, 16, 256, 72),
    ("PixArt-alpha 1024x1024", 2, 16, 4096, 72),
    ("PixArt-alpha 2048x2048", 2, 16, 16384, 72),
    ("FLUX.1-dev 1024x1024", 1, 24, 4608, 128),
]


def views(batch: int, heads: int, tokens: int, dim: int, queries: int) -> tuple[Callable, torch.Tensor, torch.Tensor]:
    """The QKV projection (a call that writes one [B, L, 3, H, d] output), and its sampled queries and
    all keys as [B, H, L, d] views."""
    x = torch.randn(batch * tokens, heads * dim, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(heads * dim, 3 * heads * dim, device="cuda", dtype=torch.bfloat16) * (heads * dim) ** -0.5  # unit outputs
    qkv = torch.empty(batch * tokens, 3 * heads * dim, device="cuda", dtype=torch.bfloat16)
    project = lambda: torch.mm(x, w, out=qkv)  # noqa: E731
    project()
    q, k, _ = qkv.view(batch, tokens, 3, heads, dim).permute(2, 0, 3, 1, 4).unbind(0)
    return project, q[:, :, :: tokens // queries][:, :, :queries], k


def torch_path(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return influence_from_map(_probs(q, k, None), out, 0)


def kernel_path(q: torch.Tensor, k: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    return _fill_influence(attention_columns.column_sums(q, k, q.shape[-1] ** -0.5).sum(dim=0), out, 0)


def time_us(fn: Callable[[], object], repeats: int, per_graph: int = 20) -> float:
    """GPU time of one call: `per_graph` calls captured in one CUDA graph (as the models run them),
    replays timed with CUDA events, the median replay over `per_graph`."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(per_graph):
            fn()
    times = []
    for _ in range(repeats):
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        graph.replay()
        end.record()
        end.synchronize()
        times.append(begin.elapsed_time(end) * 1e3 / per_graph)
    return statistics.median(times)


def measure(queries: int, repeats: int, paths: dict[str, Callable]) -> list[dict]:
    rows = []
    for name, batch, heads, tokens, dim in SHAPES:
        torch._dynamo.reset()  # a fresh compile per shape, whatever ran before
        torch.manual_seed(0)
        project, q, k = views(batch, heads, tokens, dim, queries)
        row = {"model": name, "shape": _shape(batch, heads, queries, tokens, dim)}
        maps = {}
        alone = time_us(project, repeats)
        for label, path in paths.items():
            fn = torch.compile(path, dynamic=False)
            out = torch.empty(tokens, device="cuda")
            row[label] = time_us(lambda: (project(), fn(q, k, out)), repeats) - alone
            maps[label] = out.clone()
        first, *rest = maps.values()
        row["max_diff"] = max(((m - first).abs().max().item() for m in rest), default=0.0)
        rows.append(row)
        print(row, flush=True)
    return rows


def sweep_warps(queries: int, repeats: int) -> list[dict]:
    """The kernels alone (no normalisation), eager, at each warps setting: the one-tile kernel's for up
    to `ONE_TILE` keys, the (statistics, columns) pair's beyond."""
    rows = []
    for name, batch, heads, tokens, dim in SHAPES:
        torch.manual_seed(0)
        project, q, k = views(batch, heads, tokens, dim, queries)
        alone = time_us(project, repeats)
        one_tile = tokens <= attention_columns.ONE_TILE
        settings = [(w, None) for w in (4, 8, 16)] if one_tile else [(s, c) for s in (4, 8, 16) for c in (4, 8)]
        for warps in settings:
            with _warps(*warps):
                us = time_us(lambda: (project(), attention_columns.column_sums(q, k, dim**-0.5)), repeats) - alone
            rows.append({"model": name, "shape": _shape(batch, heads, queries, tokens, dim), "warps": warps, "us": us})
            print(rows[-1], flush=True)
    return rows


def _shape(batch: int, heads: int, queries: int, tokens: int, dim: int) -> str:
    return f"{batch}x{heads}x{queries}q x {tokens}k, d={dim}"


@contextlib.contextmanager
def _warps(first: int, second: int | None) -> Iterator[None]:
    """The one-tile kernel's warps (`second` None), else the split kernels' (statistics, columns)."""
    saved = attention_columns.ONE_TILE_WARPS, attention_columns.SPLIT_WARPS
    if second is None:
        attention_columns.ONE_TILE_WARPS = first
    else:
        attention_columns.SPLIT_WARPS = (first, second)
    try:
        yield
    finally:
        attention_columns.ONE_TILE_WARPS, attention_columns.SPLIT_WARPS = saved


def markdown(rows: list[dict], labels: list[str]) -> str:
    head = "| model | q x k | " + " | ".join(f"{label} us" for label in labels) + " | max map diff |"
    lines = [head, "|" + "---|" * (len(labels) + 3)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | " + " | ".join(f"{r[x]:.1f}" for x in labels) + f" | {r['max_diff']:.1e} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--queries", type=int, default=64, help="sampled queries (the presets' 64)")
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--warps", action="store_true", help="sweep the kernels' warps instead")
    args = parser.parse_args()
    title = f"attention score per block, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16"
    if args.warps:
        rows = sweep_warps(args.queries, args.repeats)
        table = "\n".join(["| model | q x k | warps | us |", "|---|---|---|---|"] + [
            f"| {r['model']} | {r['shape']} | {r['warps'][0] if r['warps'][1] is None else r['warps']} | {r['us']:.1f} |" for r in rows
        ])
        report(args.out / "score_kernel_warps.json", f"{title}, kernel warps", table, rows)
        return
    paths = {"torch": torch_path, "kernel": kernel_path}
    rows = measure(args.queries, args.repeats, paths)
    report(args.out / "score_kernel.json", title, markdown(rows, list(paths)), rows)


def report(path: Path, title: str, table: str, rows: list[dict]) -> None:
    """The table under its title to stdout, the rows as JSON to `path`."""
    print(f"## {title}\n\n{table}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"title": title, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
