import pytest
import torch

from toca_fx.compile import workers


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graph, guard or backend left over from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(autouse=True)
def _variants_compiled_in_process(monkeypatch):
    """parallel_compile=None (the default) means no workers, whatever the test machine's cores: tests
    that want workers ask for them."""
    monkeypatch.setattr(workers, "AUTO_MIN_CPUS", 1 << 30)
