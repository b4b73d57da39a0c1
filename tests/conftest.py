import pytest
import torch


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Each test compiles from scratch: no graph, guard or backend left over from another test."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()
