"""Dynamic shapes: one static graph, with its own cache state, per concrete input shape.

The pass needs a static token count (the number of rows a partial step gathers is baked into the
graph). When Dynamo hands over a graph with symbolic sizes (`dynamic=True`, `mark_dynamic`, or the
automatic dynamic shapes that a second resolution triggers), `PerShape` waits for each call's
concrete inputs, re-propagates FakeTensor shapes through a copy of the graph with them (`specialize`:
size computations fold to ints), and hands the static copy to the backend's static path. A new batch
size or resolution so gets a new graph and fresh state, never a stale cache.
"""
from __future__ import annotations

import copy
from typing import Any, Callable

import torch
import torch.fx as fx
from torch._subclasses.fake_tensor import FakeTensorMode

from ..analysis.fake import FakeRun

Key = tuple


class PerShape:
    """Dispatcher for a graph with symbolic sizes: a static graph per concrete input shape."""

    def __init__(self, gm: fx.GraphModule, build: Callable[[fx.GraphModule, list[Any]], Callable]):
        self.gm = gm
        self.build = build
        self.by_shape: dict[Key, Callable] = {}

    def __call__(self, *args: Any) -> Any:
        key = shape_key(args)
        fn = self.by_shape.get(key)
        if fn is None:
            fn = self.by_shape[key] = self.build(specialize(self.gm, list(args)), list(args))
        return fn(*args)


def shape_key(args: tuple) -> Key:
    """What a static graph depends on: tensor shapes and integer inputs (symbolic sizes)."""
    return tuple(tuple(a.shape) if isinstance(a, torch.Tensor) else a if isinstance(a, int) else None for a in args)


def specialize(gm: fx.GraphModule, args: list[Any]) -> fx.GraphModule:
    """A copy of `gm` for these inputs: sizes computed in the graph become constants, and every node's
    `example_value` is a FakeTensor of static shape."""
    graph = fx.Graph()
    graph._codegen = copy.deepcopy(gm.graph._codegen)
    graph.output(graph.graph_copy(gm.graph, {}))
    static = fx.GraphModule(gm, graph)
    mode = FakeTensorMode()
    inputs = [mode.from_tensor(a, static_shapes=True) if isinstance(a, torch.Tensor) else a for a in args]
    FakeRun(static, mode, record=True).run_fakes(inputs)
    for node in list(graph.nodes):
        _fold(graph, node)
    return fx.GraphModule(gm, graph)


# ---------------------------------------------------------------------------------------------

def _fold(graph: fx.Graph, node: fx.Node) -> None:
    """A node whose static value is a number (a size): the number replaces it in the nodes that read it."""
    value = node.meta.get("example_value")
    if not isinstance(value, (int, float, bool)) or node.op == "output":
        return
    for user in list(node.users):
        user.args = fx.node.map_arg(user.args, lambda n: value if n is node else n)
        user.kwargs = fx.node.map_arg(user.kwargs, lambda n: value if n is node else n)
    if node.op == "placeholder":
        node.meta.pop("example_value")
    else:
        graph.erase_node(node)  # not dead-code elimination: it would drop in-place setitem
