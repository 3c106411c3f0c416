"""The benchmark scripts run end to end at a tiny preset (timings are not checked: speed targets live in the
benchmark's own output, never in tests)."""

import json
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[2] / "bench"
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
    assert step_throughput.main(["--sweep", "gpu-scaling", "--no-write"]) == []
    assert "[gpu-scaling] skipped: needs CUDA." in capsys.readouterr().out


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


def test_sweep_cli_parsing_and_one_line_errors():
    import argparse
    import dataclasses

    import scaling_sweep

    assert scaling_sweep.parse_experts("256, 16,64") == [16, 64, 256]
    for bad, match in (("16,x", "comma-separated integers"), ("1,8", "at least 2"), ("8,8", "twice"), ("", "at least 2")):
        with pytest.raises(SystemExit, match=match):
            scaling_sweep.parse_experts(bad)
    args = step_throughput.parse_args(["--sweep", "scaling"])
    rows = scaling_sweep.sweep_rows(args, step_throughput.PRESETS)
    assert [(label, p.experts, p.hidden, p.intermediate, p.layers, p.top_k, p.batch, p.seq) for label, p in rows] == [
        (str(e), e, 256, 128, 2, 8, 2, 256) for e in (16, 64, 128, 256)
    ]
    rows = scaling_sweep.sweep_rows(step_throughput.parse_args(["--preset", "tiny", "--experts", "4,16"]),
                                    step_throughput.PRESETS)
    assert [p.experts for _, p in rows] == [4, 16] and rows[0][1].hidden == step_throughput.PRESETS["tiny"].hidden
    gpu = scaling_sweep.sweep_rows(step_throughput.parse_args(["--sweep", "gpu-scaling"]), step_throughput.PRESETS)
    assert [(p.experts, p.device) for _, p in gpu] == [(128, "cuda"), (256, "cuda")]
    with pytest.raises(SystemExit, match="Unknown --sweep"):
        scaling_sweep.sweep_rows(argparse.Namespace(sweep="nope", experts=None), step_throughput.PRESETS)
    three = {"tiny": dataclasses.replace(step_throughput.PRESETS["tiny"], top_k=3)}
    with pytest.raises(SystemExit, match="below the preset's top-3"):
        scaling_sweep.sweep_rows(step_throughput.parse_args(["--preset", "tiny", "--experts", "2,4"]), three)


def test_expert_sweep_writes_one_results_file_with_a_row_per_expert_count_and_the_figure(tmp_path):
    argv = ["--preset", "tiny", "--experts", "4,8", "--runs", "2", "--steps", "1", "--warmup", "1", "--threads", "1",
            "--out", str(tmp_path), "--name", "sweep"]
    (data,) = step_throughput.main(argv)
    saved = json.loads((tmp_path / "sweep.json").read_text())
    md = (tmp_path / "sweep.md").read_text()
    assert saved["smoke"] is True and "SMOKE RUN" in md and "load average" in md
    assert [r["experts"] for r in saved["rows"]] == [4, 8]
    for row in saved["rows"]:
        floor = row["configs"]["floor"]
        assert floor["time_x"] == floor["mem_x"] == 1.0 and floor["time_x_range"] == [1.0, 1.0]
        for name in ("peft-all", "ours-all", "hellora-k"):
            c = row["configs"][name]
            assert len(c["step_s_runs"]) == 2 and c["time_x_range"][0] <= c["time_x"] <= c["time_x_range"][1]
            assert c["peak_bytes"] >= c["static_bytes"] > 0
        assert row["configs"]["hellora-k"]["trainable"] < row["configs"]["peft-all"]["trainable"]
        assert 0 < row["profiling"]["forward_share"] < 1 and 0 < row["profiling"]["warmup_share"] < 1
        assert row["histogram_bytes"] == 2 * row["experts"] * 8
    assert md.count("\n| 4 |") == 2 and md.count("\n| 8 |") == 2  # step table and profiling table
    assert (tmp_path / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and "](sweep.png)" in md


def test_render_readme_includes_the_scaling_sweep_in_order(tmp_path):
    for name in ("olmoe-small", "scaling", "quality"):
        (tmp_path / f"{name}.md").write_text(f"### {name}\n")
    files = render_readme.result_files(tmp_path)
    assert [f.stem for f in files] == ["olmoe-small", "scaling", "quality"]


def test_profile_hot_path_tiny_writes_operator_tables(tmp_path):
    import profile_hot_path

    data = profile_hot_path.main(["--tiny", "--experts", "4,8", "--steps", "1", "--warmup", "1", "--out", str(tmp_path)])
    assert [e["experts"] for e in data["per_experts"]] == [4, 8]
    for e in data["per_experts"]:
        ops = {d["op"] for d in e["top_extra"]}
        assert e["hellora_total_us"] > 0 and e["floor_total_us"] > 0 and ops
        assert any(d["floor_calls"] == 0 and d["hellora_calls"] > 0 for d in e["top_extra"])  # ops only ours runs
    md = (tmp_path / "profile-hot-path.md").read_text()
    assert "#### 4 experts" in md and "#### 8 experts" in md and "Command: `python bench/profile_hot_path.py" in md


def test_render_readme_points_result_figures_at_their_folder(tmp_path):
    results = tmp_path / "bench" / "results"
    results.mkdir(parents=True)
    (results / "scaling.md").write_text("### Sweep\n\n![step time](scaling.png) ![web](https://x.org/a.png)\n")
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    render_readme.main([str(results / "scaling.md"), "--readme", str(readme), "--write"])
    text = readme.read_text()
    assert "![step time](bench/results/scaling.png)" in text and "![web](https://x.org/a.png)" in text


@pytest.mark.parametrize("title", ["", "SMOKE RUN: not a measurement"])
def test_scaling_figure_title_is_the_one_given(tmp_path, monkeypatch, title):
    # regression: the panel loop reused the name `title`, so every figure got "peak memory x floor" as its title
    # and a smoke run's figure lost its SMOKE label
    import matplotlib.figure
    import scaling_sweep

    titles = []
    real = matplotlib.figure.Figure.suptitle
    monkeypatch.setattr(matplotlib.figure.Figure, "suptitle", lambda self, t, **k: titles.append(t) or real(self, t, **k))
    config = {"time_x": 1.1, "time_x_range": [1.0, 1.2], "mem_x": 1.05}
    rows = [{"experts": e, "configs": {n: config for n in ("floor", "peft-all", "ours-all", "hellora-k")}}
            for e in (16, 64)]
    assert scaling_sweep.plot(rows, tmp_path / "s.png", title) == tmp_path / "s.png"
    assert titles == ([title] if title else [])


def test_render_readme_places_the_evidence_before_the_quality_table(tmp_path):
    for name in ("olmoe-small", "evidence", "quality"):
        (tmp_path / f"{name}.md").write_text(f"### {name}\n")
    assert [f.stem for f in render_readme.result_files(tmp_path)] == ["olmoe-small", "evidence", "quality"]
    readme = tmp_path / "README.md"
    readme.write_text("intro\n<!-- bench:start -->\nold\n<!-- bench:end -->\n")
    render_readme.main(["--readme", str(readme), "--write", *map(str, render_readme.result_files(tmp_path))])
    text = readme.read_text()
    assert text.index("### evidence") < text.index("### quality") and "old" not in text


def test_readme_shows_the_current_results_files():
    """The README's generated section is what bench/render_readme.py makes of bench/results/ now: rerun
    `python bench/render_readme.py --write` after a benchmark or `bench/evidence/analyze.py` changes a results file."""
    import re

    text = render_readme.README.read_text()
    pattern = re.escape(render_readme.START) + r"\n(.*?)\n" + re.escape(render_readme.END)
    shown = re.search(pattern, text, flags=re.S).group(1)
    assert shown == render_readme.section(render_readme.result_files())
    evidence = (render_readme.RESULTS_DIR / "evidence.md").read_text().strip()
    # its figure links are rebased to the README's folder, the rest is verbatim
    rebased = render_readme.rebase_images(evidence, render_readme.RESULTS_DIR, render_readme.README.parent)
    assert evidence.startswith("### Evidence (issue 20)") and rebased in shown
    assert "#### Verdicts" in shown and shown.index("### Evidence (issue 20)") < shown.index("### Selection quality")
