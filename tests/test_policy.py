"""ToCa's policy: ratios by branch kind, depth and step; forced last full steps; presets."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from toca_fx import ToCaConfig
from toca_fx.policies.presets import PRESETS
from toca_fx.policies.schedules import ramp
from toca_fx.policies.plan import BranchPlan, drop_dead_fills, plan_key
from toca_fx.policies.toca import ToCaPolicy


def _branches(kinds: list[str], tokens: int = 100) -> list[SimpleNamespace]:
    return [
        SimpleNamespace(index=i, kind=kind, tokens=tokens, attends_tokens=kind in ("self_attn", "joint_attn"))
        for i, kind in enumerate(kinds)
    ]


BLOCKS = _branches(["self_attn", "cross_attn", "mlp"] * 3)


def test_default_plans_are_unchanged():
    policy = ToCaPolicy(ToCaConfig(interval=2, ratio=0.3))
    assert set(policy.plans(0, 10, BLOCKS).values()) == {BranchPlan("fill")}
    plans = policy.plans(1, 10, BLOCKS)
    assert [plans[i] for i in range(3)] == [BranchPlan("reuse"), BranchPlan("rows", 30), BranchPlan("rows", 30)]


def test_ratio_by_kind_depth_and_step():
    config = ToCaConfig(
        interval=10, ratio=0.1, self_attn="recompute",
        kind_factors={"self_attn": 0.0, "cross_attn": 1.0, "mlp": 2.0},
        depth_factors=(1.5, 0.5), step_factors=(1.0, 2.0), depth_levels=0, step_levels=0,
    )
    policy = ToCaPolicy(config)
    first = policy.plans(1, 11, BLOCKS)  # step factor 1.1
    assert first[0] == BranchPlan("reuse")  # a ratio of 0
    assert [first[i].k for i in (1, 4, 7)] == [17, 11, 6]  # 10% x 1.1 x (1.5, 1.0, 0.5), ceil
    assert [first[i].k for i in (2, 5, 8)] == [33, 22, 11]
    last = policy.plans(9, 11, BLOCKS)  # step factor 1.9
    assert last[2] == BranchPlan("rows", 57)  # 10% x 1.9 x 1.5 x 2


def test_step_levels_bound_the_partial_graphs():
    # Partial steps 1-10 of an 11-step 1.0 -> 2.0 ramp: 10 distinct plans exactly, 3 with 3 levels.
    def partial_plans(levels):
        policy = ToCaPolicy(ToCaConfig(interval=20, step_factors=(1.0, 2.0), step_levels=levels))
        return {plan_key(policy.plans(s, 11, BLOCKS)) for s in range(1, 11)}

    assert len(partial_plans(0)) == 10 and len(partial_plans(3)) == 3
    # Snapped to the nearest level: step 1 (factor 1.1) to 1.0, step 9 (1.9) to 2.0.
    policy = ToCaPolicy(ToCaConfig(interval=20, ratio=0.1, step_factors=(1.0, 2.0), step_levels=3))
    assert [policy.plans(s, 11, BLOCKS)[2].k for s in (1, 9)] == [10, 20]


def test_depth_levels_share_row_counts_between_blocks():
    # 28 MLPs of 4096 tokens on a 1.8 -> 0.2 ramp (ToCa's): a row count per block exactly, 4 with 4
    # levels, the ends kept and the middle snapped to the nearest level (0.733 at depth 15 of 27).
    mlps = _branches(["mlp"] * 28, tokens=4096)

    def ks(levels):
        config = ToCaConfig(interval=20, ratio=0.1, depth_factors=(1.8, 0.2), depth_levels=levels)
        return [p.k for p in ToCaPolicy(config).plans(1, 10, mlps).values()]

    exact, snapped = ks(0), ks(4)
    assert len(set(exact)) == 28 and len(set(snapped)) == 4
    assert snapped[0] == exact[0] == 738 and snapped[-1] == exact[-1] == 82  # ceil(409.6 x 1.8), (x 0.2)
    assert snapped[15] == 301  # ceil(409.6 x 0.7333)
    assert abs(sum(snapped) - sum(exact)) < 0.01 * sum(exact)  # the mean ratio kept


def test_negative_factor_reuses_the_branch():
    policy = ToCaPolicy(ToCaConfig(interval=10, step_factors=(-1.0, 3.0)))  # ToCa's DDIM-50 step factor
    assert policy.plans(1, 10, _branches(["mlp"]))[0] == BranchPlan("reuse")
    assert policy.plans(9, 10, _branches(["mlp"]))[0] == BranchPlan("rows", 90)


def test_ratio_reaching_one_is_a_plain_full_branch():
    policy = ToCaPolicy(ToCaConfig(interval=4, ratio=0.6, kind_factors={"mlp": 2.0}))
    assert policy.plans(1, 8, _branches(["mlp"]))[0] == BranchPlan("fill")


def test_last_steps_forced_full():
    policy = ToCaPolicy(ToCaConfig(interval=4, full_last=2))
    labels = [policy.label(s, 10) for s in range(10)]
    assert labels == ["full", *["partial"] * 3, "full", *["partial"] * 3, "full", "full"]


def test_stretched_interval_is_long_early_and_short_late():
    # w = 0.4 over 50 steps: gap round(4 / f), f from 0.6 to 1.4 (7 at first, 3 at the end), set at
    # each full step.
    full = sorted(ToCaPolicy(ToCaConfig(interval=4, interval_stretch=0.4)).full_steps(50))
    gaps = [b - a for a, b in zip(full, full[1:])]
    assert full[0] == 0 and gaps[0] == 7 and gaps[-1] == 3
    assert gaps == sorted(gaps, reverse=True)
    assert sorted(ToCaPolicy(ToCaConfig(interval=4)).full_steps(10)) == [0, 4, 8]


def test_dense_steps_make_every_other_step_full():
    policy = ToCaPolicy(ToCaConfig(interval=4, dense_steps=(0.5, 0.8)))
    # The gap is set at each full step: 8 is at 0.4 (gap 4), 12 and 14 inside (gap 2), 16 at 0.8.
    assert sorted(policy.full_steps(20)) == [0, 4, 8, 12, 14, 16]
    assert [policy.label(s, 20) for s in (13, 14, 15)] == ["partial", "full", "partial"]


def _generation(config: ToCaConfig, steps: int) -> list[dict[int, BranchPlan]]:
    policy = ToCaPolicy(config)
    return [policy.plans(s, steps, BLOCKS) for s in range(steps)]


def test_fills_never_read_become_plain_computations():
    # Every step full: nothing reads a cache, so no step stores one.
    every = drop_dead_fills(_generation(ToCaConfig(ratio=1.0, self_attn="recompute"), 6))
    assert all(p == BranchPlan("compute") for plans in every for p in plans.values())
    # Full steps followed by partial ones keep their stores.
    raw = _generation(ToCaConfig(interval=2), 6)
    assert drop_dead_fills(raw) == raw


def test_dropping_stores_never_adds_a_compiled_graph():
    # The last two steps are full and read by nothing, but steps 0 and 4 with the same plans are read:
    # converting only steps 8 and 9 would add a graph, so none is converted.
    raw = _generation(ToCaConfig(interval=4, full_last=2), 10)
    assert drop_dead_fills(raw) == raw
    assert len({plan_key(p) for p in drop_dead_fills(raw)}) == len({plan_key(p) for p in raw})


def test_ramp_ends():
    assert ramp((1.8, 0.2), 0, 28) == 1.8 and ramp((1.8, 0.2), 27, 28) == pytest.approx(0.2)
    assert ramp((1.8, 0.2), 0, 1) == 1.8


@pytest.mark.parametrize("name", [n for n in PRESETS if not n.startswith("taylorseer")])  # ToCa's
def test_presets_build_and_accept_overrides(name):
    config = ToCaConfig.preset(name, num_steps=10)
    assert config.num_steps == 10 and config.self_attn == "reuse"
    assert dict(config.kind_factors)["mlp"] == 2.5


def test_dit_preset_is_tocas_published_setting():
    config = ToCaConfig.preset("dit")
    assert (config.interval, config.ratio, config.num_steps) == (4, 0.07, 250)
    assert dict(config.scores) == {"attention": 1.0, "staleness": 0.0625, "spatial": 0.6}
    assert (config.depth_factors, config.step_factors) == ((1.8, 0.2), (0.6, 1.4))
    assert (config.interval_stretch, config.dense_steps) == (0.4, (0.6, 0.8))
    assert (ToCaConfig.preset("pixart").interval, ToCaConfig.preset("pixart").ratio) == (3, 0.10)


@pytest.mark.parametrize(
    "field, value",
    [
        ("scores", {"entropy": 1.0}),
        ("scores", {"staleness": -1.0}),
        ("scores", {}),
        ("kind_factors", {"attn": 1.0}),
        ("attention_queries", -1),
        ("grid", (4,)),
        ("grid", [4, 4]),
        ("depth_factors", (1.0,)),
        ("step_factors", (1.0, "x")),
        ("full_last", -1),
        ("step_levels", -1),
        ("depth_levels", 1.5),
        ("interval_stretch", 1.0),
        ("dense_steps", (0.8, 0.6)),
        ("dense_steps", (0.0, 1.5)),
    ],
)
def test_bad_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"ToCaConfig\.{field} must be"):
        ToCaConfig(**{field: value})


def test_unknown_preset_is_rejected():
    with pytest.raises(ValueError, match="preset name must be one of"):
        ToCaConfig.preset("sd3")
