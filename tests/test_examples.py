"""The shipped recipes parse, and the examples run end to end (offline default, tiny steps)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from hellora_trl.recipes.sft import accumulation_steps, apply_effective_batch
from hellora_trl.recipes.sft import parse_args

from testing_utils import shared_dataset

ROOT = Path(__file__).resolve().parents[1]
# the SFT recipes; the DPO/GRPO ones (olmoe_dpo.yaml, olmoe_grpo.yaml) are parsed by tests/recipes/test_rl_recipe.py
CONFIGS = sorted(p for p in (ROOT / "configs").glob("*.yaml") if not p.stem.endswith(("_dpo", "_grpo")))


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.name)
def test_recipes_parse_with_paper_hyperparameters(config):
    script_args, training_args, model_args = parse_args(["--config", str(config), "--bf16", "false"])
    assert (model_args.lora_r, model_args.lora_alpha) == (32, 64)
    assert training_args.hellora_warmup_fraction == 0.1
    assert script_args.effective_batch_size == 128  # declared, and derived for this 1-process run:
    effective = training_args.per_device_train_batch_size * training_args.gradient_accumulation_steps
    assert effective == 128
    expected = {"gsm8k": (4e-4, 3), "codealpaca": (2e-3, 2), "saferpaca": (4e-4, 1)}[script_args.task]
    assert (training_args.learning_rate, training_args.num_train_epochs) == expected
    k = {"olmoe": 8, "mixtral": 2, "deepseek": 12}[config.name.split("_")[0]]
    assert training_args.hellora_k == k


@pytest.mark.parametrize("processes, steps", [(1, 16), (2, 8), (4, 4), (8, 2), (16, 1)])
def test_effective_batch_128_by_arithmetic(processes, steps):
    assert accumulation_steps(128, 8, processes) == steps
    assert 8 * processes * steps == 128


@pytest.mark.parametrize("per_device, processes", [(8, 3), (8, 32), (6, 1), (16, 16)])
def test_an_unreachable_effective_batch_is_refused(per_device, processes):
    with pytest.raises(ValueError, match=f"effective batch 128 cannot be reached .* {processes} processes"):
        accumulation_steps(128, per_device, processes)


@pytest.mark.parametrize("rank", [0, 1])
def test_apply_effective_batch_on_8_processes_logs_on_the_main_process_only(rank, capsys):
    args = SimpleNamespace(per_device_train_batch_size=8, world_size=8, process_index=rank,
                           gradient_accumulation_steps=1)
    apply_effective_batch(128, args)
    assert args.gradient_accumulation_steps == 2
    out = capsys.readouterr().out
    expected = "effective batch 128 = 8 per device x 8 processes x 2 gradient accumulation steps\n"
    assert out == (expected if rank == 0 else "")


def test_apply_effective_batch_refuses_a_contradicting_accumulation():
    args = SimpleNamespace(per_device_train_batch_size=8, world_size=8, process_index=0, gradient_accumulation_steps=16)
    with pytest.raises(ValueError, match="gradient_accumulation_steps 16 contradicts effective_batch_size 128"):
        apply_effective_batch(128, args)
    args.gradient_accumulation_steps = 2  # the value it derives is accepted (README's old DDP command)
    apply_effective_batch(128, args)
    unset = SimpleNamespace(gradient_accumulation_steps=5)
    apply_effective_batch(None, unset)
    assert unset.gradient_accumulation_steps == 5


@pytest.mark.slow
def test_effective_batch_under_accelerate_launch_on_2_processes(tmp_path):
    # the recipe YAML on 2 CPU processes (the shipped DDP config): every rank accumulates 8 steps (8 x 2 x 8 = 128),
    # and only the main process logs it (each rank reports through its own JSON file, not through stdout)
    from distributed_harness import launch_command, run

    worker = Path(__file__).resolve().parent / "distributed" / "effective_batch_worker.py"
    output, _ = run(launch_command("ddp.yaml", worker, [str(ROOT / "configs" / "olmoe_gsm8k.yaml"), str(tmp_path)]),
                    timeout=300)
    records = [json.loads((tmp_path / f"rank{i}.json").read_text()) for i in range(2)]
    for i, record in enumerate(records):
        assert record == {"process_index": i, "world_size": 2, "per_device_train_batch_size": 8,
                          "gradient_accumulation_steps": 8, "effective_batch_size": 128}
    assert output.count("effective batch 128 = 8 per device x 2 processes x 8 gradient accumulation steps") == 1
    assert output.count("effective batch") == 1


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
