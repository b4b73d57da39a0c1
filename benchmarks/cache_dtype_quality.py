"""The error narrower caches add (ToCaConfig.cache_dtype), on the embedded trained digits DiT.

    python benchmarks/cache_dtype_quality.py --samples 200 --out benchmarks/results/cache-dtype.json

For each caching setting, samples with caches in the model's dtype (float32), bfloat16 and float8 e4m3
(per-row scales), all from the same noise; PSNR and relative L2 against the uncached sample, and the
cache bytes of one generation. Runs on the CPU (inner="eager") or the GPU.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.eval.metrics import psnr, relative_l2
from toca_fx.eval.sampling import ddim_sample
from toca_fx.models.digits import RESOLUTION, load_digits_dit

SETTINGS = {"N=4 r=0.3": dict(interval=4, ratio=0.3), "N=3 r=0.3, attention reused": dict(interval=3, ratio=0.3, self_attn="reuse")}
DTYPES = {"model's (float32)": None, "bfloat16": torch.bfloat16, "float8 e4m3 + row scales": torch.float8_e4m3fn}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=200)
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--out", type=Path)
    args = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model = load_digits_dit(device=device).eval()
    labels = torch.arange(10, device=device).repeat(max(1, args.samples // 10))
    sample = lambda fn: ddim_sample(fn, labels, (1, RESOLUTION, RESOLUTION), steps=args.steps, seed=0,  # noqa: E731
                                    null_label=model.num_classes)
    with torch.no_grad():
        base = sample(model)
    rows = []
    for name, setting in SETTINGS.items():
        for dname, dtype in DTYPES.items():
            torch._dynamo.reset()
            config = ToCaConfig(num_steps=args.steps, inner="eager" if device.type == "cpu" else "inductor",
                                cache_dtype=dtype, **{"self_attn": "recompute", **setting})
            backend = ToCaBackend(config)
            with torch.no_grad():
                out = sample(torch.compile(model, backend=backend, dynamic=False))
            nbytes = sum(g.state.nbytes for g in backend.graphs if g.state is not None)
            rows.append({"setting": name, "cache_dtype": dname, "psnr": psnr(out, base).clamp(max=100).mean().item(),
                         "rel_l2": relative_l2(out, base).mean().item(), "cache_bytes": nbytes})
            print(json.dumps(rows[-1]), flush=True)
    head = (f"{len(labels)} samples, {args.steps} DDIM steps, {device.type}, torch {torch.__version__}, "
            f"{time.strftime('%Y-%m-%d')}; python benchmarks/cache_dtype_quality.py --samples {args.samples}")
    lines = [head, "", "| setting | cache dtype | PSNR vs uncached (dB) | rel L2 | cache KiB |", "|---|---|---|---|---|"]
    lines += [f"| {r['setting']} | {r['cache_dtype']} | {r['psnr']:.2f} | {r['rel_l2']:.4f} | {r['cache_bytes'] / 1024:.0f} |"
              for r in rows]
    print("\n".join(lines))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps({"header": head, "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
