"""The demo: sample digits from the embedded trained DiT without and with toca_fx, side by side.

    python -m toca_fx.demo [--samples 40] [--steps 25] [--interval 4] [--ratio 0.3] [--out toca_demo.png]

Both runs are compiled (plain Inductor, and the toca_fx backend), warmed up so that compilation stays
out of the timing, and sampled from the same noise. Prints a table (wall time, speedup, tokens
recomputed, theoretical FLOP ratio, classifier accuracy, Frechet distance to the real digits, PSNR and
SSIM of each cached sample against its uncached twin) and writes a PNG: uncached left, cached right.
"""
from __future__ import annotations

import argparse
import logging
import struct
import sys
import time
import zlib
from pathlib import Path

import torch

from . import ToCaBackend, ToCaConfig
from .eval.metrics import classifier_accuracy, digits_frechet_distance, psnr, ssim
from .models.digits import RESOLUTION, load_digits_classifier, load_digits_dit
from .eval.sampling import ddim_sample


def main(argv: list[str] | None = None) -> dict:
    args = _parser().parse_args(argv)
    _show_compile_progress()
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    model = load_digits_dit(device=device).eval()
    classifier = load_digits_classifier(device=device)
    labels = torch.arange(10, device=device).repeat_interleave(max(1, args.samples // 10))
    shape = (model.in_channels, RESOLUTION, RESOLUTION)
    config = ToCaConfig(interval=args.interval, ratio=args.ratio, num_steps=args.steps)
    backend = ToCaBackend(config)
    runs = {
        "uncached (Inductor)": torch.compile(model, dynamic=False),
        "toca_fx": torch.compile(model, backend=backend, dynamic=False),
    }
    samples, seconds = {}, {}
    for name, fn in runs.items():
        print(f"{name}: compiling and warming up ...", file=sys.stderr)
        ddim_sample(fn, labels, shape, steps=2, seed=args.seed)  # compiles every variant
        backend.reset()
        backend.reset_stats()
        print(f"{name}: sampling {len(labels)} digits, {args.steps} steps", file=sys.stderr)
        start = time.perf_counter()
        samples[name] = ddim_sample(fn, labels, shape, steps=args.steps, seed=args.seed, progress=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds[name] = time.perf_counter() - start
    report = _report(samples, seconds, labels, classifier, backend, args.steps)
    _write_png(args.out, [samples[n] for n in runs])
    print(_table(report))
    print(f"\nwrote {args.out}: uncached (left) and toca_fx (right), one row per class")
    return report


def _show_compile_progress() -> None:
    """toca_fx's INFO messages (each variant's compilation as it ends) on stderr, as the demo's own."""
    log = logging.getLogger("toca_fx")
    if not log.handlers:
        log.addHandler(logging.StreamHandler(sys.stderr))
    log.setLevel(logging.INFO)


def _report(samples, seconds, labels, classifier, backend, steps) -> dict:
    base, cached = samples["uncached (Inductor)"], samples["toca_fx"]
    stats = backend.stats()
    rows = {}
    for name, images in samples.items():
        is_cached = name == "toca_fx"
        rows[name] = {
            "wall s": seconds[name],
            "speedup": seconds["uncached (Inductor)"] / seconds[name],
            "tokens recomputed": stats["computed_fraction"] if is_cached else 1.0,
            "FLOP ratio": stats["flops_ratio"] if is_cached else 1.0,
            "accuracy": classifier_accuracy(classifier, images, labels),
            "Frechet distance": digits_frechet_distance(classifier, images),
            "PSNR dB": psnr(cached, base).mean().item() if is_cached else float("inf"),
            "SSIM": ssim(cached, base).mean().item() if is_cached else 1.0,
        }
    return rows


def _table(report: dict) -> str:
    cols = list(next(iter(report.values())))
    lines = ["| setting | " + " | ".join(cols) + " |", "|---" * (len(cols) + 1) + "|"]
    for name, row in report.items():
        cells = [f"{v:.1f}" if c.startswith(("wall", "PSNR", "Frechet")) else f"{v:.3f}" for c, v in row.items()]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _write_png(path: Path, grids: list[torch.Tensor], scale: int = 4, per_row: int | None = None) -> None:
    """Greyscale PNG of image batches side by side (no imaging library needed)."""
    panels = []
    for images in grids:
        images = ((images.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).cpu()[:, 0]
        n, h, w = images.shape
        cols = per_row or max(1, n // 10)
        rows = -(-n // cols)
        canvas = torch.full((rows * (h + 1), cols * (w + 1)), 255, dtype=torch.uint8)
        for i in range(n):
            r, c = divmod(i, cols)
            canvas[r * (h + 1): r * (h + 1) + h, c * (w + 1): c * (w + 1) + w] = images[i]
        panels.append(canvas)
    gap = torch.full((panels[0].shape[0], 6), 255, dtype=torch.uint8)
    picture = torch.cat([torch.cat([p, gap], dim=1) for p in panels], dim=1)[:, :-6]
    picture = picture.repeat_interleave(scale, 0).repeat_interleave(scale, 1).numpy()
    raw = b"".join(b"\x00" + row.tobytes() for row in picture)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", picture.shape[1], picture.shape[0], 8, 0, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw, 9)) + chunk(b"IEND", b""))


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m toca_fx.demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=20, help="digits to sample (a multiple of 10: equal per class)")
    p.add_argument("--steps", type=int, default=25, help="DDIM steps")
    p.add_argument("--interval", type=int, default=4, help="a full step every this many steps")
    p.add_argument("--ratio", type=float, default=0.3, help="fraction of tokens recomputed on partial steps")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto (CUDA when present), cpu or cuda")
    p.add_argument("--out", type=Path, default=Path("toca_demo.png"))
    return p


if __name__ == "__main__":
    main()
