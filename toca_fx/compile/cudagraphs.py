"""CUDA-graph replay of a compiled variant, on CUDA in any `torch.compile` mode (`ToCaConfig.cuda_graphs`).

A partial step is many small kernels; launched one by one from Python the host cannot keep the GPU
busy, so on CUDA the runtime replays each variant as a CUDA graph whatever the mode. Inductor's own
CUDA graphs (`mode="reduce-overhead"`) skip graphs that mutate non-static inputs, and every variant
updates its cache buffers in place; where the runtime replays a variant itself, Inductor's are turned
off for it (`compile.options.variant_options`), so nothing is captured twice.

Here the variant is captured as is: its first call runs normally (the warm-up, which also times
Inductor's kernel configs), its second is captured and replayed. Inputs that keep their storage
(parameters, buffers, the cache buffers) are used in place; the others are copied into static slots
before each replay. Outputs are cloned out of the graph's memory pool, so a caller may keep them
across steps. A static input found at another address than at capture (a parameter whose `.data` was
replaced) is captured again. Where a graph cannot be captured (`decide`, or a capture that fails, or
a Python number input that changes between calls, which a graph would keep at its captured value),
the variant runs uncaptured and the reason goes to `on_fallback`, once.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

_NO_CUDAGRAPHS_MODES = ("max-autotune-no-cudagraphs",)
# One C++ call that compares tensors' data pointers (what Inductor's CUDA-graph trees check with): a
# Python loop over the few hundred parameters of a model runs after the timestep's device read, with
# the GPU idle. Absent from builds without CUDA.
_ADDRESSES_EQUAL = getattr(torch._C, "_tensors_data_ptrs_at_indices_equal", None)


def decide(setting: bool | None, inner: str, options: dict, args: Sequence[Any]) -> tuple[bool, str | None]:
    """Whether a graph's variants replay as CUDA graphs here, and where not although `setting` asked
    for them or auto (None) would have, why (a warning's text); None when there is nothing to say
    (turned off, CPU, eager inner, a mode that rules CUDA graphs out)."""
    if setting is False or inner != "inductor":
        return False, ("ToCaConfig.cuda_graphs=True needs inner='inductor'" if setting and inner != "inductor" else None)
    tensors = [a for a in args if isinstance(a, torch.Tensor)]
    if not any(t.is_cuda for t in tensors):
        return False, ("ToCaConfig.cuda_graphs=True but no input is on CUDA" if setting else None)
    if setting is None and (options.get("mode") in _NO_CUDAGRAPHS_MODES
                            or (options.get("options") or {}).get("triton.cudagraphs") is False):
        return False, None
    off_gpu = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor) and not a.is_cuda]
    if off_gpu:
        return False, (f"input(s) {off_gpu} of the compiled graph are on the CPU (a CUDA graph would keep their "
                       "value at capture): variants run without CUDA graphs; move them to the GPU for the fast path")
    return True, None


class CudaGraphed:
    def __init__(self, fn: Callable, static: list[bool], pool: Any, on_fallback: Callable[[str], None] | None = None):
        self.fn = fn
        self.static = static
        self.pool = pool
        self.on_fallback = on_fallback or (lambda why: None)
        self.calls = 0
        self.captures = 0
        self.failed: str | None = None  # why it runs uncaptured, once that is so
        self.graph: torch.cuda.CUDAGraph | None = None
        self.slots: list[Any] = []
        self.copied: list[int] = []  # positions of the non-static tensor inputs, copied into slots per replay
        self.kept: list[int] = []  # positions of the static tensor inputs, used in place
        self.numbers: list[tuple[int, Any]] = []  # (position, value at capture) of the other inputs
        self.addresses: list[int] = []
        self._positions: list[int] = []  # 0 .. len(kept) - 1, for `_ADDRESSES_EQUAL`
        self.outputs: Any = None

    def __call__(self, *args: Any) -> Any:
        self.calls += 1
        if self.calls == 1 or self.failed is not None:
            return self.fn(*args)
        if self.graph is None or not self._same_static(args):
            if not self._capture(args):
                return self.fn(*args)
        elif any(args[i] != v for i, v in self.numbers):
            self._fall_back("an input that is a Python number changed between calls (a CUDA graph keeps its "
                            "value at capture)")
            return self.fn(*args)
        if self.copied:  # not all inputs: parameters make most of them
            torch._foreach_copy_([self.slots[i] for i in self.copied], [args[i] for i in self.copied])
        self.graph.replay()
        return type(self.outputs)(o.clone() if isinstance(o, torch.Tensor) else o for o in self.outputs)

    def _same_static(self, args: tuple) -> bool:
        if _ADDRESSES_EQUAL is not None:
            return _ADDRESSES_EQUAL([args[i] for i in self.kept], self.addresses, self._positions)
        return [args[i].data_ptr() for i in self.kept] == self.addresses

    def _capture(self, args: tuple) -> bool:
        """Capture the call (not run: the replay that follows runs it); False where capture failed."""
        tensors = [i for i, a in enumerate(args) if isinstance(a, torch.Tensor)]
        self.copied = [i for i in tensors if not self.static[i]]
        self.kept = [i for i in tensors if self.static[i]]
        self.addresses = [args[i].data_ptr() for i in self.kept]
        self._positions = list(range(len(self.kept)))
        self.numbers = [(i, a) for i, a in enumerate(args) if not isinstance(a, torch.Tensor)]
        self.slots = list(args)
        for i in self.copied:
            self.slots[i] = args[i].clone()
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        try:
            with torch.cuda.graph(graph, pool=self.pool):
                self.outputs = self.fn(*self.slots)
        except Exception as e:  # noqa: BLE001 - any capture failure: run uncaptured, say why once
            self.graph = None
            self._fall_back(f"capture failed ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            return False
        self.graph, self.captures = graph, self.captures + 1
        # The replay reads the static inputs at their addresses; holding them here would keep a deleted
        # model's parameters (and so its caches) alive.
        kept = set(self.kept)
        self.slots = [None if i in kept else s for i, s in enumerate(self.slots)]
        return True

    def _fall_back(self, why: str) -> None:
        self.failed, self.graph, self.slots, self.outputs = why, None, [], None
        self.on_fallback(why)
