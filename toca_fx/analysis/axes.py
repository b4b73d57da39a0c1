"""What the token-axis propagation knows of a tensor: where the stream's token axis is (`Axes`), only
another stream's rows (`Passengers`), or nothing (None); and what it learnt of a branch (`TokenFlow`).

An `Axes` value says that the rows of a tensor along `tok` are the stream's tokens and that row i
depends on the stream only through token i, except through attention: an attention op mixes tokens
only through its keys and values, which the rewrite computes in full. `key` is set on attention maps
(q k^T), whose second token axis runs over the keys.

Joint attention (MMDiT, FLUX, CogVideoX) concatenates the stream with the tokens of another stream
(text) along the token axis. Such a tensor's `tok` axis holds the stream's rows at [start, start + N)
and `extra` rows of the other stream around them; the rewrite keeps those rows whole. A slice or split
that keeps only other-stream rows yields `Passengers`: rows that depend on the stream only through
attention keys/values, so a computation on the chosen rows yields them unchanged, as does any op on
them alone.

A stream may itself hold parts computed differently (a joint stream sliced into its image and text
rows inside the branch, each part processed alone and the parts joined again): where the slices
partition its rows, its largest part is the stream's tokens (`TokenFlow.tokens`, at `Axes.start`) and
the other parts are `extra` rows, recomputed whole on every step like another stream's.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch.fx as fx


@dataclass(frozen=True)
class Axes:
    tok: int
    key: int | None = None
    start: int = 0  # where the stream's rows begin along `tok`
    extra: int = 0  # rows along `tok` from another stream (joint attention), always computed whole

    def moved(self, fn: Callable[[int], int]) -> "Axes":
        return replace(self, tok=fn(self.tok), key=None if self.key is None else fn(self.key))

    def rows_pos(self, pos: int, n: int, k: int) -> int:
        """Where position `pos` along `tok` (outside the stream's rows) lands once the stream's n rows
        are cut to k."""
        return pos if pos <= self.start else pos - n + k


@dataclass(frozen=True)
class Passengers:
    """Only rows of another stream, split off a joint tensor along axis `tok`."""

    tok: int


# None: the tensor does not carry the stream's tokens. Tuples: multi-output ops (chunk, unbind).
Info = Any


class NotTokenLocal(Exception):
    """The branch contains an op that the pass cannot prove to act token by token."""


class TokenCut(NotTokenLocal):
    """A slice or split cuts the stream's rows at `cuts` (positions among its N rows, 0 < cut < N)."""

    def __init__(self, message: str, cuts: tuple[int, ...]):
        super().__init__(message)
        self.cuts = cuts


@dataclass
class TokenFlow:
    """What propagation learnt about one branch."""

    tokens: int = 0  # N, the stream's token count (its rows that can be chosen)
    info: dict[fx.Node, Info] = field(default_factory=dict)
    # Inputs that an attention op consumes over all tokens (keys, values): node -> those inputs.
    full_inputs: dict[fx.Node, tuple[fx.Node, ...]] = field(default_factory=dict)
    # Tensors from outside the branch indexed by token (e.g. rotary tables): node -> their token axis.
    external_rows: dict[fx.Node, Axes] = field(default_factory=dict)
    # Nodes outside the branch that read only other-stream rows of it (joint attention's text side).
    passenger_outputs: list[fx.Node] = field(default_factory=list)
    self_attention: list[fx.Node] = field(default_factory=list)
    joint_attention: list[fx.Node] = field(default_factory=list)
    cross_attention: list[fx.Node] = field(default_factory=list)
    # External operands of cross-attention (context keys/values): constant within a generation.
    context_kv: list[fx.Node] = field(default_factory=list)

