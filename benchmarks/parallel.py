r"""Speed of toca_fx under diffusers' context parallelism (Ulysses), side by side in one run per world size.

    torchrun --nproc-per-node 2 benchmarks/parallel.py --models flux,wan --out results/   # 2 GPUs
    torchrun --nproc-per-node 4 benchmarks/parallel.py --models flux,wan --out results/   # 4 GPUs
    torchrun --nproc-per-node 2 benchmarks/parallel.py --tiny                            # CPU, gloo

Per model, in this order on one model instance (random weights, bf16 on CUDA):
  1. plain Inductor on one GPU: every rank runs the whole model alone (the same work on each);
  2. the toca_fx setting on one GPU, likewise;
  3. context parallel alone: `enable_parallelism(config=ContextParallelConfig(ulysses_degree=P))`, P the
     world size, compiled by plain Inductor;
  4. context parallel + the toca_fx setting.
Each: wall time per generation (median over --repeats after a warm-up generation that also compiles;
CUDA events; the ranks start each generation together), speedup over 1, bytes one rank receives from
the others per step (read off the compiled graphs' collectives: `toca_fx.analysis.collectives`; for
toca_fx, `stats()["exchanged_bytes"]`, over its graphs with cached branches, plus what any graph it
compiled plain exchanges), and the final sample's relative L2 error against the setting it caches or
parallelises. The issue's target: the speedup of 4 >= 0.9 x (speedup of 2) x (speedup of 3), printed
as "multiplied". Rank 0 writes JSON and a markdown table under --out.

On CUDA the ranks use NCCL. On the CPU (--tiny) they use gloo: diffusers builds the mesh of the
machine's accelerator and divides the rank by the accelerator count, which is 0 on a CPU-only host,
so the ranks pass a device mesh of type "cpu" and see one device while `enable_parallelism` runs. For
an input its plan does not split (Wan's 1-D timestep, on any device) diffusers 0.42.1 calls
`logger.warning_once`, which its logger lacks: the ranks give it one.
Dynamo traces diffusers' Ulysses attention into the model's graph only with gradients off (its
autograd.Function's backward breaks the graph): every run here is under torch.no_grad().

Models: "flux" is FLUX.1-dev at 1024x1024 (4096 image and 512 text tokens, 28 steps, run.py's
config); "wan" is a Wan2.1-T2V-1.3B-sized WanTransformer3DModel at 480x832, 81 frames (21 x 30 x 52 =
32760 tokens after its 1x2x2 patches), --wan-steps steps (50 by default), without guidance.
"""
from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any, Callable
from unittest import mock

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks.run import (  # noqa: E402
    FLUX_DEV, FLUX_PRESET, default_dtype, elapsed, flux_inputs, flux_model, generate, rel_l2,
)
from toca_fx import ToCaBackend, ToCaConfig  # noqa: E402
from toca_fx.analysis.collectives import exchanged_bytes  # noqa: E402

WAN_1_3B = dict(patch_size=(1, 2, 2), num_attention_heads=12, attention_head_dim=128, in_channels=16, out_channels=16,
                text_dim=4096, freq_dim=256, ffn_dim=8960, num_layers=30, cross_attn_norm=True,
                qk_norm="rms_norm_across_heads", eps=1e-6, rope_max_seq_len=1024)
TINY_FLUX = dict(in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=4,
                 joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))

TINY_WAN = dict(patch_size=(1, 2, 2), num_attention_heads=4, attention_head_dim=16, in_channels=4, out_channels=4,
                text_dim=24, freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32)


def wan_model(**config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import diffusers
        return diffusers.WanTransformer3DModel(**config)
    return build


def wan_inputs(frames: int, height: int, width: int, channels: int, text_tokens: int, text_channels: int):
    """Wan's latent [B, C, F, H, W] and text; the timestep as its pipeline passes it (0-1000)."""
    def make(batch: int, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, channels, frames, height, width, generator=g).to(device)
        ctx = torch.randn(batch, text_tokens, text_channels, generator=g).to(device)
        return x, lambda xx, t: dict(hidden_states=xx, timestep=t, encoder_hidden_states=ctx, return_dict=False)
    return make


def models(tiny: bool, wan_steps: int) -> dict[str, dict[str, Any]]:
    if tiny:  # 8 x 8 image tokens and 8 text tokens (FLUX), 2 x 4 x 4 patches (Wan): split evenly up to 8 ranks
        preset = ("ToCa preset flux", ToCaConfig.preset("flux", num_steps=6))
        return {"flux": dict(name="tiny FLUX", build=flux_model(**TINY_FLUX), steps=6,
                             inputs=flux_inputs(8, 16, 8, 24, 16), setting=preset),
                "wan": dict(name="tiny Wan", build=wan_model(**TINY_WAN), steps=6,
                            inputs=wan_inputs(2, 8, 8, 4, 5, 24), setting=preset)}
    return {
        "flux": dict(name="FLUX.1-dev 1024x1024", build=flux_model(**FLUX_DEV), steps=28,
                     inputs=flux_inputs(64, 64, 512, 4096, 768), setting=FLUX_PRESET),
        "wan": dict(name="Wan2.1-1.3B-sized 480x832x81", build=wan_model(**WAN_1_3B), steps=wan_steps,
                    inputs=wan_inputs(21, 60, 104, 16, 512, 4096),
                    setting=("ToCa preset flux's values", ToCaConfig.preset("flux", num_steps=wan_steps))),
    }


class CountingInductor:
    """Inductor, recording the bytes each captured graph's collectives move (one call of each a step)."""

    def __init__(self) -> None:
        self.graph_bytes: list[int] = []

    def __call__(self, gm: torch.fx.GraphModule, example_inputs: list[Any]) -> Callable:
        from torch._inductor.compile_fx import compile_fx
        self.graph_bytes.append(exchanged_bytes(gm.graph))
        return compile_fx(gm, example_inputs)


class CountingToCa(ToCaBackend):
    """toca_fx, adding the bytes of the graphs it compiles plain (no cacheable branch) to its stats'."""

    def __init__(self, config: ToCaConfig):
        super().__init__(config)
        self.plain_bytes = 0

    def _plain(self, gm: torch.fx.GraphModule, example_inputs: list[Any], options: dict, why: str) -> Callable:
        self.plain_bytes += exchanged_bytes(gm.graph)
        return super()._plain(gm, example_inputs, options, why)


def parallel(model: torch.nn.Module, world: int, cuda: bool) -> None:
    import diffusers.hooks.context_parallel as hooks
    from diffusers import ContextParallelConfig
    if not hasattr(hooks.logger, "warning_once"):  # diffusers 0.42.1 calls it for Wan's 1-D timestep
        hooks.logger.warning_once = functools.lru_cache(None)(hooks.logger.warning)
    if cuda:
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world))
        return
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("ring", "ulysses"))
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=world, mesh=mesh))


def timed(fn: Callable, x0: torch.Tensor, args_of: Callable, steps: int, repeats: int) -> tuple[float, torch.Tensor]:
    """Median seconds per generation after a warm-up one (which compiles); the last sample."""
    with torch.no_grad():
        generate(fn, x0, args_of, steps, cfg=False)
        times = []
        for _ in range(repeats):
            dist.barrier()
            times.append(elapsed(lambda: generate(fn, x0, args_of, steps, cfg=False), x0.is_cuda))
        return statistics.median(times), generate(fn, x0, args_of, steps, cfg=False)


def run_model(spec: dict[str, Any], world: int, device: torch.device, dtype: torch.dtype, repeats: int) -> list[dict]:
    torch.manual_seed(0)
    with torch.device(device), default_dtype(dtype):  # made in its dtype: no float32 copy of a large model
        model = spec["build"]().eval()
    x0, args_of = spec["inputs"](1, device)
    x0 = x0.to(dtype)
    label, config = spec["setting"]
    steps, cuda = spec["steps"], device.type == "cuda"
    rows, samples = [], {}

    def measure(name: str, backend: Any, base: str | None) -> None:
        torch._dynamo.reset()
        seconds, samples[name] = timed(torch.compile(model, backend=backend), x0, args_of, steps, repeats)
        if isinstance(backend, CountingInductor):
            per_step = sum(backend.graph_bytes)
        else:
            exchanged = backend.stats()["exchanged_bytes"]["calls"]
            per_step = exchanged / ((repeats + 2) * steps) + backend.plain_bytes
        row = {"model": spec["name"], "setting": name, "world": world, "ms": seconds * 1e3,
               "bytes_per_step": per_step}
        if base is not None:
            row["rel_l2_vs"] = (base, rel_l2(samples[name].float(), samples[base].float()))
        rows.append(row)

    measure("plain Inductor, 1 device", CountingInductor(), None)
    measure(f"{label}, 1 device", CountingToCa(config), "plain Inductor, 1 device")
    parallel(model, world, cuda)
    measure(f"context parallel (Ulysses {world})", CountingInductor(), "plain Inductor, 1 device")
    measure(f"context parallel + {label}", CountingToCa(config), f"context parallel (Ulysses {world})")
    base = rows[0]["ms"]
    for row in rows:
        row["speedup"] = base / row["ms"]
    toca, cp, both = (rows[i]["speedup"] for i in (1, 2, 3))
    rows[3]["multiplied"] = both / (toca * cp)  # the target: >= 0.9
    return rows


def markdown(rows: list[dict], header: str) -> str:
    lines = [header, "",
             "| model | setting | ms / generation | speedup | KiB received / step | rel L2 vs | multiplied |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        vs = f"{r['rel_l2_vs'][1]:.2e} ({r['rel_l2_vs'][0]})" if "rel_l2_vs" in r else ""
        mult = f"{r['multiplied']:.2f}" if "multiplied" in r else ""
        lines.append(f"| {r['model']} | {r['setting']} | {r['ms']:.1f} | {r['speedup']:.2f}x | "
                     f"{r['bytes_per_step'] / 1024:.1f} | {vs} | {mult} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", default="flux,wan")
    p.add_argument("--tiny", action="store_true", help="a tiny FLUX on the CPU with gloo: a smoke run")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--wan-steps", type=int, default=50)
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available() and not args.tiny
    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    if world < 2:
        raise SystemExit("run under torchrun with --nproc-per-node 2 or more: context parallelism needs ranks")
    dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(minutes=30))
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", rank)))
    device = torch.device("cuda", torch.cuda.current_device()) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    table = models(args.tiny, args.wan_steps)
    rows = []
    for key in args.models.split(","):
        if key in table:
            rows += run_model(table[key], world, device, dtype, 1 if args.tiny else args.repeats)
    if rank == 0:
        header = (f"{torch.cuda.get_device_name() if cuda else 'CPU'} x {world}, torch {torch.__version__}, "
                  f"{'bf16' if cuda else 'float32'}")
        text = markdown(rows, header)
        if args.out is not None:
            args.out.mkdir(parents=True, exist_ok=True)
            (args.out / f"parallel_{world}.json").write_text(json.dumps(rows, indent=1))
            (args.out / f"parallel_{world}.md").write_text(text + "\n")
        print(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
