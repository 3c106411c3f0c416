"""The DPO/GRPO recipe (hellora_trl.recipes.rl), `hellora dpo` / `hellora grpo` argument parsing and the GPU YAMLs
(issue 21 items 4-5); no model is loaded here."""

from __future__ import annotations

from pathlib import Path

import pytest

from hellora_trl.recipes.eval.gsm8k import extract_gsm8k_answer
from hellora_trl.recipes.lab.corpus import arithmetic_splits
from hellora_trl.recipes.rl import (
    FORMAT_WEIGHT,
    OFFLINE_DEFAULTS,
    answer_reward,
    dpo_rows,
    format_reward,
    grpo_rows,
    parse_args,
    wrong_answer,
)
from hellora_trl.rl_trainers import HELLoRADPOConfig, HELLoRAGRPOConfig

CONFIGS = Path(__file__).resolve().parents[2] / "configs"


def test_rewards_score_exact_match_and_format():
    gold = ["14-5 = <<14-5=9>>9\n#### 9", "#### 16"]
    completions = [" 14-5 = 9\n#### 9", " 13+3 = 15\n#### 15"]
    assert answer_reward(completions, answer=gold) == [1.0, 0.0]
    assert format_reward(completions) == [FORMAT_WEIGHT, FORMAT_WEIGHT]
    assert format_reward(["no marker 9", "#### none"]) == [0.0, 0.0]
    conversational = [[{"role": "assistant", "content": "#### 9"}]]
    assert answer_reward(conversational, answer=["9"]) == [1.0]


def test_wrong_answer_changes_the_final_number_consistently():
    bad = wrong_answer("14-5 = <<14-5=9>>9\n#### 9", offset=2)
    assert extract_gsm8k_answer(bad) == "11"
    assert "<<14-5=11>>11" in bad


def test_pairs_and_prompts_use_the_sft_prompt_and_differ_in_the_answer():
    train, held = arithmetic_splits(6, 3, seed=0)
    pairs = dpo_rows(train)
    assert pairs.column_names == ["prompt", "chosen", "rejected"]
    for row, source in zip(pairs, train):
        assert row["prompt"].startswith("Question: ") and row["prompt"].endswith("\nAnswer:")
        assert extract_gsm8k_answer(row["chosen"]) == extract_gsm8k_answer(source["answer"])
        assert extract_gsm8k_answer(row["rejected"]) != extract_gsm8k_answer(source["answer"])
    prompts = grpo_rows(held)
    assert prompts.column_names == ["prompt", "answer"] and len(prompts) == 3


@pytest.mark.parametrize("kind,config_class", [("dpo", HELLoRADPOConfig), ("grpo", HELLoRAGRPOConfig)])
def test_parse_args_offline_defaults_and_cli_wins(kind, config_class, tmp_path):
    script, args, model = parse_args(kind, ["--output_dir", str(tmp_path), "--max_steps", "3", "--hellora_k", "2"])
    assert isinstance(args, config_class)
    assert model.model_name_or_path is None and script.dataset_name is None
    assert args.max_steps == 3 and args.hellora_k == 2 and args.output_dir == str(tmp_path)
    assert args.learning_rate == OFFLINE_DEFAULTS[kind]["learning_rate"] and model.lora_r == 8
    assert args.hellora_profile_mode == "forward"


def test_parse_args_reads_the_init_adapter_and_source(tmp_path):
    _, args, _ = parse_args("grpo", ["--output_dir", str(tmp_path), "--hellora_init_adapter", "outputs/sft",
                                     "--hellora_profile_source", "rollouts"])
    assert args.hellora_init_adapter == "outputs/sft" and args.hellora_profile_source == "rollouts"


@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_gpu_recipe_yaml_parses_with_cli_override(kind, tmp_path):
    script, args, model = parse_args(
        kind, ["--config", str(CONFIGS / f"olmoe_{kind}.yaml"), "--output_dir", str(tmp_path), "--seed", "3"]
    )
    assert model.model_name_or_path == "allenai/OLMoE-1B-7B-0924" and model.lora_r == 32
    assert args.seed == 3 and args.output_dir == str(tmp_path)  # the command line wins over the YAML
    assert args.hellora_profile_mode == "forward" and args.hellora_k == 8
    assert script.dataset_name is not None


def test_cli_refuses_a_bad_choice_in_one_line(capsys):
    from hellora_trl import cli

    code = cli.main(["grpo", "--hellora_profile_source", "everything"])
    assert code == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "hellora_profile_source" in err[0]
