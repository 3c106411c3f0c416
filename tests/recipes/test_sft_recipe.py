"""The SFT recipe's handling of TRL's ModelConfig flags and the generic `--task sft` (a TRL drop-in)."""

from __future__ import annotations

import json

import pytest
import torch

from hellora_trl.recipes.sft import HELLoRAScriptArguments, load_task_data, lora_config_from, parse_args, run


def parsed(tmp_path, *extra):
    return parse_args(["--output_dir", str(tmp_path / "out"), "--report_to", "none", *extra])


@pytest.mark.parametrize("flag", ["--load_in_4bit", "--load_in_8bit"])
def test_quantization_flags_are_refused_with_the_reason(tmp_path, flag):
    _, _, model_args = parsed(tmp_path, flag, "true")
    with pytest.raises(ValueError, match="fused 3-D parameters"):
        lora_config_from(model_args)


def test_lora_target_parameters_are_refused(tmp_path):
    _, _, model_args = parsed(tmp_path, "--lora_target_parameters", "mlp.experts.gate_up_proj")
    with pytest.raises(ValueError, match="places expert adapters itself"):
        lora_config_from(model_args)


@pytest.mark.parametrize("argv", [["--use_peft", "false"], ["--use_peft=False"]])
def test_use_peft_false_is_refused(tmp_path, argv):
    with pytest.raises(ValueError, match="always trains a LoRA adapter"):
        parsed(tmp_path, *argv)


def test_use_peft_false_in_the_yaml_is_refused(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("use_peft: false\nlora_r: 4\n")
    with pytest.raises(ValueError, match="always trains a LoRA adapter"):
        parsed(tmp_path, "--config", str(config))
    config.write_text("use_peft: true\nlora_r: 4\n")
    assert parsed(tmp_path, "--config", str(config))[2].lora_r == 4


def test_dora_and_modules_to_save_reach_the_lora_config(tmp_path):
    _, _, model_args = parsed(tmp_path, "--use_dora", "true", "--lora_modules_to_save", "lm_head")
    config = lora_config_from(model_args)
    assert config.use_dora is True and list(config.modules_to_save) == ["lm_head"]


def test_task_sft_passes_a_trl_format_dataset_through(tmp_path):
    rows = [{"messages": [{"role": "user", "content": f"hi {i}"}, {"role": "assistant", "content": "hello"}]}
            for i in range(5)]
    path = tmp_path / "chat.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    train, held_out = load_task_data(HELLoRAScriptArguments(task="sft", dataset_name=str(path), train_limit=3))
    assert held_out is None and len(train) == 3 and train[0]["messages"] == rows[0]["messages"]
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n")
    with pytest.raises(ValueError, match="TRL-format dataset"):
        load_task_data(HELLoRAScriptArguments(task="sft", dataset_name=str(bad)))
    with pytest.raises(ValueError, match="needs --dataset_name"):
        load_task_data(HELLoRAScriptArguments(task="sft"))


def test_task_sft_trains_with_modules_to_save_end_to_end(tmp_path):
    """`hellora train --task sft` on a prompt-completion file, with lm_head fully trained (modules_to_save)."""
    torch.set_num_threads(1)
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" {i * 2}"}) + "\n" for i in range(16)))
    script_args, training_args, model_args = parse_args([
        "--task", "sft", "--dataset_name", str(path), "--output_dir", str(tmp_path / "out"), "--max_steps", "2",
        "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none",
        "--hellora_profile_mode", "forward", "--hellora_plots", "false", "--disable_tqdm", "true",
        "--lora_modules_to_save", "lm_head",
    ])  # fmt: skip
    summary = run(script_args, training_args, model_args)
    assert "train" in summary and set(summary) == {"train"}  # no task metric for generic SFT
    from safetensors.torch import load_file

    saved = load_file(str(tmp_path / "out" / "adapter_model.safetensors"))
    assert any("lm_head" in k and "lora_" not in k for k in saved)


def test_a_run_interrupted_while_evaluating_leaves_its_folder_marked_in_progress(tmp_path, monkeypatch):
    """Review (hardening) note: the final save cleared the in-progress marker before evaluation, so a kill while
    evaluating left a new adapter beside the previous run's results, unmarked. Results now come first."""
    import hellora_trl.recipes.sft as sft
    from hellora_trl.constants import RUN_MARKER_FILE

    torch.set_num_threads(1)
    path = tmp_path / "pc.jsonl"
    path.write_text("".join(json.dumps({"prompt": f"Q{i}:", "completion": f" {i}"}) + "\n" for i in range(8)))
    args = parse_args([
        "--task", "sft", "--dataset_name", str(path), "--output_dir", str(tmp_path / "out"), "--max_steps", "1",
        "--per_device_train_batch_size", "4", "--lora_r", "2", "--lora_alpha", "4", "--report_to", "none",
        "--hellora_profile_mode", "forward", "--hellora_plots", "false", "--disable_tqdm", "true",
    ])  # fmt: skip

    def killed(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(sft, "evaluate", killed)
    with pytest.raises(KeyboardInterrupt):
        run(*args)
    out = tmp_path / "out"
    assert (out / RUN_MARKER_FILE).is_file() and not (out / "adapter_model.safetensors").exists()


def test_parsing_prints_no_deprecated_checkpointing_warning(tmp_path):
    """Issue 18 polish: the main job printed transformers' `gradient_checkpointing` FutureWarning three times (TRL's
    default and the offline defaults used the deprecated name). The offline defaults still turn it off."""
    import warnings

    from hellora_trl.config import CHECKPOINTING_FIELD

    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        _, offline, _ = parse_args(["--output_dir", str(tmp_path / "out")])
        _, hub, _ = parse_args(["--output_dir", str(tmp_path / "out"), "--model_name_or_path", "some/model"])
    assert getattr(offline, CHECKPOINTING_FIELD) is False and offline.gradient_checkpointing is False
    assert getattr(hub, CHECKPOINTING_FIELD) is True  # TRL's default for real models
