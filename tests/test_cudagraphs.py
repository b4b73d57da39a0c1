import contextlib

import torch

from toca_fx.compile.cudagraphs import CudaGraphed


class _Graph:
    """Stands in for `torch.cuda.CUDAGraph` on the CPU: a replay reruns the captured call."""

    def replay(self):
        self.run()


def test_replays_copy_only_the_non_static_tensors(monkeypatch):
    monkeypatch.setattr(torch.cuda, "synchronize", lambda: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", _Graph)
    weight, cache = torch.full((3,), 2.0), torch.zeros(3)

    def fn(w, x, scale, c):
        c.add_(x)  # updated in place, as the variants update their cache buffers
        return (w * x * scale + c,)

    graphed = CudaGraphed(fn, [True, False, False, True], pool=None)

    def capture(graph, pool):
        slots = graphed.slots  # as captured: a real graph reads the static inputs at their addresses
        graph.run = lambda: graphed.outputs[0].copy_(fn(*slots)[0])
        return contextlib.nullcontext()

    monkeypatch.setattr(torch.cuda, "graph", capture)
    graphed(weight, torch.ones(3), 1.0, cache)  # warm-up: runs fn as is
    graphed(weight, torch.ones(3), 1.0, cache)  # captured (running fn once), then replayed
    assert graphed.copied == [1]  # not the parameter, the cache or the float
    assert graphed.slots[0] is None and graphed.slots[3] is None  # read at their addresses, not held
    out = graphed(weight, torch.full((3,), 3.0), 1.0, cache)
    assert torch.equal(cache, torch.full((3,), 1.0 + 1.0 + 1.0 + 3.0))  # warm-up, capture, two replays
    assert torch.equal(out[0], torch.full((3,), 2 * 3.0 + 6.0)) and out[0] is not graphed.outputs[0]
