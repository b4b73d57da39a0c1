"""Variants compiled ahead in worker processes: this process then loads them from the caches, with
results equal to compiling them here; workers run a few at a time, fail softly and never outlive it."""
from __future__ import annotations

import logging
import sys
import warnings
from dataclasses import replace

import pytest
import torch
from torch._dynamo.utils import counters

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.compile import workers
from toca_fx.models import DiT
from toca_fx.compile.workers import _TIMES, Prefetch, _dump, _load

from tests.helpers import SIZE, step_inputs
from tests.helpers import tiny_dit_generation as _generation


def test_variants_compiled_in_workers_are_loaded_from_the_caches_and_match(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))  # read by this process and the workers
    caplog.set_level(logging.INFO, logger="toca_fx")
    config = ToCaConfig(interval=2, ratio=0.5, num_steps=2, regional=False)  # a full and a partial variant, each whole
    counters.clear()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        parallel, backend = _generation(replace(config, parallel_compile=True))
    assert not [w for w in caught if "worker process" in str(w.message)]  # what a failed worker warns
    compiles = backend.stats()["compiles"]
    assert compiles == 2
    # Progress and compile times: the full variant compiled here, the partial one by a worker.
    full, partial = backend.stats()["compile_times"]
    assert (full["label"], full["step"], partial["label"], partial["step"]) == ("full", 0, "partial", 1)
    assert "worker" not in full and full["seconds"] > 0
    assert partial["worker"]["starting"] > 0 and partial["worker"]["compiling"] > 0 and partial["worker"]["queued"] >= 0
    messages = [r.getMessage() for r in caplog.records if r.name == "toca_fx"]
    assert "; 1 of them ahead in worker processes" in messages[0]
    assert messages[1].startswith("toca_fx: variant 1 of 2 (full, first called at step 0) ready in ")
    assert messages[1].endswith("compiled here")
    assert messages[2].startswith("toca_fx: variant 2 of 2 (partial, first called at step 1)")
    assert "compiled ahead in a worker: queued " in messages[2]
    # The full variant compiled here; the partial one, compiled by a worker meanwhile, loaded.
    assert counters["aot_autograd"]["autograd_cache_hit"] == counters["inductor"]["fxgraph_cache_hit"] == compiles - 1
    assert not workers._live  # every worker waited for
    torch._dynamo.reset()
    counters.clear()
    warm, _ = _generation(replace(config, parallel_compile=True))  # compiled before: all loaded
    assert counters["inductor"]["fxgraph_cache_hit"] == compiles and not workers._live
    assert all(torch.equal(a, b) for a, b in zip(parallel, warm))
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "serial"))
    counters.clear()
    serial, backend = _generation(config)
    assert counters["inductor"]["fxgraph_cache_miss"] == compiles  # compiled here, from scratch
    assert not [row for row in backend.stats()["compile_times"] if "worker" in row]
    for step, (a, b) in enumerate(zip(parallel, serial)):
        assert torch.equal(a, b), f"step {step}"


def test_regional_variants_past_the_second_compile_in_workers_region_by_region(tmp_path, monkeypatch, caplog):
    # Full, then two partial plans (the step factor moves the ratio): by regions the first two compile
    # here; the third in a worker, which must cut it as this process does (the stream's marks go with
    # the job), so that every region graph of it loads here from the caches.
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path))
    caplog.set_level(logging.INFO, logger="toca_fx")
    config = ToCaConfig(interval=2, ratio=0.5, num_steps=4, step_factors=(0.5, 1.5), parallel_compile=True, regional=True)
    counters.clear()
    parallel, backend = _deep_generation(config)
    rows = backend.stats()["compile_times"]
    assert [("worker" in r, r.get("blocks")) for r in rows] == [(False, 4), (False, 4), (True, 4)]
    ready = [r.getMessage() for r in caplog.records if r.name == "toca_fx" and " ready in " in r.getMessage()]
    assert ["compiled here by regions: 4 blocks" in m for m in ready] == [True, True, False]
    assert "compiled ahead in a worker by regions: 4 blocks" in ready[2]
    assert counters["inductor"]["fxgraph_cache_miss"] > 0  # the first two, here
    loaded = counters["inductor"]["fxgraph_cache_hit"]
    assert loaded >= 3 and not workers._live  # the third's prologue, block and epilogue at least
    torch._dynamo.reset()
    monkeypatch.setenv("TORCHINDUCTOR_CACHE_DIR", str(tmp_path / "serial"))
    serial, _ = _deep_generation(replace(config, parallel_compile=False))
    for step, (a, b) in enumerate(zip(parallel, serial)):
        assert torch.equal(a, b), f"step {step}"


def _deep_generation(config: ToCaConfig) -> tuple[list[torch.Tensor], ToCaBackend]:
    """As `tiny_dit_generation`, with 4 blocks: the first has a form of its own (no closing add of a
    block before it), the other three share one."""
    torch.manual_seed(0)
    model = DiT(num_classes=10, **{**SIZE, "depth": 4}).eval()
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        return [fast(*args) for args in step_inputs(model, config.num_steps)], backend


def test_a_dumped_graph_loads_with_the_same_code():
    config = ToCaConfig.preset("dit", num_steps=12, inner="eager")  # full, partial levels, reused branches
    _, backend = _generation(config)
    graph = backend.graphs[0]
    assert len(graph.planner.variants) > 2
    for variant in graph.planner.variants:
        gm = graph.compiler.graph(variant)
        assert _load(_dump(gm)).code == gm.code  # the code, from which the caches' keys are made


def test_a_graph_holding_its_weights_is_not_dumped():
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4096, 4097))  # weights as the graph's own: 64 MiB
    with pytest.raises(ValueError, match="64 MiB of constants"):
        _dump(gm)
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 3))
    assert torch.equal(_load(_dump(gm))(torch.ones(2, 4)), gm(torch.ones(2, 4)))


# Workers that only sleep for the seconds of their job, or fail: the bookkeeping, without compiling.
_SLEEP = "import sys, time; time.sleep(float(sys.stdin.read()))"
_FAIL = "import sys; sys.exit('boom: ' + sys.stdin.read())"


@pytest.fixture
def worker_code(monkeypatch):
    """Sets the workers' code; restores the state a failure leaves."""
    monkeypatch.setattr(workers, "_failed", False)
    return lambda code: monkeypatch.setattr(workers, "_command", lambda: [sys.executable, "-c", code])


def test_workers_run_a_few_at_a_time_in_order_and_are_all_reaped(worker_code):
    worker_code(_SLEEP)
    made = []
    ahead = Prefetch(max_workers=2)
    ahead.add({key: lambda key=key: made.append(key) or b"0.2" for key in "abc"})
    assert made == ["a", "b"] and list(ahead.running) == ["a", "b"]  # jobs made as workers start
    started = {key: w.process for key, w in ahead.running.items()}
    ahead.wait("a")
    assert made == ["a", "b", "c"] and len(ahead.running) <= 2
    ahead.wait("c")
    ahead.wait("b")
    assert not ahead.running and not ahead.queue and not workers._live
    assert [p.returncode for p in started.values()] == [0, 0]


def test_workers_report_where_their_seconds_went(worker_code):
    # Each sleeps for its job's seconds, then says when it began and ended, as a compiling worker does.
    worker_code(f"import sys, time, json; b = time.time(); time.sleep(float(sys.stdin.read())); "
            f"print({_TIMES!r} + json.dumps([b, time.time()]))")
    ahead = Prefetch(max_workers=1)
    ahead.add({"a": lambda: b"0.5", "b": lambda: b"0.2"})
    assert ahead.wait("a") and ahead.wait("b")
    a, b = ahead.times["a"], ahead.times["b"]
    assert 0.5 <= a.compiling < 5 and 0.2 <= b.compiling < 5
    assert a.starting > 0 and b.starting > 0
    assert a.queued < 0.5 <= b.queued  # "b" waited for "a"'s slot


def test_a_job_due_before_its_worker_started_is_left_to_the_caller(worker_code):
    worker_code(_SLEEP)
    ahead = Prefetch(max_workers=1)
    ahead.add({"a": lambda: b"0.2", "b": lambda: pytest.fail("never started")})
    ahead.wait("b")  # due now: no worker will compile it
    assert "b" not in ahead.queue
    ahead.wait("a")
    assert not ahead.running and not workers._live


def test_a_failed_worker_warns_once_and_then_none_start(worker_code):
    worker_code(_FAIL)
    ahead = Prefetch(max_workers=2)
    ahead.add({"a": lambda: b"a", "b": lambda: b"b", "c": lambda: b"c"})
    with pytest.warns(UserWarning, match="compiling a variant in a worker process failed") as caught:
        ahead.wait("a")
        ahead.wait("b")
    assert len(caught) == 1 and "boom" in str(caught[0].message)
    assert not ahead.queue and not ahead.running  # "c" is left to this process
    assert not workers.enabled(True, {})


def test_workers_stop_once_a_variant_no_worker_compiled_loads_from_the_caches(worker_code):
    worker_code(_SLEEP)
    ahead = Prefetch(max_workers=1)
    ahead.add({"b": lambda: b"60", "c": lambda: b"60"})
    process = ahead.running["b"].process
    with ahead.compiling("a"):
        pass  # compiled: a miss, so the workers go on
    assert list(ahead.running) == ["b"] and list(ahead.queue) == ["c"]
    with ahead.compiling("a2"):
        counters["inductor"]["fxgraph_cache_hit"] += 1  # loaded from the caches
    assert not ahead.running and not ahead.queue and process.returncode is not None
    assert not workers._live


def test_a_variant_loaded_from_its_workers_entries_stops_no_worker(worker_code):
    worker_code(_SLEEP)
    ahead = Prefetch(max_workers=2)
    ahead.add({"b": lambda: b"0", "c": lambda: b"60"})
    ahead.running["b"].process.wait()
    ahead.wait("c2")  # "b" ended before it was due: reaped meanwhile
    assert list(ahead.running) == ["c"]
    with ahead.compiling("b"):
        counters["inductor"]["fxgraph_cache_hit"] += 1  # loaded: what its worker compiled
    assert list(ahead.running) == ["c"]
    ahead.stop()
    assert not workers._live


def test_workers_still_running_at_exit_are_stopped(worker_code):
    worker_code(_SLEEP)
    ahead = Prefetch(max_workers=1)
    ahead.add({"a": lambda: b"60"})
    process = ahead.running["a"].process
    workers._stop_all()  # what atexit runs
    assert process.returncode is not None and process.returncode != 0
    assert not workers._live


def test_enabled_by_setting_cores_caches_and_autotuning(monkeypatch):
    monkeypatch.setattr(workers, "AUTO_MIN_CPUS", 8)
    monkeypatch.setattr(workers, "_cpus", lambda: 16)
    assert workers.enabled(None, {}) and workers.enabled(True, {})
    assert not workers.enabled(False, {})
    assert not workers.enabled(True, {"max_autotune": True})  # workers would time kernels at once
    monkeypatch.setattr(workers, "_cpus", lambda: 2)
    assert not workers.enabled(None, {}) and workers.enabled(True, {})
    # config.patch, not monkeypatch: pytest 9.2's undo deletes a module attribute that lives outside
    # the module's __dict__, which hides Inductor's config entry for the rest of the test run.
    with torch._inductor.config.patch(fx_graph_cache=False):
        assert not workers.enabled(True, {})
