"""Caches in another dtype than their branch outputs (`ToCaConfig.cache_dtype`), on a built variant.

Matches: each cache placeholder whose `BufferSpec` has `reads_as` (a cache narrower than its branch
output), and its scale placeholder for a float8 cache (which holds its elements as uint8 bytes,
`BufferSpec.holds` their format). Produces: a full step's `store` becomes `store_scaled` (rounded
to the cache's dtype, by row scales for float8); a partial step's
`scatter_rows` becomes `scatter_scaled` (the chosen rows rounded into the cache, the cache read back
in the output's dtype with those rows as computed); any other read of the cache (a reused branch)
reads `load(cache, scale, dtype, format)`. Inductor fuses the rounding into the kernel that computes the value
and the read into the one that adds it to the stream.
Refuses (NotImplementedError): another function that updates the cache in place, which would then
update a temporary.
"""
from __future__ import annotations

import torch.fx as fx

from ..ops import SIDE_EFFECTS
from ..ops.cache import load, scatter_rows, scatter_scaled, store, store_scaled
from .layout import BufferSpec


def narrow_caches(gm: fx.GraphModule, specs: tuple[BufferSpec, ...], used: frozenset[int]) -> frozenset[int]:
    """Rewrite `gm`'s reads and writes of narrow caches in place (see the module's doc); the indices of
    the buffers it uses, now with the scales of the caches it uses."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"][-len(specs):] if specs else []
    index = {spec.name: i for i, spec in enumerate(specs)}
    added = set()
    for i, (node, spec) in enumerate(zip(placeholders, specs)):
        if spec.reads_as is None or not node.users:
            continue
        j = index.get(spec.name[: -len("cache")] + "scale")
        scale = placeholders[j] if j is not None else None
        if j is not None:
            added.add(j)
        _rewrite(gm.graph, node, scale, spec)
        gm.recompile()
    return used | frozenset(added)


def _rewrite(graph: fx.Graph, cache: fx.Node, scale: fx.Node | None, spec: BufferSpec) -> None:
    readers = []
    for user in list(cache.users):
        if user.op == "call_function" and user.target is store and user.args[0] is cache:
            user.target, user.args = store_scaled, (cache, scale, *user.args[1:], spec.holds)
        elif user.op == "call_function" and user.target is scatter_rows and user.args[0] is cache:
            user.target, user.args = scatter_scaled, (cache, scale, *user.args[1:], spec.reads_as, spec.holds)
        elif user.op == "call_function" and user.target in SIDE_EFFECTS:
            raise NotImplementedError(f"toca_fx: ToCaConfig.cache_dtype with {user.target.__name__} updating "
                                      f"the cache {spec.name}")
        else:
            readers.append(user)
    if readers:
        first = next(n for n in graph.nodes if n in readers)
        with graph.inserting_before(first):
            loaded = graph.call_function(load, (cache, scale, spec.reads_as, spec.holds))
        for user in readers:
            user.replace_input_with(cache, loaded)
