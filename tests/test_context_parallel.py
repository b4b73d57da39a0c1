"""toca_fx under diffusers' own context parallelism (Ulysses, degree 2), on CPU with gloo.

Two ranks are spawned once for the module; each runs a tiny random FluxTransformer2DModel made
parallel by `enable_parallelism(config=ContextParallelConfig(ulysses_degree=2))`, uncached and through
toca_fx, and the tests read what each rank saved. diffusers builds the device mesh of the machine's
accelerator and divides the rank by the accelerator count, which is 0 on a CPU-only host: the ranks
pass their own gloo mesh of type "cpu" (`ContextParallelConfig(mesh=...)`) and see one device while
`enable_parallelism` runs. Everything else is diffusers' code: its sharding hooks and its Ulysses
attention, whose all-to-alls Dynamo traces as `torch.ops._c10d_functional` collectives.

A rank that skipped a collective the other runs would hang the group: gloo's timeout (and the join
timeout here) turn that into a failure instead of a stuck test run.
"""
from __future__ import annotations

import datetime
import math
import os
import socket
import traceback
import warnings
from unittest import mock

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

pytest.importorskip("diffusers")
if not dist.is_available() or not dist.is_gloo_available():
    pytest.skip("torch.distributed with gloo is not available", allow_module_level=True)

WORLD, STEPS, INTERVAL = 2, 4, 2
IMAGE_SIDE, TEXT = 4, 6  # 16 image and 6 text tokens: 8 and 3 per rank
JOIN_TIMEOUT_S = 150  # the whole spawned run; gloo times a stuck collective out well before this
COLLECTIVE_TIMEOUT_S = 60


def _wan() -> torch.nn.Module:
    import diffusers
    torch.manual_seed(0)
    return diffusers.WanTransformer3DModel(
        num_attention_heads=2, attention_head_dim=16, patch_size=(1, 2, 2), in_channels=4, out_channels=4, text_dim=24,
        freq_dim=32, ffn_dim=64, num_layers=2, rope_max_seq_len=32).eval()


def _wan_calls() -> list[dict]:
    """2 x 8 x 8 latent patches of 1 x 2 x 2: 32 tokens, 16 per rank; 5 text tokens, not split."""
    g = torch.Generator().manual_seed(2)
    x, drift = torch.randn(1, 4, 2, 8, 8, generator=g), torch.randn(1, 4, 2, 8, 8, generator=g)
    text = torch.randn(1, 5, 24, generator=g)
    return [dict(hidden_states=x + 0.05 * i * drift, timestep=torch.full((1,), 999.0 - 200 * i),
                 encoder_hidden_states=text, return_dict=False) for i in range(STEPS)]


def _model() -> torch.nn.Module:
    import diffusers
    torch.manual_seed(0)
    return diffusers.FluxTransformer2DModel(
        num_attention_heads=2, attention_head_dim=16, patch_size=1, in_channels=16, num_layers=1,
        num_single_layers=1, joint_attention_dim=24, pooled_projection_dim=16, axes_dims_rope=(4, 6, 6)).eval()


def _parallel(model: torch.nn.Module) -> torch.nn.Module:
    import functools

    import diffusers.hooks.context_parallel as hooks
    from diffusers import ContextParallelConfig
    from torch.distributed.device_mesh import init_device_mesh
    if not hasattr(hooks.logger, "warning_once"):
        hooks.logger.warning_once = functools.lru_cache(None)(hooks.logger.warning)
    mesh = init_device_mesh("cpu", (1, WORLD), mesh_dim_names=("ring", "ulysses"))
    with mock.patch.object(torch.accelerator, "device_count", return_value=1):
        model.enable_parallelism(config=ContextParallelConfig(ulysses_degree=WORLD, mesh=mesh))
    return model


def _calls(seed: int, batch: int = 2) -> list[dict]:
    """A denoising-like loop: the latent drifts, the timestep counts down, the conditions stay."""
    g = torch.Generator().manual_seed(seed)
    side = IMAGE_SIDE
    ids = torch.zeros(side * side, 3)
    ids[:, 1], ids[:, 2] = torch.arange(side * side) // side, torch.arange(side * side) % side
    x, drift = torch.randn(batch, side * side, 16, generator=g), torch.randn(batch, side * side, 16, generator=g)
    fixed = dict(encoder_hidden_states=torch.randn(batch, TEXT, 24, generator=g),
                 pooled_projections=torch.randn(batch, 16, generator=g), img_ids=ids, txt_ids=torch.zeros(TEXT, 3),
                 return_dict=False)
    return [dict(hidden_states=x + 0.05 * i * drift, timestep=torch.full((batch,), 0.9 - 0.2 * i), **fixed)
            for i in range(STEPS)]


def _run(model, calls: list[dict]) -> list[torch.Tensor]:
    with torch.no_grad():
        return [model(**kw)[0] for kw in calls]


def _cached(model, calls: list[dict], **config) -> tuple[list[torch.Tensor], object, list[str]]:
    import toca_fx
    backend = toca_fx.ToCaBackend(toca_fx.ToCaConfig(interval=INTERVAL, num_steps=STEPS, inner="eager", **config))
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", toca_fx.ToCaWarning)
        outs = _run(torch.compile(model, backend=backend), calls)
    return outs, backend, [str(w.message) for w in caught if issubclass(w.category, toca_fx.ToCaWarning)]


def _exchanges(backend) -> dict:
    """What the graphs exchange: per graph, the collectives of the captured graph, of the full and the
    partial variant, and of the branches a partial step reuses."""
    from toca_fx.analysis.collectives import exchanged_bytes, exchanges
    from toca_fx.policies.plan import Mode, StepKind
    rows = []
    for graph in backend.graphs:
        partial = dict(graph.planner.first_of(StepKind.PARTIAL).key)
        reused = [b for b in graph.analysis.branches if partial[b.index].mode == Mode.REUSE]
        rows.append({
            "captured": len(exchanges(graph.gm.graph.nodes)),
            "full": len(exchanges(graph.variant_graph("full").graph.nodes)),
            "partial": len(exchanges(graph.variant_graph("partial").graph.nodes)),
            "in_reused": sum(len(exchanges(b.nodes)) for b in reused),
            "bytes_full": exchanged_bytes(graph.variant_graph("full").graph),
            "bytes_partial": exchanged_bytes(graph.variant_graph("partial").graph),
            "whole_only": {b.name: b.whole_only for b in graph.analysis.branches},
        })
    return rows


def _scenarios(rank: int) -> dict:
    model = _parallel(_model())
    same = _calls(seed=1)
    result = {"reference": _run(model, same)}
    outs, _, result["warnings_1"] = _cached(model, same, ratio=1.0, self_attn="recompute")
    result["ratio_1"] = outs
    outs, backend, result["warnings_05"] = _cached(model, same, ratio=0.5)
    result["ratio_05"], result["stats_05"], result["exchanges_05"] = outs, backend.stats(), _exchanges(backend)
    # Each rank its own data (as if seeded apart): the scores, so the chosen tokens, differ by rank.
    outs, backend, _ = _cached(model, _calls(seed=10 + rank), ratio=0.5)
    result["differ"], result["stats_differ"] = outs, backend.stats()
    wan, calls = _parallel(_wan()), _wan_calls()
    result["wan"] = {"reference": _run(wan, calls)}
    result["wan"]["ratio_1"] = _cached(wan, calls, ratio=1.0, self_attn="recompute")[0]
    backend = _cached(wan, calls, ratio=0.5)[1]
    result["wan"]["stats_05"], result["wan"]["exchanges_05"] = backend.stats(), _exchanges(backend)
    return result


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", rank=rank, world_size=WORLD,
                                timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        torch.save(_scenarios(rank), os.path.join(out_dir, f"rank{rank}.pt"))
    except BaseException:
        with open(os.path.join(out_dir, f"rank{rank}.err"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def ranks(tmp_path_factory) -> list[dict]:
    out = str(tmp_path_factory.mktemp("context_parallel"))
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, port, out)) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(JOIN_TIMEOUT_S)
    stuck = [r for r, p in enumerate(procs) if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    errors = {r: open(os.path.join(out, f"rank{r}.err")).read() for r in range(WORLD)
              if os.path.exists(os.path.join(out, f"rank{r}.err"))}
    assert not stuck, f"ranks {stuck} did not finish in {JOIN_TIMEOUT_S} s (a collective left unmatched?)"
    assert not errors, "\n".join(f"rank {r}:\n{e}" for r, e in errors.items())
    return [torch.load(os.path.join(out, f"rank{r}.pt"), weights_only=False) for r in range(WORLD)]


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_every_token_recomputed_equals_the_uncached_parallel_run(ranks, model):
    ranks = [r if model == "flux" else r["wan"] for r in ranks]
    for rank, result in enumerate(ranks):
        assert len(result["ratio_1"]) == STEPS
        for step, (got, want) in enumerate(zip(result["ratio_1"], result["reference"])):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=f"rank {rank}, step {step}")
    # The ranks' outputs are the gathered whole: both hold the same tensor.
    torch.testing.assert_close(ranks[0]["ratio_1"][-1], ranks[1]["ratio_1"][-1], rtol=0, atol=0)


def test_half_ratio_computes_ceil_half_of_each_ranks_tokens(ranks):
    """Per cached branch with rows, per partial step: ceil(0.5 * N / P) rows, N the branch's tokens over
    all ranks, read from each rank's stats (rows over the calls, minus the full steps' rows)."""
    full_steps, partial_steps = STEPS // INTERVAL, STEPS - STEPS // INTERVAL
    global_tokens = {"ff": IMAGE_SIDE ** 2, "ff_context": TEXT}
    for key in ("stats_05", "stats_differ"):
        for rank, result in enumerate(ranks):
            by_name = {b["name"].split(".net")[0].rsplit(".", 1)[-1]: b for b in result[key]["branches"]}
            for name, n in global_tokens.items():
                branch = by_name[name]
                assert branch["tokens"] == n // WORLD
                per_partial = (branch["rows"] - full_steps * branch["tokens"]) / partial_steps
                assert per_partial == math.ceil(0.5 * n / WORLD), (key, rank, name, branch)
    assert ranks[0]["stats_05"]["calls"] == ranks[1]["stats_05"]["calls"] == {"full": 2, "partial": 2}


def test_wan_rows_per_rank_and_a_partial_step_exchanging_only_the_output(ranks):
    """Wan's cross-attention (text not split) and MLP run on ceil(0.5 * 32 / 2) rows per rank; its
    self-attentions, reused, exchange nothing: a partial step gathers the output and nothing else."""
    for result in ranks:
        stats = result["wan"]["stats_05"]
        rowed = [b for b in stats["branches"] if b["kind"] in ("cross_attn", "mlp")]
        assert len(rowed) == 4 and all(b["tokens"] == 16 for b in rowed)
        assert all((b["rows"] - 2 * b["tokens"]) / 2 == math.ceil(0.5 * 32 / WORLD) for b in rowed)
        (graph,) = result["wan"]["exchanges_05"]
        assert graph["partial"] == 1 and graph["bytes_partial"] == 1 * 32 // WORLD * 4 * 4 * 4 * (WORLD - 1)


@pytest.mark.parametrize("model", ["flux", "wan"])
def test_partial_steps_drop_the_exchanges_of_reused_branches(ranks, model):
    ranks = [r if model == "flux" else r["wan"] for r in ranks]
    for result in ranks:
        rows = result["exchanges_05"]
        assert sum(r["in_reused"] for r in rows) > 0  # a reused attention branch holds exchanges
        for r in rows:
            assert r["full"] == r["captured"]  # full steps keep every exchange
            assert r["partial"] == r["captured"] - r["in_reused"]  # the reused ones, and only they, go
            assert r["bytes_partial"] < r["bytes_full"]
    assert ranks[0]["exchanges_05"] == ranks[1]["exchanges_05"]  # the same exchanges, of the same sizes


def test_stats_count_the_bytes_each_rank_receives(ranks):
    """Ulysses exchanges q, k, v and the output of each attention (an all-to-all each, of which a rank
    keeps 1/P), and the output projection is gathered once (P - 1 shards received); a partial step
    runs only the joint attention of the double-stream block (its single-stream attention is reused)."""
    batch, heads, head_dim, out_channels, f32 = 2, 2, 16, 16, 4
    tokens = (IMAGE_SIDE ** 2 + TEXT) // WORLD
    attention = 4 * batch * tokens * heads * head_dim * f32 * (WORLD - 1) // WORLD
    gather = batch * IMAGE_SIDE ** 2 // WORLD * out_channels * f32 * (WORLD - 1)
    full, partial = 2 * attention + gather, attention + gather
    for result in ranks:
        assert result["stats_05"]["exchanged_bytes"] == {"calls": 2 * full + 2 * partial, "uncached": 4 * full}


def test_branches_that_exchange_tokens_are_cached_whole_only(ranks):
    for r in ranks[0]["exchanges_05"]:
        restricted = [why for why in r["whole_only"].values() if why]
        assert restricted, "the attention branches hold all-to-alls: none may be computed on rows"


def test_ranks_with_different_data_finish_with_the_same_plans(ranks):
    for result in ranks:
        assert all(torch.isfinite(o).all() for o in result["differ"])
    assert ranks[0]["stats_differ"]["calls"] == ranks[1]["stats_differ"]["calls"]
    # Each rank's output is the gathered whole (its own shard and the other's), so both hold one tensor,
    # made of shards of two different inputs: not the output of the run where the ranks' data agree.
    torch.testing.assert_close(ranks[0]["differ"][-1], ranks[1]["differ"][-1], rtol=0, atol=0)
    assert not torch.allclose(ranks[0]["differ"][-1], ranks[0]["ratio_05"][-1])


def _exchange_graph(read: bool):
    """x -> all_to_all_single -> wait -> (read by the output, or by nothing) and x + 1 returned; each node
    with a meta tensor as its example value, as Dynamo leaves them."""
    import torch.fx as fx
    import torch.distributed._functional_collectives  # noqa: F401  (registers the ops)
    ops = torch.ops._c10d_functional
    g = fx.Graph()
    x = g.placeholder("x")
    sent = g.call_function(ops.all_to_all_single, (x, [4, 4], [4, 4], "0"))
    got = g.call_function(ops.wait_tensor, (sent,))
    out = g.call_function(torch.add, (x, got if read else 1))
    g.output(out)
    for node in (x, sent, got, out):
        node.meta["example_value"] = torch.empty(8, 4, device="meta")
    return g


def test_an_unread_exchange_is_dropped_with_its_wait_and_a_read_one_kept():
    from toca_fx.analysis.collectives import exchanged_bytes, exchanges
    from toca_fx.rewrite.dead_code import eliminate_dead_code
    kept, dropped = _exchange_graph(read=True), _exchange_graph(read=False)
    assert exchanged_bytes(kept) == 8 * 4 * 4 // 2  # a rank keeps its own half of an all-to-all of 2
    eliminate_dead_code(kept)
    eliminate_dead_code(dropped)
    assert [e.op for e in exchanges(kept.nodes)] == ["all_to_all_single"]
    assert not any(n.op == "call_function" and "c10d" in str(n.target) for n in dropped.nodes)


def test_a_branch_holding_a_collective_is_never_computed_on_rows():
    from toca_fx.analysis.axes import Axes, TokenFlow
    from toca_fx.analysis.collectives import restrict
    from toca_fx.analysis.residual import Branch
    g = _exchange_graph(read=True)
    x, sent, got, out = [n for n in g.nodes if n.op != "output"]
    branch = Branch(out, x, got, None, [sent, got], TokenFlow(tokens=8, info={x: Axes(1)}), name="b")
    assert "rows" in branch.modes
    assert restrict([branch]) == ["b"]
    assert "rows" not in branch.modes and "all_to_all_single" in branch.whole_only
