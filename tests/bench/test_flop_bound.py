"""The FLOP lower bound of issue 22 (bench/flop_bound.py), the sweep's column for it, and the memory breakdown."""

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "bench"))

import flop_bound  # noqa: E402
from flop_bound import Shape, count_gemm_flops, step_flops  # noqa: E402


def test_step_flops_on_a_shape_counted_by_hand():
    # T=2 tokens, H=4, I=2, E=2 experts, top-1 (n=2 assignments), 1 head of 4, vocab 3, r=1, half the
    # assignments (m=1) on hot experts.
    shape = Shape(hidden=4, intermediate=2, experts=2, top_k=1, layers=1, batch=1, seq=2, heads=1, kv_heads=1,
                  vocab=3, rank=1)
    f = step_flops(shape, 0.5)
    # q, k, v forward only (first layer: frozen embedding, no input gradient) 2*2*4*12; o forward + backward 2*2*2*4*4
    assert f["attention projections"] == 192 + 128
    # q, k, v LoRA 6*2*1*(4+4) - 2*2*1*4 each (no input gradient), o 6*2*1*8
    assert f["attention LoRA"] == 3 * 80 + 96
    assert f["attention scores"] == 3 * 4 * 1 * 1 * 2 * 2 * 4  # 4 B h S^2 d forward, twice that backward
    assert f["router"] == 2 * 2 * 2 * 4 * 2
    assert f["expert GEMMs"] == 2 * 6 * 2 * 4 * 2
    assert f["LM head"] == 2 * 2 * 2 * 4 * 3
    assert f["floor"] == 1200
    # router: activation space 6*2*1*(4+2) = 72 < folded 2*2*4*2 + 6*4*2*1 = 80
    assert f["router LoRA"] == 72
    # one hot row: gate, up, down each 6*1*1*(4+2) = 36 < folded 2*1*4*2 + 6*4*2 = 64
    assert f["hot-expert LoRA"] == 108
    assert f["adapter"] == 180 and f["bound"] == pytest.approx(1380 / 1200)
    assert f["hellora"] == 1200 + 80 + 108  # HELLoRA folds the router, runs the experts' LoRA in activation space


def test_least_lora_takes_the_folded_form_when_rows_outnumber_the_rank_cost():
    # 1000 rows of a 4 -> 2 weight at r=4: activation space 6*1000*4*6 = 144000, folded 2*1000*8 + 6*8*4 = 16192
    assert flop_bound.least_lora_flops(1000, 4, 4, 2) == 16192
    assert flop_bound.least_lora_flops(1, 4, 4, 2) == 144


def test_step_flops_refuses_bad_hot_shares():
    shape = Shape(hidden=4, intermediate=2, experts=2, top_k=1, layers=2, batch=1, seq=2, heads=1, kv_heads=1,
                  vocab=3, rank=1)
    with pytest.raises(ValueError, match="2 layers"):
        step_flops(shape, [0.5])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        step_flops(shape, 1.5)


def test_formulas_match_the_products_the_tiny_sweep_step_dispatches():
    torch.set_num_threads(1)
    check = flop_bound.counted_check(8, tiny=True)
    assert check["floor_counted"] == check["floor_expected"]
    assert check["hellora_counted"] == check["hellora_expected"]
    assert check["hellora_expected"] > check["floor_expected"]


def test_gemm_counter_refuses_a_product_it_has_no_formula_for():
    with pytest.raises(NotImplementedError, match="aten.dot"):
        count_gemm_flops(lambda: torch.dot(torch.ones(3), torch.ones(3)))


def test_sweep_rerender_adds_the_flop_bound_column_and_keeps_the_measured_numbers(tmp_path):
    import scaling_sweep

    for name in ("scaling.json", "scaling.png"):
        shutil.copy(REPO / "bench" / "results" / name, tmp_path / name)
    old = json.loads((tmp_path / "scaling.json").read_text())
    for row in old["rows"]:
        row.pop("flop_bound", None)
    (tmp_path / "scaling.json").write_text(json.dumps(old))
    md = scaling_sweep.rerender(tmp_path / "scaling.json").read_text()
    new = json.loads((tmp_path / "scaling.json").read_text())
    assert "| FLOP bound x floor |" in md
    for a, b in zip(old["rows"], new["rows"]):
        assert a["configs"] == b["configs"]  # measurements untouched
        assert b["flop_bound"]["bound"] > 1.0
        line = next(l for l in md.splitlines() if l.startswith(f"| {b['label']} |"))
        assert f"| {b['flop_bound']['bound']:.3f} |" in line


def test_memory_breakdown_tiny_accounts_for_the_static_and_low_rank_bytes(tmp_path):
    import memory_hot_path

    torch.set_num_threads(1)
    data = memory_hot_path.main(["--tiny", "--experts", "8", "--out", str(tmp_path)])
    (row,) = data["rows"]
    assert row["static_extra_measured"] == row["static_extra_expected"]
    assert row["low_rank_saved_measured"] == row["low_rank_saved_expected"] > 0
    md = (tmp_path / "memory-hot-path.md").read_text()
    assert f"| 8 | {row['low_rank_saved_measured']:,} | {row['low_rank_saved_expected']:,} | yes |" in md
    assert "Command: `python bench/memory_hot_path.py" in md


@pytest.mark.parametrize("argv, message", [
    (["--hot-share", "1.5"], "--hot-share"),
    (["--ranks", "32,x"], "--ranks"),
    (["--count", "sixteen"], "--count"),
])
def test_flop_bound_cli_refuses_bad_arguments_in_one_line(argv, message):
    with pytest.raises(SystemExit, match=message):
        flop_bound.main(argv + ["--no-write"])


def test_flop_bound_cli_writes_the_real_shape_table(tmp_path):
    data = flop_bound.main(["--count", "", "--ranks", "32", "--out", str(tmp_path)])
    md = (tmp_path / "flop-bound.md").read_text()
    assert [r["experts"] for r in data["bench_shape"]] == [16, 64, 128, 256]
    assert all(r["bound"] > 1.05 for r in data["bench_shape"])  # the sweep's shape: above the 1.05x
    assert {r["preset"] for r in data["real_shapes"]} == {"olmoe-1b-7b", "qwen3-moe", "deepseek-v3-like-1l-gpu"}
    assert all(1.0 < r["bound"] < r["bound_causal"] + 1e-12 for r in data["real_shapes"])
    assert "Qwen3-30B-A3B" in md and "Command: `python bench/flop_bound.py" in md
