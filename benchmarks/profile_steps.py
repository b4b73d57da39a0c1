"""Where a cached generation's time goes: per plan, and per kernel.

    python benchmarks/profile_steps.py --model dit --setting preset      # on the GPU machine

Builds one model of `benchmarks/run.py` at one of its settings, compiles it (CUDA graphs on unless
`--no-cudagraphs`), runs a warm-up generation, then:
- times every step of a generation with CUDA events and groups the steps by plan (full step, each
  partial plan): calls, median ms, theoretical GFLOPs of one call, and the ms that call would take at
  the full step's FLOP rate, so the plans that fall short of their theoretical time stand out;
- profiles one more generation (torch.profiler, CUDA activity) and lists the kernels by total time;
- with `--per-plan`, profiles every step of one more generation on its own and lists each plan's
  kernels per call, after those of one step of the plain Inductor model (compiled alongside): what
  caching adds to a full step, and what a partial step still launches.
Markdown to stdout, JSON to `--out`.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import statistics
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

import torch

from run import build, call, cases, elapsed, generate  # run.py beside this file
from toca_fx import ToCaBackend

SETTINGS = {"ratio1": 0, "preset": 1, "n4r03": 2}  # positions in run.py's settings of each model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="dit", choices=["dit", "pixart1024", "pixart2048", "flux"])
    parser.add_argument("--tiny", action="store_true", help="a tiny model on the CPU (FLUX for --model flux, else DiT): a smoke run of this script")
    parser.add_argument("--setting", default="preset", choices=list(SETTINGS))
    parser.add_argument("--no-cudagraphs", action="store_true")
    parser.add_argument("--kernels", type=int, default=25, help="kernels listed")
    parser.add_argument("--per-plan", action="store_true", help="also list each plan's kernels per call")
    parser.add_argument("--whole", action="store_true", help="compile each variant whole (ToCaConfig(regional=False))")
    parser.add_argument("--out", type=Path, default=Path("benchmark-results"))
    args = parser.parse_args()
    tiny = cases(tiny=True) if args.tiny else {}
    case = tiny.get(args.model, tiny.get("dit")) if args.tiny else cases(tiny=False)[args.model]
    config = replace(case.settings[SETTINGS[args.setting]][1], regional=not args.whole)
    device = torch.device("cpu" if args.tiny else "cuda")
    dtype = torch.float32 if args.tiny else torch.bfloat16
    model, x0, cast = build(case, device, dtype)
    backend = ToCaBackend(config)
    graphed = not (args.no_cudagraphs or args.tiny)
    fn = torch.compile(model, backend=backend, dynamic=False, mode="reduce-overhead" if graphed else None)
    with torch.no_grad():
        generate(fn, x0, cast, case.steps, cfg=case.cfg)  # compiles every plan
        generate(fn, x0, cast, case.steps, cfg=case.cfg)  # CUDA graphs: the second call of a plan captures it
        plans = per_plan(backend, fn, x0, cast, case.steps, case.cfg)
        kernels = kernel_table(fn, x0, cast, case.steps, args.kernels, case.cfg)
        by_plan = per_plan_kernels(backend, fn, model, x0, cast, case, graphed, args.kernels) if args.per_plan else []
    where = "CPU" if args.tiny else torch.cuda.get_device_name()
    title = (f"{case.name}, {args.setting}{', one graph per variant' if args.whole else ''}, {'' if graphed else 'no '}CUDA graphs, "
             f"{where}, torch {torch.__version__}")
    print(f"## {title}\n\n{plans_markdown(plans)}\n\n{kernels_markdown(kernels)}")
    for entry in by_plan:
        print(f"\n### {entry['plan']}: {entry['calls']} calls, {entry['kernels_per_call']:.0f} kernels and "
              f"{entry['ms_per_call']:.2f} ms of kernel time per call\n\n{per_call_markdown(entry['kernels'])}")
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"title": title, "plans": plans, "kernels": kernels, "per_plan": by_plan}
    (args.out / f"profile-{args.model}-{args.setting}{'-whole' if args.whole else ''}.json").write_text(json.dumps(result, indent=1))


def per_plan(backend: ToCaBackend, fn, x0, args_of, steps: int, cfg: bool) -> list[dict]:
    """One generation, each step timed alone; grouped by the plan each step ran."""
    graph = backend.graphs[0]
    times: dict[tuple, list[float]] = defaultdict(list)
    labels: dict[tuple, str] = {}

    def timed(*args, **kwargs):
        label, variant = graph.next_step()
        key = variant.key
        out = []
        times[key].append(elapsed(lambda: out.append(call(fn, kwargs or args)), x0.is_cuda) * 1e3)
        labels[key] = label
        return out[0]

    generate(timed, x0, args_of, steps, cfg=cfg)
    flops = graph.flops
    full_key = next(k for k, lab in labels.items() if lab == "full")
    rate = flops[full_key] / statistics.median(times[full_key])  # FLOPs per ms of the full step
    rows = []
    for key, ms in sorted(times.items(), key=lambda kv: -flops[kv[0]]):
        rows.append({
            "label": labels[key], "plan": describe(key), "calls": len(ms),
            "ms": statistics.median(ms), "gflops": flops[key] / 1e9, "ms_at_full_rate": flops[key] / rate,
        })
    return rows


def kernel_table(fn, x0, args_of, steps: int, top: int, cfg: bool) -> list[dict]:
    """Kernels (CPU ops on the CPU) of one generation, by total time."""
    with _profiled(x0.is_cuda) as totals:
        generate(fn, x0, args_of, steps, cfg=cfg)
    whole = sum(t for t, _ in totals.values())
    ranked = sorted(totals.items(), key=lambda kv: -kv[1][0])
    return [{"kernel": name[:90], "ms": us / 1e3, "share": us / whole, "calls": n} for name, (us, n) in ranked[:top]] + [
        {"kernel": "(all kernels)", "ms": whole / 1e3, "share": 1.0, "calls": sum(n for _, n in totals.values())}
    ]


def per_plan_kernels(backend: ToCaBackend, fn, model, x0, args_of, case, graphed: bool, top: int) -> list[dict]:
    """Each plan's kernels per call (every step of a generation profiled on its own), after one step of
    the plain Inductor model (a generation of it, per step)."""
    graph = backend.graphs[0]
    totals: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0]))
    calls: dict[str, int] = defaultdict(int)

    def profiled(*args, **kwargs):
        label, variant = graph.next_step()
        key = variant.key
        name = f"{label}: {describe(key)}"
        with _profiled(x0.is_cuda) as step:
            out = call(fn, kwargs or args)
        for kernel, (us, n) in step.items():
            totals[name][kernel][0] += us
            totals[name][kernel][1] += n
        calls[name] += 1
        return out

    plain = torch.compile(model, dynamic=False, mode="reduce-overhead" if graphed else None)
    for _ in range(2):  # compile, then capture
        generate(plain, x0, args_of, case.steps, cfg=case.cfg)
    with _profiled(x0.is_cuda) as plain_totals:
        generate(plain, x0, args_of, case.steps, cfg=case.cfg)
    name = "plain Inductor step"
    totals[name], calls[name] = plain_totals, case.steps
    generate(profiled, x0, args_of, case.steps, cfg=case.cfg)
    entries = []
    for name in [name, *sorted(n for n in calls if n != name)]:
        n = calls[name]
        ranked = sorted(totals[name].items(), key=lambda kv: -kv[1][0])
        entries.append({
            "plan": name, "calls": n,
            "kernels_per_call": sum(k for _, k in totals[name].values()) / n,
            "ms_per_call": sum(us for us, _ in totals[name].values()) / n / 1e3,
            "kernels": [{"kernel": k[:90], "us_per_call": us / n, "launches_per_call": c / n} for k, (us, c) in ranked[:top]],
        })
    return entries


def describe(key: tuple) -> str:
    """A plan as branches per mode, and the rows its "rows" branches compute."""
    modes = defaultdict(int)
    for _, plan in key:
        modes[plan.mode] += 1
    rows_k = sum(plan.k for _, plan in key)
    return ", ".join(f"{n} {m}" for m, n in sorted(modes.items())) + (f" ({rows_k} rows)" if rows_k else "")


@contextlib.contextmanager
def _profiled(cuda: bool):
    """Yields a dict filled, on exit, with kernel name -> [total us, launches] of the work inside
    (CPU leaf ops on the CPU)."""
    from torch.profiler import ProfilerActivity, profile

    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    if cuda:
        torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA if cuda else ProfilerActivity.CPU]) as prof:
        yield totals
        if cuda:
            torch.cuda.synchronize()
    kind = torch.autograd.DeviceType.CUDA if cuda else torch.autograd.DeviceType.CPU
    for event in prof.events():
        if event.device_type == kind and (cuda or not event.cpu_children):  # CPU: leaf ops only
            totals[event.name][0] += event.device_time_total if cuda else event.self_cpu_time_total
            totals[event.name][1] += 1


def plans_markdown(rows: list[dict]) -> str:
    lines = ["| step | plan (branches per mode) | calls | ms (median) | GFLOPs | ms at the full step's rate | ratio |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['label']} | {r['plan']} | {r['calls']} | {r['ms']:.2f} | {r['gflops']:.0f} | "
                     f"{r['ms_at_full_rate']:.2f} | {r['ms'] / max(r['ms_at_full_rate'], 1e-9):.2f} |")
    total = sum(r["ms"] * r["calls"] for r in rows)
    ideal = sum(r["ms_at_full_rate"] * r["calls"] for r in rows)
    lines.append(f"\nGeneration: {total:.1f} ms timed step by step, {ideal:.1f} ms at the full step's rate "
                 f"(efficiency {ideal / total:.2f}).")
    return "\n".join(lines)


def per_call_markdown(rows: list[dict]) -> str:
    lines = ["| kernel | us per call | launches per call |", "|---|---|---|"]
    lines += [f"| `{r['kernel']}` | {r['us_per_call']:.1f} | {r['launches_per_call']:.1f} |" for r in rows]
    return "\n".join(lines)


def kernels_markdown(rows: list[dict]) -> str:
    lines = ["| kernel | total ms | share | launches |", "|---|---|---|---|"]
    lines += [f"| `{r['kernel']}` | {r['ms']:.1f} | {r['share']:.1%} | {r['calls']} |" for r in rows]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
