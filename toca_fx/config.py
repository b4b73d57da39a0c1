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
    """

    interval: int = 4
    ratio: float = 0.3
    num_steps: int = 50
    self_attn: str = "reuse"
    inner: str = "inductor"

    def __post_init__(self) -> None:
        _check(_is_int(self.interval) and self.interval >= 1, "interval", "an int >= 1", self.interval)
        _check(
            _is_number(self.ratio) and 0.0 < self.ratio <= 1.0, "ratio", "a number in (0, 1]", self.ratio
        )
        _check(_is_int(self.num_steps) and self.num_steps >= 1, "num_steps", "an int >= 1", self.num_steps)
        _check(self.self_attn in SELF_ATTN_MODES, "self_attn", f"one of {SELF_ATTN_MODES}", self.self_attn)
        _check(self.inner in INNER_COMPILERS, "inner", f"one of {INNER_COMPILERS}", self.inner)


def _check(ok: bool, field: str, allowed: str, value: object) -> None:
    if not ok:
        raise ValueError(f"ToCaConfig.{field} must be {allowed}, got {value!r}")


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)
