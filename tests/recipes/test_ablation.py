"""`hellora ablate`: grid construction, validation and an end-to-end run on the tiny offline model."""

from __future__ import annotations

import csv

import pytest

from hellora_trl.recipes.ablation import AblationArguments, check_rows, grid_rows, main

BASE = {"selection": "layer", "k": None, "components": "all", "warmup_fraction": 0.1, "variant": "lora"}


def test_one_at_a_time_rows_vary_a_single_axis_from_the_baseline():
    rows = grid_rows(AblationArguments(selections="layer,cold", ks="2,4", components="all,experts"), BASE)
    assert rows[0] == BASE
    assert len(rows) == len({tuple(sorted(r.items(), key=str)) for r in rows})  # no duplicates
    for row in rows[1:]:
        assert sum(row[a] != BASE[a] for a in BASE) == 1
    assert {r["selection"] for r in rows} == {"layer", "cold"} and {2, 4} <= {r["k"] for r in rows}


def test_full_grid_is_the_product():
    rows = grid_rows(AblationArguments(selections="layer,cold", ks="2,4", components="all", full_grid=True), BASE)
    assert len(rows) == 4


def test_bad_values_fail_before_training():
    with pytest.raises(ValueError, match="selection 'hottest'"):
        check_rows(grid_rows(AblationArguments(selections="hottest"), BASE))
    with pytest.raises(ValueError, match="empty"):
        grid_rows(AblationArguments(components=""), BASE)


def test_grid_runs_end_to_end_on_the_tiny_model(tmp_path):
    rows = main([
        "--selections", "layer,cold", "--components", "all", "--ks", "2", "--warmup_fractions", "0.1",
        "--variants", "lora,lori_d", "--hellora_k", "2", "--output_dir", str(tmp_path), "--max_steps", "2", "--train_limit", "32",
        "--eval_limit", "2", "--eval_max_new_tokens", "4", "--hellora_profile_mode", "forward",
        "--disable_tqdm", "true", "--max_length", "96",
    ])
    assert [(r["selection"], r["variant"]) for r in rows] == [("layer", "lora"), ("cold", "lora"), ("layer", "lori_d")]
    with open(tmp_path / "ablation.csv") as f:
        table = list(csv.DictReader(f))
    assert len(table) == 3 and (tmp_path / "ablation.md").read_text().count("\n") == 5
    lora, cold, lori_d = rows
    # LoRI-D trains only B: fewer trainable parameters than LoRA on the same placement
    assert lori_d["trainable_percent"] < lora["trainable_percent"]
    # cold experts get fewer routed tokens than hot ones, so their adapters cost fewer FLOPs per token
    assert cold["adapter_gflops_per_token"] < lora["adapter_gflops_per_token"]
    assert all(r["final_loss"] is not None and r["metric"] == "arithmetic/accuracy" for r in rows)


def test_a_non_number_in_a_numeric_axis_names_the_flag():
    """Review 7.31: `hellora ablate --ks abc` said only "invalid literal for int() with base 10: 'abc'"."""
    with pytest.raises(ValueError, match=r"--ks '2,abc': every comma-separated value must be a int"):
        grid_rows(AblationArguments(ks="2,abc"), BASE)
    with pytest.raises(ValueError, match=r"--warmup_fractions 'x'"):
        grid_rows(AblationArguments(warmup_fractions="x"), BASE)
