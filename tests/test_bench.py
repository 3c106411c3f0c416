"""The benchmark scripts run end to end at a tiny preset (timings are not checked: speed targets live in the
benchmark's own output, never in tests)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import profile_overhead  # noqa: E402
import render_readme  # noqa: E402
import step_throughput  # noqa: E402


def test_step_throughput_tiny_writes_table_and_json(tmp_path):
    argv = ["--preset", "tiny", "--steps", "2", "--warmup", "1", "--out", str(tmp_path), "--with-loop"]
    (data,) = step_throughput.main(argv)
    md = (tmp_path / "tiny.md").read_text()
    saved = json.loads((tmp_path / "tiny.json").read_text())
    configs = {(r["config"], r["router"]) for r in saved["rows"]}
    expected = {"floor", "peft-all", "ours-all", "hellora-k2", "hellora-k4", "hellora-k2-loop"}
    assert configs == {(c, r) for c in expected for r in ("skewed", "uniform")}
    for row in saved["rows"]:
        assert row["step_s"] > 0 and row["peak_bytes"] >= row["static_bytes"] > 0 and row["trainable"] > 0
        if row["config"] == "floor":
            assert row["time_x"] == row["mem_x"] == 1.0
    # HELLoRA trains fewer parameters than LoRA on every expert, and every hot set has k experts per layer
    by = {(r["config"], r["router"]): r for r in saved["rows"]}
    assert by[("hellora-k2", "skewed")]["trainable"] < by[("peft-all", "skewed")]["trainable"]
    shares = saved["routing"]["routers"]["skewed"]["top_k_share_per_layer"]
    assert all(0.35 < s < 0.65 for s in shares)  # the skewed router's favourites take about half
    assert "Command: `python bench/step_throughput.py --preset tiny" in md and "Machine: " in md
    assert "| hellora-k2 | skewed |" in md and "Targets" in md
    assert data["targets"] and all({"target", "met", "value"} <= set(t) for t in data["targets"])


def test_gpu_presets_are_skipped_without_cuda(capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("CUDA present: the GPU preset would run for real")
    assert step_throughput.main(["--preset", "olmoe-1b-7b,qwen3-moe", "--no-write"]) == []
    assert "needs CUDA" in capsys.readouterr().out


def test_profile_overhead_tiny(tmp_path):
    data = profile_overhead.main(["--preset", "tiny", "--steps", "2", "--warmup", "1", "--out", str(tmp_path)])
    fractions = [0.01, 0.05, 0.10, 0.20, 0.50]
    assert [(r["epochs"], r["fraction"]) for r in data["rows"]] == [(e, f) for e in (3.0, 1.0) for f in fractions]
    for epochs in (3.0, 1.0):
        forward = [r["forward_share"] for r in data["rows"] if r["epochs"] == epochs]
        assert forward == sorted(forward) and all(0 < s < 1 for s in forward)
    # more training epochs dilute the same profiling time
    e3, e1 = data["rows"][2], data["rows"][7]
    assert e3["fraction"] == e1["fraction"] == 0.10 and e3["forward_share"] < e1["forward_share"]
    assert [t["epochs"] for t in data["target_forward_10pct"]] == [3.0, 1.0]
    assert (tmp_path / "profile-overhead-tiny.md").read_text().count("|") > 20


def test_render_readme_replaces_only_the_marked_section(tmp_path):
    results = tmp_path / "a.md"
    results.write_text("### Step throughput\n\n| x | y |\n|---|---|\n| 1 | 2 |\n")
    readme = tmp_path / "README.md"
    readme.write_text("# Title\n\nbefore\n<!-- bench:start -->\nold numbers\n<!-- bench:end -->\nafter\n")
    render_readme.main([str(results), "--readme", str(readme), "--write"])
    text = readme.read_text()
    assert "old numbers" not in text and "| 1 | 2 |" in text
    assert text.startswith("# Title\n\nbefore\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\nafter\n")
    readme.write_text("no markers\n")
    with pytest.raises(ValueError, match="markers"):
        render_readme.main([str(results), "--readme", str(readme), "--write"])


def test_qwen3_preset_with_autocast_and_noautocast_comparison(tmp_path):
    """The Qwen3-MoE architecture (the GPU preset's, tiny here) under bf16 autocast, HELLoRA k also without it."""
    argv = ["--preset", "tiny-qwen3", "--steps", "1", "--warmup", "1", "--routers", "skewed", "--autocast", "on",
            "--with-noautocast", "--out", str(tmp_path)]
    (data,) = step_throughput.main(argv)
    configs = [r["config"] for r in data["rows"]]
    assert configs == ["floor", "peft-all", "ours-all", "hellora-k4", "hellora-k4-noautocast", "hellora-k8"]
    assert data["routing"]["autocast"] is True and data["shape"]["family"] == "qwen3_moe"
    assert "qwen3_moe architecture" in (tmp_path / "tiny-qwen3.md").read_text()
    assert all(r["step_s"] > 0 and r["trainable"] > 0 for r in data["rows"])
