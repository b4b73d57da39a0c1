"""Graph printouts that hold across torch versions: nodes numbered in order, ops by short name,
placeholders other than the cache buffers anonymised."""
from __future__ import annotations

import torch.fx as fx

from toca_fx.analysis.graphs import op_name


def graph_text(gm: fx.GraphModule) -> str:
    names: dict[fx.Node, str] = {}
    lines = []
    inputs = 0
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            names[node] = node.name if node.name.startswith("toca_") else f"in{inputs}"
            inputs += node.name.startswith("toca_") is False
            continue
        names[node] = f"%{len(lines)}"
        args = ", ".join(_fmt(a, names) for a in node.args)
        kwargs = "".join(f", {k}={_fmt(v, names)}" for k, v in node.kwargs.items())
        if node.op == "output":
            lines.append(f"return {args}")
        else:
            lines.append(f"{names[node]} = {op_name(node)}({args}{kwargs})")
    return "\n".join(lines)


def _fmt(value, names) -> str:
    if isinstance(value, fx.Node):
        return names[value]
    if isinstance(value, (list, tuple)):
        inner = ", ".join(_fmt(v, names) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner}{',' if len(value) == 1 else ''})"
    return repr(value)
