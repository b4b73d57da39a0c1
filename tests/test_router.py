"""Learned caching: router training (SDT + IEPO) on a tiny DiT, and the router as a backend policy."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from toca_fx import Router, ToCaBackend, ToCaConfig
from toca_fx.router import TrainConfig, train
from toca_fx.router.student import Student

from .helpers import step_inputs, tiny_dit

STEPS = 4


@pytest.fixture(scope="module")
def trained():
    torch._dynamo.reset()
    config = TrainConfig(num_steps=STEPS, iterations=4, batch=1, lambda_every=2, lambda_batch=1, beta=0.05)
    return train(tiny_dit(), (4, 8, 8), config=config, progress=False)


def test_training_reduces_the_objective(trained):
    assert len(trained.objectives) == 4
    assert trained.objectives[-1] < trained.objectives[0]
    assert trained.router.gates.shape == (STEPS, 4)  # attention and MLP of 2 blocks


def test_lambdas_are_positive_and_reestimated_on_schedule(trained):
    assert trained.lambda_iterations == [0, 2]
    for lam in trained.lambdas:
        assert lam.shape == (STEPS,) and bool((lam > 0).all())
        assert lam[1:].mean().item() == pytest.approx(1.0)


def test_target_reuse_adapts_beta_towards_the_target():
    torch._dynamo.reset()
    config = TrainConfig(num_steps=STEPS, iterations=8, batch=1, lr=0.5, beta=1e-6, target_reuse=0.5)
    result = train(tiny_dit(), (4, 8, 8), config=config, progress=False)
    # From FORA's schedule (2 of 3 partial steps reused): beta falls while the router reuses more than
    # half, rises while it reuses less.
    moves = [(b2 > b1) == (r < 0.5) for b1, b2, r in zip(result.betas, result.betas[1:], result.reused) if r != 0.5]
    assert result.reused[0] > 0.5 and moves and all(moves)


def test_saved_router_reloads_to_the_same_plans(tmp_path):
    router = Router(torch.rand(6, 4), threshold=0.5, branch_names=list("abcd"))
    router.save(tmp_path / "router.pt")
    loaded = Router.load(tmp_path / "router.pt")
    branches = [SimpleNamespace(index=i) for i in range(4)]
    for step in range(6):
        assert loaded.plans(step, 6, branches) == router.plans(step, 6, branches)
        assert loaded.label(step, 6) == router.label(step, 6)
    assert loaded.branch_names == list("abcd")
    assert all(p.mode == "fill" for p in router.plans(0, 6, branches).values())  # step 0 fills the cache


def test_student_with_hard_gates_equals_the_backend_running_the_router():
    model = tiny_dit()
    inputs = step_inputs(model, 5)
    gates = torch.tensor([[1.0, 1, 1, 1], [0, 1, 0, 1], [0, 0, 0, 0], [1, 0, 1, 0], [0, 1, 1, 0]])
    router = Router(gates, threshold=0.5)
    backend = ToCaBackend(ToCaConfig(policy=router, num_steps=5, inner="eager"))
    fast = torch.compile(model, backend=backend, dynamic=False)
    student = Student(model)
    with torch.no_grad():
        cached = [fast(*args) for args in inputs]
        student_out = []
        for step, args in enumerate(inputs):
            student.gates = router.computes()[step].float()
            student_out.append(student(*args))
    for step, (a, b) in enumerate(zip(cached, student_out)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=f"step {step}")
    assert backend.stats()["compiles"] == 5
    assert not torch.allclose(cached[2], model(*inputs[2]), atol=1e-4)


def test_router_rejects_a_generation_of_another_length():
    with pytest.raises(ValueError, match="trained for 3 steps"):
        Router(torch.ones(3, 2)).plans(0, 5, [])


@pytest.mark.parametrize("field, value", [("iterations", 0), ("beta", -1.0), ("threshold", 1.5), ("batch", 2.0), ("target_reuse", 1.0)])
def test_train_config_is_validated(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{field: value})
