"""A block's pass over every token (residual update, layer norm, modulation, the token norm that the
"change" score reads), as Inductor compiles it for hidden sizes over 1024, as toca_fx does, and
against the bytes it must move.

    python benchmarks/residual_pass.py --out DIR      # on the GPU machine

A partial step still updates the residual stream of every token after each branch, so these passes do
not shrink with the ratio. Inductor makes a reduction over more than 1024 elements a loop (its
persistent threshold), which reads its inputs twice; toca_fx's variants reduce rows of up to 4096 in
one pass (toca_fx/inductor.py); Inductor's multi-kernel mode compiles both and picks the faster at
run time. Each is compiled with Inductor's caches off and timed in a CUDA graph; "copy" times a clone
of the same bytes (read + write), the bandwidth the pass could reach.
"""
from __future__ import annotations

import argparse
import contextlib
from pathlib import Path

import torch
import torch.nn.functional as F

from score_kernel import report, time_us
from toca_fx.compile.inductor import wide_row_reductions

SHAPES = [("DiT-XL/2 256x256", 16, 256, 1152), ("PixArt-alpha 1024x1024", 2, 4096, 1152),
          ("PixArt-alpha 2048x2048", 2, 16384, 1152), ("FLUX.1-dev 1024x1024", 1, 4608, 3072)]


def block_pass(x, branch, gate, shift, scale):
    """The residual update after a branch, then the next branch's input and the token norm."""
    x = x + gate * branch
    norm = x.float().norm(dim=-1).mean(dim=0)
    h = F.layer_norm(x, x.shape[-1:], eps=1e-6) * (1 + scale) + shift
    return x, h, norm


MODES = {
    "default": contextlib.nullcontext,
    "toca_fx": wide_row_reductions,  # one pass over rows of up to 4096 elements
    "multi_kernel": lambda: torch._inductor.config.patch({"triton.multi_kernel": 1}),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    torch._inductor.config.fx_graph_cache = False  # the choice of reduction is not in its key
    rows, lines = [], []
    for name, b, n, d in SHAPES:
        dev = dict(device="cuda", dtype=torch.bfloat16)
        x, branch = torch.randn(b, n, d, **dev), torch.randn(b, n, d, **dev)
        gate, shift, scale = (torch.randn(b, 1, d, **dev) for _ in range(3))
        want = block_pass(x, branch, gate, shift, scale)
        row = {"model": name, "shape": f"{b}x{n}x{d}"}
        for mode, context in MODES.items():
            torch._dynamo.reset()
            fn = torch.compile(block_pass)
            with context():
                got = fn(x, branch, gate, shift, scale)
            for g, w in zip(got, want):  # bf16 outputs up to about 16: 2 units in the last place
                torch.testing.assert_close(g.float(), w.float(), rtol=2e-2, atol=0.125)
            row[f"{mode}_us"] = time_us(lambda: fn(x, branch, gate, shift, scale), args.repeats)
        bytes_moved = 4 * x.numel() * x.element_size()  # read x and the branch, write x and h
        big = torch.empty(bytes_moved // 2, dtype=torch.uint8, device="cuda")
        row["copy_us"] = time_us(lambda: big.clone(), args.repeats)  # reads and writes bytes_moved
        row["bytes"] = bytes_moved
        rows.append(row)
        lines.append(f"| {name} | {row['shape']} | " + " | ".join(f"{row[f'{m}_us']:.1f}" for m in MODES)
                     + f" | {row['copy_us']:.1f} |")
    table = "| model | [B, N, D] | " + " | ".join(f"{m} us" for m in MODES) + " | copy of the bytes us |\n"
    table += "|---" * (len(MODES) + 3) + "|\n" + "\n".join(lines)
    report(args.out / "residual-pass.json", f"residual pass, {torch.cuda.get_device_name()}, torch {torch.__version__}, bf16", table, rows)


if __name__ == "__main__":
    main()
