"""The README's main job: `python -m toca_fx.demo` (small settings)."""
import torch

from toca_fx import demo


def test_demo_samples_both_ways_and_writes_a_picture(tmp_path, capsys):
    torch._dynamo.reset()
    out = tmp_path / "demo.png"
    report = demo.main(["--samples", "10", "--steps", "8", "--interval", "4", "--ratio", "0.3", "--out", str(out)])
    base, cached = report["uncached (Inductor)"], report["toca_fx"]
    assert out.read_bytes().startswith(b"\x89PNG\r\n\x1a\n") and out.stat().st_size > 1000
    assert cached["FLOP ratio"] < 0.6 and 0.0 < cached["tokens recomputed"] < 0.6
    assert base["FLOP ratio"] == 1.0
    # Trained model: uncached digits are recognisable, and caching keeps them close to uncached.
    assert base["accuracy"] >= 0.8 and cached["accuracy"] >= base["accuracy"] - 0.2
    assert 20.0 < cached["PSNR dB"] < float("inf")
    printed = capsys.readouterr().out
    assert "| toca_fx |" in printed and "Frechet distance" in printed
