"""FX utilities the analysis and the rewrite share: op names, shapes, data flow and readable names.

Everything here reads the graph alone: op targets, the FakeTensor shapes Dynamo records in
`node.meta["example_value"]`, and edges. `nn_module_stack` serves only `readable_name`, for reports.
"""
from __future__ import annotations

import re
from typing import Any

import torch
import torch.fx as fx


def op_name(node: fx.Node) -> str:
    """A short, version-independent name for a node's op: 'linear', 'view', 'add', ..."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        name = getattr(node.target, "__name__", str(node.target))
        return name.split(".")[-1]
    return node.op


def value(node: fx.Node) -> Any:
    """The node's example value (a FakeTensor for tensors), or None."""
    return node.meta.get("example_value")


def shape(node: Any) -> tuple[int, ...] | None:
    v = value(node) if isinstance(node, fx.Node) else None
    return tuple(int(s) for s in v.shape) if isinstance(v, torch.Tensor) else None


def positions(graph: fx.Graph) -> dict[fx.Node, int]:
    """Each node's index in graph order."""
    return {node: i for i, node in enumerate(graph.nodes)}


def depends(node: fx.Node, on: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether `node` is computed from `on` (`order`: `positions` of their graph)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n is on:
            return True
        for i in n.all_input_nodes:
            if i not in seen and order[i] >= order[on]:
                seen.add(i)
                todo.append(i)
    return False


def ancestors(node: fx.Node) -> set[fx.Node]:
    """`node` and every node it is computed from."""
    seen, todo = {node}, [node]
    while todo:
        for i in todo.pop().all_input_nodes:
            if i not in seen:
                seen.add(i)
                todo.append(i)
    return seen


def readable_name(node: fx.Node, module_of: fx.Node | None = None) -> str:
    """`module.path:node` for reports (from nn_module_stack); never used to decide anything."""
    stack = (module_of or node).meta.get("nn_module_stack") or {}
    paths = [v[0] if isinstance(v, tuple) else str(v) for v in stack.values()]
    parts = _MODULE_KEY.sub(r".\1", paths[-1] if paths else "").split(".")  # a['b'] -> a.b
    path = ".".join(p for p in parts if p and p not in _MODULE_PATH_NOISE)
    return f"{path}:{node.name}" if path else node.name


_MODULE_KEY = re.compile(r"\[['\"]?([\w.]+)['\"]?\]")
_MODULE_PATH_NOISE = {"L", "self", "L__self__", "__dict__", "_modules"}
