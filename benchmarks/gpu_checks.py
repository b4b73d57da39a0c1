"""GPU correctness of the runtime's CUDA graphs, narrow caches and autocast casts, on a small DiT.

    python benchmarks/gpu_checks.py --out results/checks.json

Each check runs one generation two ways from the same inputs and reports the largest relative
difference of any step's output (CUDA-graph replay against uncaptured launches: the same kernels, so
0 is expected; autocast with parameters cast once against autocast's own casts: the same bf16
operands) and how many ToCaWarnings were raised.
"""
from __future__ import annotations

import argparse
import json
import warnings
from pathlib import Path

import torch

import toca_fx.backend as toca_backend
from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.errors import ToCaWarning
from toca_fx.models import DiT


def generation(model, config: ToCaConfig, steps: int, autocast: bool = False, mode: str | None = None):
    torch._dynamo.reset()
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False, mode=mode)
    g = torch.Generator(device="cpu").manual_seed(0)
    x = torch.randn(8, 4, 16, 16, generator=g).cuda()
    y = torch.randint(0, 10, (8,), generator=g).cuda()
    outs = []
    amp = torch.autocast("cuda", dtype=torch.bfloat16, enabled=autocast)
    with warnings.catch_warnings(record=True) as caught, torch.no_grad(), amp:
        warnings.simplefilter("always", ToCaWarning)
        for i in range(steps):
            t = torch.full((8,), 999.0 - 999.0 * i / steps, device="cuda")
            outs.append(fast(x + 0.01 * i, t, y).float().clone())
    graphed = any(gr.compiler.graphed for gr in backend.graphs)
    return outs, graphed, [str(w.message) for w in caught if issubclass(w.category, ToCaWarning)]


def diff(a, b) -> float:
    return max(((p - q).norm() / q.norm()).item() for p, q in zip(a, b))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", type=Path)
    args = p.parse_args()
    torch.manual_seed(0)
    model = DiT(input_size=16, patch_size=2, in_channels=4, hidden_size=384, depth=6, num_heads=6, num_classes=10).cuda().eval()
    bf16 = torch.nn.Module.to(__import__("copy").deepcopy(model), torch.bfloat16)
    steps = 8
    base = dict(interval=3, ratio=0.3, num_steps=steps, self_attn="recompute")
    results = {}
    for name, net, extra, mode in [("default mode", bf16, {}, None), ("reduce-overhead", bf16, {}, "reduce-overhead"),
                                   ("fp8 caches", bf16, {"cache_dtype": torch.float8_e4m3fn}, None)]:
        on, g_on, w_on = generation(net, ToCaConfig(**base, **extra), steps, mode=mode)
        off, g_off, w_off = generation(net, ToCaConfig(**base, **extra, cuda_graphs=False), steps, mode=mode)
        results[f"cuda graphs vs none, {name}"] = dict(max_rel_diff=diff(on, off), graphed=(g_on, g_off), warnings=w_on + w_off)
    cast, _, w1 = generation(model, ToCaConfig(**base), steps, autocast=True)
    own = toca_backend.lowered_parameters
    toca_backend.lowered_parameters = lambda gm, ex: {}
    try:
        incast, _, w2 = generation(model, ToCaConfig(**base), steps, autocast=True)
    finally:
        toca_backend.lowered_parameters = own
    results["autocast: weights cast once vs per call"] = dict(max_rel_diff=diff(cast, incast), warnings=w1 + w2)
    fp8, _, _ = generation(bf16, ToCaConfig(**base, cache_dtype=torch.float8_e4m3fn), steps)
    ref, _, _ = generation(bf16, ToCaConfig(**base), steps)
    results["fp8 caches vs bf16 caches (caching error added)"] = dict(max_rel_diff=diff(fp8, ref))
    for k, v in results.items():
        print(k, json.dumps(v))
    if args.out:
        args.out.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
