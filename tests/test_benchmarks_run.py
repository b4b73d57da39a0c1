"""benchmarks/run.py's generation loop with and without classifier-free guidance, and its FLUX case."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location("benchmarks_run", Path(__file__).parents[1] / "benchmarks" / "run.py")
run = sys.modules["benchmarks_run"] = importlib.util.module_from_spec(_spec)  # dataclasses look it up
_spec.loader.exec_module(run)


def _old_generate(fn, x0, args_of, steps, guidance=4.0):
    """run.generate before it took cases without guidance, verbatim."""
    x = x0.clone()
    for i in range(steps):
        t = torch.full((2 * x.shape[0],), 999.0 * (1 - i / steps), device=x.device)
        out = fn(*args_of(torch.cat([x, x]), t))[:, : x.shape[1]]
        cond, uncond = out.chunk(2)
        x = x - (1.0 / steps) * (uncond + guidance * (cond - uncond))
    return x


def test_cfg_loop_is_unchanged():
    x0, args_of = run._dit_inputs(4, 10)(2, torch.device("cpu"))

    def model(x, t, y):  # learned-sigma-like output: twice the channels, depends on t and the label
        out = torch.sin(x) * (t / 1000)[:, None, None, None] + y[:, None, None, None] / 10
        return torch.cat([out, -out], dim=1)

    assert torch.equal(run.generate(model, x0, args_of, 5), _old_generate(model, x0, args_of, 5))


def test_loop_without_cfg_calls_once_per_step_with_keywords():
    batch, steps = 2, 4
    x0, args_of = run.flux_inputs(side=3, channels=5, text_tokens=2, text_channels=6, pooled=7)(batch, torch.device("cpu"))
    calls = []

    def model(**kw):
        calls.append(kw)
        return (kw["hidden_states"] * 0 + kw["timestep"][:, None, None],)  # a tuple, as with return_dict=False

    x = run.generate(model, x0, args_of, steps, cfg=False)
    assert len(calls) == steps
    assert all(c["hidden_states"].shape == (batch, 9, 5) and c["return_dict"] is False for c in calls)
    times = [c["timestep"] for c in calls]
    assert all(t.shape == (batch,) for t in times)
    torch.testing.assert_close(torch.stack([t[0] for t in times]), torch.tensor([0.999 * (1 - i / steps) for i in range(steps)]))
    assert all(torch.equal(c["guidance"], torch.full((batch,), 3.5)) for c in calls)
    torch.testing.assert_close(x, x0 - sum(times)[:, None, None] / steps)  # Euler steps on the output
    # FLUX's pipeline ids: image token i * side + j at (0, i, j); text tokens at 0
    ids = calls[0]["img_ids"]
    assert ids.shape == (9, 3) and ids[7].tolist() == [0.0, 2.0, 1.0] and not ids[:, 0].any()
    assert calls[0]["txt_ids"].shape == (2, 3) and not calls[0]["txt_ids"].any()


def test_cast_inputs_casts_latents_and_conditions_only():
    x0, args_of = run.flux_inputs(2, 4, 3, 6, 5)(1, torch.device("cpu"))
    args = run.cast_inputs(args_of, torch.bfloat16)(x0, torch.full((1,), 999.0))
    assert {k for k, v in args.items() if isinstance(v, torch.Tensor) and v.dtype == torch.bfloat16} == {
        "hidden_states", "encoder_hidden_states", "pooled_projections", "img_ids", "txt_ids"
    }
    assert args["timestep"].dtype == args["guidance"].dtype == torch.float32
    assert args["return_dict"] is False


def test_flux_dev_case_builds_in_bf16_off_the_cpu():
    pytest.importorskip("diffusers")
    case = run.cases(tiny=False)["flux"]
    assert not case.cfg and case.batch == 1 and case.steps == 28 and case.build_in_dtype
    with torch.device("meta"), run.default_dtype(torch.bfloat16):  # anything made on the CPU would show
        model = case.build()
    assert torch.get_default_dtype() == torch.float32
    params = list(model.parameters())
    assert {p.device.type for p in params} == {"meta"} and {p.dtype for p in params} == {torch.bfloat16}
    assert 11.8e9 < sum(p.numel() for p in params) < 12.0e9  # FLUX.1-dev's transformer
    assert case.settings[1][1].attention_queries == 64 and case.settings[1][1].num_steps == 28


def test_tiny_flux_case_runs():
    pytest.importorskip("diffusers")
    case = run.cases(tiny=True)["flux"]
    torch.manual_seed(0)
    model = case.build().eval()
    x0, args_of = case.inputs(case.batch, torch.device("cpu"))
    with torch.no_grad():
        x = run.generate(model, x0, args_of, 3, cfg=case.cfg)
    assert x.shape == x0.shape and torch.isfinite(x).all() and not torch.equal(x, x0)


def test_relative_compares_each_row_with_the_baseline_of_its_mode():
    def row(setting, ms, **extra):
        return {"setting": setting, "ms": ms, "compile_s": 1.0, "peak": 100, **extra}

    rows = run._relative([
        row("eager", 400.0),  # no plain Inductor row with --cudagraphs on: compared with the CUDA-graph one
        row("inductor +cudagraphs", 200.0),
        row("toca preset +cudagraphs", 100.0, flops_ratio=0.4),
    ])
    assert [r["speedup"] for r in rows] == [0.5, 1.0, 2.0]
    assert rows[2]["theoretical"] == 2.5 and rows[2]["efficiency"] == pytest.approx(0.8)
    both = run._relative([row("inductor", 300.0), row("inductor +cudagraphs", 200.0), row("toca", 150.0),
                          row("toca +cudagraphs", 100.0)])
    assert [r["speedup"] for r in both] == [1.0, 1.0, 2.0, 2.0]


def test_like_for_like_rows_are_a_second_reference_not_the_baseline():
    def row(setting, ms, **extra):
        return {"model": "m", "setting": setting, "ms": ms, "spread": 0.0, "compile_s": 1.0, "peak": 100, "rel_l2": 0.0, **extra}

    rows = run._relative([
        row("inductor +cudagraphs", 200.0),
        row(f"{run.SAME_REDUCTIONS} +cudagraphs", 180.0),
        row("toca +cudagraphs", 100.0, flops_ratio=0.4),
    ])
    assert [r["speedup"] for r in rows] == [1.0, pytest.approx(200 / 180), 2.0]  # plain Inductor stays the baseline
    assert rows[2]["speedup_same_reductions"] == pytest.approx(1.8)
    assert rows[2]["efficiency_same_reductions"] == pytest.approx(0.72)
    assert "efficiency_same_reductions" not in rows[1]
    table = run.markdown(rows, "header").splitlines()
    assert table[2].endswith("| efficiency vs same reductions |")
    assert table[-1].endswith("| 1.80x | 0.72 |") and table[-2].endswith("| - | - |")
    assert "same reductions" not in run.markdown(run._relative([row("inductor", 1.0)]), "h")


def test_each_setting_compiles_cold(monkeypatch):
    # Inductor's and Triton's caches in a new directory, the in-memory kernels emptied, both on the way
    # in and out, and the caller's environment given back.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", "/elsewhere")
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    cleared = []
    monkeypatch.setattr(run, "clear_caches", lambda: cleared.append(True))
    with run.fresh_inductor_caches():
        inductor, triton = os.environ["TORCHINDUCTOR_CACHE_DIR"], os.environ["TRITON_CACHE_DIR"]
        assert Path(inductor).is_dir() and triton == os.path.join(inductor, "triton") and len(cleared) == 1
    assert len(cleared) == 2 and not Path(inductor).exists()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == "/elsewhere" and "TRITON_CACHE_DIR" not in os.environ


def test_first_generation_is_recorded_call_by_call():
    torch._dynamo.reset()
    fn = torch.compile(lambda x, t, y: torch.cat([x * 2, x], dim=1), backend="inductor", dynamic=False)
    x0, args_of = run._dit_inputs(4, 10)(1, torch.device("cpu"))
    with run.fresh_inductor_caches():
        result = run.time_generations(fn, x0, args_of, steps=3, repeats=1)
    calls = result["first_calls_s"]
    assert len(calls) == 3 and calls[0] > max(calls[1:])  # the first call compiles
    assert result["compile_phases_s"]["compile_fx_inner"] > 0
    assert set(result["compile_phases_s"]) <= set(run._PHASES)


def test_extra_rows_run_in_the_default_mode_and_compare_within_their_group():
    from toca_fx import ToCaConfig

    settings = [("toca preset", ToCaConfig()), ("toca N=4", ToCaConfig(ratio=0.5))]
    extras = run.Extras(autocast="N=4", cache_dtypes=("fp8",), cache_settings="N=4", ungraphed="preset")
    runs = run.plan_runs(settings, [None, "reduce-overhead"], False, extras, skip="eager")
    names = [r[0] for r in runs]
    assert names == ["inductor", "toca preset", "toca N=4", f"toca preset{run.UNGRAPHED}", "toca N=4 cache fp8",
                     "inductor +cudagraphs", "toca preset +cudagraphs", "toca N=4 +cudagraphs",
                     f"toca N=4{run.AUTOCAST}", f"inductor{run.AUTOCAST}"]
    by = {r[0]: r for r in runs}
    assert by[f"toca preset{run.UNGRAPHED}"][1].cuda_graphs is False and by["toca N=4 cache fp8"][1].cache_dtype == torch.float8_e4m3fn
    assert by[f"toca N=4{run.AUTOCAST}"][2:] == (None, True) and by["toca N=4 +cudagraphs"][2:] == ("reduce-overhead", False)

    def row(setting, ms):
        return {"setting": setting, "ms": ms, "compile_s": 1.0, "peak": 100}

    rows = run._relative([row("inductor", 400.0), row("toca N=4", 200.0), row(f"inductor{run.AUTOCAST}", 500.0),
                          row(f"toca N=4{run.AUTOCAST}", 250.0)])
    assert [r["speedup"] for r in rows] == [1.0, 2.0, 1.0, 2.0]  # autocast rows against plain Inductor under autocast
    assert rows[3]["vs_bf16_weights"] == pytest.approx(0.8)


def test_each_setting_runs_without_the_caches_of_the_one_before(monkeypatch):
    # A setting's peak memory is measured in its run: the caches of the setting before must be freed by then.
    import gc

    from toca_fx import ToCaConfig
    from toca_fx.runtime.state import CacheState

    tiny = run.cases(tiny=True)["dit"]
    settings = [(f"toca r={r}", ToCaConfig(inner="eager", interval=2, ratio=r, num_steps=tiny.steps)) for r in (0.5, 0.3)]
    case = run.Case(tiny.name, tiny.build, tiny.batch, tiny.steps, tiny.inputs, settings)
    held, timed = [], run.time_generations

    def counting(*args, **kwargs):
        gc.collect()
        held.append(sum(o.nbytes for o in gc.get_objects() if isinstance(o, CacheState)))
        return timed(*args, **kwargs)

    monkeypatch.setattr(run, "time_generations", counting)
    rows = run.run_case(case, torch.device("cpu"), torch.float32, 1, [None], lambda row: None, skip="eager")
    assert [r["setting"] for r in rows] == ["inductor", "toca r=0.5", "toca r=0.3"]
    assert all(r["state_bytes"] > 0 for r in rows[1:])
    assert held == [0, 0, 0]
