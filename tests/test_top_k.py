"""The Triton top-k kernel against a stable descending sort. It runs only where CUDA and Triton are
(the GPU machine); elsewhere `toca_fx.ops.scores.top_indices` takes torch's top-k, which tests/test_scores.py
covers through the token choice."""
from __future__ import annotations

import pytest
import torch
from torch._inductor.utils import run_and_get_code

from toca_fx.kernels import top_k
from toca_fx.ops.scores import select_batch, select_tokens, top_indices

pytestmark = pytest.mark.skipif(
    not (torch.cuda.is_available() and top_k.triton is not None), reason="the kernel needs CUDA and Triton"
)


def _tied(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 5, (n,), generator=g).float() + torch.rand(n, generator=g).round(decimals=1)  # many ties


def _reference(score: torch.Tensor, k: int) -> list[int]:
    """Highest first, ties to the lower index, NaN last."""
    key = [float("-inf") if v != v else v for v in score.tolist()]
    return sorted(range(len(key)), key=lambda i: (-key[i], i))[:k]


@pytest.mark.parametrize("n, k", [(1, 1), (7, 3), (256, 77), (300, 300), (4096, 1229), (16384, 4916)])
def test_one_row_is_the_stable_descending_sort(n: int, k: int):
    score = _tied(n, n)
    got = top_k.top_k(score.cuda(), k).cpu()
    assert got.tolist() == _reference(score, k)
    assert torch.equal(score[got], torch.topk(score, k).values)  # the values of torch's top-k


def test_rows_strides_dtypes_and_nan():
    score = torch.stack([_tied(1000, s) for s in range(3)])
    score[1, ::7] = float("nan")  # ranked as -inf: every slot still holds a token
    cuda = score.cuda()
    assert top_k.top_k(cuda, 301).cpu().tolist() == [_reference(row, 301) for row in score]
    strided = cuda.t().contiguous().t()  # the token axis of stride 3
    assert top_k.top_k(strided[2], 500).cpu().tolist() == _reference(score[2], 500)
    half = score[0].half()
    assert top_k.top_k(half.cuda(), 50).cpu().tolist() == _reference(half.float(), 50)


def test_compiled_choice_calls_the_kernel_up_to_its_comparison_budget():
    score = _tied(4096, 0)
    got, code = run_and_get_code(torch.compile(lambda s: top_indices(s * 2, 1229)), score.cuda())
    assert "topk" not in "".join(code) and "toca_fx.kernels.top_k" in "".join(code)
    assert got.cpu().tolist() == _reference(score, 1229)
    # Beyond the budget (84 rows of 4096: torch's top-k was 7x faster) torch's top-k is taken.
    _, code = run_and_get_code(torch.compile(lambda s: top_indices(s * 2, 1229)), torch.randn(84, 4096, device="cuda"))
    assert "topk" in "".join(code) and "toca_fx.kernels.top_k" not in "".join(code)


def test_batched_choice_on_the_gpu_is_the_cpu_choice():
    # Distinct scores (no ties, where torch's order is unspecified), unequal ks: the same tokens.
    g = torch.Generator().manual_seed(3)
    staleness = torch.randperm(4 * 64, generator=g).float().reshape(4, 64)
    ks = (5, 9, 5, 17)
    cpu, gpu = staleness.clone(), staleness.cuda()
    want = select_batch(cpu, (0, 2, 3, 1), ks, (("staleness", 1.0),))
    got = select_batch(gpu, (0, 2, 3, 1), ks, (("staleness", 1.0),))
    assert [sorted(i.tolist()) for i in got] == [sorted(i.tolist()) for i in want]
    assert torch.equal(gpu.cpu(), cpu)  # staleness updated alike


def _state(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 4, (n,), generator=g).float(), torch.rand(n, generator=g), torch.rand(n, generator=g)


@pytest.mark.parametrize("n, k", [(7, 3), (300, 77), (4096, 1229)])
def test_refresh_is_the_choice_and_the_state_update(n: int, k: int):
    score = _tied(n, n)
    staleness, ref_norm, norm = _state(n, n)
    want_stale, want_ref = staleness + 1, ref_norm.clone()
    want = _reference(score, k)
    want_stale[want], want_ref[want] = 0, norm[want]
    # State rows of stacked buffers, as the rewritten graphs pass them.
    stale_stack, ref_stack = torch.stack([staleness] * 2).cuda(), torch.stack([ref_norm] * 3).cuda()
    got = top_k.top_k_refresh(score.cuda(), k, stale_stack[1], ref_stack[2], norm.cuda())
    assert got.cpu().tolist() == want
    assert torch.equal(stale_stack[1].cpu(), want_stale) and torch.equal(stale_stack[0].cpu(), staleness)
    assert torch.equal(ref_stack[2].cpu(), want_ref) and torch.equal(ref_stack[1].cpu(), ref_norm)
    only_stale = staleness.cuda()  # no reference norms: the staleness score alone
    assert top_k.top_k_refresh(score.cuda(), k, only_stale, None, None).cpu().tolist() == want
    assert torch.equal(only_stale.cpu(), want_stale)


def test_compiled_token_choice_is_one_kernel_and_the_cpu_choice():
    # Token norms exact on both devices (one nonzero feature) and scores well apart (no ties, where
    # torch's order is unspecified): the same tokens and the same state.
    x = torch.zeros(2, 4096, 64)
    x[:, :, 5] = torch.randperm(4096).float() / 64
    staleness = torch.randperm(4096).float() % 3
    ref_norm = torch.zeros(4096)
    cpu_state, gpu_state = (staleness.clone(), ref_norm.clone()), (staleness.cuda(), ref_norm.cuda())
    want = select_tokens(x, *cpu_state, 1229)
    got, code = run_and_get_code(torch.compile(select_tokens), x.cuda(), *gpu_state, 1229)
    assert "top_k_refresh" in code[0] and "index_fill" not in code[0] and "topk" not in code[0]
    assert sorted(got.tolist()) == sorted(want.tolist())
    assert torch.equal(gpu_state[0].cpu(), cpu_state[0]) and torch.equal(gpu_state[1].cpu(), cpu_state[1])
