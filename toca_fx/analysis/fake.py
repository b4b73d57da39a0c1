"""Graphs run on fake tensors: shapes and dtypes without computing anything or touching real memory.

`TensorMeta` is what any stage reads of a tensor input (and what the compile caches key on), so a
process that holds only metadata (a compile worker, the FLOP counter) runs a graph as this one would.
`FakeRun` runs a graph on fakes of such metadata, optionally recording each node's output as its
example value; `fake_value` evaluates one new node's example value.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx
from torch._guards import detect_fake_mode
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.fx.experimental.symbolic_shapes import ShapeEnv


@dataclass(frozen=True)
class TensorMeta:
    """What a compilation reads of a tensor input (and so what its cache keys hold of it)."""

    shape: tuple[int, ...]
    stride: tuple[int, ...]
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool = False
    parameter: bool = False

    @classmethod
    def of(cls, x: Any) -> Any:
        """The metadata of `x` if it is a tensor, else `x` itself."""
        if not isinstance(x, torch.Tensor):
            return x
        parameter = isinstance(x, torch.nn.Parameter)
        return cls(tuple(x.shape), tuple(x.stride()), x.dtype, x.device, x.requires_grad, parameter)

    @classmethod
    def contiguous(cls, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> TensorMeta:
        """A contiguous tensor's metadata, as `torch.zeros(shape)` would have."""
        return cls(tuple(shape), torch.empty(shape, device="meta").stride(), dtype, torch.device(device))

    def fake(self) -> torch.Tensor:
        """A tensor with this metadata (a fake one under a FakeTensorMode)."""
        t = torch.empty_strided(self.shape, self.stride, dtype=self.dtype, device=self.device)
        return torch.nn.Parameter(t, self.requires_grad) if self.parameter else t.requires_grad_(self.requires_grad)


def new_fake_mode() -> FakeTensorMode:
    """A fake-tensor mode with a shape environment of its own: a data-dependent number (the `.item()`
    of a float timestep) becomes a symbol instead of an error."""
    return FakeTensorMode(shape_env=ShapeEnv())


def metas_of(values: list[Any]) -> list[Any]:
    """`TensorMeta.of` each value: no tensor kept alive."""
    return [TensorMeta.of(v) for v in values]


def fakes(metas: list[Any], fake_mode: FakeTensorMode) -> list[Any]:
    """Fake tensors of `metas` in `fake_mode`; other values as they are."""
    with fake_mode:
        return [m.fake() if isinstance(m, TensorMeta) else m for m in metas]


class FakeRun(fx.Interpreter):
    """Runs a graph on fakes; with `record`, each node's output becomes its example value. Constants
    of the graph (get_attr) are real tensors and are made fake to run on."""

    def __init__(self, gm: fx.GraphModule, fake_mode: FakeTensorMode, record: bool = False):
        super().__init__(gm)
        self.fake_mode, self.record = fake_mode, record

    def run_on(self, metas: list[Any]) -> Any:
        """The graph's output on fakes of `metas`."""
        return self.run_fakes(fakes(metas, self.fake_mode))

    def run_fakes(self, inputs: list[Any]) -> Any:
        """The graph's output on `inputs`, fakes of this run's mode."""
        with self.fake_mode:
            return self.run(*inputs)

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if self.record and n.op != "output":
            n.meta["example_value"] = out
        return out

    def fetch_attr(self, target: str) -> Any:
        out = super().fetch_attr(target)
        return self.fake_mode.from_tensor(out) if isinstance(out, torch.Tensor) else out


def fake_value(node: fx.Node) -> Any:
    """Compute and record the example value of a new call node from its inputs' example values."""
    args, kwargs = fx.node.map_arg((node.args, node.kwargs), lambda n: n.meta["example_value"])
    fn = getattr(args[0], node.target) if node.op == "call_method" else node.target
    call_args = args[1:] if node.op == "call_method" else args
    with detect_fake_mode((args, kwargs)) or contextlib.nullcontext():
        node.meta["example_value"] = fn(*call_args, **kwargs)
    return node.meta["example_value"]
