"""Train the glyphs DiT and its classifier from scratch, write their checkpoints, report sample quality.

    PYTHONPATH=. python examples/train_glyphs.py --max-seconds 400 --out /tmp/ck      # GPU
    PYTHONPATH=. python examples/train_glyphs.py --steps 3 --batch-size 4 --classifier-steps 3 \\
        --train-size 64 --eval-samples 4 --eval-steps 2 --no-compile --out /tmp/ck          # CPU smoke run

Data: `toca_fx.models.glyphs.glyphs_dataset` (training set seed 0, classifier validation seed 1,
reference statistics seed 2). The DiT learns eps-prediction on the linear 1000-step schedule that
toca_fx.eval.sampling uses, with 10% of the labels dropped to the null class for classifier-free
guidance; bf16 autocast, each block compiled once (regional compilation), AdamW with warmup and a cosine
decay over whichever ends first, `--steps` or `--max-seconds`, and an EMA of the weights. Every
`--save-every` seconds the EMA weights (glyphs_dit.pt) and the raw weights (glyphs_dit_raw.pt) are
written in bf16, so a run cut short still leaves a checkpoint; `--resume DIR` starts from DIR's two.
"""
from __future__ import annotations

import argparse
import math
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from toca_fx.eval.metrics import (
    DigitClassifier, classifier_accuracy, classifier_features, digits_frechet_distance, feature_statistics,
)
from toca_fx.eval.sampling import ddim_sample, alphas_cumprod
from toca_fx.models.glyphs import (
    CHECKPOINT_DIR, CLASSIFIER_CONFIG, DIT_CONFIG, RESOLUTION, GlyphsDiT, glyphs_dataset,
    load_glyphs_classifier, load_glyphs_dit, save_checkpoint,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=100000, help="DiT optimiser steps (upper bound)")
    p.add_argument("--max-seconds", type=float, default=None, help="DiT training time budget")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--warmup", type=int, default=300)
    p.add_argument("--ema", type=float, default=0.9995)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--train-size", type=int, default=300000, help="training images (seed 0)")
    p.add_argument("--classifier-steps", type=int, default=3000)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--eval-steps", type=int, default=20)
    p.add_argument("--cfg-scales", type=str, default="1.5,2,3", help="comma-separated guidance scales")
    p.add_argument("--save-every", type=float, default=60.0, help="seconds between checkpoints")
    p.add_argument("--resume", type=Path, default=None, help="folder with glyphs_dit.pt and glyphs_dit_raw.pt")
    p.add_argument("--classifier", type=Path, default=None, help="use this classifier instead of training one")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="folder for the checkpoints")
    return p.parse_args(argv)


def noisy(x: torch.Tensor) -> torch.Tensor:
    """Pixel noise of a random strength up to 0.15, so the classifier judges shapes, not clean pixels."""
    return x + 0.15 * torch.rand(len(x), 1, 1, 1, device=x.device) * torch.randn_like(x)


def cosine_lr(base: float, step: int, warmup: int, progress: float) -> float:
    """Linear warmup over `warmup` steps, then cosine from `base` to 5% of it as `progress` goes 0 -> 1."""
    decay = 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return base * min(1.0, step / warmup) * decay


def train_classifier(args: argparse.Namespace, device: torch.device) -> DigitClassifier:
    images, labels = glyphs_dataset(min(args.train_size, 100000), seed=0, device=device)
    val_x, val_y = glyphs_dataset(min(10000, args.train_size), seed=1, device=device)
    clf = DigitClassifier(**CLASSIFIER_CONFIG).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in range(1, args.classifier_steps + 1):
        idx = torch.randint(len(images), (256,), device=device)
        loss = F.cross_entropy(clf(noisy(images[idx].float())), labels[idx])
        for group in opt.param_groups:
            group["lr"] = cosine_lr(2e-3, step, 100, step / args.classifier_steps)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc = classifier_accuracy(clf, val_x, val_y)
    print(f"classifier: {args.classifier_steps} steps, accuracy {acc:.4f} on {len(val_x)} held-out glyphs (seed 1)")
    ref, _ = glyphs_dataset(min(10000, args.train_size), seed=2, device=device)
    mu, cov = feature_statistics(classifier_features(clf, ref))
    clf.ref_mu.copy_(mu)
    clf.ref_cov.copy_(cov)
    return clf


def _new_model(args: argparse.Namespace, device: torch.device) -> tuple[GlyphsDiT, GlyphsDiT]:
    model = GlyphsDiT(**DIT_CONFIG).zero_init_()
    ema = GlyphsDiT(**DIT_CONFIG)
    if args.resume is not None:
        model.load_state_dict(torch.load(args.resume / "glyphs_dit_raw.pt", weights_only=True)["state_dict"])
        ema.load_state_dict(torch.load(args.resume / "glyphs_dit.pt", weights_only=True)["state_dict"])
        print(f"resumed from {args.resume}")
    else:
        ema.load_state_dict(model.state_dict())
    return model.to(device).train(), ema.to(device).eval().requires_grad_(False)


def _save(model: GlyphsDiT, ema: GlyphsDiT, out: Path) -> None:
    save_checkpoint(ema, DIT_CONFIG, out / "glyphs_dit.pt", dtype=torch.bfloat16)
    save_checkpoint(model, DIT_CONFIG, out / "glyphs_dit_raw.pt", dtype=torch.bfloat16)


def train_dit(args: argparse.Namespace, device: torch.device) -> None:
    images, labels = glyphs_dataset(args.train_size, seed=0, device=device)
    images = images.to(torch.bfloat16 if device.type == "cuda" else torch.float32)
    model, ema = _new_model(args, device)
    print(f"DiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, config {DIT_CONFIG}")
    if not args.no_compile:
        for block in model.blocks:
            block.compile()
    params = list(model.parameters())
    ema_params = list(ema.parameters())
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0, betas=(0.9, 0.99), fused=device.type == "cuda")
    a_bar = alphas_cumprod().float().to(device)
    null = DIT_CONFIG["num_classes"]
    start = last_save = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(images), (args.batch_size,), device=device)
        x0, y = images[idx].float(), labels[idx]
        y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
        t = torch.randint(len(a_bar), (len(y),), device=device)
        noise = torch.randn_like(x0)
        a = a_bar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.mse_loss(model(xt, t, y).float(), noise)
        if step == 3:  # compile and warm-up behind: the time budget counts from here
            start = time.time()
        elapsed = time.time() - start if step > 3 else 0.0
        progress = max(step / args.steps, elapsed / args.max_seconds if args.max_seconds else 0.0)
        for group in opt.param_groups:
            group["lr"] = cosine_lr(args.lr, step, args.warmup, progress)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        decay = min(args.ema, (1 + step) / (10 + step))
        torch._foreach_lerp_(ema_params, params, 1 - decay)
        done = step == args.steps or progress >= 1.0
        if step % 500 == 0 or step == 100 or done:
            print(f"step {step}: loss {loss.item():.4f}, lr {opt.param_groups[0]['lr']:.2e}, {elapsed:.0f}s, "
                  f"{step / max(elapsed, 1e-9):.1f} steps/s", flush=True)
        if done or time.time() - last_save > args.save_every:
            _save(model, ema, args.out)
            last_save = time.time()
        if done:
            print(f"DiT training stopped after {step} steps, {elapsed:.0f}s")
            break


def evaluate(args: argparse.Namespace, device: torch.device) -> None:
    """Sample quality of the checkpoints as written (bf16 DiT weights run in float32), per guidance scale."""
    dit = load_glyphs_dit(device, checkpoint=args.out / "glyphs_dit.pt")
    clf = load_glyphs_classifier(device, checkpoint=args.out / "glyphs_classifier.pt")
    n = args.eval_samples
    real, _ = glyphs_dataset(n, seed=1, device=device)
    print(f"Frechet distance of {n} held-out real glyphs (seed 1) to the reference: "
          f"{digits_frechet_distance(clf, real):.3f}")
    labels = torch.arange(n, device=device) % dit.num_classes
    for cfg in [float(s) for s in args.cfg_scales.split(",")]:
        begin = time.time()
        samples = ddim_sample(dit, labels, (1, RESOLUTION, RESOLUTION), steps=args.eval_steps, cfg_scale=cfg,
                              seed=args.seed)
        print(f"cfg {cfg}: {n} samples, {args.eval_steps} DDIM steps: accuracy "
              f"{classifier_accuracy(clf, samples, labels):.4f}, Frechet distance "
              f"{digits_frechet_distance(clf, samples):.3f}, {time.time() - begin:.1f}s", flush=True)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    args.out.mkdir(parents=True, exist_ok=True)
    begin = time.time()
    if args.classifier is None:
        save_checkpoint(train_classifier(args, device), CLASSIFIER_CONFIG, args.out / "glyphs_classifier.pt")
    elif args.classifier.resolve() != (args.out / "glyphs_classifier.pt").resolve():
        (args.out / "glyphs_classifier.pt").write_bytes(args.classifier.read_bytes())
    print(f"classifier ready after {time.time() - begin:.0f}s", flush=True)
    train_dit(args, device)
    print(f"total training {time.time() - begin:.0f}s", flush=True)
    evaluate(args, device)


if __name__ == "__main__":
    main()
