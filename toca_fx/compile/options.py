"""`torch.compile` options of a variant, and the one place they become Inductor config patches.

Inductor's choices that the caching variants change:
- pointwise configs are not timed (`triton.autotune_pointwise=False`): Inductor times each pointwise
  kernel's configs at its first run, on the critical path of a generation's first calls, and caching
  variants have many more distinct pointwise kernels than the plain model; the plain model's graph
  (every branch computed, nothing stored) keeps Inductor's choice.
- a variant that reuses branches and chooses no rows caps fused groups at 16 nodes
  (`max_fusion_size`): nothing reads the residual stream between its reused-branch adds, and Inductor
  would otherwise fuse the whole chain of adds into the next reduction, one long serial kernel. The
  cap slows full steps and steps with rows, so they keep the default.
A user's own options ("options" of `torch.compile`) override these.
"""
from __future__ import annotations

from functools import partial
from typing import Any, Callable

import torch
import torch.fx as fx

from ..policies.plan import Mode
from .inductor import compile_inductor
from .regions import compile_graph
from .store_placement import PlaceStores

_CACHING_PATCHES = {"triton.autotune_pointwise": False}
_REUSE_PATCHES = {"max_fusion_size": 16}
_NOT_CAPTURED = {"triton.cudagraphs": False}  # the runtime replays the variant as a CUDA graph itself


def variant_options(options: dict, modes: set[Mode], graphed: bool) -> dict:
    """The `torch.compile` options for a variant whose branches take `modes`; `graphed`: the runtime
    replays it as a CUDA graph itself, so Inductor must not capture it too (its mode's other choices,
    max-autotune's, stay)."""
    chains = Mode.REUSE in modes and Mode.ROWS not in modes  # rows plans read the stream at every block
    out = {k: v for k, v in options.items() if not (graphed and k == "mode" and v == "reduce-overhead")}
    patches = {**(_CACHING_PATCHES if modes != {Mode.COMPUTE} else {}), **(_REUSE_PATCHES if chains else {})}
    out["options"] = {"post_grad_custom_post_pass": PlaceStores(), **patches, **(options.get("options") or {}),
                      **(_NOT_CAPTURED if graphed else {})}
    return out


def inductor_patches(options: dict) -> dict[str, Any]:
    """The Inductor config patches of `torch.compile` options: its mode's, then its "options"."""
    patches = dict(torch._inductor.list_mode_options(options.get("mode")) if options.get("mode") else {})
    patches.update(options.get("options") or {})
    return patches


def compile_variant(
    gm: fx.GraphModule, inputs: list[Any], inner: str, options: dict, wide_rows: bool = True, regional: bool = False
) -> Callable:
    """`gm` as `inner` runs it: by regions (`compile.regions`) where `regional` and blocks repeat, else
    whole; `wide_rows`: reductions as `inductor.wide_rows_choices` makes them (not for the plain model)."""
    if inner == "eager":
        return gm
    one = partial(compile_inductor, patches=inductor_patches(options), wide_rows=wide_rows)
    return compile_graph(gm, inputs, one, regional)
