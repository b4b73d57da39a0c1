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
    assert families == {"uncached", *curve.FAMILIES}
    assert all(r["speedup"] > 1 for r in result["rows"][1:])
    assert all(r[k][1] <= r[k][0] <= r[k][2] for r in result["rows"] for k in ("accuracy", "psnr", "ssim"))
    assert len(result["comparisons"]) == 3
    saved = json.loads((tmp_path / "quality_glyphs.json").read_text())
    assert saved["meta"]["model"] == "glyphs" and saved["meta"]["tiny"]
    assert (tmp_path / "quality_glyphs.png").exists() and (tmp_path / "quality_glyphs_records.pt").exists()
    assert "| a - b |" in (tmp_path / "quality_glyphs_table.md").read_text()


def test_policies_quality_tiny_on_digits(capsys):
    policies = load("policies_quality")
    policies.main(["--model", "digits", "--tiny", "--no-router", "--device", "cpu"])
    out = capsys.readouterr().out
    assert "| uncached | 1.00x |" in out and "FORA interval=2" in out and "ToCa interval=2" in out
