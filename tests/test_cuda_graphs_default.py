"""CUDA graphs by default (ToCaConfig.cuda_graphs): the decision, Inductor's capture turned off where the
runtime captures, the fallbacks and their one warning. CUDA itself is stood in for on the CPU."""
from __future__ import annotations

import contextlib
import warnings

import pytest
import torch

from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.compile import cudagraphs
from toca_fx.compile.cudagraphs import CudaGraphed, decide
from toca_fx.compile.options import inductor_patches, variant_options
from toca_fx.errors import ToCaWarning
from toca_fx.policies.plan import Mode
from toca_fx.runtime import replay

from tests.helpers import step_inputs, tiny_dit


class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on CUDA: what `decide` reads."""

    @property
    def is_cuda(self):
        return True


def _cuda(t: torch.Tensor) -> torch.Tensor:
    return torch.Tensor._make_subclass(_OnCuda, t)


def test_decide_auto_is_on_for_cuda_inputs_under_inductor_in_any_mode():
    args = [_cuda(torch.ones(2)), _cuda(torch.ones(3))]
    for mode in (None, "default", "reduce-overhead", "max-autotune"):
        assert decide(None, "inductor", {"mode": mode}, args) == (True, None)


@pytest.mark.parametrize("setting,inner,options", [
    (False, "inductor", {}),  # turned off
    (None, "eager", {}),  # eager inner: nothing compiled, nothing captured
    (None, "inductor", {"mode": "max-autotune-no-cudagraphs"}),
    (None, "inductor", {"options": {"triton.cudagraphs": False}}),
])
def test_decide_off_without_a_word(setting, inner, options):
    assert decide(setting, inner, options, [_cuda(torch.ones(2))]) == (False, None)


def test_decide_off_on_the_cpu_and_says_why_only_when_asked():
    assert decide(None, "inductor", {}, [torch.ones(2)]) == (False, None)
    graphed, why = decide(True, "inductor", {}, [torch.ones(2)])
    assert not graphed and "no input is on CUDA" in why
    graphed, why = decide(True, "eager", {}, [_cuda(torch.ones(2))])
    assert not graphed and "needs inner='inductor'" in why


def test_decide_refuses_a_cpu_input_beside_cuda_ones_with_a_reason():
    graphed, why = decide(None, "inductor", {}, [_cuda(torch.ones(2)), torch.tensor(3.0)])
    assert not graphed and "[1]" in why and "CPU" in why


@pytest.mark.parametrize("mode", [None, "reduce-overhead", "max-autotune"])
def test_no_double_capture_where_the_runtime_captures(mode):
    options = {"mode": mode} if mode else {}
    graphed = variant_options(options, {Mode.ROWS}, graphed=True)
    assert inductor_patches(graphed)["triton.cudagraphs"] is False
    if mode == "max-autotune":  # its other choices stay
        assert inductor_patches(graphed)["max_autotune"] is True
    if mode == "reduce-overhead":  # not graphed here: Inductor's own capture as the user asked
        assert inductor_patches(variant_options(options, {Mode.ROWS}, graphed=False))["triton.cudagraphs"] is True


class _Graph:
    """Stands in for `torch.cuda.CUDAGraph` on the CPU: a replay reruns the captured call on the slots."""

    def replay(self):
        self.run()


def _fake_cuda(monkeypatch, fail: Exception | None = None) -> list:
    """CPU stand-ins for capture and replay; returns the list of graphs captured."""
    captured = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    monkeypatch.setattr(torch.cuda, "graph_pool_handle", lambda: None)

    @contextlib.contextmanager
    def capture(graph, pool):
        if fail is not None:
            raise fail
        captured.append(graph)
        yield

    monkeypatch.setattr(torch.cuda, "graph", capture)
    return captured


def _runner(fn, static, monkeypatch, fail=None):
    reasons = []
    graphed = CudaGraphed(fn, static, None, reasons.append)
    captured = _fake_cuda(monkeypatch, fail)
    original = graphed._capture

    def capture(args):  # the stand-in graph reruns the call on the slots, writing into the outputs
        ok = original(args)
        if ok:  # the static inputs, which the runner does not hold, at the addresses captured
            slots = [a if s is None else s for s, a in zip(graphed.slots, args)]
            graphed.graph.run = lambda: [o.copy_(n) for o, n in zip(graphed.outputs, fn(*slots))]
        return ok

    graphed._capture = capture
    return graphed, reasons, captured


def test_a_failed_capture_runs_uncaptured_and_says_why_once(monkeypatch):
    calls = []

    def fn(x):
        calls.append(1)
        return (x * 2,)

    graphed, reasons, _ = _runner(fn, [False], monkeypatch, fail=RuntimeError("operation not permitted when capturing"))
    outs = [graphed(torch.full((2,), float(i)))[0] for i in range(4)]
    assert [o.tolist() for o in outs] == [[0, 0], [2, 2], [4, 4], [6, 6]]
    assert len(reasons) == 1 and "capture failed" in reasons[0] and "not permitted" in reasons[0]
    assert graphed.failed is not None and len(calls) == 4


def test_a_python_number_that_changes_falls_back(monkeypatch):
    graphed, reasons, captured = _runner(lambda x, s: (x * s,), [False, False], monkeypatch)
    x = torch.ones(2)
    assert graphed(x, 2.0)[0].tolist() == [2, 2]
    assert graphed(x, 2.0)[0].tolist() == [2, 2] and len(captured) == 1  # captured, replayed
    assert graphed(x, 3.0)[0].tolist() == [3, 3]  # not the captured 2.0
    assert len(reasons) == 1 and "Python number" in reasons[0]


def _addresses_equal(tensors, ptrs, indices):
    """torch._C._tensors_data_ptrs_at_indices_equal as documented (CUDA builds only)."""
    return all(tensors[i].data_ptr() == ptrs[i] for i in indices)


@pytest.mark.parametrize("check", ["python", "c++"])
def test_a_static_input_at_a_new_address_is_captured_again(monkeypatch, check):
    if check == "c++":
        monkeypatch.setattr(cudagraphs, "_ADDRESSES_EQUAL", getattr(torch._C, "_tensors_data_ptrs_at_indices_equal",
                                                                    _addresses_equal))
    else:
        monkeypatch.setattr(cudagraphs, "_ADDRESSES_EQUAL", None)
    graphed, reasons, captured = _runner(lambda w, x: (w * x,), [True, False], monkeypatch)
    w = torch.full((2,), 2.0)
    for _ in range(3):
        assert graphed(w, torch.ones(2))[0].tolist() == [2, 2]
    assert len(captured) == 1
    w2 = torch.full((2,), 5.0)  # a parameter whose .data was replaced
    assert graphed(w2, torch.ones(2))[0].tolist() == [5, 5]
    assert len(captured) == 2 and not reasons


def _generation(config: ToCaConfig) -> tuple[list[torch.Tensor], ToCaBackend]:
    model = tiny_dit()
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        return [fast(*args) for args in step_inputs(model, config.num_steps)], backend


def test_graphed_generation_equals_the_uncaptured_one(monkeypatch):
    """The runtime's replay path (slots for the step's inputs, the cache buffers used in place),
    with a stand-in graph that reruns the captured call: the same outputs as without graphs."""
    config = ToCaConfig(interval=3, ratio=0.5, num_steps=8, inner="eager", self_attn="recompute")
    plain, backend = _generation(config)
    assert not backend.graphs[0].compiler.graphed
    torch._dynamo.reset()
    _fake_cuda(monkeypatch)
    monkeypatch.setattr(replay, "decide", lambda *a: (True, None))
    runners = []
    original = CudaGraphed._capture

    def capture(self, args):  # a real capture runs nothing: the stand-in's run is undone
        before = [a.clone() if isinstance(a, torch.Tensor) else None for a in args]
        ok = original(self, args)
        for a, b in zip(args, before):
            if b is not None:
                a.copy_(b)
        fn, slots = self.fn, [a if s is None else s for s, a in zip(self.slots, args)]
        self.graph.run = lambda: [o.copy_(n) for o, n in zip(self.outputs, fn(*slots))]
        runners.append(self)
        return ok

    monkeypatch.setattr(CudaGraphed, "_capture", capture)
    graphed, backend = _generation(config)
    assert backend.graphs[0].compiler.graphed and runners  # replayed
    # A runner keeps no static input (parameters) alive: only the inputs it copies into.
    assert all(not isinstance(s, torch.nn.Parameter) for r in runners for s in r.slots)
    for step, (a, b) in enumerate(zip(graphed, plain)):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=f"step {step}")


def test_cpu_and_eager_get_no_graphs_and_no_warning():
    for inner in ("eager", "inductor"):
        torch._dynamo.reset()
        with warnings.catch_warnings():
            warnings.simplefilter("error", ToCaWarning)
            _, backend = _generation(ToCaConfig(interval=2, ratio=0.5, num_steps=4, inner=inner))
        assert not backend.graphs[0].compiler.graphed


def test_forced_graphs_on_the_cpu_warn_once():
    with pytest.warns(ToCaWarning, match="CUDA graphs not used: ToCaConfig.cuda_graphs=True needs inner='inductor'") as record:
        _generation(ToCaConfig(interval=2, ratio=0.5, num_steps=4, inner="eager", cuda_graphs=True))
    assert sum("CUDA graphs" in str(w.message) for w in record) == 1


def test_config_checks_the_fields():
    with pytest.raises(ValueError, match="cuda_graphs"):
        ToCaConfig(cuda_graphs="auto")
    with pytest.raises(ValueError, match="cache_dtype"):
        ToCaConfig(cache_dtype="fp8")
