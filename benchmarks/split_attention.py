"""Self-attention of a partial step's chosen queries against all keys, at each benchmark model's size:
one SDPA call against the keys split into S parts (run as S x the batch in one call, the parts' outputs
merged by their log-sum-exps, as flash-decoding does), and the time per query count (waves).

    python benchmarks/split_attention.py --out DIR      # on the GPU machine

A partial step at ratio 0.3 gives the attention 0.3x the full step's queries, but its kernel runs in
whole waves of the multiprocessors: PixArt-1024's chosen queries fill 2.4 waves and run as 3. Splitting
the keys multiplies the programs by S and divides each one's work by S, so the last wave's share of
idle multiprocessors shrinks. Every path is compiled by Inductor and timed in a CUDA graph (CUDA events,
median of `--repeats` replays); each split path's output is checked against the one-call one.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
import torch.nn.functional as F

from score_kernel import report, time_us

# (model, batch incl. CFG, heads, keys, head dim, chosen queries at ratio 0.3 (FLUX: + 512 text rows)).
SHAPES = [
    ("DiT-XL/2 256x256", 16, 16, 256, 72, 77),
    ("PixArt-alpha 1024x1024", 2, 16, 4096, 72, 1229),
    ("PixArt-alpha 2048x2048", 2, 16, 16384, 72, 4916),
    ("FLUX.1-dev 1024x1024", 1, 24, 4608, 128, 1741),
]
SPLITS = (2, 3, 4)


def heads_view(x: torch.Tensor, heads: int) -> torch.Tensor:
    """[B, L, H*d] -> [B, H, L, d], a view as the models make it."""
    b, n, _ = x.shape
    return x.view(b, n, heads, -1).transpose(1, 2)


def one_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    return F.scaled_dot_product_attention(heads_view(q, heads), heads_view(k, heads), heads_view(v, heads))


def split_call(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int, parts: int) -> torch.Tensor:
    """The keys in `parts` runs along the batch axis (views), the queries repeated for each; one cuDNN call
    that returns each run's log-sum-exp, the runs merged by them."""
    b, n, width = k.shape
    qs = q.unsqueeze(1).expand(b, parts, *q.shape[1:]).reshape(b * parts, *q.shape[1:])
    ks, vs = (t.view(b * parts, n // parts, width) for t in (k, v))
    out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(
        heads_view(qs, heads), heads_view(ks, heads), heads_view(vs, heads), None, True
    )[:2]
    lse = lse.reshape(b, parts, heads, -1, 1)
    weight = torch.softmax(lse, dim=1)
    return (out.view(b, parts, *out.shape[1:]).float() * weight).sum(dim=1).to(q.dtype)


def backends(heads: int) -> dict:
    """The one call through other kernels: cuDNN's asked for log-sum-exps (as the split calls are),
    FlashAttention-2, memory-efficient attention; and the split call's cuDNN kernel alone."""
    def lse_call(q, k, v):
        return torch.ops.aten._scaled_dot_product_cudnn_attention(
            heads_view(q, heads), heads_view(k, heads), heads_view(v, heads), None, True
        )[0]

    def backend(kind):
        def call(q, k, v):
            with torch.nn.attention.sdpa_kernel(kind):
                return one_call(q, k, v, heads)
        return call

    def split2_kernel(q, k, v):
        b, n, width = k.shape
        qs = q.repeat(2, 1, 1)  # stands for the expanded queries: not timed apart
        return lse_call(qs, k.view(2 * b, n // 2, width), v.view(2 * b, n // 2, width))

    kinds = torch.nn.attention.SDPBackend
    fns = {"lse": lse_call, "flash": backend(kinds.FLASH_ATTENTION), "efficient": backend(kinds.EFFICIENT_ATTENTION)}
    out = {label: torch.compile(fn, dynamic=False) for label, fn in fns.items()}
    out["split2_kernel"] = split2_kernel
    return out


def measure(repeats: int) -> list[dict]:
    rows = []
    for name, batch, heads, keys, dim, chosen in SHAPES:
        torch._dynamo.reset()
        torch.manual_seed(0)
        width = heads * dim
        k, v = (torch.randn(batch, keys, width, device="cuda", dtype=torch.bfloat16) for _ in range(2))
        full_q = torch.randn(batch, keys, width, device="cuda", dtype=torch.bfloat16)
        q = full_q[:, :chosen].clone()
        row = {"model": name, "shape": f"{batch}x{heads}, {chosen}q x {keys}k, d={dim}"}
        plain = torch.compile(one_call, dynamic=False)
        row["full_us"] = time_us(lambda: plain(full_q, k, v, heads), repeats)
        row["one_call_us"] = time_us(lambda: plain(q, k, v, heads), repeats)
        ref = plain(q, k, v, heads).float()
        for label, fn in backends(heads).items():
            row[f"{label}_us"] = time_us(lambda: fn(q, k, v), repeats)
        for parts in SPLITS:
            if keys % parts:
                continue
            fn = torch.compile(lambda a, b_, c, p=parts: split_call(a, b_, c, heads, p), dynamic=False)
            row[f"split{parts}_us"] = time_us(lambda: fn(q, k, v), repeats)
            out = fn(q, k, v).float()
            row[f"split{parts}_rel_err"] = ((out - ref).norm() / ref.norm()).item()
        row["waves"] = staircase(one_call, full_q, k, v, heads, chosen, repeats)
        rows.append(row)
        print({key: val for key, val in row.items() if key != "waves"}, flush=True)
    return rows


def staircase(call, full_q, k, v, heads: int, chosen: int, repeats: int) -> list[tuple[int, float]]:
    """One-call time (eager: the same kernel) at query counts around `chosen` (steps: a wave starts)."""
    step = max(8, chosen // 16)
    counts = range(max(step, chosen - 8 * step), min(full_q.shape[1], chosen + 8 * step) + 1, step)
    return [(n, time_us(lambda n=n: call(full_q[:, :n], k, v, heads), repeats)) for n in counts]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    rows = measure(args.repeats)
    labels = ["full_us", "one_call_us", "lse_us", "flash_us", "efficient_us", "split2_kernel_us"] + [f"split{p}_us" for p in SPLITS]
    lines = ["| model | shape | " + " | ".join(labels) + " |", "|" + "---|" * (len(labels) + 2)]
    for r in rows:
        lines.append(f"| {r['model']} | {r['shape']} | " + " | ".join(f"{r[x]:.1f}" if x in r else "-" for x in labels) + " |")
    title = f"partial self-attention, {torch.cuda.get_device_name()} ({torch.cuda.get_device_properties(0).multi_processor_count} SMs), torch {torch.__version__}, bf16"
    report(args.out / "split_attention.json", title, "\n".join(lines), rows)
    for r in rows:
        print(r["model"], " ".join(f"{n}:{us:.0f}" for n, us in r["waves"]))


if __name__ == "__main__":
    main()
