"""Train the digits DiT and its classifier from scratch, write their checkpoints, report sample quality.

    PYTHONPATH=. python examples/train_digits.py --max-minutes 4       # GPU: a few minutes
    PYTHONPATH=. python examples/train_digits.py --steps 3 --classifier-steps 3 --eval-samples 10 --out /tmp/ck

The DiT learns eps-prediction on the linear 1000-step schedule that toca_fx.eval.sampling uses by default,
with 10% of the labels dropped to the null class for classifier-free guidance; its EMA weights are
saved in fp16. The classifier is trained on 80% of the digits with random affine jitter and noise (so
that it judges generated digits, not memorised pixels); the real digits' feature statistics are stored
with it for the Frechet distance.
"""
from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from toca_fx.eval.metrics import (
    DigitClassifier,
    classifier_accuracy,
    classifier_features,
    digits_frechet_distance,
    feature_statistics,
)
from toca_fx.models.digits import (
    CHECKPOINT_DIR,
    CLASSIFIER_CONFIG,
    DIT_CONFIG,
    RESOLUTION,
    digits_dataset,
    load_digits_classifier,
    load_digits_dit,
    save_checkpoint,
)
from toca_fx.models.dit import DiT
from toca_fx.eval.sampling import DEFAULT_STEPS, alphas_cumprod, ddim_sample


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=20000, help="DiT optimiser steps")
    p.add_argument("--max-minutes", type=float, default=None, help="stop DiT training early after this")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=5e-4)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--ema", type=float, default=0.999)
    p.add_argument("--label-dropout", type=float, default=0.1)
    p.add_argument("--classifier-steps", type=int, default=2000)
    p.add_argument("--eval-samples", type=int, default=1000)
    p.add_argument("--eval-steps", type=int, default=DEFAULT_STEPS)
    p.add_argument("--cfg-scales", type=str, default="1,1.5,2,3,4", help="comma-separated guidance scales")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=CHECKPOINT_DIR, help="folder for the checkpoints")
    p.add_argument("--save-samples", type=Path, default=None, help="write 100 samples per scale here")
    return p.parse_args()


def augment(x: torch.Tensor) -> torch.Tensor:
    """Random rotation (+-10 deg), scale (0.9..1.1), shift (+-2 px at 16x16) and pixel noise."""
    b = len(x)
    angle = (torch.rand(b, device=x.device) - 0.5) * (20 * torch.pi / 180)
    scale = 0.9 + 0.2 * torch.rand(b, device=x.device)
    shift = (torch.rand(b, 2, device=x.device) - 0.5) * 0.5
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    x = F.grid_sample(x + 1, grid, align_corners=False) - 1  # zero padding is background (-1)
    return x + 0.1 * torch.rand(b, 1, 1, 1, device=x.device) * torch.randn_like(x)


def train_classifier(images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> DigitClassifier:
    device = images.device
    perm = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed)).to(device)
    cut = int(0.8 * len(images))
    train, val = perm[:cut], perm[cut:]
    clf = DigitClassifier(**CLASSIFIER_CONFIG).to(device)
    opt = torch.optim.AdamW(clf.parameters(), lr=1e-3, weight_decay=1e-4)
    for _ in range(args.classifier_steps):
        idx = train[torch.randint(len(train), (128,), device=device)]
        loss = F.cross_entropy(clf(augment(images[idx])), labels[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    acc = classifier_accuracy(clf, images[val], labels[val])
    print(f"classifier: {args.classifier_steps} steps, held-out accuracy {acc:.4f} on {len(val)} real digits")
    mu, cov = feature_statistics(classifier_features(clf, images))
    clf.ref_mu.copy_(mu)
    clf.ref_cov.copy_(cov)
    return clf


@torch.no_grad()
def update_ema(ema: DiT, model: DiT, decay: float) -> None:
    for e, p in zip(ema.parameters(), model.parameters()):
        e.lerp_(p, 1 - decay)


def train_dit(images: torch.Tensor, labels: torch.Tensor, args: argparse.Namespace) -> DiT:
    device = images.device
    model = DiT(**DIT_CONFIG).zero_init_().to(device)
    ema = copy.deepcopy(model).requires_grad_(False)
    print(f"DiT: {sum(p.numel() for p in model.parameters()) / 1e6:.2f}M parameters, config {DIT_CONFIG}")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    a_bar = alphas_cumprod().float().to(device)
    null = DIT_CONFIG["num_classes"]
    start = time.time()
    for step in range(1, args.steps + 1):
        idx = torch.randint(len(images), (args.batch_size,), device=device)
        x0, y = images[idx], labels[idx]
        y = torch.where(torch.rand(len(y), device=device) < args.label_dropout, null, y)
        t = torch.randint(len(a_bar), (len(y),), device=device)
        noise = torch.randn_like(x0)
        a = a_bar[t].view(-1, 1, 1, 1)
        xt = a.sqrt() * x0 + (1 - a).sqrt() * noise
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss = F.mse_loss(model(xt, t, y).float(), noise)
        for group in opt.param_groups:
            group["lr"] = args.lr * min(1.0, step / args.warmup)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        update_ema(ema, model, args.ema)
        elapsed = time.time() - start
        out_of_time = args.max_minutes is not None and elapsed > 60 * args.max_minutes
        if step % 500 == 0 or step == args.steps or out_of_time:
            print(f"step {step}: loss {loss.item():.4f}, {elapsed:.0f}s, {step / elapsed:.1f} steps/s", flush=True)
        if out_of_time:
            print(f"stopped at the time budget after {step} steps")
            break
    return ema


def evaluate(images: torch.Tensor, args: argparse.Namespace) -> None:
    """Sample quality of the checkpoints as written (fp16 DiT weights), per guidance scale."""
    device = images.device
    dit = load_digits_dit(device, checkpoint=args.out / "digits_dit.pt")
    clf = load_digits_classifier(device, checkpoint=args.out / "digits_classifier.pt")
    n = min(args.eval_samples, len(images))
    real = images[torch.randperm(len(images), generator=torch.Generator().manual_seed(1))[:n].to(device)]
    print(f"Frechet distance of {n} real digits to the reference statistics: {digits_frechet_distance(clf, real):.3f}")
    labels = torch.arange(args.eval_samples, device=device) % 10
    kept = {}
    for cfg in [float(s) for s in args.cfg_scales.split(",")]:
        start = time.time()
        samples = ddim_sample(dit, labels, (1, RESOLUTION, RESOLUTION), steps=args.eval_steps, cfg_scale=cfg,
                              seed=args.seed)
        acc = classifier_accuracy(clf, samples, labels)
        fd = digits_frechet_distance(clf, samples)
        print(f"cfg {cfg}: {args.eval_samples} samples, {args.eval_steps} DDIM steps: accuracy {acc:.4f}, "
              f"Frechet distance {fd:.3f}, range [{samples.min():.2f}, {samples.max():.2f}], "
              f"{time.time() - start:.1f}s")
        kept[cfg] = samples[:100].cpu()
    if args.save_samples is not None:
        torch.save(kept, args.save_samples)


def main() -> None:
    args = parse_args()
    torch.manual_seed(args.seed)
    torch.set_float32_matmul_precision("high")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    print(f"torch {torch.__version__} on {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}")
    images, labels = (t.to(device) for t in digits_dataset(RESOLUTION))
    args.out.mkdir(parents=True, exist_ok=True)

    start = time.time()
    clf = train_classifier(images, labels, args)
    save_checkpoint(clf, CLASSIFIER_CONFIG, args.out / "digits_classifier.pt")
    print(f"classifier trained in {time.time() - start:.0f}s")

    start = time.time()
    ema = train_dit(images, labels, args)
    save_checkpoint(ema, DIT_CONFIG, args.out / "digits_dit.pt", dtype=torch.float16)
    print(f"DiT trained in {time.time() - start:.0f}s")

    evaluate(images, args)


if __name__ == "__main__":
    main()
