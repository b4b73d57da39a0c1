"""Forecasting (TaylorSeer's Taylor factors, `Mode.FORECAST`) against a hand-written eager reference."""
from __future__ import annotations

import math

import pytest
import torch

from toca_fx import FORAPolicy, TaylorSeerPolicy, ToCaBackend, ToCaConfig
from toca_fx.models.layers import modulate, unpatchify
from toca_fx.ops.scores import refresh_scores, select_tokens
from toca_fx.policies.plan import BranchPlan, Mode, StepKind

from tests.helpers import step_inputs, tiny_dit


class _Taylor:
    """One feature's factors as TaylorSeer keeps them: a list [f_0, f_1, ...] and the last fill's step."""

    def __init__(self, order: int):
        self.order, self.factors, self.last = order, [], None

    def fill(self, step: int, value: torch.Tensor) -> torch.Tensor:
        new = [value.clone()]
        if self.last is not None and step > self.last:
            d = step - self.last
            for i in range(min(self.order, len(self.factors))):
                new.append((new[i] - self.factors[i]) / d)
        self.factors, self.last = new, step
        return value

    def forecast(self, step: int) -> torch.Tensor:
        k = step - self.last
        return sum(f * (k**i / math.factorial(i)) for i, f in enumerate(self.factors))

    def refresh_rows(self, step: int, idx: torch.Tensor, rows: torch.Tensor) -> None:
        """The hybrid's rule: the top factor's chosen rows absorb the residual of the exact rows."""
        while len(self.factors) <= self.order:
            self.factors.append(torch.zeros_like(self.factors[0]))
        k, n = step - self.last, self.order
        residual = rows - self.forecast(step)[:, idx]
        self.factors[n][:, idx] += residual * (math.factorial(n) / k**n)


def _reference(model, inputs, full, order, rows_k=0):
    """DiT where each block's attention and MLP outputs (before their gates) keep Taylor factors, filled
    on `full(step)` steps and forecast on the others; `rows_k` > 0: the MLP also recomputes its rows_k
    chosen tokens (the hybrid) with ToCa's score, as the backend's default."""
    feats, stale, outs = {}, {}, []
    for step, (x, t, y) in enumerate(inputs):
        tokens = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y)
        for i, blk in enumerate(model.blocks):
            sa, sc, ga, sm, scm, gm = blk.adaLN_modulation(c).chunk(6, dim=1)
            attn = feats.setdefault((i, "attn"), _Taylor(order))
            mlp = feats.setdefault((i, "mlp"), _Taylor(order))
            f_attn = lambda z: blk.attn(modulate(blk.norm1(z), sa, sc))  # noqa: E731
            f_mlp = lambda z: blk.mlp(modulate(blk.norm2(z), sm, scm))  # noqa: E731
            h = attn.fill(step, f_attn(tokens)) if full(step) else attn.forecast(step)
            tokens = tokens + ga.unsqueeze(1) * h
            if full(step):
                h = mlp.fill(step, f_mlp(tokens))
                stale[i] = (torch.zeros(tokens.shape[1]), torch.zeros(tokens.shape[1]))
                refresh_scores(tokens, *stale[i])
            elif rows_k:
                idx = select_tokens(tokens, *stale[i], rows_k)
                rows = f_mlp(tokens[:, idx])
                h = mlp.forecast(step)
                h[:, idx] = rows
                mlp.refresh_rows(step, idx, rows)
            else:
                h = mlp.forecast(step)
            tokens = tokens + gm.unsqueeze(1) * h
        outs.append(unpatchify(model.final_layer(tokens, c), model.patch_size, model.out_channels))
    return outs


def _run(model, config, inputs):
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        return [fast(*args) for args in inputs], backend


def _full_taylorseer(interval, first_full):
    return lambda s: s < first_full or (s - first_full + 1) % interval == 0


@pytest.mark.parametrize("order", [1, 2])
def test_taylorseer_matches_hand_written_forecast(order):
    model, steps = tiny_dit(), 12
    inputs = step_inputs(model, steps)
    config = ToCaConfig(policy=TaylorSeerPolicy(4, first_full=2), forecast_order=order, forecast_dtype=torch.float32,
                        num_steps=steps, inner="eager")
    cached, backend = _run(model, config, inputs)
    with torch.no_grad():
        reference = _reference(model, inputs, _full_taylorseer(4, 2), order)
        uncached = [model(*args) for args in inputs]
    for step, (a, b) in enumerate(zip(cached, reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    for step in (0, 1, 5, 9):  # full steps are the model's own
        assert torch.equal(cached[step], uncached[step]), f"step {step}"
    assert not torch.allclose(cached[3], uncached[3], atol=1e-4)
    assert backend.stats()["calls"] == {"full": 4, "partial": 8}
    assert backend.stats()["compiles"] == 2  # the step distance is a tensor: one partial graph for every k


def test_forecast_differs_from_reuse_and_order_zero_is_reuse_exactly():
    model, steps = tiny_dit(), 7
    inputs = step_inputs(model, steps)
    reuse, _ = _run(model, ToCaConfig(policy=FORAPolicy(3), num_steps=steps, inner="eager"), inputs)
    order0, _ = _run(model, ToCaConfig(policy=FORAPolicy(3, forecast=True), forecast_order=0, num_steps=steps,
                                       inner="eager"), inputs)
    order1, _ = _run(model, ToCaConfig(policy=FORAPolicy(3, forecast=True), forecast_order=1, num_steps=steps,
                                       inner="eager"), inputs)
    assert all(torch.equal(a, b) for a, b in zip(order0, reuse))
    assert torch.equal(order1[2], reuse[2])  # one fill so far: no slope yet
    assert not torch.allclose(order1[4], reuse[4], atol=1e-4)
    assert all(torch.equal(order1[s], reuse[s]) for s in (0, 3, 6))


def test_hybrid_matches_hand_written_reference():
    model, steps = tiny_dit(), 8
    inputs = step_inputs(model, steps)
    config = ToCaConfig(interval=4, ratio=0.4, num_steps=steps, forecast_order=1, forecast_dtype=torch.float32,
                        inner="eager")
    cached, backend = _run(model, config, inputs)
    k = math.ceil(0.4 * 16)
    with torch.no_grad():
        reference = _reference(model, inputs, lambda s: s % 4 == 0, 1, rows_k=k)
    for step, (a, b) in enumerate(zip(cached, reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    plans = dict(backend.graphs[0].planner.generation(steps)[1].variant.key)
    assert {p.mode for p in plans.values()} == {Mode.FORECAST} and {p.k for p in plans.values()} == {0, k}


def test_hybrid_of_order_zero_is_toca_exactly():
    model, steps = tiny_dit(), 8
    inputs = step_inputs(model, steps)
    toca, _ = _run(model, ToCaConfig(interval=4, ratio=0.4, num_steps=steps, inner="eager"), inputs)
    hybrid, _ = _run(model, ToCaConfig(interval=4, ratio=0.4, num_steps=steps, forecast_order=0, inner="eager"), inputs)
    assert all(torch.equal(a, b) for a, b in zip(hybrid, toca))


def test_inductor_forecast_matches_eager():
    model, steps = tiny_dit(), 9
    inputs = step_inputs(model, steps)
    kwargs = dict(policy=TaylorSeerPolicy(3, first_full=2), forecast_order=2, forecast_dtype=torch.float32,
                  num_steps=steps)
    eager, _ = _run(model, ToCaConfig(**kwargs, inner="eager"), inputs)
    compiled, backend = _run(model, ToCaConfig(**kwargs), inputs)
    for step, (a, b) in enumerate(zip(compiled, eager)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4, msg=f"step {step}")
    assert backend.stats()["compiles"] == 2


def test_factors_default_to_bf16_and_stay_close_to_float32():
    model, steps = tiny_dit(), 8
    inputs = step_inputs(model, steps)
    kwargs = dict(policy=TaylorSeerPolicy(3, first_full=2), forecast_order=1, num_steps=steps, inner="eager")
    half, backend = _run(model, ToCaConfig(**kwargs), inputs)
    full, _ = _run(model, ToCaConfig(**kwargs, forecast_dtype=torch.float32), inputs)
    specs = {s.name: s for s in backend.graphs[0].state.specs}
    assert specs["b0_f1"].dtype == torch.bfloat16 and specs["b0_cache"].dtype == torch.float32
    assert "b0_f2" not in specs and specs["clock"].shape == (1,)
    for a, b in zip(half, full):
        torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


class _ForecastFirst:
    forecasts = True

    def label(self, step, num_steps):
        return StepKind.PARTIAL

    def plans(self, step, num_steps, branches):
        return {b.index: BranchPlan(Mode.FORECAST) for b in branches}


def test_forecast_before_any_fill_is_refused():
    model = tiny_dit()
    inputs = step_inputs(model, 2)
    with pytest.raises(ValueError, match="'forecast' reads a cache that no earlier step"):
        _run(model, ToCaConfig(policy=_ForecastFirst(), forecast_order=1, num_steps=2, inner="eager"), inputs)


def test_forecasting_policy_needs_an_order():
    with pytest.raises(ValueError, match=r"ToCaConfig\.forecast_order must be"):
        ToCaConfig(policy=FORAPolicy(3, forecast=True))
    with pytest.raises(ValueError, match=r"ToCaConfig\.forecast_order must be"):
        ToCaConfig(forecast_order=3)


def test_a_new_generation_restarts_the_factors():
    model, steps = tiny_dit(), 6
    inputs = step_inputs(model, steps)
    config = ToCaConfig(policy=TaylorSeerPolicy(3, first_full=2), forecast_order=1, forecast_dtype=torch.float32,
                        num_steps=steps, inner="eager")
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        first = [fast(*args) for args in inputs]
        second = [fast(*args) for args in inputs]
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("name, full, ratio", [
    ("taylorseer-flux", [0, 1, 2, 8, 14, 20, 26, 32, 38, 44], 5.0),  # the paper's 4.99x FLUX setting
    ("taylorseer-flux-28", [0, 1, 2, 8, 14, 20, 26], 4.0),
    ("taylorseer-dit", [0, 1, 5, 9, 13, 17, 21, 25, 29, 33, 37, 41, 45, 49], 50 / 14),  # README: 3.57x
])
def test_taylorseer_presets_follow_the_published_schedules(name, full, ratio):
    config = ToCaConfig.preset(name)
    steps = [s for s in range(config.num_steps) if config.policy.label(s, config.num_steps) == StepKind.FULL]
    assert steps == full and config.num_steps / len(steps) == pytest.approx(ratio)
    assert config.forecast_order in (1, 2) and config.forecast_dtype == torch.bfloat16


def test_fills_of_a_forecasting_branch_are_kept():
    from toca_fx.policies.plan import drop_dead_fills

    fill, reuse, forecast = BranchPlan(Mode.FILL), BranchPlan(Mode.REUSE), BranchPlan(Mode.FORECAST)
    reusing = [{0: fill, 1: fill}, {0: fill, 1: reuse}, {0: reuse, 1: reuse}]
    forecasting = [{0: fill, 1: fill}, {0: fill, 1: reuse}, {0: forecast, 1: reuse}]
    assert drop_dead_fills(reusing)[0][0].mode == Mode.COMPUTE  # written again before it is read
    assert drop_dead_fills(forecasting) == forecasting  # the second fill's divided differences read the first


def test_router_and_fora_forecast_what_they_would_reuse():
    from types import SimpleNamespace

    from toca_fx import Router

    branches = [SimpleNamespace(index=i) for i in range(2)]
    router = Router(torch.tensor([[1.0, 1.0], [0.9, 0.1]])).forecasting()
    assert router.forecasts and router.plans(1, 2, branches) == {0: BranchPlan(Mode.FILL), 1: BranchPlan(Mode.FORECAST)}
    assert FORAPolicy(2, forecast=True).plans(1, 4, branches) == {0: BranchPlan(Mode.FORECAST), 1: BranchPlan(Mode.FORECAST)}
    with pytest.raises(ValueError, match=r"ToCaConfig\.forecast_order must be"):
        ToCaConfig(policy=router, num_steps=2)


def _hooked_reference(model, inputs, full, order, forecast_only=None):
    """diffusers' FLUX with TaylorSeer's features forecast by forward hooks (as its FLUX code does): the
    double blocks' image and text attention outputs and both MLPs', the single blocks' fused output;
    with `forecast_only`, only that feature's (the others computed on every step)."""
    taylors = {}

    def hook(key, pick):
        def replace(module, args, out):
            values = out if isinstance(out, tuple) else (out,)
            kept = []
            for j, v in enumerate(values):
                t = taylors.setdefault((key, j), _Taylor(order))
                compute = full(step[0]) or (forecast_only is not None and key != forecast_only)
                kept.append(t.fill(step[0], v) if compute else t.forecast(step[0]))
            return tuple(kept) if isinstance(out, tuple) else kept[0]
        return pick.register_forward_hook(replace)

    step = [0]
    handles = []
    for i, blk in enumerate(model.transformer_blocks):
        handles += [hook(("attn", i), blk.attn), hook(("ff", i), blk.ff), hook(("ff_context", i), blk.ff_context)]
    handles += [hook(("single", i), blk.proj_out) for i, blk in enumerate(model.single_transformer_blocks)]
    outs = []
    try:
        for s, kwargs in enumerate(inputs):
            step[0] = s
            outs.append(model(**kwargs)[0])
    finally:
        for h in handles:
            h.remove()
    return outs


def test_flux_forecasts_the_text_side_of_joint_attention_too():
    """The text side of a double block's joint attention is its image side's companion: forecast with it
    (TaylorSeer's FLUX code forecasts both), so a forecast step runs no attention at all."""
    from tests.diffusers_zoo import build, loop_inputs

    model, steps = build("flux"), 8
    inputs = loop_inputs("flux", steps)
    config = ToCaConfig(policy=TaylorSeerPolicy(3, first_full=2), forecast_order=1, forecast_dtype=torch.float32,
                        num_steps=steps, inner="eager")
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        cached = [fast(**kwargs)[0] for kwargs in inputs]
        reference = _hooked_reference(model, inputs, _full_taylorseer(3, 2), 1)
    for step, (a, b) in enumerate(zip(cached, reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    from toca_fx.rewrite.variants import build_variant

    graph = backend.graphs[0]
    forecast = {b.index: BranchPlan(Mode.FORECAST) for b in graph.analysis.branches}
    partial = build_variant(graph.gm, forecast, config).gm
    targets = {n.target for n in partial.graph.nodes if n.op == "call_function"}
    assert torch.nn.functional.scaled_dot_product_attention not in targets and "b0_cache_c0" in {
        s.name for s in graph.layout}
    reuse = build_variant(graph.gm, {i: BranchPlan(Mode.REUSE) for i in forecast}, config).gm  # ToCa: text side recomputed
    assert torch.nn.functional.scaled_dot_product_attention in {n.target for n in reuse.graph.nodes}


class _ForecastFirstBranch:
    """TaylorSeer's full steps; between them the first branch forecasts and the others compute."""

    forecasts = True

    def __init__(self, full):
        self.full = full

    def label(self, step, num_steps):
        return StepKind.FULL if self.full(step) else StepKind.PARTIAL

    def plans(self, step, num_steps, branches):
        mode = Mode.FILL if self.full(step) else Mode.FORECAST
        return {b.index: BranchPlan(mode if b.index == 0 else Mode.FILL) for b in branches}


def test_flux_text_side_forecast_is_read_where_later_blocks_compute():
    """With the double block's joint attention forecast and the single block computed, the single block
    reads the text stream, and so the text side's forecast."""
    from tests.diffusers_zoo import build, loop_inputs

    model, steps, full = build("flux"), 7, _full_taylorseer(3, 2)
    inputs = loop_inputs("flux", steps)
    config = ToCaConfig(policy=_ForecastFirstBranch(full), forecast_order=1, forecast_dtype=torch.float32,
                        num_steps=steps, inner="eager")
    fast = torch.compile(model, backend=ToCaBackend(config), dynamic=False)
    with torch.no_grad():
        cached = [fast(**kwargs)[0] for kwargs in inputs]
        reference = _hooked_reference(model, inputs, full, 1, forecast_only=("attn", 0))
        uncached = [model(**kwargs)[0] for kwargs in inputs]
    for step, (a, b) in enumerate(zip(cached, reference)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert not torch.allclose(cached[3], uncached[3], atol=1e-4)
