"""`ToCaConfig`: every setting of the backend, validated when it is made."""
from __future__ import annotations

from dataclasses import dataclass

SELF_ATTN_MODES = ("reuse", "recompute", "recompute_cached_kv")
INNER_COMPILERS = ("inductor", "eager")


@dataclass(frozen=True)
class ToCaConfig:
    """Token-wise caching settings.

    interval: a full step (every token of every branch recomputed) every `interval` calls; the first
        call of a generation is always full.
    ratio: fraction of tokens recomputed by cached branches on the partial steps in between.
    num_steps: calls per generation; the cache resets after this many calls (or on `reset()`).
    self_attn: on partial steps, "reuse" (ToCa's default) adds the cached self-attention output
        without running it; "recompute" runs the chosen queries against keys/values of all tokens;
        "recompute_cached_kv" against cached keys/values updated with the chosen tokens' rows.
    inner: "inductor" compiles each rewritten graph with Inductor; "eager" runs it as is.
    calls_per_step: calls of the model per denoising step, each with its own cache: 2 for a pipeline
        that calls the model for the conditional, then the unconditional half of classifier-free
        guidance (batched guidance, one call with both halves, is 1).
    """

    interval: int = 4
    ratio: float = 0.3
    num_steps: int = 50
    self_attn: str = "reuse"
    inner: str = "inductor"
    calls_per_step: int = 1

    def __post_init__(self) -> None:
        _check(_is_int(self.interval) and self.interval >= 1, "interval", "an int >= 1", self.interval)
        _check(
            _is_number(self.ratio) and 0.0 < self.ratio <= 1.0, "ratio", "a number in (0, 1]", self.ratio
        )
        _check(_is_int(self.num_steps) and self.num_steps >= 1, "num_steps", "an int >= 1", self.num_steps)
        _check(self.self_attn in SELF_ATTN_MODES, "self_attn", f"one of {SELF_ATTN_MODES}", self.self_attn)
        _check(self.inner in INNER_COMPILERS, "inner", f"one of {INNER_COMPILERS}", self.inner)
        _check(
            _is_int(self.calls_per_step) and self.calls_per_step >= 1,
            "calls_per_step", "an int >= 1", self.calls_per_step,
        )


def _check(ok: bool, field: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"ToCaConfig.{field} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
