"""The --tiny paths of benchmarks/quality_curve.py and benchmarks/policies_quality.py, per model."""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

pytest.importorskip("matplotlib")

BENCH = Path(__file__).parents[1] / "benchmarks"


def load(name: str):
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = sys.modules[name] = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_step_reuse_restarts_every_generation():
    curve = load("quality_curve")
    calls = []
    reuse = curve.StepReuse(lambda x: calls.append(x) or x, every=3, steps=4)
    outputs = [reuse(i) for i in range(8)]
    assert calls == [0, 3, 4, 7] and outputs == [0, 0, 0, 3, 4, 4, 4, 7]
    assert reuse.computed == 4


def test_quality_curve_tiny_on_glyphs(tmp_path):
    curve = load("quality_curve")
    result = curve.main(["--model", "glyphs", "--tiny", "--device", "cpu", "--out", str(tmp_path)])
    families = {r["family"] for r in result["rows"]}
    assert families == {"uncached", *curve.FAMILIES} - {"learned router"}  # no --routers
    assert all(r["speedup"] > 1 for r in result["rows"][1:])
    assert all(r[k][1] <= r[k][0] <= r[k][2] for r in result["rows"] for k in ("accuracy", "psnr", "ssim"))
    assert len(result["comparisons"]) == 3
    saved = json.loads((tmp_path / "quality_glyphs.json").read_text())
    assert saved["meta"]["model"] == "glyphs" and saved["meta"]["tiny"] and saved["meta"]["skipped"] == []
    assert (tmp_path / "quality_glyphs.png").exists() and (tmp_path / "quality_glyphs_records.pt").exists()
    assert "| a - b |" in (tmp_path / "quality_glyphs_table.md").read_text()


def test_router_rows_parts_and_merge(tmp_path):
    """A router trained by policies_quality.py --train-only is a row of the curve; parts run apart
    (--families) merge into the curve one run gives; a missing router and the time budget skip rows."""
    policies, curve = load("policies_quality"), load("quality_curve")
    prefix = tmp_path / "routers" / "router_glyphs"
    policies.main(["--model", "glyphs", "--tiny", "--train", "3.0", "--train-only", "--router", str(prefix)])
    assert prefix.with_name("router_glyphs_3.0x.pt").exists() and not prefix.with_name("router_glyphs_2.0x.pt").exists()
    tiny = ["--model", "glyphs", "--tiny", "--device", "cpu"]
    a = curve.main(tiny + ["--families", "FORA,learned router", "--routers", str(prefix), "--out", str(tmp_path / "a")])
    assert [r["setting"] for r in a["rows"]] == ["uncached", "FORA N=2", "HarmoniCa (router for 3.0x)"]
    assert a["meta"]["skipped"] == ["HarmoniCa (router for 1.5x)", "HarmoniCa (router for 2.0x)"]
    b = curve.main(tiny + ["--families", "ToCa,fewer steps", "--out", str(tmp_path / "b")])
    budget = curve.main(tiny + ["--families", "ToCa", "--max-seconds", "0", "--out", str(tmp_path / "c")])
    assert [r["setting"] for r in budget["rows"]] == ["uncached"] and budget["meta"]["skipped"] == ["ToCa N=2 r=0.5"]

    merged = curve.main(tiny + ["--merge", f"{tmp_path / 'a'},{tmp_path / 'b'}", "--out", str(tmp_path / "m")])
    assert [r["family"] for r in merged["rows"]] == ["uncached", "ToCa", "FORA", "fewer steps", "fewer steps",
                                                     "learned router"]
    assert merged["meta"]["uncached_feature_gap"] == 0.0  # the same noise gives the same uncached samples
    measured = {r["setting"]: r for r in b["rows"] + a["rows"]}  # the uncached row from the first part
    assert merged["rows"] == [measured[r["setting"]] for r in merged["rows"]]  # rows as each part measured them
    ordered = curve.main(tiny + ["--only", "3 DDIM steps,ToCa N=2 r=0.5", "--out", str(tmp_path / "o")])
    assert [r["setting"] for r in ordered["rows"]] == ["uncached", "3 DDIM steps", "ToCa N=2 r=0.5"]
    assert len(merged["comparisons"]) == 6  # ToCa, FORA, fewer steps and the router, pairwise
    whole = curve.main(tiny + ["--families", "ToCa,FORA,fewer steps,learned router", "--routers", str(prefix),
                               "--out", str(tmp_path / "w")])
    assert merged["comparisons"] == whole["comparisons"]


def test_policies_quality_tiny_on_digits(capsys):
    policies = load("policies_quality")
    policies.main(["--model", "digits", "--tiny", "--no-router", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| uncached | 1.00x |" in out and "FORA interval=2" in out and "ToCa interval=2" in out
