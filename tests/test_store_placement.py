"""The post-grad pass that moves each cache store next to the value it stores."""
from __future__ import annotations

import torch
import torch.fx as fx

from toca_fx.compile.store_placement import PlaceStores


def _graph() -> tuple[fx.Graph, dict[str, fx.Node]]:
    g = fx.Graph()
    x, cache, read = g.placeholder("x"), g.placeholder("cache"), g.placeholder("read")
    value = g.call_function(torch.ops.aten.mul.Tensor, (x, 2))
    later = g.call_function(torch.ops.aten.add.Tensor, (value, read))
    total = g.call_function(torch.ops.aten.sum.default, (later,))
    stored = g.call_function(torch.ops.aten.copy_.default, (cache, value))  # AOTAutograd puts it last
    kept = g.call_function(torch.ops.aten.copy_.default, (read, value))  # `read` is read above: stays
    g.output((total,))
    return g, {"value": value, "stored": stored, "kept": kept}


def test_a_store_moves_next_to_its_value_and_a_read_buffer_stays_last():
    g, n = _graph()
    PlaceStores()(g)
    order = list(g.nodes)
    assert order.index(n["stored"]) == order.index(n["value"]) + 1
    assert order.index(n["kept"]) == len(order) - 2  # before the output, as it was
    g.lint()


def test_moved_stores_keep_the_results():
    x = torch.randn(3)
    results = []
    for move in (False, True):
        g, _ = _graph()
        if move:
            PlaceStores()(g)
        cache, read = torch.zeros(3), torch.ones(3)
        (total,) = fx.GraphModule(torch.nn.Module(), g)(x, cache, read)
        results.append((total, cache, read))
    assert all(torch.equal(a, b) for a, b in zip(*results))
    assert torch.equal(results[1][1], 2 * x)
