"""The token choice's top-k at each benchmark model's size: torch's top-k against the Triton ranking
kernel (`toca_fx.kernels.top_k`), each compiled by Inductor.

    python benchmarks/top_k_kernel.py --out DIR      # on the GPU machine

Two shapes per model: one branch's choice ([N], k = 0.3 N, as at N=4 r=0.3 with the "change" score,
chosen per branch) and a step's batched choice ([branches, N], ranked in order, as the presets'
`select_batch`). Each path's calls run in a CUDA graph, timed with CUDA events (`score_kernel.time_us`);
the two paths' choices are checked to hold the same tokens. Markdown to stdout, JSON to `--out`.
"""
from __future__ import annotations

import argparse
import itertools
import json
import math
from pathlib import Path

import torch

from score_kernel import report, time_us
from toca_fx.kernels import top_k
from toca_fx.kernels.top_k import triton

# (model, tokens, cached branches): DiT-XL/2-256 and PixArt-alpha (2 and 3 branches a block, 28
# blocks), FLUX.1-dev's 4096 image tokens (19 double-stream blocks of 2 branches, 38 single of 1).
SHAPES = [
    ("DiT-XL/2 256x256", 256, 56),
    ("PixArt-alpha 1024x1024", 4096, 84),
    ("PixArt-alpha 2048x2048", 16384, 84),
    ("FLUX.1-dev 1024x1024", 4096, 76),
]


def measure(repeats: int) -> list[dict]:
    rows = []
    for name, tokens, branches in SHAPES:
        torch._dynamo.reset()
        k = math.ceil(0.3 * tokens)
        for shape, ordered in (((tokens,), False), ((branches, tokens), True)):
            # Distinct scores: with ties the two paths may pick different tokens.
            score = torch.randperm(math.prod(shape), device="cuda").float().reshape(shape)
            paths = {
                "torch": torch.compile(lambda s, o=ordered: torch.topk(s * 2, k, sorted=o).indices, dynamic=False),
                "kernel": torch.compile(lambda s: top_k.top_k(s * 2, k), dynamic=False),
            }
            row = {"model": name, "shape": "x".join(map(str, shape)), "k": k}
            picks = {}
            for label, fn in paths.items():
                row[label] = time_us(lambda: fn(score), repeats)
                picks[label] = fn(score).sort(dim=-1).values
            row["same_tokens"] = torch.equal(picks["torch"], picks["kernel"])
            rows.append(row)
            print(row, flush=True)
    return rows


def sweep(repeats: int) -> list[dict]:
    """The kernel alone at other tile sizes and warps (how BLOCK_I and BLOCK_J were chosen)."""
    rows = []
    for name, tokens, branches in SHAPES:
        # Each single row (to show where ranking stops paying); batches only within the kernel's budget.
        for shape in [(tokens,)] + [(branches, tokens)] * (branches * tokens**2 <= top_k.MAX_PAIRS):
            score = torch.randperm(math.prod(shape), device="cuda").float().reshape(-1, tokens)
            k = math.ceil(0.3 * tokens)
            out = torch.empty(score.shape[0], k, dtype=torch.long, device="cuda")
            row = {"model": name, "shape": "x".join(map(str, shape))}
            for bi, bj, warps in itertools.product((16, 32, 64), (128, 256, 512), (4, 8)):
                grid = (triton.cdiv(tokens, bi), score.shape[0])
                launch = lambda: top_k._rank_kernel[grid](
                    score, out, tokens, k, *score.stride(), None, 0, None, 0, None, 0,
                    BLOCK_I=bi, BLOCK_J=bj, REFRESH=False, REF=False, num_warps=warps,
                )
                row[f"{bi}x{bj}/{warps}w"] = time_us(launch, repeats)
            best = min((v, c) for c, v in row.items() if "/" in c)
            print({**row, "best": best}, flush=True)
            rows.append(row)
    return rows


def markdown(rows: list[dict]) -> str:
    lines = ["| model | scores | k | torch us | kernel us | same tokens |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | {r['k']} | {r['torch']:.1f} | {r['kernel']:.1f} | {r['same_tokens']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--sweep", action="store_true", help="also time the kernel at other tile sizes")
    args = parser.parse_args()
    if args.sweep:
        args.out.mkdir(parents=True, exist_ok=True)
        (args.out / "top_k_sweep.json").write_text(json.dumps(sweep(args.repeats), indent=1))
    rows = measure(args.repeats)
    title = f"token choice top-k, {torch.cuda.get_device_name()}, torch {torch.__version__}"
    report(args.out / "top_k_kernel.json", title, markdown(rows), rows)


if __name__ == "__main__":
    main()
