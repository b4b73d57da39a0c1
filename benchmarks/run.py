r"""Speed of toca_fx against eager and plain Inductor, side by side in one process.

    python benchmarks/run.py --models dit,pixart1024 --out results/     # on the GPU machine
    python benchmarks/run.py --tiny                                     # CPU smoke run

The "flux" case (not in the default --models) is diffusers' FluxTransformer2DModel at FLUX.1-dev size
with random weights (12B parameters, 24 GB in bf16). On a GPU machine without a network, unpack the
wheels of diffusers and its import-time dependencies that `.whl/` holds (git-ignored, so copy it to
the machine with the tree; cp312 manylinux x86_64; torch and numpy are not among them: the machine's
own are used), then run it (pip, or where pip fails or is missing, `python -m zipfile`, unpacks them):

    { python -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl \
      || for w in .whl/*.whl; do python -m zipfile -e "$w" /tmp/site || exit 1; done; } \
      && PYTHONPATH=/tmp/site:$PWD python benchmarks/run.py --models flux --cudagraphs on --repeats 2

FLUX's cold compiles take minutes (docs/benchmarks.md has each run's times). Under a shorter time limit
per command, split the settings with --skip (e.g. --skip "eager|ratio 1.0|N=4", then --skip "eager|preset").

To fill `.whl/` (on a machine with PyPI): pip download --only-binary=:all: --python-version 3.12
--implementation cp --platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 --platform
manylinux_2_28_x86_64 -d .whl diffusers==0.42.1 "huggingface_hub>=1.32,<2", then delete the numpy
wheel. Where transformers and peft are installed, diffusers imports them, and transformers 5 needs
huggingface_hub < 2 (diffusers 0.42.1: >= 1.32).

For each model and setting: wall time per generation (median over repeats, CUDA events, after a
warm-up generation that also compiles), speedup over plain Inductor, theoretical FLOP speedup (counted
from the rewritten graphs' shapes), efficiency = measured / theoretical speedup, compile time (first
generation minus the median), peak memory, cache bytes, and the final sample's relative L2 error
against the uncached Inductor run from the same noise and against the model run eagerly in float32
(not for FLUX, whose float32 copy would not fit beside it): bf16 runs that round at different places
drift apart over the steps, so the first shows how far a run is from plain Inductor's and the second
how far from the exact result. Results go to JSON and a markdown table.

Each setting compiles into fresh Inductor caches (a temporary TORCHINDUCTOR_CACHE_DIR), so compile
times are cold whatever ran before. --parallel-compile sets the toca settings' ToCaConfig.parallel_compile
(auto: on with 8 or more cores); a run with "off" and one with "on" compare the two. The JSON rows of
toca settings also hold whether workers compiled ahead ("parallel_compile") and how many variants
were loaded from the caches ("cache_hits": those the workers compiled), and per variant where its
compile time went ("compile_times", from ToCaBackend.stats()). Every row holds, of its first
generation, each call's host seconds ("first_calls_s": a call that compiles or waits for a worker
stands out), Dynamo's timed phases in this process ("compile_phases_s") and how many kernels had
their configs timed at a first run ("autotuned_kernels").

On CUDA the toca settings replay their variants as CUDA graphs in every mode (ToCaConfig.cuda_graphs,
on by default); rows "+cudagraphs" are mode="reduce-overhead" (plain Inductor's own CUDA graphs), the
others torch.compile's default mode. Extra rows, each in the default mode: --ungraphed REGEX the
settings with cuda_graphs=False ("rel_l2_vs_graphed": their final sample against the graphed one's);
--autocast REGEX plain Inductor and those settings under torch.autocast(bf16) with the model's float32
weights (compared with plain Inductor under autocast, and in "vs_bf16_weights" with the same setting
in bf16 weights); --cache-dtypes bf16,fp8 the settings matching --cache-settings with
ToCaConfig.cache_dtype ("state_bytes": the buffers held, all streams).

toca_fx compiles its variants with one-pass reductions over rows of up to 4096 elements, where
Inductor loops over rows longer than 1024 (toca_fx/inductor.py), and its full steps gain from that
too. --like-for-like adds plain Inductor compiled with that same choice ("plain, toca_fx's
reductions"), and the toca rows' speedup and efficiency against it ("... vs same reductions"): what
caching alone buys, beside the speedup over plain Inductor as it ships.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import logging
import os
import re
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch._dynamo.utils import compilation_time_metrics, counters
from torch._inductor.utils import clear_caches

import toca_fx
from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.compile.inductor import wide_row_reductions
from toca_fx.models import DiT, PixArt


@dataclass
class Case:
    name: str
    build: Callable[[], torch.nn.Module]
    batch: int  # samples; classifier-free guidance doubles it per call
    steps: int
    # (x0, args_of): args_of(x, t) gives the model's arguments, a tuple (positional) or a dict (keywords)
    inputs: Callable[[int, torch.device], tuple[torch.Tensor, Callable[[torch.Tensor, torch.Tensor], tuple | dict]]]
    settings: list[tuple[str, ToCaConfig]]
    cfg: bool = True  # batched classifier-free guidance; False: one call per step on the batch as it is
    build_in_dtype: bool = False  # parameters made in the run's dtype (no float32 copy of a large model)
    float32_reference: bool = True  # each sample's error against the model run in float32 (a copy of its weights)


def _dit_inputs(size: int, classes: int):
    def make(batch: int, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, 4, size, size, generator=g).to(device)
        labels = torch.randint(0, classes, (batch,), generator=g).to(device)
        y = torch.cat([labels, torch.full_like(labels, classes)])  # conditional, then null class
        return x, lambda xx, t: (xx, t, y)

    return make


def _pixart_inputs(size: int, caption: int, text_tokens: int = 120):
    def make(batch: int, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, 4, size, size, generator=g).to(device)
        ctx = torch.randn(2 * batch, text_tokens, caption, generator=g).to(device)
        return x, lambda xx, t: (xx, t, ctx)

    return make


def flux_inputs(side: int, channels: int, text_tokens: int, text_channels: int, pooled: int, guidance: float = 3.5):
    """FLUX's packed latent (side x side tokens), text, pooled text, and the ids and guidance its pipeline
    passes; the timestep as the pipeline passes it, t / 1000."""
    def make(batch: int, device: torch.device):
        g = torch.Generator(device="cpu").manual_seed(0)
        x = torch.randn(batch, side * side, channels, generator=g).to(device)
        ctx = torch.randn(batch, text_tokens, text_channels, generator=g).to(device)
        pooled_ctx = torch.randn(batch, pooled, generator=g).to(device)
        img_ids = torch.zeros(side, side, 3)
        img_ids[..., 1], img_ids[..., 2] = torch.arange(side)[:, None], torch.arange(side)[None, :]
        img_ids, txt_ids = img_ids.reshape(side * side, 3).to(device), torch.zeros(text_tokens, 3, device=device)
        scale = torch.full((batch,), guidance, device=device)
        return x, lambda xx, t: dict(
            hidden_states=xx, encoder_hidden_states=ctx, pooled_projections=pooled_ctx, timestep=t / 1000,
            img_ids=img_ids, txt_ids=txt_ids, guidance=scale, return_dict=False,
        )

    return make


def flux_model(**config: Any) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        import diffusers  # only this case needs diffusers

        return diffusers.FluxTransformer2DModel(patch_size=1, **config)

    return build


# FLUX.1-dev's transformer (12B parameters): 19 double-stream and 38 single-stream blocks, hidden size 3072.
SAME_REDUCTIONS = "plain, toca_fx's reductions"  # --like-for-like's baseline
WHOLE = "(one graph)"  # --whole: a toca setting with each variant compiled whole (ToCaConfig(regional=False))
FLUX_DEV = dict(in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128, num_attention_heads=24,
                joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True, axes_dims_rope=(16, 56, 56))
# The attention score's map from 64 sampled queries, as for PixArt: all 4608 would cost a 4608 x 4608 map per head.
FLUX_PRESET = ("ToCa preset flux (64 sampled queries)", ToCaConfig.preset("flux", num_steps=28, attention_queries=64))


def _has_diffusers() -> bool:
    try:
        import diffusers  # noqa: F401
    except ImportError:
        return False
    return True


def _settings(steps: int, preset: tuple[str, ToCaConfig]) -> list[tuple[str, ToCaConfig]]:
    return [
        ("toca ratio 1.0 (all recomputed)", ToCaConfig(interval=4, ratio=1.0, num_steps=steps, self_attn="recompute")),
        preset,
        ("toca N=4 r=0.3 (attn recomputed)", ToCaConfig(interval=4, ratio=0.3, num_steps=steps, self_attn="recompute")),
    ]


# ToCa's DDIM-50 DiT schedule (its code: step factor 3.0 - 4.0 s/S, layer factor 0.8 + 0.4 l/(L-1)); the
# attention score's map from 64 of the 256 queries (all of them cost a large share of a full step).
DIT_PRESET = ("ToCa preset dit (DDIM-50 schedule, 64 sampled queries)",
              ToCaConfig.preset("dit", num_steps=50, step_factors=(-1.0, 3.0), depth_factors=(0.8, 1.2),
                                attention_queries=64))
# The attention score's map from 64 sampled queries: all 4096 would cost a 4096 x 4096 map per head.
PIXART_PRESET = ("ToCa preset pixart (64 sampled queries)", ToCaConfig.preset("pixart", num_steps=20, attention_queries=64))


def cases(tiny: bool) -> dict[str, Case]:
    if tiny:
        small = dict(input_size=8, patch_size=2, hidden_size=64, depth=2, num_heads=4)
        table = {
            "dit": Case("tiny DiT", lambda: DiT(num_classes=10, **small), 2, 6, _dit_inputs(8, 10),
                        _settings(6, ("ToCa preset dit", ToCaConfig.preset("dit", num_steps=6)))),
            "pixart": Case("tiny PixArt", lambda: PixArt(caption_channels=32, **small), 1, 6, _pixart_inputs(8, 32, 8),
                           _settings(6, ("ToCa preset pixart", ToCaConfig.preset("pixart", num_steps=6)))),
        }
        if _has_diffusers():
            tiny_flux = dict(in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16, num_attention_heads=4,
                             joint_attention_dim=24, pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(4, 6, 6))
            table["flux"] = Case("tiny FLUX", flux_model(**tiny_flux), 1, 6, flux_inputs(8, 16, 8, 24, 16),
                                 _settings(6, ("ToCa preset flux", ToCaConfig.preset("flux", num_steps=6))), cfg=False)
        return table
    return {
        "dit": Case("DiT-XL/2 256x256", lambda: DiT.xl_2(input_size=32), 8, 50, _dit_inputs(32, 1000), _settings(50, DIT_PRESET)),
        "pixart1024": Case(
            "PixArt-alpha 1024x1024", lambda: PixArt.alpha(input_size=128), 1, 20, _pixart_inputs(128, 4096), _settings(20, PIXART_PRESET)
        ),
        "pixart2048": Case(
            "PixArt-alpha 2048x2048", lambda: PixArt.alpha(input_size=256), 1, 20, _pixart_inputs(256, 4096), _settings(20, PIXART_PRESET)
        ),
        # 1024x1024: 64 x 64 packed latent tokens of 64 channels, 512 T5 tokens; guidance-distilled: no CFG.
        "flux": Case("FLUX.1-dev 1024x1024", flux_model(**FLUX_DEV), 1, 28, flux_inputs(64, 64, 512, 4096, 768),
                     _settings(28, FLUX_PRESET), cfg=False, build_in_dtype=True, float32_reference=False),
    }


def generate(
    fn: Callable, x0: torch.Tensor, args_of: Callable, steps: int, guidance: float = 4.0, cfg: bool = True
) -> torch.Tensor:
    """A DDIM-like loop, one model call per step: with batched classifier-free guidance (cfg), or
    without (a guidance-distilled model such as FLUX.1-dev, which takes its guidance as an input)."""
    x = x0.clone()
    for i in range(steps):
        batch = torch.cat([x, x]) if cfg else x
        t = torch.full((batch.shape[0],), 999.0 * (1 - i / steps), device=x.device)
        out = _output(call(fn, args_of(batch, t)))[:, : x.shape[1]]  # learned sigma: its channels dropped
        if cfg:
            cond, uncond = out.chunk(2)
            out = uncond + guidance * (cond - uncond)
        x = x - (1.0 / steps) * out
    return x


def call(fn: Callable, args: tuple | dict) -> Any:
    """fn on what an args_of gave: positional arguments (a tuple) or keyword arguments (a dict)."""
    return fn(**args) if isinstance(args, dict) else fn(*args)


def _output(out: Any) -> torch.Tensor:
    """The sample of a model's output: diffusers models called with return_dict=False give a tuple."""
    return out[0] if isinstance(out, (tuple, list)) else out


def time_generations(fn: Callable, x0, args_of, steps: int, repeats: int, cfg: bool = True) -> dict[str, Any]:
    sync = torch.cuda.synchronize if x0.is_cuda else (lambda: None)
    sync()
    compilation_time_metrics.clear()
    calls: list[float] = []  # the first generation's calls, in seconds of this thread: where compiling waits
    start = time.perf_counter()
    with torch.no_grad():
        sample = generate(_timed(fn, calls), x0, args_of, steps, cfg=cfg)
    sync()
    first = time.perf_counter() - start
    phases = _compile_phases()
    autotuned = len(compilation_time_metrics.get("CachingAutotuner.benchmark_all_configs", []))
    if x0.is_cuda:
        torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(repeats):
        times.append(elapsed(lambda: generate(fn, x0, args_of, steps, cfg=cfg), x0.is_cuda))
    median = statistics.median(times)
    peak = torch.cuda.max_memory_allocated() if x0.is_cuda else 0
    return {"ms": median * 1e3, "spread": (max(times) - min(times)) * 1e3, "compile_s": first - median, "peak": peak,
            "first_calls_s": [round(c, 2) for c in calls], "compile_phases_s": phases, "autotuned_kernels": autotuned, "sample": sample}


def _timed(fn: Callable, calls: list[float]) -> Callable:
    """`fn`, appending each call's host seconds to `calls` (compiles at first calls, launches otherwise)."""
    def timed(*args, **kwargs):
        start = time.perf_counter()
        out = fn(*args, **kwargs)
        calls.append(time.perf_counter() - start)
        return out
    return timed


# Dynamo's timed phases that split a compile between tracing, the backend, Inductor's stages and this
# process's waits for kernel builds (nested: "compile_fx_inner" holds the Inductor stages below it).
_PHASES = ("_compile.compile_inner", "OutputGraph.call_user_compiler", "create_aot_dispatcher_function",
           "compile_fx_inner", "GraphLowering.run", "_recursive_post_grad_passes", "Scheduler.__init__",
           "GraphLowering.codegen", "PyCodeCache.load_by_key_path", "async_compile.wait", "build_guards", "gc",
           "CachingAutotuner.benchmark_all_configs")  # the last: timing a kernel's configs at its first run


def _compile_phases() -> dict[str, float]:
    """Seconds of this process in each of `_PHASES` since `compilation_time_metrics` was cleared."""
    return {k: round(sum(compilation_time_metrics[k]), 2) for k in _PHASES if k in compilation_time_metrics}


def elapsed(work: Callable, cuda: bool) -> float:
    with torch.no_grad():
        if not cuda:
            start = time.perf_counter()
            work()
            return time.perf_counter() - start
        begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        begin.record()
        work()
        end.record()
        end.synchronize()
        return begin.elapsed_time(end) / 1e3


AUTOCAST = " [autocast bf16, fp32 weights]"  # a row run under torch.autocast with the model's float32 copy
UNGRAPHED = " cuda_graphs=False"  # a toca row with the runtime's CUDA graphs off (as before they were default)
CACHE_DTYPES = {"bf16": torch.bfloat16, "fp8": torch.float8_e4m3fn}


@dataclass
class Extras:
    """Rows beyond each setting in each mode: under autocast (`autocast`: a regex of the settings, and
    plain Inductor), with narrow caches (`cache_dtypes` for the settings matching `cache_settings`) and
    with CUDA graphs off (`ungraphed`: a regex of the settings), each in the default mode."""

    autocast: str | None = None
    cache_dtypes: tuple[str, ...] = ()
    cache_settings: str = "."
    ungraphed: str | None = None


def plan_runs(settings: list[tuple[str, Any]], modes: list, like_for_like: bool, extras: Extras,
              skip: str | None) -> list[tuple[str, Any, str | None, bool]]:
    """(row name, backend, mode, under autocast) of every row, in the order they run."""
    runs: list[tuple[str, Any, str | None, bool]] = [("eager", None, None, False)]
    for mode in modes:
        suffix = " +cudagraphs" if mode else ""
        runs.append((f"inductor{suffix}", "inductor", mode, False))
        if like_for_like:
            runs.append((f"{SAME_REDUCTIONS}{suffix}", SAME_REDUCTIONS, mode, False))
        runs += [(f"{name}{suffix}", config, mode, False) for name, config in settings]
        if mode is None:
            for name, config in settings:
                if extras.ungraphed and re.search(extras.ungraphed, name):
                    runs.append((f"{name}{UNGRAPHED}", replace(config, cuda_graphs=False), mode, False))
                if re.search(extras.cache_settings, name):
                    runs += [(f"{name} cache {d}", replace(config, cache_dtype=CACHE_DTYPES[d]), mode, False)
                             for d in extras.cache_dtypes]
    if extras.autocast:  # the settings first: a run cut short by a time limit keeps them
        runs += [(f"{name}{AUTOCAST}", config, None, True) for name, config in settings if re.search(extras.autocast, name)]
        runs.append((f"inductor{AUTOCAST}", "inductor", None, True))
    return [r for r in runs if not (skip and re.search(skip, r[0])) or r[1] == "inductor"]


def run_case(
    case: Case, device: torch.device, dtype: torch.dtype, repeats: int, modes: list, log: Callable, skip: str | None = None,
    cache_dir: Path | None = None,
    parallel_compile: bool | None = None,
    like_for_like: bool = False,
    whole: bool = False,
    extras: Extras | None = None,
    float32_reference: bool = True,
) -> list[dict]:
    extras = extras or Extras()
    model, x0, args_of = build(case, device, dtype)
    settings = case.settings + [(f"{name} {WHOLE}", replace(c, regional=False)) for name, c in case.settings if whole]
    warm_up(model, x0, args_of, case.cfg)
    exact = None
    if case.float32_reference and float32_reference and dtype != torch.float32:
        exact = float32_generation(model, x0, args_of, case)
    rows, samples = [], []
    runs = plan_runs(settings, modes, like_for_like, extras, skip)
    model32 = None  # the float32 copy for autocast rows, made when the first runs (they run last: peaks before exclude it)
    for name, backend, mode, autocast in runs:
        if autocast and model32 is None:
            model32 = copy.deepcopy(model).float()
        torch._dynamo.reset()
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the previous setting's caches and graph pools are gone
        if isinstance(backend, ToCaConfig):
            backend = ToCaBackend(replace(backend, parallel_compile=parallel_compile))
            parallel = toca_fx.compile.workers.enabled(parallel_compile, {})  # as this setting starts
        same = backend == SAME_REDUCTIONS
        net, start, make = (model32, x0.float(), cast_inputs(args_of, torch.float32)) if autocast else (model, x0, args_of)
        fn = net if backend is None else torch.compile(net, backend="inductor" if same else backend, dynamic=False, mode=mode)
        counters.clear()
        choices = wide_row_reductions() if same else contextlib.nullcontext()
        amp = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
        try:
            with fresh_inductor_caches(cache_dir), choices, amp:  # compiles at the first call, in this thread
                result = time_generations(fn, start, make, case.steps, repeats, case.cfg)
        except Exception as e:  # noqa: BLE001 - one setting's failure is a row, not the end of the run
            log({"model": case.name, "setting": name, "error": f"{type(e).__name__}: {e}"[:2000]})
            fn = backend = None  # its caches and graphs go before the next setting
            continue
        samples.append(result.pop("sample"))
        row = {"model": case.name, "setting": name, **result}
        if isinstance(backend, ToCaBackend):
            row.update(toca_stats(backend), parallel_compile=parallel,
                       cache_hits=counters["inductor"]["fxgraph_cache_hit"])  # workers' variants
        if exact is not None:
            row["rel_l2_float32"] = rel_l2(samples[-1], exact)
        rows.append(row)
        log(row)
        del fn, backend
    reference = next(s for s, r in zip(samples, rows) if r["setting"].startswith("inductor"))
    named = {r["setting"]: s for r, s in zip(rows, samples)}
    for row, sample in zip(rows, samples):
        row["rel_l2"] = rel_l2(sample, reference)
        graphed = named.get(row["setting"].replace(UNGRAPHED, "")) if UNGRAPHED in row["setting"] else None
        if graphed is not None:  # the runtime's CUDA graphs against launching the same kernels one by one
            row["rel_l2_vs_graphed"] = rel_l2(sample, graphed)
    return _relative(rows)


def toca_stats(backend: ToCaBackend) -> dict[str, Any]:
    """A toca row's statistics. A function of its own: a local that kept the backend's graphs (and so
    their caches) would keep them allocated through the next setting's run, and in its peak."""
    stats = backend.stats()
    return dict(flops_ratio=stats["flops_ratio"], cache_bytes=stats["cache_bytes"], compiles=stats["compiles"],
                compile_times=stats["compile_times"], cuda_graphs=any(g.compiler.graphed for g in backend.graphs),
                state_bytes=sum(g.state.nbytes for g in backend.graphs if g.state is not None))


def float32_generation(model: torch.nn.Module, x0: torch.Tensor, args_of: Callable, case: Case) -> torch.Tensor:
    """The generation of a float32 copy of the model (eager), from the same noise and inputs: the
    reference that shows how far each run's rounding takes it. Two runs in bf16 that round at different
    places end apart even where both are as close to this one."""
    with torch.no_grad():
        return generate(copy.deepcopy(model).float(), x0.float(), cast_inputs(args_of, torch.float32), case.steps, cfg=case.cfg)


def rel_l2(sample: torch.Tensor, reference: torch.Tensor) -> float:
    return (sample.float() - reference.float()).norm().item() / reference.float().norm().item()


def warm_up(model: torch.nn.Module, x0: torch.Tensor, args_of: Callable, cfg: bool) -> None:
    """What the first setting would otherwise pay alone in its compile time: the libraries' first use
    (CUDA context, cuBLAS, cuDNN: one eager model call) and Inductor's (its pool of compile processes
    and Triton: a small function compiled and run)."""
    batch = torch.cat([x0, x0]) if cfg else x0
    with torch.no_grad():
        call(model, args_of(batch, torch.full((batch.shape[0],), 500.0, device=x0.device)))
        with fresh_inductor_caches():
            torch.compile(lambda x: torch.nn.functional.gelu(x).sum(-1), dynamic=False)(x0.flatten(1))
    torch._dynamo.reset()


@contextlib.contextmanager
def fresh_inductor_caches(kept: Path | None = None) -> Iterator[None]:
    """Inductor's on-disk caches (and Triton's, which lie inside them) in a new temporary directory, so
    that each setting's compile time is cold: toca_fx's variants hit the caches, and a "+cudagraphs"
    setting compiles the same graphs as its plain one (its CUDA graphs are toca_fx's own). With `kept`,
    in that directory instead, which outlives the run: a second run with it times warm compiles. The
    process's in-memory caches of compiled kernels are emptied too: else a setting would load the
    kernels that an earlier setting compiled from the same code (a toca_fx full step's are largely
    plain Inductor's)."""
    names = ("TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR")
    before = {name: os.environ.get(name) for name in names}
    with contextlib.nullcontext(str(kept)) if kept else tempfile.TemporaryDirectory(prefix="toca_fx_bench_") as path:
        # Triton's too, as torch's own fresh_cache() sets it: Inductor fixes TRITON_CACHE_DIR in the
        # environment at its first kernel, which would leave every later setting on the first one's.
        os.environ.update(zip(names, (path, os.path.join(path, "triton"))))
        clear_caches()
        try:
            yield
        finally:
            clear_caches()
            for name, value in before.items():
                if value is None:
                    os.environ.pop(name, None)
                else:
                    os.environ[name] = value


def build(case: Case, device: torch.device, dtype: torch.dtype) -> tuple[torch.nn.Module, torch.Tensor, Callable]:
    """The case's model (seeded weights), first latent and argument maker, on `device` in `dtype`."""
    torch.manual_seed(0)
    with device, default_dtype(dtype if case.build_in_dtype else None):
        model = case.build().to(device=device, dtype=dtype).eval()  # buffers made from numpy start on the CPU
    x0, args_of = case.inputs(case.batch, device)
    return model, x0.to(dtype), cast_inputs(args_of, dtype)


def cast_inputs(args_of: Callable, dtype: torch.dtype) -> Callable:
    """Floating inputs of more than one dimension (latents, conditions, FLUX's position ids) in `dtype`;
    1-D ones (timesteps, guidance scales) stay float32 (FLUX's pipeline passes its timestep in the
    latents' dtype; the sinusoidal embedding computes in float32 either way)."""
    def one(a):
        return a.to(dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() and a.dim() > 1 else a

    def cast(x, t):
        args = args_of(x, t)
        if isinstance(args, dict):
            return {k: one(a) for k, a in args.items()}
        return tuple(one(a) for a in args)

    return cast


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype | None) -> Iterator[None]:
    """Parameters made in `dtype` while building (None: as they are)."""
    before = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(before)


def _relative(rows: list[dict]) -> list[dict]:
    base, same = _by_mode(rows, "inductor"), _by_mode(rows, SAME_REDUCTIONS)
    by_name = {r["setting"]: r for r in rows}
    for r in rows:
        graphed = _group(r["setting"])
        ref = base.get(graphed) or base.get(_group("")) or next(iter(base.values()))  # eager: a baseline
        r["speedup"] = ref["ms"] / r["ms"]
        r["compile_vs_inductor"] = r["compile_s"] / max(ref["compile_s"], 1e-9)
        r["peak_vs_inductor"] = r["peak"] / ref["peak"] if ref["peak"] else 0.0
        twin = by_name.get(r["setting"].replace(AUTOCAST, "")) if AUTOCAST in r["setting"] else None
        if twin is not None:  # the same setting with bf16 weights, default mode
            r["vs_bf16_weights"] = twin["ms"] / r["ms"]
        if "flops_ratio" in r:
            r["theoretical"] = 1.0 / r["flops_ratio"]
            r["efficiency"] = r["speedup"] / r["theoretical"]
            if graphed in same:
                r["speedup_same_reductions"] = same[graphed]["ms"] / r["ms"]
                r["efficiency_same_reductions"] = r["speedup_same_reductions"] / r["theoretical"]
    return rows


def _group(setting: str) -> tuple[bool, bool]:
    """What a row is compared within: its mode (reduce-overhead or not) and whether it ran under autocast."""
    return "+cudagraphs" in setting, AUTOCAST in setting


def _by_mode(rows: list[dict], prefix: str) -> dict[tuple[bool, bool], dict]:
    """The rows whose setting starts with `prefix`, by `_group`."""
    return {_group(r["setting"]): r for r in rows if r["setting"].startswith(prefix)}


def markdown(rows: list[dict], header: str) -> str:
    same = any(SAME_REDUCTIONS in r["setting"] for r in rows)
    cols = ["model", "setting", "ms/gen", "speedup vs Inductor", "theoretical", "efficiency", "compile s", "compile x",
            "peak GiB", "peak x", "cache MiB", "rel L2 vs uncached", "rel L2 vs float32"]
    cols += ["speedup vs same reductions", "efficiency vs same reductions"] if same else []
    lines = [header, "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        cells = [
            r["model"], r["setting"], f"{r['ms']:.1f} ± {r['spread'] / 2:.1f}", f"{r['speedup']:.2f}x",
            f"{r['theoretical']:.2f}x" if "theoretical" in r else "1.00x",
            f"{r['efficiency']:.2f}" if "efficiency" in r else "-",
            f"{r['compile_s']:.1f}", f"{r['compile_vs_inductor']:.2f}",
            f"{r['peak'] / 2**30:.2f}", f"{r['peak_vs_inductor']:.2f}",
            f"{r.get('cache_bytes', 0) / 2**20:.0f}", f"{r['rel_l2']:.4f}",
            f"{r['rel_l2_float32']:.4f}" if "rel_l2_float32" in r else "-",
        ]
        if same:
            cells += [f"{r['speedup_same_reductions']:.2f}x", f"{r['efficiency_same_reductions']:.2f}"] if "efficiency_same_reductions" in r else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default="dit,pixart1024,pixart2048")
    parser.add_argument("--tiny", action="store_true", help="tiny models on the CPU: a smoke run of this script")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cudagraphs", choices=["off", "on", "both"], default="both",
                        help="compile with mode='reduce-overhead' (CUDA graphs) too")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    parser.add_argument("--cache-dir", type=Path, help="Inductor's caches in this directory, kept (a second run times warm "
                        "compiles), instead of a fresh one per setting")
    parser.add_argument("--skip", help="regular expression: settings to leave out (the Inductor baseline always runs)")
    parser.add_argument("--like-for-like", action="store_true",
                        help="also time plain Inductor with toca_fx's choice of reductions, and the toca rows against it")
    parser.add_argument("--whole", action="store_true",
                        help=f"also time each toca setting with its variants compiled whole (regional=False), labelled '{WHOLE}'")
    parser.add_argument("--parallel-compile", choices=["auto", "on", "off"], default="auto",
                        help="ToCaConfig.parallel_compile of the toca settings: None (on with 8 or more cores), True, False")
    parser.add_argument("--autocast", metavar="REGEX", help="also run plain Inductor and the settings matching REGEX "
                        "under torch.autocast(bf16) with the model's float32 weights (default mode)")
    parser.add_argument("--cache-dtypes", default="", help="comma-separated of bf16, fp8: also run the settings "
                        "matching --cache-settings with ToCaConfig.cache_dtype so (default mode)")
    parser.add_argument("--cache-settings", default=".", metavar="REGEX")
    parser.add_argument("--ungraphed", metavar="REGEX", help="also run the settings matching REGEX with "
                        "ToCaConfig.cuda_graphs=False (default mode)")
    parser.add_argument("--no-float32", action="store_true", help="no float32 eager reference generation")
    parser.add_argument("--steps", type=int, help="steps per generation instead of the case's (every setting's num_steps too)")
    args = parser.parse_args(argv)
    extras = Extras(args.autocast, tuple(d for d in args.cache_dtypes.split(",") if d), args.cache_settings, args.ungraphed)
    logging.basicConfig(format="%(message)s")
    logging.getLogger("toca_fx").setLevel(logging.INFO)  # each variant's compile, as it ends: progress
    device = torch.device("cuda" if torch.cuda.is_available() and not args.tiny else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    table = cases(args.tiny)
    names = list(table) if args.tiny else args.models.split(",")
    args.out.mkdir(parents=True, exist_ok=True)
    header = (
        f"Device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}; torch {torch.__version__}; "
        f"dtype {dtype}; {time.strftime('%Y-%m-%d')}; command: python benchmarks/run.py {' '.join(sys.argv[1:])}"
    )
    rows: list[dict] = []
    for name in names:
        log = lambda row: print(json.dumps({k: v for k, v in row.items()}), flush=True)  # noqa: E731
        modes = {"off": [None], "on": ["reduce-overhead"], "both": [None, "reduce-overhead"]}[args.cudagraphs]
        parallel = {"auto": None, "on": True, "off": False}[args.parallel_compile]
        case = table[name]
        if args.steps:
            case = replace(case, steps=args.steps, settings=[(n, replace(c, num_steps=args.steps)) for n, c in case.settings])
        rows += run_case(
            case, device, dtype, args.repeats, modes if device.type == "cuda" else [None], log, args.skip,
            args.cache_dir, parallel, args.like_for_like, args.whole, extras, not args.no_float32,
        )
        (args.out / "results.json").write_text(json.dumps(rows, indent=1))
        (args.out / "benchmarks.md").write_text(markdown(rows, header) + "\n")
    print(markdown(rows, header))


if __name__ == "__main__":
    main()
