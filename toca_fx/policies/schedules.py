"""Ratio schedules of ToCa: the fraction of tokens a branch recomputes on a partial step is
`ratio x kind factor x depth factor x step factor`, the last two linear ramps (ToCa's layer and step
factors), snapped to a few levels so that steps and blocks share compiled graphs and kernels.
"""
from __future__ import annotations

from ..analysis.residual import Branch


def ramp(ends: tuple[float, float], pos: int, count: int) -> float:
    """Linear from ends[0] at pos 0 to ends[1] at pos count - 1."""
    return ends[0] if count <= 1 else ends[0] + (ends[1] - ends[0]) * pos / (count - 1)


def snapped_ramp(ends: tuple[float, float], pos: int, count: int, levels: int) -> float:
    """`ramp(ends, pos, count)` moved to the nearest of `levels` evenly spaced points from ends[0] to
    ends[1] (0: as is)."""
    value = ramp(ends, pos, count)
    if levels == 0 or ends[0] == ends[1]:
        return value
    if levels == 1:
        return (ends[0] + ends[1]) / 2
    step = (ends[1] - ends[0]) / (levels - 1)
    return ends[0] + step * round((value - ends[0]) / step)


def depths(branches: list[Branch]) -> dict[int, tuple[int, int]]:
    """Per branch index: (its position among the branches of its kind, how many there are)."""
    by_kind: dict[str, list[int]] = {}
    for b in branches:
        by_kind.setdefault(kind_of(b), []).append(b.index)
    return {i: (pos, len(idx)) for idx in by_kind.values() for pos, i in enumerate(idx)}


def kind_of(branch: Branch) -> str:
    """The branch kind that ratios are set by: joint attention counts as self-attention."""
    return "self_attn" if branch.attends_tokens else branch.kind
