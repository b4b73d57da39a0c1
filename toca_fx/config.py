"""`ToCaConfig`: every setting of the backend, validated when it is made."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass, fields, replace
from functools import partial
from typing import Any, Mapping

import torch

from .ops.scores import DEFAULT_WEIGHTS, SCORES
from .policies.plan import Policy
from .policies.presets import PRESETS

SELF_ATTN_MODES = ("reuse", "recompute", "recompute_cached_kv")
INNER_COMPILERS = ("inductor", "eager")
BRANCH_KINDS = ("self_attn", "cross_attn", "mlp")
CACHE_DTYPES = (None, torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)


@dataclass(frozen=True)
class ToCaConfig:
    """Token-wise caching settings.

    interval: a full step (every token of every branch recomputed) every `interval` calls; the first
        call of a generation is always full.
    interval_stretch: ToCa's step weight w for the interval: each full step sets the distance to the
        next one to round(interval / f), f linear from 1 - w (first step) to 1 + w (last), so full steps
        are sparse early and dense late; 0 keeps the interval fixed. In [0, 1).
    dense_steps: (start, end) fractions of a generation where full steps come every 2 calls (ToCa's DiT
        code does this where the model is most sensitive to caching), or None.
    ratio: fraction of tokens recomputed by cached branches on the partial steps in between.
    num_steps: calls per generation; the cache resets after this many calls (or on `reset()`).
    self_attn: on partial steps, "reuse" (ToCa's default) adds the cached self-attention output
        without running it; "recompute" runs the chosen queries against keys/values of all tokens;
        "recompute_cached_kv" against cached keys/values updated with the chosen tokens' rows.
    inner: "inductor" compiles each rewritten graph with Inductor; "eager" runs it as is.
    parallel_compile: at a generation's first call, compile its other variants (one Inductor compilation
        of the whole model per distinct plan) in worker processes, into Inductor's on-disk caches, while
        this process compiles the first; each later first call then loads its variant from the caches.
        True or False; None (the default) is True with 8 or more usable CPU cores (with fewer, workers
        compete with this process for them).
        Never with inner="eager", without Inductor's FX graph cache, or under max-autotune (workers
        timing kernels at once would mislead each other's choices). Workers share the cores and take
        memory (with CUDA, a context each on the GPU); one that fails warns once, and this process
        compiles the variants itself from then on.
    regional: compile a variant block by block (`toca_fx.compile.regions`): each distinct form of block once,
        reused by every block of that form, where blocks share forms; False compiles each
        variant as one whole graph. By regions a generation compiles in a fraction of the time a
        whole graph per variant takes and runs about as fast (docs/benchmarks.md). With
        `parallel_compile`, the first two variants compile here and the rest in workers.
    timestep_clock: steps and generations follow the model's timestep input (an input that reaches a
        sine or cosine embedding): a lower timestep is the next step, the same one again another call
        of the same step with a cache of its own (guidance called in halves), a higher one a new
        generation. False counts calls instead (`calls_per_step` a step, `num_steps` a generation, or
        `reset()`), for samplers whose timesteps do not fall step by step. Without a timestep input
        calls are counted too, with a warning.
    calls_per_step: where calls are counted, calls of the model per denoising step, each with its own
        cache: 2 for a pipeline that calls the model for the conditional, then the unconditional half
        of classifier-free guidance (batched guidance, one call with both halves, is 1).
    scores: weight per token score (see `toca_fx.ops.scores`), as a mapping or (name, weight) pairs.
    attention_queries: queries sampled (evenly spaced) to estimate the self-attention map that the
        "attention" score reads, on full steps; 0 takes all queries. A written-out softmax map is read
        whole at no extra cost.
    grid: token grid (H, W) or (T, H, W) for the "spatial" score; None infers it from the graph (the
        patch-embedding convolution, else a square of N tokens).
    kind_factors: ratio factor per branch kind ("self_attn" covers joint attention); a ratio of 0
        reuses the branch whole; kinds left out have factor 1.
    depth_factors: (first, last) ratio factor, linear over a branch's depth among branches of its kind.
    step_factors: (first, last) ratio factor, linear over the steps of a generation. Ratios are clamped
        to [0, 1], so a negative factor recomputes nothing (ToCa's 50-step DDIM schedule starts at -1).
    depth_levels: the depth factor is snapped to the nearest of this many evenly spaced levels between
        its ends, so that blocks share row counts and Inductor compiles fewer distinct kernels (a row
        count per block compiles a kernel set per block, for the same FLOPs); 0 keeps the exact factor.
    step_levels: the step factor is snapped to the nearest of this many evenly spaced levels between
        its ends, so a step schedule compiles at most this many partial graphs (each distinct plan is
        one compilation); 0 keeps it exact (one graph per partial step).
    full_last: the last `full_last` steps of a generation are full steps.
    forecast_order: None (no forecasting), or the highest order 0-2 of the Taylor factors each branch
        keeps (TaylorSeer, `toca_fx.ops.forecast`): fills update them by divided differences and
        `Mode.FORECAST` plans add the extrapolation in the steps since the last fill. With it, ToCa's
        schedule forecasts where it would reuse and, for branches that recompute chosen tokens,
        forecasts the others (the hybrid). Order 0 is reuse (and the hybrid ToCa's rows) exactly.
    forecast_dtype: the dtype of the factors of order >= 1 (the order-0 factor is the cache, in the
        model's dtype); a floating dtype.
    cuda_graphs: on CUDA, replay each compiled variant as a CUDA graph (captured at its second call),
        in any `torch.compile` mode: a partial step's many small kernels then launch as one. None (the
        default) does so wherever it can: inner="inductor", every input on CUDA, and not under
        mode="max-autotune-no-cudagraphs"; where it cannot, the variants run uncaptured with one
        `ToCaWarning` saying why. False never captures; True also warns where capture is impossible.
        Under mode="reduce-overhead" the variants are captured here, not again by Inductor.
    cache_dtype: the dtype of the branches' caches (not of keys/values or token state): None keeps each
        branch output's dtype; torch.bfloat16 halves a float32 model's caches; torch.float8_e4m3fn
        stores a quarter of float32's bytes (half of bf16's) with one float32 scale per cached row
        (the row's largest magnitude over 448), read back in the branch output's dtype.
    policy: None for ToCa's schedule (the fields above), or a `Policy` (`label(step, num_steps)` and
        `plans(step, num_steps, branches)`, e.g. `FORAPolicy`, `Router.load(path)`), which then decides
        every step's plan; `num_steps`, `inner` and `calls_per_step` still apply.
    """

    interval: int = 4
    interval_stretch: float = 0.0
    dense_steps: tuple[float, float] | None = None
    ratio: float = 0.3
    num_steps: int = 50
    self_attn: str = "reuse"
    inner: str = "inductor"
    timestep_clock: bool = True
    calls_per_step: int = 1
    scores: Any = DEFAULT_WEIGHTS
    attention_queries: int = 0
    grid: tuple[int, ...] | None = None
    kind_factors: Any = (("self_attn", 1.0), ("cross_attn", 1.0), ("mlp", 1.0))
    depth_factors: tuple[float, float] = (1.0, 1.0)
    step_factors: tuple[float, float] = (1.0, 1.0)
    depth_levels: int = 4
    step_levels: int = 4
    full_last: int = 0
    forecast_order: int | None = None
    forecast_dtype: torch.dtype = torch.bfloat16
    policy: Policy | None = None
    parallel_compile: bool | None = None
    regional: bool = True
    cuda_graphs: bool | None = None
    cache_dtype: Any = None

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> "ToCaConfig":
        """The settings of ToCa's paper and code for "dit", "pixart", "opensora", "flux", and TaylorSeer's
        for "taylorseer-flux" (50 steps), "taylorseer-flux-28", "taylorseer-dit" (see
        `toca_fx.policies.presets.PRESETS` for their sources); keywords override them."""
        if name not in PRESETS:
            raise ValueError(f"ToCaConfig.preset name must be one of {tuple(PRESETS)}, got {name!r}")
        return replace(cls(**PRESETS[name]), **overrides)

    def __post_init__(self) -> None:
        _validate(self)


def _validate(c: ToCaConfig) -> None:
    """Every field checked; numbers of any numeric type (numpy's too) made Python numbers, weights
    sorted pairs (hashable, order-free)."""
    for f in fields(c):
        if f.name != "policy":
            object.__setattr__(c, f.name, _python_numbers(getattr(c, f.name)))
    object.__setattr__(c, "scores", _pairs(c.scores, "scores", SCORES))
    object.__setattr__(c, "kind_factors", _pairs(c.kind_factors, "kind_factors", BRANCH_KINDS))
    _check(_is_int(c.interval) and c.interval >= 1, "interval", "an int >= 1", c.interval)
    _check(
        _is_number(c.interval_stretch) and 0.0 <= c.interval_stretch < 1.0,
        "interval_stretch", "a number in [0, 1)", c.interval_stretch,
    )
    _check(
        c.dense_steps is None or (
            isinstance(c.dense_steps, tuple) and len(c.dense_steps) == 2
            and all(_is_number(v) for v in c.dense_steps) and 0.0 <= c.dense_steps[0] < c.dense_steps[1] <= 1.0
        ),
        "dense_steps", "None or a (start, end) pair with 0 <= start < end <= 1", c.dense_steps,
    )
    _check(
        _is_number(c.ratio) and 0.0 < c.ratio <= 1.0, "ratio", "a number in (0, 1]", c.ratio
    )
    _check(_is_int(c.num_steps) and c.num_steps >= 1, "num_steps", "an int >= 1", c.num_steps)
    _check(c.self_attn in SELF_ATTN_MODES, "self_attn", f"one of {SELF_ATTN_MODES}", c.self_attn)
    _check(c.inner in INNER_COMPILERS, "inner", f"one of {INNER_COMPILERS}", c.inner)
    _check(
        c.parallel_compile is None or isinstance(c.parallel_compile, bool),
        "parallel_compile", "None, True or False", c.parallel_compile,
    )
    _check(isinstance(c.regional, bool), "regional", "True or False", c.regional)
    _check(c.cuda_graphs is None or isinstance(c.cuda_graphs, bool), "cuda_graphs", "None, True or False", c.cuda_graphs)
    _check(c.cache_dtype in CACHE_DTYPES, "cache_dtype", f"one of {CACHE_DTYPES}", c.cache_dtype)
    _check(isinstance(c.timestep_clock, bool), "timestep_clock", "True or False", c.timestep_clock)
    _check(
        _is_int(c.calls_per_step) and c.calls_per_step >= 1,
        "calls_per_step", "an int >= 1", c.calls_per_step,
    )
    _check(
        _is_int(c.attention_queries) and c.attention_queries >= 0,
        "attention_queries", "an int >= 0", c.attention_queries,
    )
    _check(
        c.grid is None or (isinstance(c.grid, tuple) and len(c.grid) in (2, 3)
                              and all(_is_int(g) and g >= 1 for g in c.grid)),
        "grid", "None or a tuple of 2 or 3 ints >= 1", c.grid,
    )
    for name in ("depth_factors", "step_factors"):
        value = getattr(c, name)
        ok = isinstance(value, tuple) and len(value) == 2 and all(_is_number(v) for v in value)
        _check(ok, name, "a (first, last) pair of finite numbers", value)
    _check(_is_int(c.full_last) and c.full_last >= 0, "full_last", "an int >= 0", c.full_last)
    for name in ("depth_levels", "step_levels"):
        value = getattr(c, name)
        _check(_is_int(value) and value >= 0, name, "an int >= 0", value)
    _check(
        c.policy is None or isinstance(c.policy, Policy),
        "policy", "None or an object with label() and plans()", c.policy,
    )
    _check(
        c.forecast_order is None or (_is_int(c.forecast_order) and 0 <= c.forecast_order <= 2),
        "forecast_order", "None or an int in [0, 2]", c.forecast_order,
    )
    _check(
        isinstance(c.forecast_dtype, torch.dtype) and c.forecast_dtype.is_floating_point,
        "forecast_dtype", "a floating torch.dtype", c.forecast_dtype,
    )
    _check(
        c.forecast_order is not None or not getattr(c.policy, "forecasts", False),
        "forecast_order", f"an int in [0, 2] for a policy that forecasts ({c.policy!r})", c.forecast_order,
    )
    # Forecasting updates the cache (its order-0 factor) in place from its old value; a narrow cache
    # takes only stores and row scatters.
    _check(c.cache_dtype is None or c.forecast_order is None, "cache_dtype",
           "None while forecast_order is set (forecasting keeps caches in the model's dtype)", c.cache_dtype)


def check_field(owner: str, ok: bool, field: str, allowed: str, value: object) -> None:
    """Raise the ValueError every config class raises: which field, what it allows, what it got."""
    if not ok:
        raise ValueError(f"{owner}.{field} must be {allowed}, got {value!r}")


_check = partial(check_field, "ToCaConfig")


def _pairs(value: Any, field: str, names: tuple[str, ...]) -> tuple[tuple[str, float], ...]:
    """A mapping or (name, weight) pairs as sorted pairs (hashable, order-free); names and weights checked."""
    items = value.items() if isinstance(value, Mapping) else value
    try:
        pairs = tuple(sorted((str(n), w) for n, w in items))
    except (TypeError, ValueError):
        pairs = ()
    ok = bool(pairs) and all(n in names and _is_number(w) and w >= 0 for n, w in pairs)
    _check(ok and len({n for n, _ in pairs}) == len(pairs), field, f"weights >= 0 keyed by {names}", value)
    return pairs


def _python_numbers(value: Any) -> Any:
    """`value` with numpy (or other numeric) scalars, also inside tuples, as Python ints and floats."""
    if isinstance(value, tuple):
        return tuple(_python_numbers(v) for v in value)
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or type(value) in (int, float):
        return value
    return int(value) if isinstance(value, numbers.Integral) else float(value)


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    """A finite int or float: nan and inf fail every range check later, or worse, pass it."""
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
