"""Regional compilation (`toca_fx.compile.regions`): a variant cut into prologue, blocks and epilogue, each
distinct block form compiled once and reused."""
from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
import torch.fx as fx

import toca_fx.compile.options as options_module
import toca_fx.runtime.compiler as compiler_module
from toca_fx import ToCaBackend, ToCaConfig
from toca_fx.models import DiT, PixArt
from toca_fx.analysis.graphs import op_name
from toca_fx.analysis.graphs import ancestors
from toca_fx.analysis.marks import stream_marks
from toca_fx.compile.regions import CHEAP, Regional, compile_regions, cut_graph
from toca_fx.ops import SIDE_EFFECTS

DEPTH = 4
STEPS = 6
# One ratio for every block (depth and step factors 1): every block of a variant has the same plan.
CONSTANT = dict(interval=3, ratio=0.3, num_steps=STEPS, self_attn="recompute", parallel_compile=False)
# The regional-vs-whole comparison (fp32, CPU): the same math, cut or not (bit-identical here, with
# torch 2.13), where cached partial steps differ from the uncached model by 2e-2 to 2e-1.
RTOL, ATOL = 1e-5, 1e-5


def _pixart() -> PixArt:
    torch.manual_seed(0)
    return PixArt(input_size=8, patch_size=2, hidden_size=32, depth=DEPTH, num_heads=2, caption_channels=32).eval()


def _dit() -> DiT:
    torch.manual_seed(0)
    return DiT(input_size=8, patch_size=2, hidden_size=32, depth=DEPTH, num_heads=2, num_classes=10).eval()


MODELS = {"pixart": _pixart, "dit": _dit}
ADDS_PER_BLOCK = {"pixart": 3, "dit": 2}  # self-attention, cross-attention, MLP; self-attention, MLP


def _inputs(model, steps: int = STEPS) -> list[tuple]:
    """A denoising loop's inputs: the latent moves noticeably each step, t counts down, the condition stays."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 8, 8, generator=g)
    drift = torch.randn(2, 4, 8, 8, generator=g)
    cond = torch.randn(2, 8, 32, generator=g) if isinstance(model, PixArt) else torch.tensor([1, 7])
    return [(x + 0.1 * i * drift, torch.full((2,), 999.0 - 150 * i), cond) for i in range(steps)]


def _generate(model, config: ToCaConfig, inputs: list[tuple]) -> tuple[list[torch.Tensor], ToCaBackend]:
    torch._dynamo.reset()
    backend = ToCaBackend(config)
    fast = torch.compile(model, backend=backend, dynamic=False)
    with torch.no_grad():
        outs = [fast(*args) for args in inputs]
    torch._dynamo.reset()
    return outs, backend


def _eager_run(name: str, config: ToCaConfig) -> tuple[ToCaBackend, dict, list[torch.Tensor]]:
    """The model run with inner="eager" (cheap): its backend, each variant graph's first inputs by graph
    id, and each step's output."""
    seen = {}
    real = compiler_module.compile_variant

    def recording(gm, inputs, *args, **kwargs):
        seen.setdefault(id(gm), list(inputs))
        return real(gm, inputs, *args, **kwargs)

    model = MODELS[name]()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(compiler_module, "compile_variant", recording)
        outs, backend = _generate(model, config, _inputs(model, config.num_steps))
    return backend, seen, outs


@pytest.fixture(scope="module")
def eager_runs() -> dict:
    """Per model, a 6-step generation with inner="eager" (`_eager_run`)."""
    return {name: _eager_run(name, ToCaConfig(inner="eager", **CONSTANT)) for name in MODELS}


def _stub_inductor(monkeypatch) -> list[fx.GraphModule]:
    """Inductor stubbed in the backend (each graph runs as it is): the graphs it is handed, in order."""
    compiles = []
    monkeypatch.setattr(options_module, "compile_inductor", lambda g, inputs, patches, wide_rows: compiles.append(g) or g)
    return compiles


def _ops(nodes: list[fx.Node]) -> tuple:
    return tuple((n.op, str(n.target)) for n in nodes)


# --- 1. numerics: regional == whole, step by step -------------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_regional_generation_matches_whole_compilation(name):
    model = MODELS[name]()
    inputs = _inputs(model)
    regional, by_regions = _generate(model, ToCaConfig(regional=True, **CONSTANT), inputs)
    whole, by_graph = _generate(model, ToCaConfig(regional=False, **CONSTANT), inputs)
    with torch.no_grad():
        uncached = [model(*args) for args in inputs]

    assert by_regions.stats()["calls"] == {"full": 2, "partial": 4}
    for step, (a, b) in enumerate(zip(regional, whole)):
        torch.testing.assert_close(a, b, rtol=RTOL, atol=ATOL, msg=lambda m: f"step {step}: {m}")
    # Not vacuous: partial steps read the cache and differ from the uncached model far beyond the
    # tolerance; full steps equal it.
    for step in (1, 2, 4, 5):
        assert (regional[step] - uncached[step]).abs().max() > 100 * ATOL, f"step {step} does not read the cache"
    for step in (0, 3):
        torch.testing.assert_close(regional[step], uncached[step], rtol=1e-4, atol=1e-4)

    rows = by_regions.stats()["compile_times"]
    assert [r["label"] for r in rows] == ["full", "partial"]
    for row in rows:
        # Every block runs the same plan: one form for all blocks, or, where a block's closing residual
        # add is handed over to the next region (`_hand_over`), one for the first block (which receives
        # none) and one for all the others.
        assert row.get("blocks") == DEPTH and row.get("forms") in (1, 2), row
    rows = by_graph.stats()["compile_times"]
    assert len(rows) == 2 and not any("blocks" in r or "forms" in r for r in rows), rows


# --- 2. cut_graph / compile_regions on a rewritten graph --------------------------------------------

@pytest.mark.parametrize("name", list(MODELS))
def test_cut_graph_splits_a_partial_step_into_blocks(name, eager_runs):
    backend, _, _ = eager_runs[name]
    gm = backend.graphs[0].variant_graph("partial")
    nodes = list(gm.graph.nodes)
    cut = cut_graph(gm.graph)
    assert cut is not None and len(cut) == DEPTH + 2
    prologue, *blocks, epilogue = cut
    assert prologue and epilogue and all(blocks)

    # Every computing node is in a region; leaves and the output in none. A node in two regions is
    # computed again in the second, which must be the next one (`_hand_over`'s copies): then it must be
    # elementwise or a view (no matmul done twice) without an effect (a cache update done twice, a
    # staleness counted twice).
    where: dict[fx.Node, list[int]] = {}
    for r, region in enumerate(cut):
        assert region == sorted(region, key=nodes.index)  # each in graph order
        assert len(set(region)) == len(region)
        for n in region:
            where.setdefault(n, []).append(r)
    assert set(where) == {n for n in nodes if n.op not in ("placeholder", "get_attr", "output")}
    x0 = next(n for n, j in stream_marks(nodes).items() if j == 0)
    for n, rs in where.items():
        if len(rs) > 1:
            assert len(rs) == 2 and rs[1] == rs[0] + 1 and rs[0] > 0, (n.name, rs)
            assert op_name(n) in CHEAP and n is not x0, n.name
            assert n.target not in SIDE_EFFECTS and not (n.op == "call_method" and n.target.endswith("_")), n.name
    effects = [n for n in where if n.target in SIDE_EFFECTS]
    assert effects and all(len(where[n]) == 1 for n in effects)
    region_of = {n: rs[0] for n, rs in where.items()}
    # Values flow forward: no region reads a value first computed in a later one.
    for n, rs in where.items():
        for i in n.all_input_nodes:
            assert region_of.get(i, 0) <= rs[0], (i.name, n.name)

    # The stream: x0 in the prologue, the residual adds in their blocks, in order: a block's closing
    # add in it or in the next region, another add in its block and perhaps again in the next region.
    marks = stream_marks(nodes)
    per_block = ADDS_PER_BLOCK[name]
    assert sorted(marks.values()) == list(range(DEPTH * per_block + 1))
    assert where[x0] == [0]
    for add, j in marks.items():
        if j:
            home = 1 + (j - 1) // per_block
            allowed = ([home], [home + 1]) if j % per_block == 0 else ([home], [home, home + 1])
            assert where[add] in allowed, (add.name, j, where[add])
    # A sum on the stream leaves its region only where one graph writes it out too: a block's last, or
    # one a matmul reads; any other would be rounded to the model's dtype where Inductor keeps it in
    # float32 (the next test).
    for n, rs in where.items():
        if marks.get(n) and any(r not in rs for u in n.users for r in where.get(u, [])):
            assert marks[n] % per_block == 0 or any(op_name(u) == "linear" for u in n.users), n.name
    # No prologue node reads the stream (x0 or anything computed from it).
    assert not [n.name for n in prologue if n is not x0 and x0 in ancestors(n)]
    # The blocks after the first are alike: the same ops, in the same order.
    assert len({_ops(b) for b in blocks[1:]}) == 1, [len(b) for b in blocks]


@pytest.mark.parametrize("name", list(MODELS))
def test_compile_regions_runs_like_the_whole_graph(name, eager_runs):
    backend, seen, _ = eager_runs[name]
    graph = backend.graphs[0]
    gm = graph.variant_graph("partial")
    n_args = len(seen[id(gm)]) - len(graph.state.specs)
    # The variant's inputs as the backend builds them, with the buffers as the 6-step run left them
    # (filled by full steps, updated by partial ones): a partial step's realistic state.
    inputs = graph.variant_inputs("partial", tuple(seen[id(gm)][:n_args]))
    compiled = []

    def compile_one(region: fx.GraphModule, metas: list) -> fx.GraphModule:
        assert len(metas) == sum(n.op == "placeholder" for n in region.graph.nodes)
        compiled.append(region)
        return region

    regional = compile_regions(gm, inputs, compile_one)
    assert isinstance(regional, Regional)
    assert regional.blocks == DEPTH and regional.forms in (1, 2)
    # Each form once: the prologue, the block form(s), the epilogue; the blocks after the first share one.
    assert len(compiled) == 2 + regional.forms and len({id(r) for r in compiled}) == len(compiled)
    assert len(compiled) < 2 + DEPTH

    whole_in = [x.clone() for x in inputs]
    regional_in = [x.clone() for x in inputs]
    with torch.no_grad():
        expected = gm(*whole_in)
        got = regional(*regional_in)
    assert type(got) is type(expected) and len(got) == len(expected)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
    # The same in-place updates of the cache state: the buffers the step updates, alike after both.
    updated = [i for i, (after, before) in enumerate(zip(whole_in, inputs)) if not torch.equal(after, before)]
    assert updated and all(i >= n_args for i in updated), updated
    for i, (a, b) in enumerate(zip(regional_in, whole_in)):
        # Token norms may differ by an ulp: regions hand the stream on contiguous, which changes the
        # order of a reduction (see `_extract`).
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6, msg=lambda m: f"input {i}: {m}")


@pytest.mark.parametrize("ratio", [1.0, 0.3])
def test_bf16_generation_by_regions_is_as_close_to_float32_as_whole(ratio):
    # Each region writes out what leaves it in bf16, where one graph may keep a sum in float32: cut
    # after the wrong sums, a generation drifts from float32's as far as eager's does, about twice
    # as far as a whole graph's; the cut that keeps those sums within regions stays as close.
    torch.manual_seed(0)
    exact = PixArt(input_size=16, patch_size=2, hidden_size=128, depth=6, num_heads=4, caption_channels=32).eval()
    model = copy.deepcopy(exact).to(torch.bfloat16)
    config = ToCaConfig(interval=4, ratio=ratio, num_steps=20, self_attn="recompute", parallel_compile=False)
    reference = _denoise(exact, torch.float32)
    errors = {}
    for regional in (False, True):
        torch._dynamo.reset()
        fast = torch.compile(model, backend=ToCaBackend(replace(config, regional=regional)), dynamic=False)
        sample = _denoise(fast, torch.bfloat16)
        errors[regional] = ((sample.float() - reference).norm() / reference.norm()).item()
    torch._dynamo.reset()
    assert errors[True] < 1.3 * errors[False], errors


def _denoise(model, dtype: torch.dtype, steps: int = 20, guidance: float = 4.0) -> torch.Tensor:
    """A 20-step Euler loop with classifier-free guidance, where each step's rounding carries into the next."""
    g = torch.Generator().manual_seed(1)
    x, text = torch.randn(1, 4, 16, 16, generator=g), torch.randn(2, 8, 32, generator=g)
    with torch.no_grad():
        for i in range(steps):
            t = torch.full((2,), 999.0 * (1 - i / steps))
            cond, uncond = model(torch.cat([x, x]).to(dtype), t, text.to(dtype))[:, :4].float().chunk(2)
            x = x - (uncond + guidance * (cond - uncond)) / steps
    return x


def test_graph_without_a_marked_stream_is_not_cut():
    gm = fx.symbolic_trace(torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4)))
    assert cut_graph(gm.graph) is None
    assert compile_regions(gm, [torch.randn(2, 4)], lambda g, metas: pytest.fail("nothing to compile")) is None


# --- 3. fallback: no two blocks alike ------------------------------------------------------------

def test_blocks_that_all_differ_compile_whole(monkeypatch):
    # Each block recomputes its own number of rows: no two partial-step blocks share a form.
    config = dict(interval=2, ratio=0.3, num_steps=2, self_attn="recompute", parallel_compile=False,
                  depth_factors=(1.8, 0.2), depth_levels=0)
    backend, seen, eager = _eager_run("dit", ToCaConfig(inner="eager", **config))
    graph = backend.graphs[0]
    gm = graph.variant_graph("partial")
    ks = [plan.k for _, plan in graph.planner.first_of("partial").key if plan.mode == "rows"]
    assert len(ks) == 2 * DEPTH and len(set(ks)) == DEPTH, ks  # the premise: rows differ from block to block
    assert cut_graph(gm.graph) is not None  # the cut is found ...
    compiled = []
    assert compile_regions(gm, seen[id(gm)], lambda g, metas: compiled.append(g) or g) is None  # ... but spares nothing
    assert compiled == []

    # Through the backend with inner="inductor", Inductor itself stubbed (each graph runs as it is; test 1
    # compiles whole graphs with Inductor for real): what is compiled, and how the rows report it.
    compiles = _stub_inductor(monkeypatch)
    model = _dit()
    cached, backend = _generate(model, ToCaConfig(regional=True, **config), _inputs(model, 2))
    graph = backend.graphs[0]
    rows = {r["label"]: r for r in backend.stats()["compile_times"]}
    assert set(rows) == {"full", "partial"}
    assert "blocks" not in rows["partial"] and "forms" not in rows["partial"], rows
    # The full step refills every block alike: it is still compiled by regions (the prologue, its block
    # forms, the epilogue), then the partial step's graph whole, in one compilation.
    assert rows["full"].get("blocks") == DEPTH and rows["full"]["forms"] < DEPTH, rows
    assert len(compiles) == 2 + rows["full"]["forms"] + 1
    assert compiles[-1] is graph.variant_graph("partial")
    assert graph.variant_graph("full") not in compiles
    for step, (a, b) in enumerate(zip(cached, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


def test_steps_that_reuse_every_branch_are_cut_after_every_add(monkeypatch):
    # Every kind's ratio factor 0: the partial step adds each branch's cached output, a chain of adds
    # that one graph fuses into long kernels; cut after every add, it matches eager's step for step.
    compiled = _stub_inductor(monkeypatch)
    model = _dit()
    reuse = dict(interval=2, num_steps=4, kind_factors={"self_attn": 0.0, "mlp": 0.0})
    config = ToCaConfig(parallel_compile=False, **reuse)
    assert config.regional
    cached, backend = _generate(model, config, _inputs(model, 4))
    rows = {r["label"]: r for r in backend.stats()["compile_times"]}
    assert set(rows) == {"full", "partial"}
    assert rows["full"]["blocks"] == DEPTH and rows["partial"].get("blocks") == ADDS_PER_BLOCK["dit"] * DEPTH, rows
    reused = backend.graphs[0].variant_graph("partial")
    assert reused not in compiled  # not compiled whole
    _, _, eager = _eager_run("dit", ToCaConfig(inner="eager", parallel_compile=False, **reuse))
    for step, (a, b) in enumerate(zip(cached, eager)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")


# --- 4. config --------------------------------------------------------------------------------------

def test_regional_must_be_a_bool():
    assert ToCaConfig().regional is True  # the default (see ToCaConfig.regional)
    assert ToCaConfig(regional=True).regional is True
    assert ToCaConfig(regional=False).regional is False
    for bad in ("yes", 1, None):
        with pytest.raises(ValueError, match="regional"):
            ToCaConfig(regional=bad)


# --- 4. blocks of different forms ------------------------------------------------------------------

class _Uneven(torch.nn.Module):
    """A two-stream (image, text) joint-attention DiT whose blocks differ in their residual adds: the
    first has an extra image self-attention, the last no text-stream adds."""

    def __init__(self, dim: int = 32, depth: int = 4):
        super().__init__()
        self.embed, self.embed_text, self.depth = torch.nn.Linear(4, dim), torch.nn.Linear(8, dim), depth
        self.qkv = torch.nn.ModuleList(torch.nn.Linear(dim, 3 * dim) for _ in range(depth + 1))
        self.out = torch.nn.ModuleList(torch.nn.Linear(dim, dim) for _ in range(2 * depth + 1))
        self.mlp = torch.nn.ModuleList(torch.nn.Sequential(torch.nn.LayerNorm(dim), torch.nn.Linear(dim, dim),
                                                           torch.nn.GELU()) for _ in range(2 * depth))

    def forward(self, x: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        h, c = self.embed(x), self.embed_text(text)
        for i in range(self.depth):
            if i == 0:
                h = h + self.out[-1](_attend(self.qkv[-1](h)))
            joint = _attend(self.qkv[i](torch.cat([c, h], dim=1)))
            h = h + self.out[2 * i](joint[:, c.shape[1]:])
            h = h + self.mlp[2 * i](h)
            if i < self.depth - 1:
                c = c + self.out[2 * i + 1](joint[:, : c.shape[1]])
                c = c + self.mlp[2 * i + 1](c)
        return h


def _attend(qkv: torch.Tensor) -> torch.Tensor:
    heads = lambda t: t.unflatten(-1, (2, -1)).transpose(1, 2)  # noqa: E731
    q, k, v = qkv.chunk(3, dim=-1)
    return torch.nn.functional.scaled_dot_product_attention(heads(q), heads(k), heads(v)).transpose(1, 2).flatten(2)


@pytest.mark.parametrize("depth", [3, 4, 6])
@pytest.mark.parametrize("ratio", [1.0, 0.5])
def test_blocks_of_different_forms_do_not_crash_the_cut(monkeypatch, ratio, depth):
    """Cut where one period fits, else compiled whole; exact where every row is computed."""
    _stub_inductor(monkeypatch)
    torch.manual_seed(0)
    model = _Uneven(depth=depth).eval()
    g = torch.Generator().manual_seed(1)
    x, drift, text = (torch.randn(2, n, c, generator=g) for n, c in ((16, 4), (16, 4), (5, 8)))
    inputs = [(x + 0.05 * i * drift, text) for i in range(4)]
    config = ToCaConfig(interval=2, ratio=ratio, num_steps=4, self_attn="recompute", regional=True, parallel_compile=False)
    cached, backend = _generate(model, config, inputs)
    assert len(backend.stats()["branches"]) == 1 + 2 * depth + depth - 1  # image: attentions, MLPs; text: MLPs
    with torch.no_grad():
        for step, (a, args) in enumerate(zip(cached, inputs)):
            if ratio == 1.0 or step % 2 == 0:
                torch.testing.assert_close(a, model(*args), rtol=1e-5, atol=1e-5, msg=lambda m: f"step {step}: {m}")
