"""An Inductor post-grad pass: each cache store next to the value it stores.

Matches: `copy_(buffer, value)` where `buffer` is a graph input that nothing else in the graph reads (a
cache a full step fills). Produces: the same copy, moved to just after `value` is computed.

Why: AOTAutograd moves the copies into mutated inputs to the end of the graph, and Inductor does not
fuse nodes more than 64 apart, so every store but the last block's would run as a kernel of its own.
Next to its value, the copy fuses into the kernel that already reads the value (the residual add and
the following layer norm).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch._inductor.custom_graph_pass import CustomGraphPass, get_hash_for_files


class PlaceStores(CustomGraphPass):
    def __call__(self, graph: fx.Graph) -> None:
        for node in list(graph.nodes):
            if node.op != "call_function" or node.target is not torch.ops.aten.copy_.default:
                continue
            buffer, value = node.args[:2]
            if buffer.op == "placeholder" and isinstance(value, fx.Node) and len(buffer.users) == 1:
                value.append(node)

    def uuid(self) -> bytes:
        return get_hash_for_files((__file__,))
