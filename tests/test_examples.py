"""The shipped recipes parse, and the examples run end to end (offline default, tiny steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from hellora_trl.sft import parse_args

from testing_utils import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_recipes_parse_with_paper_hyperparameters(config):
    script_args, training_args, model_args = parse_args(["--config", str(config), "--bf16", "false"])
    assert (model_args.lora_r, model_args.lora_alpha) == (32, 64)
    assert training_args.hellora_warmup_fraction == 0.1
    effective = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    assert effective == 128
    expected = {"gsm8k": (4e-4, 3), "codealpaca": (2e-3, 2), "saferpaca": (4e-4, 1)}[script_args.task]
    assert (training_args.learning_rate, training_args.num_train_epochs) == expected
    k = {"olmoe": 8, "mixtral": 2, "deepseek": 12}[config.name.split("_")[0]]
    assert training_args.hellora_k == k


def test_offline_default_applies_only_without_model_and_data(tmp_path):
    script_args, training_args, model_args = parse_args(["--output_dir", str(tmp_path)])
    assert model_args.model_name_or_path is None and model_args.lora_r == 8  # offline tiny-model default
    assert training_args.output_dir == str(tmp_path)  # what the user gave wins
    _, _, model_args = parse_args(["--model_name_or_path", "some/model", "--dataset_name", "x.json"])
    assert model_args.lora_r == 32  # the paper's default for real models


def run_example(name: str, *args: str, timeout: int = 900) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(ROOT / "examples" / name), *args]
    result = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def test_gsm8k_example_offline_default_end_to_end(tmp_path):
    out = tmp_path / "gsm8k"
    run_example(
        "sft_gsm8k.py", "--output_dir", str(out), "--max_steps", "3", "--train_limit", "48", "--eval_limit", "4",
        "--eval_max_new_tokens", "8", "--disable_tqdm", "true",
    )
    summary = json.loads((out / "hellora_summary.json").read_text())
    assert summary["arithmetic/total"] == 4 and 0 <= summary["arithmetic/accuracy"] <= 1
    assert not any(key.startswith("gsm8k/") for key in summary)  # the lab task is not GSM8K
    # no model given: the lab model, with base vs adapted numbers and the routing concentration in the summary
    for key in ("lab/base_heldout_loss", "lab/adapted_heldout_loss", "lab/base_exact_match", "lab/adapted_exact_match",
                "lab/routing_top_k_share_layer0", "lab/routing_min_top_k_share_over_uniform"):
        assert key in summary, key
    for name in ("adapter_model.safetensors", "hellora_profile.json", "hellora_expert_heatmap.png", "eval/results.json"):
        assert (out / name).is_file(), name


@pytest.mark.slow
@pytest.mark.data
def test_codealpaca_example_on_shared_data(tmp_path):
    data = shared_dataset("code_alpaca", "code_alpaca_2k.json")
    humaneval = shared_dataset("humaneval", "HumanEval.jsonl.gz")
    run_example(
        "sft_codealpaca.py", "--dataset_name", str(data), "--output_dir", str(tmp_path), "--max_steps", "2",
        "--train_limit", "64", "--eval_limit", "2", "--eval_max_new_tokens", "8", "--eval_dataset_path",
        str(humaneval), "--max_length", "128", "--hellora_profile_mode", "forward", "--disable_tqdm", "true",
    )
    assert "humaneval/pass@1" in json.loads((tmp_path / "hellora_summary.json").read_text())


@pytest.mark.slow
@pytest.mark.data
def test_saferpaca_example_on_shared_data(tmp_path):
    data = shared_dataset("saferpaca", "safety_only_data_Instructions.json")
    harmful = shared_dataset("safety_eval", "I-MaliciousInstructions.json")
    benign = shared_dataset("safety_eval", "I-Alpaca.json")
    run_example(
        "sft_saferpaca.py", "--dataset_name", str(data), "--output_dir", str(tmp_path), "--max_steps", "2",
        "--train_limit", "64", "--eval_limit", "2", "--eval_max_new_tokens", "8", "--eval_dataset_path",
        str(harmful), "--benign_eval_path", str(benign), "--max_length", "128", "--disable_tqdm", "true",
    )
    summary = json.loads((tmp_path / "hellora_summary.json").read_text())
    assert 0 <= summary["safety/refusal_rate"] <= 1 and 0 <= summary["safety/over_refusal_rate"] <= 1


def test_gsm8k_example_resumes_from_the_command_line(tmp_path):
    out = tmp_path / "resume"
    common = ["--output_dir", str(out), "--train_limit", "48", "--eval_limit", "0", "--disable_tqdm", "true",
              "--hellora_profile_mode", "forward", "--save_strategy", "steps", "--save_steps", "2"]
    run_example("sft_gsm8k.py", *common, "--max_steps", "2")
    profile = json.loads((out / "checkpoint-2" / "hellora_profile.json").read_text())
    result = run_example("sft_gsm8k.py", *common, "--max_steps", "3", "--resume_from_checkpoint", str(out / "checkpoint-2"))
    state = json.loads((out / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3
    assert json.loads((out / "hellora_profile.json").read_text())["hot_experts"] == profile["hot_experts"]
    assert "profile_seconds" in result.stdout
