"""Inductor compilation of a rewritten graph, in the form Inductor's on-disk caches take.

A variant compiled at its first call, outside Dynamo, reached neither cache: the FX graph cache
bypasses a compilation without a tracing context whose fake mode has a shape env ("no shape env"), and
AOTAutograd's cache refuses a graph that calls functions outside torch (the rewrite's `store`,
`select_tokens`, ...) unless they are marked cacheable, or that calls a method of a node without an
example value (the rewrite's nodes have none). Here a graph compiles as Dynamo would hand it over:
every node with its example value, fake inputs in a tracing context with a shape env, and toca_fx's
functions marked, keyed by a hash of toca_fx's source (an edit of toca_fx invalidates its entries).

The fakes are made from the inputs' metadata alone (`TensorMeta`), so a process that holds only the
metadata (a compile worker, `compile.workers`) compiles under the same cache keys.

Rows of up to `PERSISTENT_ROWS` elements reduce in one pass (`wide_rows_choices`). A partial step still runs the
residual update, layer norm and token norm of every token after each branch; over DiT hidden sizes
(1152 to 3072) Inductor makes those reductions loops, which read their inputs twice
(benchmarks/residual_pass.py and docs/benchmarks.md measure both). Full steps get the same kernels,
so benchmarks/run.py --like-for-like also times plain Inductor with this choice.
"""
from __future__ import annotations

import contextlib
import copy
import functools
from pathlib import Path
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._guards import TracingContext, tracing
from torch._subclasses.fake_tensor import FakeTensorMode

from ..analysis.fake import FakeRun, fakes, metas_of, new_fake_mode

_MARKED = "unsafe_marked_cacheable_functions"
PERSISTENT_ROWS = 4096  # Inductor's own limit is 1024
_ROWS_KEY = "toca_fx.persistent_rows"  # in the marked functions, so the choice is in the cache keys


def compile_inductor(gm: fx.GraphModule, inputs: list[Any], patches: dict[str, Any], wide_rows: bool = True) -> Callable:
    """`compile_fx(gm, inputs)` under the Inductor config `patches`, cacheable (see the module's doc),
    with `wide_rows_choices`' reductions unless `wide_rows` is False (Inductor's own choice, as plain Inductor).
    `inputs`: tensors or `TensorMeta`s, and other values as they are; only tensors' metadata is read."""
    from torch._inductor.compile_fx import compile_fx

    fake_mode = new_fake_mode()
    metas = metas_of(inputs)
    gm = _with_example_values(gm, metas, new_fake_mode())  # its own: unbacked symbols (item()) stay there
    marked = {**patches.get(_MARKED, torch._inductor.config.unsafe_marked_cacheable_functions), **_toca_functions(gm)}
    if wide_rows:
        marked[_ROWS_KEY] = str(PERSISTENT_ROWS)
    inputs = fakes(metas, fake_mode)
    with tracing(TracingContext(fake_mode)), (wide_row_reductions() if wide_rows else contextlib.nullcontext()):
        return compile_fx(gm, inputs, config_patches={**patches, _MARKED: marked})


def wide_row_reductions() -> contextlib.AbstractContextManager[None]:
    """Compilations in this thread, inside the context, choose their reductions as `WideRows`."""
    from torch._inductor.virtualized import V

    return V.set_choices_handler(wide_rows_choices()())


@functools.cache
def wide_rows_choices() -> type:
    """`WideRows`: Inductor's choices, except that a reduction along contiguous rows of up to
    PERSISTENT_ROWS elements is persistent (one pass, the row in registers), not a loop over the row,
    where Inductor would loop only for the row's length. Made on first use: Inductor's choices module
    takes seconds to import."""
    from torch._inductor.choices import InductorChoices
    from torch._inductor.runtime.hints import ReductionHint
    from torch._inductor.virtualized import V

    class WideRows(InductorChoices):
        @staticmethod
        def should_use_persistent_reduction(features: Any, cooperative_reduction: bool) -> bool:
            if InductorChoices.should_use_persistent_reduction(features, cooperative_reduction):
                return True
            config = torch._inductor.config
            strict = getattr(features, "strict_sum_rblock", None)  # torch >= 2.14: a sum's block is fixed
            return bool(
                config.triton.persistent_reductions
                and not (cooperative_reduction or config.triton.multi_kernel)  # those weigh both kinds themselves
                and features.get_reduction_hint() == ReductionHint.INNER
                and (strict is None or strict() is None)
                and V.graph.sizevars.statically_known_leq(features.reduction_numel, PERSISTENT_ROWS)
            )

    return WideRows


def _with_example_values(gm: fx.GraphModule, metas: list[Any], fake_mode: FakeTensorMode) -> fx.GraphModule:
    """`gm`, or where a node lacks its example value (the rewrite's nodes), a copy with every node's:
    AOTAutograd's cache takes a method call only on a node that has one. Dynamo's own graphs go as
    they are, with the metadata they carry for AOTAutograd (their sources, static inputs)."""
    if all("example_value" in n.meta for n in gm.graph.nodes if n.op != "output"):
        return gm
    gm = fx.GraphModule(gm, copy.deepcopy(gm.graph))  # node metas copied, not shared
    FakeRun(gm, fake_mode, record=True).run_on(metas)
    return gm


def _toca_functions(gm: fx.GraphModule) -> dict[str, str]:
    """The toca_fx functions that `gm` calls, by the names AOTAutograd's cache looks up, each keyed by
    the hash of toca_fx's source."""
    names = {
        f"{getattr(n.target, '__module__', None)}.{getattr(n.target, '__name__', None)}"
        for n in gm.graph.nodes
        if n.op == "call_function"
    }
    return dict.fromkeys(sorted(n for n in names if n.startswith("toca_fx.")), _source_hash())


@functools.cache
def _source_hash() -> str:
    from torch._inductor.custom_graph_pass import get_hash_for_files

    return get_hash_for_files(tuple(sorted(str(p) for p in Path(__file__).parents[1].rglob("*.py")))).hex()
