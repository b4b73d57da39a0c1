r"""toca_fx against the other caching libraries, on one transformer in one process.

    PYTHONPATH=/tmp/site:$PWD python benchmarks/peers.py --out results/     # GPU: diffusers, cache-dit wheels
    PYTHONPATH=/tmp/site:$PWD python benchmarks/peers.py --steps 50,28 --only "plain,TaylorSeer preset"
    python benchmarks/peers.py --tiny                                       # CPU smoke run

The transformer is diffusers' FluxTransformer2DModel at FLUX.1-dev width (hidden 3072, 24 heads,
1024x1024: 4096 image and 512 text tokens), random weights, bf16; --double and --single set its depth
(FLUX.1-dev: 19 and 38). --steps lists the generation lengths (28 by default; 50 is TaylorSeer's
FLUX.1-dev setting), each run over the settings in turn. One Inductor cache directory serves the whole
run (`fresh_inductor_caches`): a setting that compiles graphs an earlier one compiled (plain Inductor's
second length, toca_fx's second preset) loads them, and its compile time is a warm one. Settings:
- plain Inductor, the baseline: diffusers' regional compile (`compile_repeated_blocks`, each block
  compiled once and reused: a full-depth FLUX compiled whole takes minutes);
- toca_fx: TaylorSeer's schedule forecasting at order 1 (preset "taylorseer-flux" at 50 steps,
  "taylorseer-flux-28" otherwise), ToCa's preset "flux" (reuse), and the hybrid (ToCa's schedule
  forecasting, chosen MLP rows recomputed);
- diffusers' TaylorSeerCache (cache_interval 6, order 1, 3 warm-up steps: a fixed schedule, as many
  steps computed as in the toca_fx preset), FirstBlockCache (threshold-driven: with random weights
  its decisions are arbitrary; no fixed schedule is offered) and MagCache (FLUX's published magnitude
  ratios: its decisions follow from them, a fixed schedule), each with diffusers' regional compile
  (`compile_repeated_blocks`);
- cache-dit's DBCache (first Fn blocks always computed, the others reused) with a static steps mask
  (the toca_fx preset's full steps), without and with its TaylorSeer calibrator (order 1), compiled
  with torch.compile.
Per setting: ms per generation (median, CUDA events, after a first generation that compiles), compile
time (first generation minus the median), peak memory, the compute it did (matmul FLOPs counted by
torch's FlopCounterMode over one eager generation of the same setting, against the uncached one (one
uncached call times the steps: every uncached step does the same work); for toca_fx the FLOPs of its
rewritten graphs, `stats()`), and the final sample's relative L2 error against plain Inductor's. A
setting that fails is recorded with its error; settings left when --budget seconds have passed are
recorded as not run.
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.run import (  # noqa: E402
    Case, flux_model, flux_inputs, rel_l2, build, fresh_inductor_caches, generate, time_generations, warm_up,
)
from toca_fx import ToCaBackend, ToCaConfig  # noqa: E402
from toca_fx.policies.plan import StepKind  # noqa: E402


def taylorseer_preset(steps: int) -> str:
    """The toca_fx TaylorSeer preset of a generation length: the paper's 50 steps, else the 28-step one."""
    return "taylorseer-flux" if steps == 50 else "taylorseer-flux-28"


def full_steps(steps: int) -> tuple[int, ...]:
    """The steps the TaylorSeer preset computes in full (the peers' fixed schedules follow them)."""
    policy = ToCaConfig.preset(taylorseer_preset(steps)).policy
    return tuple(s for s in range(steps) if policy.label(s, steps) == StepKind.FULL)


@dataclass
class Peer:
    """One setting: `apply(model)` returns the callable a generation calls (compiled), `eager(model)`
    the same caching uncompiled (for counting), `undo(model)` restores the model."""

    name: str
    apply: Callable[[torch.nn.Module], Callable]
    eager: Callable[[torch.nn.Module], Callable] | None = None
    undo: Callable[[torch.nn.Module], None] = lambda m: None
    schedule: str = ""


def _toca(name: str, config: ToCaConfig, schedule: str) -> Peer:
    holder: dict[str, ToCaBackend] = {}

    def apply(model):
        holder["backend"] = ToCaBackend(config)
        return torch.compile(model, backend=holder["backend"], dynamic=False)

    peer = Peer(name, apply, schedule=schedule)
    peer.backend = holder  # type: ignore[attr-defined]
    return peer


def _uncompile(model: torch.nn.Module) -> None:
    for m in model.modules():
        m._compiled_call_impl = None


def _with_context(model: torch.nn.Module, steps: int) -> Callable:
    """Each call in diffusers' cache context, and the hooks' state reset at each generation's first call."""
    calls = [0]

    def fn(**kwargs):
        if calls[0] % steps == 0:
            model._reset_stateful_cache()
        calls[0] += 1
        with model.cache_context("cond"):
            return model(**kwargs)

    return fn


def _plain() -> Peer:
    def apply(model):
        model.compile_repeated_blocks(dynamic=False)
        return model

    return Peer("plain Inductor (regional compile)", apply, undo=_uncompile)


def _diffusers(name: str, make_config: Callable[[], Any], schedule: str, steps: int) -> Peer:
    def enable(model, compiled: bool):
        model.enable_cache(make_config())
        if compiled:
            model.compile_repeated_blocks(dynamic=False)
        return _with_context(model, steps)

    def undo(model):
        model.disable_cache()
        _uncompile(model)

    return Peer(name, lambda m: enable(m, True), lambda m: enable(m, False), undo, schedule)


def _cache_dit(name: str, calibrated: bool, front: int, schedule: str, steps: int) -> Peer:
    def enable(model, compiled: bool):
        import cache_dit

        full = full_steps(steps)
        mask = [1 if s in full else 0 for s in range(steps)]
        config = cache_dit.DBCacheConfig(Fn_compute_blocks=front, Bn_compute_blocks=0, num_inference_steps=steps,
                                         steps_computation_mask=mask, steps_computation_policy="static")
        calibrator = cache_dit.TaylorSeerCalibratorConfig(taylorseer_order=1) if calibrated else None
        cache_dit.enable_cache(model, cache_config=config, calibrator_config=calibrator)
        return torch.compile(model, dynamic=False) if compiled else model

    def undo(model):
        import cache_dit

        cache_dit.disable_cache(model)

    return Peer(name, lambda m: enable(m, True), lambda m: enable(m, False), undo, schedule)


def peers(front: int, steps: int) -> list[Peer]:
    def taylorseer():
        from diffusers import TaylorSeerCacheConfig

        return TaylorSeerCacheConfig(cache_interval=6, max_order=1, disable_cache_before_step=3)

    def first_block():
        from diffusers import FirstBlockCacheConfig

        return FirstBlockCacheConfig(threshold=0.05)

    def mag():
        from diffusers import MagCacheConfig
        from diffusers.hooks.mag_cache import FLUX_MAG_RATIOS

        return MagCacheConfig(num_inference_steps=steps, mag_ratios=FLUX_MAG_RATIOS)

    full = full_steps(steps)
    fixed = f"fixed: full steps {', '.join(map(str, full))}"
    # diffusers' TaylorSeerCache computes its warm-up steps, then one step in cache_interval from the
    # last warm-up step on (its 2026-12-03 run: 0, 1, 2, 4, 10, 16, 22 of 28).
    computed = sorted({0, 1, 2, *range(4, steps, 6)})
    interval3 = "fixed: ToCa's interval 3"
    # In the order they run: cache-dit last, as its disable_cache leaves its patch of FLUX's forward in
    # place (the 2026-12-03 run had them in the middle: the settings after them ran on the patched
    # forward, and FirstBlockCache failed on it).
    preset = taylorseer_preset(steps)
    return [
        _plain(),
        _toca(f"toca_fx TaylorSeer preset ({preset}, order 1)", ToCaConfig.preset(preset, num_steps=steps), fixed),
        _diffusers("diffusers TaylorSeerCache(cache_interval=6, max_order=1, disable_cache_before_step=3)", taylorseer,
                   f"fixed: steps {', '.join(map(str, computed))} computed", steps),
        _diffusers("diffusers FirstBlockCache(threshold=0.05)", first_block, "threshold on random weights", steps),
        _diffusers("diffusers MagCache(FLUX_MAG_RATIOS)", mag, "fixed by the published ratios", steps),
        _toca("toca_fx hybrid (ToCa preset flux, forecasting order 1)",
              ToCaConfig.preset("flux", num_steps=steps, attention_queries=64, forecast_order=1), interval3),
        _toca("toca_fx ToCa preset flux (reuse)", ToCaConfig.preset("flux", num_steps=steps, attention_queries=64), interval3),
        _cache_dit(f"cache-dit DBCache F{front}B0 + TaylorSeer order 1, static steps mask", True, front, fixed, steps),
        _cache_dit(f"cache-dit DBCache F{front}B0, static steps mask", False, front, fixed, steps),
    ]


def counted_flops(fn: Callable, x0: torch.Tensor, args_of: Callable, steps: int) -> int:
    """Matmul FLOPs of one eager generation of `fn`, as torch's FlopCounterMode counts them."""
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        generate(fn, x0, args_of, steps, cfg=False)
    return counter.get_total_flops()


def run_peer(peer: Peer, model, x0, args_of, repeats: int, uncached_flops: int, steps: int) -> dict[str, Any]:
    torch._dynamo.reset()
    gc.collect()
    if x0.is_cuda:
        torch.cuda.empty_cache()
    row: dict[str, Any] = {"setting": peer.name, "schedule": peer.schedule, "steps": steps}
    try:
        if peer.eager is not None:
            row["compute_done"] = counted_flops(peer.eager(model), x0, args_of, steps) / uncached_flops
            peer.undo(model)
        fn = peer.apply(model)
        result = time_generations(fn, x0, args_of, steps, repeats, cfg=False)
        row.update({k: v for k, v in result.items() if k in ("ms", "spread", "compile_s", "peak")})
        row["sample"] = result["sample"]
        backend = getattr(peer, "backend", {}).get("backend")
        if backend is not None:
            stats = backend.stats()
            row.update(compute_done=stats["flops_ratio"], cache_bytes=stats["cache_bytes"], calls=stats["calls"])
    except Exception as e:  # a library's failure is a result too
        row["error"] = f"{type(e).__name__}: {e}"[:2000]
        traceback.print_exc()
    finally:
        peer.undo(model)
    return row


def markdown(rows: list[dict], header: str) -> str:
    """One table; each row against the baseline (the first row measured) of its generation length."""
    base = {}
    for r in rows:
        if "ms" in r:
            base.setdefault(r["steps"], r)
    lines = [header, "", "| steps | setting | schedule | ms / generation | vs plain Inductor | compute done | compile s | "
             "peak GiB | peak x | rel L2 vs Inductor |", "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        head = f"| {r['steps']} | {r['setting']} | {r['schedule']} |"
        if "ms" not in r:
            lines.append(f"{head} {r.get('error', 'not run')} | | | | | | |")
            continue
        b = base[r["steps"]]
        lines.append(
            f"{head} {r['ms']:.0f} | {b['ms'] / r['ms']:.2f}x | {r.get('compute_done', 1.0):.2f} | {r['compile_s']:.1f} | "
            f"{r['peak'] / 2**30:.1f} | {r['peak'] / b['peak'] if b['peak'] else 0:.2f} | {r.get('rel_l2', 0):.4f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny FLUX on the CPU: a smoke run of this script")
    p.add_argument("--double", type=int, default=19, help="double-stream blocks (FLUX.1-dev: 19)")
    p.add_argument("--single", type=int, default=38, help="single-stream blocks (FLUX.1-dev: 38)")
    p.add_argument("--steps", default="28", help="comma-separated generation lengths, run in this order")
    p.add_argument("--front", type=int, default=8, help="cache-dit's Fn_compute_blocks")
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--budget", type=float, default=1e9, help="seconds after which no further setting starts")
    p.add_argument("--only", default="", help="comma-separated substrings: run only the settings naming one")
    p.add_argument("--skip", default="", help="comma-separated substrings of settings to leave out")
    p.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = p.parse_args(argv)
    start = time.perf_counter()
    lengths = [int(n) for n in args.steps.split(",")]
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    if args.tiny:
        size = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                    joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
        inputs = flux_inputs(8, 16, 8, 24, 16)
    else:
        size = dict(in_channels=64, num_layers=args.double, num_single_layers=args.single, attention_head_dim=128,
                    num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                    axes_dims_rope=(16, 56, 56))
        inputs = flux_inputs(64, 64, 512, 4096, 768)
    case = Case("FLUX", flux_model(**size), 1, lengths[0], inputs, [], cfg=False, build_in_dtype=True,
                float32_reference=False)
    model, x0, args_of = build(case, device, dtype)
    warm_up(model, x0, args_of, cfg=False)
    per_call = counted_flops(model, x0, args_of, 1)
    header = (f"Device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}; "
              f"{dtype}; FluxTransformer2DModel {size['num_layers']} double + {size['num_single_layers']} single blocks; "
              f"{time.strftime('%Y-%m-%d')}; python benchmarks/peers.py {' '.join(sys.argv[1:])}")
    args.out.mkdir(parents=True, exist_ok=True)
    rows: list[dict] = []
    only, skip = ([s for s in arg.split(",") if s] for arg in (args.only, args.skip))
    with fresh_inductor_caches():
        for steps in lengths:
            for peer in peers(args.front, steps):
                if any(s in peer.name for s in skip) or (only and not any(s in peer.name for s in only)):
                    continue
                if time.perf_counter() - start > args.budget:
                    rows.append({"setting": peer.name, "schedule": peer.schedule, "steps": steps,
                                 "error": "not run: time budget"})
                    continue
                rows.append(run_peer(peer, model, x0, args_of, args.repeats, per_call * steps, steps))
                print(json.dumps({k: v for k, v in rows[-1].items() if k != "sample"}, default=str), flush=True)
                _write(rows, header, args.out)
    print(markdown(_finished(rows), header))


def _finished(rows: list[dict]) -> list[dict]:
    """The rows with each sample's relative L2 against the first sample of its generation length."""
    reference: dict[int, torch.Tensor] = {}
    out = []
    for r in rows:
        r = dict(r)
        sample = r.pop("sample", None)
        if sample is not None:
            r["rel_l2"] = rel_l2(sample, reference.setdefault(r["steps"], sample))
        out.append(r)
    return out


def _write(rows: list[dict], header: str, out: Path) -> None:
    done = _finished(rows)
    (out / "peers.json").write_text(json.dumps({"header": header, "rows": done}, indent=1, default=str))
    (out / "peers.md").write_text(markdown(done, header) + "\n")


if __name__ == "__main__":
    main()
