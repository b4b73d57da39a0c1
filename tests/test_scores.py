import pytest
import torch

from toca_fx.ops.scores import refresh_scores, select_batch, select_tokens


def _state(x):
    stale, ref = torch.zeros(x.shape[1]), torch.zeros(x.shape[1])
    refresh_scores(x, stale, ref)
    return stale, ref


def test_largest_change_wins_among_equally_stale_tokens():
    x = torch.ones(2, 6, 4)
    stale, ref = _state(x)
    moved = x.clone()
    moved[:, 4] *= 3.0  # biggest change
    moved[:, 1] *= 2.0  # second biggest
    idx = select_tokens(moved, stale, ref, 2)
    assert sorted(idx.tolist()) == [1, 4]
    assert stale.tolist() == [1, 0, 1, 1, 0, 1]


def test_staleness_eventually_recomputes_every_token():
    torch.manual_seed(0)
    x = torch.randn(2, 10, 4)
    stale, ref = _state(x)
    seen = set()
    for _ in range(4):  # ceil(10 / 3) partial steps
        seen.update(select_tokens(x + 0.01 * torch.randn_like(x), stale, ref, 3).tolist())
    assert seen == set(range(10))


def test_choice_is_unique_deterministic_and_shared_by_the_batch():
    torch.manual_seed(0)
    x = torch.randn(4, 32, 8)
    runs = []
    for _ in range(2):
        stale, ref = _state(x)
        runs.append(select_tokens(x * 1.1 + 0.2 * torch.arange(32.0)[None, :, None], stale, ref, 7))
    assert torch.equal(runs[0], runs[1])
    assert len(set(runs[0].tolist())) == len(runs[0]) == 7
    assert runs[0].dim() == 1  # one index set for every sample (both CFG halves)


# -- ToCa's scores on hand-made inputs ----------------------------------------------------------

from toca_fx.ops.scores import (  # noqa: E402
    attention_influence,
    cross_entropy,
    entropy_from_map,
    influence_from_map,
    spatial_bonus,
)


def _topk(score, k):
    return sorted(torch.topk(score, k).indices.tolist())


def test_attention_influence_ranks_the_keys_everyone_attends_to():
    n, d = 12, 8
    q = torch.randn(2, 2, n, d) * 0.1  # near-uniform attention ...
    k = torch.randn(2, 2, n, d) * 0.1
    q[..., 0] = 1.0
    k[:, :, [3, 7], 0] = 6.0  # ... except that every query attends to keys 3 and 7
    full, sampled = torch.zeros(n), torch.zeros(n)
    attention_influence(q, k, full, start=0, queries=0)
    attention_influence(q, k, sampled, start=0, queries=4)
    assert _topk(full, 2) == _topk(sampled, 2) == [3, 7]
    torch.testing.assert_close(full.norm(), torch.tensor(1.0))


def test_influence_from_a_written_out_map_reads_the_stream_columns_only():
    probs = torch.full((1, 6, 6), 1 / 6)
    probs[..., :, 4] += 0.5  # key 4 receives the most
    probs[..., :, 0] += 1.0  # key 0 more, but it is another stream's (joint attention, start=1)
    out = torch.zeros(5)
    influence_from_map(probs, out, start=1)
    assert _topk(out, 1) == [3]  # key 4 is the stream's token 3


def test_cross_entropy_is_highest_for_tokens_attending_evenly():
    n, m, d = 6, 5, 4
    q, k = torch.zeros(1, n, d), torch.eye(m, d)[None] * 10
    q[0, 2] = 0.0  # token 2: uniform over the context, maximal entropy
    q[0, [0, 1, 3, 4, 5], 0] = 5.0  # the others focus on context token 0
    q[0, 5, 1] = 5.0  # token 5 splits between two: in between
    out = torch.zeros(n)
    cross_entropy(q, k, out)
    assert _topk(out, 2) == [2, 5]
    probs = torch.softmax(q @ k.transpose(-2, -1) * d**-0.5, dim=-1)
    again = torch.zeros(n)
    entropy_from_map(probs.unsqueeze(1), again, tok=2)  # [B, H, N, M] written out
    torch.testing.assert_close(out, again)


def test_spatial_bonus_spreads_picks_over_grid_cells():
    score = torch.arange(16.0)  # a ramp: plain top-4 takes one corner row
    assert _topk(score, 4) == [12, 13, 14, 15]
    spread = score + 2.0 * spatial_bonus(score, (4, 4))
    assert _topk(spread, 4) == [5, 7, 13, 15]  # the best token of each 2x2 cell
    odd = spatial_bonus(torch.arange(15.0), (3, 5))  # odd sizes: edge cells are smaller
    assert odd.nonzero().flatten().tolist() == [6, 8, 9, 11, 13, 14]
    video = spatial_bonus(torch.arange(32.0), (2, 4, 4))  # 3-D grid: 2x2x2 cells
    assert video.nonzero().flatten().tolist() == [21, 23, 29, 31]


def test_cache_frequency_eventually_recomputes_every_token_despite_a_fixed_attention_map():
    n = 16
    x = torch.randn(2, n, 4)
    stale, ref = _state(x)
    attention = torch.nn.functional.normalize(torch.rand(n) ** 4, dim=0)  # strongly favours a few
    weights = (("attention", 1.0), ("spatial", 0.6), ("staleness", 0.25))
    seen = set()
    for _ in range(40):
        seen.update(select_tokens(x, stale, ref, 2, weights, attention, None, (4, 4)).tolist())
    assert seen == set(range(n))


def test_combined_score_is_deterministic():
    torch.manual_seed(0)
    x, attention, entropy = torch.randn(2, 16, 4), torch.rand(16), torch.rand(16)
    weights = (("attention", 1.0), ("change", 1.0), ("cross_entropy", 0.5), ("spatial", 0.6), ("staleness", 0.25))
    runs = []
    for _ in range(2):
        stale, ref = _state(x)
        runs.append([select_tokens(x * s, stale, ref, 5, weights, attention, entropy, (4, 4)) for s in (1.1, 0.9, 1.3)])
    for a, b in zip(*runs):
        assert torch.equal(a, b)


def test_random_baseline_follows_the_seed():
    x = torch.randn(1, 32, 4)
    picks = []
    for _ in range(2):
        torch.manual_seed(3)
        stale, ref = _state(x)
        picks.append(select_tokens(x, stale, ref, 6, (("random", 1.0),)))
    assert torch.equal(picks[0], picks[1])


def test_a_batched_choice_is_each_branchs_own_choice():
    # Three branches of a 4x4 grid: stale rows 2, 0, 3 of a stack of 4 (not consecutive), reading
    # attention rows 1, 1, 0 and entropy rows 0, 1, 1, choosing 3, 5 and 3 tokens (sorted top-k).
    g = torch.Generator().manual_seed(0)
    weights = (("attention", 1.0), ("cross_entropy", 0.5), ("spatial", 0.6), ("staleness", 0.25))
    stack = torch.randint(0, 4, (4, 16), generator=g).float()
    attention, entropy = torch.rand(2, 16, generator=g), torch.rand(2, 16, generator=g)
    rows, ks, attn_rows, ent_rows = (2, 0, 3), (3, 5, 3), (1, 1, 0), (0, 1, 1)
    own = [stack[r].clone() for r in rows]
    untouched, before = stack[1].clone(), stack.clone()
    idx = select_batch(stack, rows, ks, weights, attention, attn_rows, entropy, ent_rows, (4, 4))
    # Read through row-id buffers, as the variants do so that blocks share kernels: the same choice.
    row_ids = tuple(torch.tensor([i]) for i in range(len(rows)))
    again = select_batch(before, rows, ks, weights, attention, attn_rows, entropy, ent_rows, (4, 4), row_ids)
    assert [a.tolist() for a in again] == [i.tolist() for i in idx] and torch.equal(before, stack)
    x = torch.full((2, 16, 8), float("nan"))  # never read without the "change" score
    for i, (stale, k) in enumerate(zip(own, ks)):
        alone = select_tokens(x, stale, None, k, weights, attention[attn_rows[i]], entropy[ent_rows[i]], (4, 4))
        assert sorted(idx[i].tolist()) == sorted(alone.tolist())
        assert torch.equal(stack[rows[i]], stale)
    assert torch.equal(stack[1], untouched)


def test_batched_spatial_bonus_is_the_bonus_of_each_row():
    score = torch.rand(3, 2, 5 * 7)  # odd grid sizes: padded cells
    rows = torch.stack([torch.stack([spatial_bonus(r, (5, 7)) for r in b]) for b in score])
    assert torch.equal(spatial_bonus(score, (5, 7)), rows)


def test_batched_choice_refuses_the_score_that_reads_the_stream():
    with pytest.raises(ValueError, match="change"):
        select_batch(torch.zeros(1, 4), (0,), (2,), (("change", 1.0),))


def test_fused_choice_refuses_bad_input_before_any_kernel():
    from toca_fx.kernels.top_k import top_k_refresh

    score, state = torch.rand(8), torch.zeros(8)
    with pytest.raises(ValueError, match=r"k must be in \[1, 8\]"):
        top_k_refresh(score, 9, state, None, None)
    with pytest.raises(ValueError, match="go together"):
        top_k_refresh(score, 2, state, torch.zeros(8), None)
    with pytest.raises(ValueError, match="differ"):
        top_k_refresh(score, 2, torch.zeros(7), None, None)
    with pytest.raises(ValueError, match="shares memory"):
        top_k_refresh(state, 2, state, None, None)
