"""Learned caching: router training (SDT + IEPO) on a tiny DiT, and the router as a backend policy."""
from __future__ import annotations

import importlib
from types import SimpleNamespace

import pytest
import torch

from toca_fx import Router, ToCaBackend, ToCaConfig
from toca_fx.router import TrainConfig, train
from toca_fx.router.student import Student
from toca_fx.router.train import TrainResult, _budget_router, _center, _final_error, _keep_if_best, _validation_set
from toca_fx.router.trajectory import Sampler

from tests.helpers import step_inputs, tiny_dit

STEPS = 4


@pytest.fixture(scope="module")
def trained():
    torch._dynamo.reset()
    model = tiny_dit()
    config = TrainConfig(num_steps=STEPS, iterations=3, batch=1, lambda_every=2, lambda_batch=1, beta=0.05, lr=0.5,
                         validate_every=2)
    return SimpleNamespace(model=model, config=config, result=train(model, (4, 8, 8), config=config, progress=False))


def test_training_reduces_the_objective(trained):
    result = trained.result
    assert len(result.objectives) == 3
    assert result.objectives[-1] < result.objectives[0]
    assert result.router.gates.shape == (STEPS, 4)  # attention and MLP of 2 blocks


def test_the_result_is_the_best_validated_router(trained):
    result = trained.result
    assert sorted(result.validation) == [0, 2, 3]  # the start, every 2nd iteration, after the last
    assert result.best_iteration == min(result.validation, key=lambda it: (result.validation[it], it))
    # the returned router is the one that scored: re-scored on the same validation set, the same error
    sampler = Sampler(STEPS, trained.config.cfg_scale, null_label=trained.model.num_classes)
    validation = _validation_set(trained.model, sampler, trained.config, (4, 8, 8), trained.model.num_classes,
                                 torch.device("cpu"))
    error = _final_error(Student(trained.model), sampler, result.router.computes(), *validation)
    assert error == pytest.approx(result.validation[result.best_iteration], rel=1e-5)


def test_keep_if_best_keeps_the_router_of_the_lowest_error_earliest_on_ties():
    routers = [Router(torch.full((2, 1), g)) for g in (0.1, 0.2, 0.3, 0.4)]
    result = TrainResult(router=routers[0])
    for it, (router, error) in enumerate(zip(routers, [3.0, 1.0, 2.0, 1.0])):
        _keep_if_best(result, router, it, error)
    assert result.router is routers[1] and result.best_iteration == 1


@pytest.mark.parametrize("budget", [0, 5, 12])
def test_centering_puts_the_budget_boundary_at_zero_and_keeps_the_ranking(budget):
    logits = torch.randn(STEPS, 4, generator=torch.Generator().manual_seed(budget))
    before = logits.clone()
    _center(logits, budget)
    assert torch.equal(logits[0], before[0])  # step 0 always computes: not shifted
    shift = before[1:] - logits[1:]
    assert torch.allclose(shift, shift[0, 0].expand_as(shift))  # one shift for all: no ranking changes
    top = logits[1:].flatten().sort(descending=True).values
    boundary = top[max(budget - 1, 0):budget + 1].mean()
    assert abs(boundary.item()) < 1e-6


def test_lambdas_are_positive_and_reestimated_on_schedule(trained):
    result = trained.result
    assert result.lambda_iterations == [0, 2]
    for lam in result.lambdas:
        assert lam.shape == (STEPS,) and bool((lam > 0).all())
        assert lam[1:].mean().item() == pytest.approx(1.0)


def test_target_reuse_is_the_budget_of_every_forward_and_of_the_router(monkeypatch):
    hard = []

    class Recording(Student):  # keeps each training step's gates (IEPO's are 2-D, validation's need no grad)
        def __setattr__(self, name, value):
            if name == "gates" and value is not None and value.dim() == 1 and value.requires_grad:
                hard.append(value.detach().round())
            super().__setattr__(name, value)

    module = importlib.import_module("toca_fx.router.train")  # `toca_fx.router.train` is also the function
    monkeypatch.setattr(module, "Student", Recording)
    config = TrainConfig(num_steps=STEPS, iterations=3, batch=1, lr=0.5, target_reuse=0.5)
    result = train(tiny_dit(), (4, 8, 8), config=config, progress=False)
    # 3 partial steps x 4 branches: exactly 6 pairs reused; FORA's start (interval 2) alone reuses 8.
    assert result.reused == [0.5] * 3
    assert int((~result.router.computes()[1:]).sum()) == 6
    computed = torch.stack(hard).view(3, STEPS - 1, 4).sum(dim=(1, 2))
    assert computed.tolist() == [6.0] * 3


def test_budget_router_splits_tied_gates_in_order(tmp_path):
    gates = torch.tensor([[0.1, 0.1], [0.7, 0.5], [0.5, 0.5], [0.2, 0.7]])
    router = _budget_router(gates, 3, ["a", "b"])
    # Steps >= 1: the two 0.7s, then the first of the three tied 0.5s.
    expected = torch.tensor([[True, True], [True, True], [False, False], [False, True]])
    assert torch.equal(router.computes(), expected)
    router.save(tmp_path / "router.pt")
    assert torch.equal(Router.load(tmp_path / "router.pt").computes(), expected)


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


@pytest.mark.parametrize("field, value", [("iterations", 0), ("beta", -1.0), ("threshold", 1.5), ("batch", 2.0), ("target_reuse", 1.0),
                                          ("num_steps", 1), ("momentum", 1.0), ("validate_every", 0)])
def test_train_config_is_validated(field, value):
    with pytest.raises(ValueError, match=rf"TrainConfig\.{field} must be"):
        TrainConfig(**{field: value})
