"""Nothing silently wrong: each way a cache could be served to the wrong call (graph breaks, shared
backends, number timesteps, early stops, Dynamo resets, threads, grad mode, bad configs, leaks) either
gives what a well-behaved run gives or says so."""
from __future__ import annotations

import gc
import threading
import warnings

import numpy as np
import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig, ToCaWarning
from toca_fx.policies.plan import BranchPlan, Mode, StepKind

from tests.helpers import step_inputs, tiny_dit

CONFIG = ToCaConfig(num_steps=6, interval=3, ratio=0.5, inner="eager")


def _run(model, inputs, config=CONFIG, backend=None, **compile_kwargs):
    backend = backend or ToCaBackend(config)
    fast = torch.compile(model, backend=backend, **{"dynamic": False, **compile_kwargs})
    with torch.no_grad():
        return [fast(*args) for args in inputs], backend


def _close(outputs, reference, atol=1e-5):
    assert len(outputs) == len(reference)
    for out, ref in zip(outputs, reference):
        torch.testing.assert_close(out, ref, atol=atol, rtol=1e-5)


@pytest.fixture
def model():
    torch._dynamo.reset()
    return tiny_dit()


@pytest.fixture
def reference(model):
    """Six steps of the tiny DiT under CONFIG, compiled as one graph; generations repeat it."""
    outputs, backend = _run(model, step_inputs(model, 6))
    assert backend.stats()["computed_fraction"] < 1.0  # the reference itself caches
    torch._dynamo.reset()
    return outputs


class _BreakingBlock(torch.nn.Module):
    """A block whose forward breaks the graph first (as a print or a `.tolist()` would): Dynamo
    compiles its frame once and calls that one graph for every block."""

    def __init__(self, block):
        super().__init__()
        self.block = block

    def forward(self, x, c):
        torch._dynamo.graph_break()
        return self.block(x, c)


def test_graph_break_inside_blocks_gives_each_block_its_own_cache(model, reference):
    model.blocks = torch.nn.ModuleList([_BreakingBlock(b) for b in model.blocks])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ToCaWarning)  # the fragments without blocks compile plainly
        outputs, backend = _run(model, step_inputs(model, 6) * 2)
    _close(outputs, reference * 2)
    block_graphs = [g for g in backend.graphs if g.calls]
    assert len(block_graphs) == 1 and sum(block_graphs[0].calls.values()) == 12 * len(model.blocks)


def test_two_models_of_one_class_on_one_backend_keep_their_own_caches(model, reference):
    other = tiny_dit(seed=3)
    other_reference, _ = _run(other, step_inputs(model, 6))
    torch._dynamo.reset()
    backend = ToCaBackend(CONFIG)
    fast = [torch.compile(m, backend=backend, dynamic=False) for m in (model, other)]
    with torch.no_grad():  # step by step in turn, as two models of one pipeline run
        outputs = [[f(*args) for f in fast] for args in step_inputs(model, 6)]
    _close([o[0] for o in outputs], reference)
    _close([o[1] for o in outputs], other_reference)


class _NumberTimestep(torch.nn.Module):
    """Takes the timestep as a Python number, as some pipelines pass it."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x, t, y):
        return self.model(x, torch.full((x.shape[0],), t, device=x.device), y)


@pytest.mark.parametrize("kind", [int, float])
def test_python_number_timesteps_follow_the_clock_without_a_graph_per_value(model, reference, kind):
    inputs = [(x, kind(t[0].item()), y) for x, t, y in step_inputs(model, 6)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", ToCaWarning)
        outputs, backend = _run(_NumberTimestep(model), inputs * 2, dynamic=None)
    _close(outputs, reference * 2)
    # Dynamo bakes the first value in, then makes the number symbolic: two graphs for twelve values.
    assert len(backend.graphs) == 2
    assert backend.stats()["calls"] == {"full": 4, "partial": 8}


def test_a_generation_that_ends_early_warns_and_the_next_starts_afresh(model, reference):
    inputs = step_inputs(model, 6)
    with pytest.warns(ToCaWarning, match="ended after 4 of its 6 planned steps"):
        outputs, _ = _run(model, inputs[:4] + inputs)
    _close(outputs[4:], reference)


def test_dynamo_reset_mid_generation_keeps_the_schedule(model, reference):
    inputs = step_inputs(model, 6)
    backend = ToCaBackend(CONFIG)
    outputs, _ = _run(model, inputs[:2], backend=backend)
    torch._dynamo.reset()
    more, _ = _run(model, inputs[2:] + inputs, backend=backend)
    _close(outputs + more, reference * 2)


def test_threads_have_their_own_generations(model, reference):
    backend = ToCaBackend(CONFIG)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        fast(*step_inputs(model, 1)[0])  # compile here; the threads then interleave their steps
    backend.reset()
    results, start = {}, threading.Barrier(2)

    def generate(i):
        start.wait()
        with torch.no_grad():
            results[i] = [fast(*args) for args in step_inputs(model, 6)]

    threads = [threading.Thread(target=generate, args=(i,)) for i in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    for i in range(2):
        _close(results[i], reference)


class _ReuseFirst:
    """A policy that reuses a cache on its first step: nothing has filled it."""

    def label(self, step, num_steps):
        return StepKind.PARTIAL

    def plans(self, step, num_steps, branches):
        return {b.index: BranchPlan(Mode.REUSE) for b in branches}

    def __repr__(self):
        return "_ReuseFirst()"


def test_a_policy_that_reads_a_cache_before_filling_it_is_refused(model):
    with pytest.raises(ValueError, match=r"_ReuseFirst\(\) at step 0 of 6, branch 0"):
        _run(model, step_inputs(model, 1), ToCaConfig(num_steps=6, policy=_ReuseFirst(), inner="eager"))


def test_grad_mode_computes_in_full_with_one_warning_and_gradients_flow(model):
    inputs = step_inputs(model, 3)
    x = inputs[0][0].clone().requires_grad_(True)
    fast = torch.compile(model, backend=ToCaBackend(CONFIG), dynamic=False)
    with pytest.warns(ToCaWarning, match="gradients are enabled"):
        outputs = [fast(x + 0.1 * i, t, y) for i, (_, t, y) in enumerate(inputs)]
    for i, (out, (_, t, y)) in enumerate(zip(outputs, inputs)):
        torch.testing.assert_close(out, model(x + 0.1 * i, t, y), atol=1e-5, rtol=1e-5)
    sum(o.square().sum() for o in outputs).backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


@pytest.mark.parametrize("field, value", [
    ("depth_factors", (float("nan"), 1.0)), ("step_factors", (1.0, float("inf"))),
    ("ratio", float("nan")), ("interval_stretch", float("nan")), ("scores", {"staleness": float("inf")}),
])
def test_non_finite_numbers_are_refused(field, value):
    with pytest.raises(ValueError, match=rf"ToCaConfig\.{field} must be"):
        ToCaConfig(**{field: value})


def test_numpy_numbers_are_accepted_as_python_numbers():
    config = ToCaConfig(ratio=np.float32(0.5), num_steps=np.int64(10), step_factors=(np.float64(0.5), 1))
    assert config == ToCaConfig(ratio=0.5, num_steps=10, step_factors=(0.5, 1))
    assert type(config.num_steps) is int and type(config.ratio) is float


def test_a_backend_takes_only_a_config():
    with pytest.raises(TypeError, match="ToCaBackend takes a ToCaConfig"):
        ToCaBackend({"ratio": 0.5})


def test_a_grid_that_does_not_fit_the_tokens_is_reported(model):
    config = ToCaConfig(num_steps=2, inner="eager", grid=(3, 3), scores={"staleness": 1.0, "spatial": 0.5})
    with pytest.warns(ToCaWarning, match=r"grid \(3, 3\) holds 9 tokens, not the 16"):
        _run(model, step_inputs(model, 2), config)


def test_caches_of_shapes_no_longer_used_are_freed_at_reset(model):
    _, alone = _run(model, step_inputs(model, 6, batch=2))
    backend = ToCaBackend(CONFIG)
    for batch in (1, 2, 3):
        _run(model, step_inputs(model, 6, batch=batch), backend=backend)
    assert backend.runtime.nbytes > alone.runtime.nbytes
    backend.reset()
    _run(model, step_inputs(model, 6, batch=2), backend=backend)
    backend.reset()  # batches 1 and 3 were not called since the previous reset
    assert backend.runtime.nbytes == alone.runtime.nbytes
    assert backend.stats()["cache_bytes"] == backend.runtime.nbytes


def test_a_deleted_model_takes_its_caches_with_it():
    backend, model = ToCaBackend(CONFIG), tiny_dit()
    _run(model, step_inputs(model, 6), backend=backend)
    assert backend.runtime.nbytes > 0
    del model
    torch._dynamo.reset()  # Dynamo's compiled code holds the parameters too
    gc.collect()
    assert backend.runtime.nbytes == 0




def test_a_large_batch_still_reads_its_timestep(model):
    from toca_fx.analysis.timestep import timestep_inputs

    found = []

    def recording(gm, inputs):
        found.extend(tuple(inputs[i].shape) for i in timestep_inputs(gm.graph, inputs))
        return gm

    fast = torch.compile(model, backend=recording, dynamic=False)
    with torch.no_grad():
        fast(*step_inputs(model, 1, batch=96)[0])
    assert found == [(96,)]


def test_an_input_that_never_changes_is_not_taken_for_a_timestep(model):
    inputs = [(x, torch.full_like(t, 500.0), y) for x, t, y in step_inputs(model, 12)]
    with pytest.warns(ToCaWarning, match="kept its value over 8 calls"):
        _, backend = _run(model, inputs)
    (graph,) = backend.graphs
    assert len(graph.state.streams) <= 8  # not a cache stream per call
    assert graph.calls["partial"] > 0  # counted steps cache again
