"""The `hellora` command line, run in-process on the offline tiny OLMoE (`--tiny olmoe`), plus one real subprocess."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
import yaml
from PIL import Image

from hellora_trl import ExpertProfile, apply_hellora, default_lora_config, find_moe_layers, load_hellora, select_hot_experts
from hellora_trl import cli

HOT = [0, 3]


def tiny_base():
    """The model `--tiny olmoe` builds (seed 42); not the lab model `hellora train` fine-tunes offline."""
    from hellora_trl.recipes.offline import tiny_moe_model
    from hellora_trl.recipes.models import OFFLINE_MODEL

    return tiny_moe_model("olmoe", seed=42, **OFFLINE_MODEL)


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    """A saved HELLoRA adapter with non-zero factors (so merging changes the model) on the `--tiny olmoe` base."""
    model = tiny_base()
    peft_model = apply_hellora(model, {layer.name: HOT for layer in find_moe_layers(model)},
                               default_lora_config(r=4, lora_alpha=8))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """`hellora profile --tiny olmoe` on 24 generated arithmetic rows, model saved beside it."""
    root = tmp_path_factory.mktemp("profile")
    argv = ["profile", "--tiny", "olmoe", "--limit", "24", "--batch_size", "8", "--max_length", "96",
            "--output", str(root / "p.json"), "--save_model_to", str(root / "model"), "--disable_tqdm"]
    assert cli.main(argv) == 0
    return root


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------ help
def test_console_script_help_in_a_subprocess():
    command = [shutil.which("hellora")] if shutil.which("hellora") else [sys.executable, "-m", "hellora_trl.cli"]
    result = subprocess.run(command + ["--help"], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    for name in cli.COMMANDS:
        assert name in result.stdout


@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_every_subcommand_has_help(name, capsys):
    try:
        code = cli.main([name, "--help"])
    except SystemExit as stop:
        code = stop.code
    out = capsys.readouterr().out
    assert code == 0 and f"hellora {name}" in out
    if name == "train":
        assert "--hellora_k" in out and "--per_device_train_batch_size" in out
    if name in ("profile", "select", "eval", "report", "merge", "export"):
        assert "--config x.yaml" in " ".join(out.split())


def test_unknown_command_exits_with_usage(capsys):
    with pytest.raises(SystemExit) as stop:
        cli.main(["frobnicate"])
    assert stop.value.code == 2 and "invalid choice" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ profile / select
def test_profile_writes_a_profile_of_the_model(profiled):
    profile = ExpertProfile.load(profiled / "p.json")
    assert (profile.num_layers, profile.num_experts) == (4, 16)
    assert profile.tokens_seen > 24 * 10
    assert (profile.counts.sum(dim=1) == profile.tokens_seen * profile.experts_per_token).all()
    assert profile.source["task"] == "gsm8k" and profile.source["rows"] == 24 and profile.source["model"].startswith("tiny:")
    assert profile.source["dataset"] == "offline:lab_arithmetic" and profile.source["max_length"] == 96
    assert (profiled / "model" / "config.json").is_file() and (profiled / "model" / "tokenizer.json").is_file()


def test_profile_reads_yaml_config_and_cli_wins(profiled, tmp_path, capsys):
    config = tmp_path / "profile.yaml"
    config.write_text(yaml.safe_dump({"model_name_or_path": str(profiled / "model"), "limit": 24, "fraction": 0.5,
                                      "output": str(tmp_path / "from_yaml.json"), "disable_tqdm": True, "max_length": 96}))
    code, out, _ = run(["profile", "--config", config, "--seed", 7], capsys)
    assert code == 0 and "Wrote" in out
    profile = ExpertProfile.load(tmp_path / "from_yaml.json")
    assert profile.source["rows"] == 12 and profile.source["seed"] == 7 and profile.source["fraction"] == 0.5


@pytest.mark.parametrize("chat_format", [False, True], ids=["prompt_completion", "messages"])
def test_profile_slice_has_the_trainers_warmup_tokens(profiled, tmp_path, monkeypatch, chat_format):
    """Issue 18 item 5: `hellora profile --fraction f` routes the token ids of the trainer's warm-up slice (TRL's
    preparation: EOS or chat template, truncation at max_length), not a hand-rendered text of the same rows."""
    import hellora_trl.profiling as profiling
    from hellora_trl.recipes.sft import build_trainer, parse_args

    seen = []
    real = profiling.profile_experts

    def recording(model, rows, **kwargs):
        seen.append(rows)
        return real(model, rows, **kwargs)

    monkeypatch.setattr(profiling, "profile_experts", recording)
    model_dir = str(profiled / "model")
    chat = ["--chat_format", "true"] if chat_format else []
    assert cli.main(["profile", "--model_name_or_path", model_dir, "--limit", "40", "--fraction", "0.25",
                     "--seed", "7", "--max_length", "40", "--output", str(tmp_path / "p.json"), "--disable_tqdm",
                     *chat]) == 0
    script_args, training_args, model_args = parse_args([
        "--model_name_or_path", model_dir, "--train_limit", "40", "--hellora_warmup_fraction", "0.25",
        "--seed", "7", "--max_length", "40", "--output_dir", str(tmp_path / "run"), "--report_to", "none",
        "--eval_limit", "0", *chat])
    trainer, tokenizer, _ = build_trainer(script_args, training_args, model_args)
    warmup = profiling.warmup_slice(trainer.train_dataset, 0.25, 7)
    (rows,) = seen
    assert len(rows) == len(warmup) == 10
    assert [list(ids) for ids in rows["input_ids"]] == [list(ids) for ids in warmup["input_ids"]]
    assert max(len(ids) for ids in rows["input_ids"]) <= 40  # the trainer's truncation
    if not chat_format:  # prompt-completion rows end with EOS, as the trainer appends it
        assert all(ids[-1] == tokenizer.eos_token_id for ids in rows["input_ids"] if len(ids) < 40)


def test_profile_max_length_defaults_to_the_trainers(tmp_path):
    """Without --max_length the profile truncates where `hellora train` (given a model) does, not at its own 512."""
    from hellora_trl.cli.arguments import DataArguments
    from hellora_trl.cli.loading import max_length_of
    from hellora_trl.recipes.sft import parse_args

    _, training_args, _ = parse_args(["--model_name_or_path", "some/model", "--output_dir", str(tmp_path)])
    assert max_length_of(DataArguments()) == training_args.max_length
    assert max_length_of(DataArguments(max_length=64)) == 64


def test_select_writes_hot_map_and_prints_table(profiled, tmp_path, capsys):
    out_path = tmp_path / "hot.json"
    code, out, _ = run(["select", "--profile", profiled / "p.json", "--k", 3, "--output", out_path,
                        "--model_name_or_path", profiled / "model"], capsys)
    assert code == 0
    data = json.loads(out_path.read_text())
    expected = select_hot_experts(ExpertProfile.load(profiled / "p.json"), 3)
    assert data["hot_experts"] == expected and data["selection"]["k"] == 3
    assert ExpertProfile.load(out_path).counts.equal(ExpertProfile.load(profiled / "p.json").counts)
    first = expected["model.layers.0.mlp.experts"]
    assert "L0         3" in out and ", ".join(map(str, first)) in out


def test_select_rejects_a_profile_of_another_model(profiled, capsys):
    code, _, err = run(["select", "--profile", profiled / "p.json", "--tiny", "mixtral"], capsys)
    assert code == 1 and "does not match the model" in err


@pytest.mark.parametrize("argv, says", [
    (["select", "--profile", "p.json", "--strategy", "foo"], "argument --strategy: invalid choice: 'foo'"),
    (["select", "--profile", "p.json", "--k", "abc"], "argument --k"),
    (["profile", "--tiny", "olmoe", "--limit"], "argument --limit: expected one argument"),
    (["pretrain", "--steps", "many"], "argument --steps"),
    (["train", "--hellora_k", "x"], "argument --hellora_k"),
])
def test_option_errors_are_one_line_with_status_1(argv, says, capsys):
    # argparse used to print the whole usage block and exit with status 2 (docs/cli.md promises one line, status 1)
    code, _, err = run(argv, capsys)
    assert code == 1, err
    assert err.strip().splitlines() == [err.strip()] and says in err and "usage:" not in err
    assert err.startswith(f"hellora {argv[0]}: error: ") and f"see `hellora {argv[0]} --help`" in err


def test_option_errors_restore_argparse(capsys):
    import argparse

    before = argparse.ArgumentParser.error
    run(["select", "--strategy", "foo"], capsys)
    assert argparse.ArgumentParser.error is before


def test_pretrain_reads_config_like_every_command(tmp_path, capsys):
    # `hellora pretrain --config` used to be refused ("arguments are not used by the HfArgumentParser")
    config = tmp_path / "pre.yaml"
    config.write_text("recipe: no_such_recipe\n")
    code, _, err = run(["pretrain", "--config", config], capsys)
    assert code == 1 and "unknown lab recipe 'no_such_recipe'" in err
    code, _, err = run(["pretrain", "--config", config, "--recipe", "also_unknown"], capsys)  # the command line wins
    assert code == 1 and "'also_unknown'" in err


def test_adapter_of_another_shape_is_one_line(tmp_path, capsys):
    # the main job's adapter on `--tiny olmoe` used to end in a multi-line "size mismatch" traceback
    from hellora_trl.recipes.offline import tiny_moe_model
    from hellora_trl.recipes.models import OFFLINE_MODEL

    model = tiny_moe_model("olmoe", seed=42, **{**OFFLINE_MODEL, "intermediate_size": 32})
    peft_model = apply_hellora(model, {layer.name: HOT for layer in find_moe_layers(model)},
                               default_lora_config(r=4, lora_alpha=8))
    peft_model.save_pretrained(tmp_path / "adapter")
    capsys.readouterr()  # the save's progress bar
    code, _, err = run(["merge", "--adapter", tmp_path / "adapter", "--tiny", "olmoe", "--output_dir",
                        tmp_path / "merged"], capsys)
    errors = [line for line in err.splitlines() if "error" in line.lower()]  # (progress bars aside)
    assert code == 1 and len(errors) == 1 and "Traceback" not in err and "size mismatch for" not in err.replace(
        errors[0], "")
    assert "does not fit this base model (size mismatch" in err and "--model_name_or_path" in err


def test_missing_inputs_fail_early_with_one_line(tmp_path, capsys):
    code, _, err = run(["select", "--profile", tmp_path / "nope.json"], capsys)
    assert code == 1 and "not found" in err and "Traceback" not in err
    code, _, err = run(["eval", "--adapter", tmp_path, "--tiny", "olmoe"], capsys)
    assert code == 1 and "adapter_config.json" in err
    code, _, err = run(["eval", "--task", "humaneval", "--tiny", "olmoe"], capsys)
    assert code == 1 and "--dataset_name is required" in err
    code, _, err = run(["profile", "--tiny", "olmoe", "--dataset_name", tmp_path / "missing.jsonl"], capsys)
    assert code == 1 and "not found" in err
    code, _, err = run(["profile", "--dataset_name", "x.jsonl"], capsys)
    assert code == 1 and "--tiny olmoe" in err


# ------------------------------------------------------------------------------------------------ eval
def test_eval_gsm8k_on_adapter(adapter_dir, tmp_path, capsys):
    code, out, _ = run(["eval", "--adapter", adapter_dir, "--tiny", "olmoe", "--limit", 2, "--max_new_tokens", 4,
                        "--output_dir", tmp_path, "--disable_tqdm"], capsys)
    assert code == 0 and "arithmetic:" in out  # no dataset: the lab's held-out arithmetic rows, named for what they are
    results = json.loads((tmp_path / "results.json").read_text())
    assert "gsm8k" not in results
    assert results["arithmetic"]["total"] == 2 and len(results["arithmetic"]["records"]) == 2
    assert results["run"]["adapter"] == str(adapter_dir)
    assert "| arithmetic.accuracy |" in (tmp_path / "results.md").read_text()


def test_eval_without_a_dataset_scores_exactly_what_train_held_out(tmp_path):
    """Issue 18: `hellora eval` without a dataset scored generate_math_problems(seed + 10000), other problems than
    the arithmetic rows `hellora train` holds out, although its --help said they were the same."""
    from hellora_trl.cli.commands.eval import EvalArguments, gsm8k_rows
    from hellora_trl.recipes.sft import load_task_data, parse_args

    script_args, training_args, _ = parse_args(["--output_dir", str(tmp_path / "a")])  # the offline default run
    _, held_out = load_task_data(script_args, seed=training_args.seed)
    assert len(held_out) == script_args.eval_limit and gsm8k_rows(EvalArguments()) == held_out
    script_args, training_args, _ = parse_args(["--output_dir", str(tmp_path / "b"), "--seed", "5", "--train_limit",
                                                "100", "--eval_limit", "8"])
    _, held_out = load_task_data(script_args, seed=training_args.seed)
    assert gsm8k_rows(EvalArguments(seed=5, train_limit=100, limit=8)) == held_out


def test_eval_humaneval_and_safety(tmp_path, capsys):
    problem = {"task_id": "t/0", "prompt": "def double(x):\n", "entry_point": "double",
               "canonical_solution": "    return 2 * x\n", "test": "def check(f):\n    assert f(2) == 4\n"}
    (tmp_path / "he.jsonl").write_text(json.dumps(problem) + "\n")
    code, _, _ = run(["eval", "--task", "humaneval", "--dataset_name", tmp_path / "he.jsonl", "--tiny", "olmoe",
                      "--max_new_tokens", 4, "--output_dir", tmp_path / "he", "--disable_tqdm"], capsys)
    assert code == 0
    results = json.loads((tmp_path / "he" / "results.json").read_text())["humaneval"]
    assert results["n_tasks"] == 1 and results["pass@1"] in (0.0, 1.0)
    (tmp_path / "harm.json").write_text(json.dumps({"instructions": ["a", "b"], "inputs": []}))
    (tmp_path / "ok.json").write_text(json.dumps(["c"]))
    code, _, _ = run(["eval", "--task", "safety", "--dataset_name", tmp_path / "harm.json", "--benign_path",
                      tmp_path / "ok.json", "--tiny", "olmoe", "--max_new_tokens", 4, "--output_dir", tmp_path / "s",
                      "--disable_tqdm"], capsys)
    safety = json.loads((tmp_path / "s" / "results.json").read_text())["safety"]
    assert code == 0 and (safety["n_harmful"], safety["n_benign"]) == (2, 1)


def test_eval_vllm_backend_errors_clearly(tmp_path, adapter_dir, capsys):
    code, _, err = run(["eval", "--backend", "vllm", "--adapter", adapter_dir, "--tiny", "olmoe"], capsys)
    assert code == 1 and "hellora merge" in err


def test_eval_vllm_missing_is_reported(tmp_path, capsys):
    try:
        import vllm  # noqa: F401

        pytest.skip("vLLM is installed")
    except ImportError:
        pass
    code, _, err = run(["eval", "--backend", "vllm", "--model_name_or_path", tmp_path], capsys)
    assert code == 1 and "vLLM" in err


# ------------------------------------------------------------------------------------------------ merge / export
def logits(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits


def test_merge_writes_a_plain_checkpoint_equal_to_base_plus_adapter(adapter_dir, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    code, _, err = run(["merge", "--adapter", adapter_dir, "--tiny", "olmoe", "--output_dir", out], capsys)
    assert code == 0, err
    ids = torch.randint(3, 500, (2, 12), generator=torch.Generator().manual_seed(0))
    merged = AutoModelForCausalLM.from_pretrained(out).eval()
    expected = logits(load_hellora(tiny_base(), adapter_dir), ids)
    torch.testing.assert_close(logits(merged, ids), expected, rtol=0, atol=1e-4)
    assert (expected - logits(tiny_base().eval(), ids)).abs().max() > 1e-3
    assert (out / "tokenizer.json").is_file()
    code, _, err = run(["merge", "--adapter", adapter_dir, "--tiny", "olmoe", "--output_dir", out], capsys)
    assert code == 1 and "--overwrite" in err


def test_export_peft_layout(adapter_dir, tmp_path, capsys):
    out = tmp_path / "peft"
    code, _, err = run(["export", "--format", "peft", "--adapter", adapter_dir, "--tiny", "olmoe", "--output_dir", out],
                       capsys)
    assert code == 0, err
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["target_parameters"] and (out / "adapter_model.safetensors").is_file()


# ------------------------------------------------------------------------------------------------ report
def image_size(path):
    return Image.open(path).size


def test_report_from_profiles(profiled, tmp_path, capsys):
    sel = tmp_path / "sel.json"
    assert cli.main(["select", "--profile", str(profiled / "p.json"), "--k", "3", "--output", str(sel)]) == 0
    out = tmp_path / "report"
    code, _, err = run(["report", "--profiles", f"math={profiled / 'p.json'}", f"picked={sel}", "--output_dir", out],
                       capsys)
    assert code == 0, err
    assert image_size(out / "heatmap_math.png") == (600, 300)
    assert image_size(out / "heatmap_picked.png") == (600, 300)
    assert image_size(out / "concentration.png") == (700, 400)
    assert image_size(out / "jaccard.png")[0] > 400
    markdown = (out / "report.md").read_text()
    assert "stored hot map (k=3)" in markdown and "| math | olmoe | 4 | 16 |" in markdown


def test_report_stability_from_a_model(tmp_path, capsys):
    out = tmp_path / "report"
    code, _, err = run(["report", "--tiny", "olmoe", "--limit", 20, "--max_length", 64, "--stability_fractions", 0.1,
                        0.5, 1.0, "--stability_seeds", 2, "--output_dir", out, "--disable_tqdm"], capsys)
    assert code == 0, err
    assert image_size(out / "stability.png") == (600, 350)
    assert image_size(out / "heatmap_full_data.png") == (600, 300)
    summary = json.loads((out / "report.json").read_text())
    rows = summary["stability"]["rows"]
    assert [r["fraction"] for r in rows] == [0.1, 0.5, 1.0] and rows[0]["rows"] == 2
    assert rows[-1]["jaccard"] == 1.0 and rows[-1]["coverage"] == pytest.approx(summary["stability"]["ceiling"])
    assert ExpertProfile.load(out / "full_profile.json").source["rows"] == 20
    assert "paper Table 10" in (out / "report.md").read_text()


def test_report_stability_from_labelled_profiles(profiled, tmp_path, capsys):
    half = tmp_path / "half.json"
    assert cli.main(["profile", "--model_name_or_path", str(profiled / "model"), "--limit", "24", "--fraction", "0.5",
                     "--max_length", "96", "--output", str(half), "--disable_tqdm"]) == 0
    code, _, err = run(["report", "--stability_profiles", half, "--reference_profile", profiled / "p.json",
                        "--output_dir", tmp_path / "r"], capsys)
    assert code == 0, err
    rows = json.loads((tmp_path / "r" / "report.json").read_text())["stability"]["rows"]
    assert [r["fraction"] for r in rows] == [0.5]
    assert (tmp_path / "r" / "stability.png").is_file()


def test_report_rejects_profile_of_another_model(profiled, tmp_path, capsys):
    code, _, err = run(["report", "--profiles", profiled / "p.json", "--tiny", "mixtral", "--limit", 4,
                        "--output_dir", tmp_path], capsys)
    assert code == 1 and "does not match the model" in err


# ------------------------------------------------------------------------------------------------ train / ablate
def test_train_hands_every_argument_to_the_sft_recipe(monkeypatch):
    seen = {}
    monkeypatch.setattr("hellora_trl.recipes.sft.main", lambda argv, **kwargs: seen.update(argv=argv, **kwargs))
    argv = ["--config", "x.yaml", "--hellora_k", "4", "--learning_rate", "1e-4"]
    assert cli.main(["train", *argv]) == 0
    assert seen["argv"] == argv
    assert seen["prog"] == "hellora train"  # names the parser (help, errors) without touching sys.argv


def test_ablate_delegates_to_the_ablation_module(monkeypatch):
    seen = {}
    monkeypatch.setattr("hellora_trl.recipes.ablation.main", lambda argv, prog=None: seen.update(argv=argv, prog=prog))
    assert cli.main(["ablate", "--ks", "2,4"]) == 0 and seen == {"argv": ["--ks", "2,4"], "prog": "hellora ablate"}


def test_ablate_reports_a_failed_import_in_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "hellora_trl.recipes.ablation", None)  # import now fails
    assert cli.main(["ablate", "--anything"]) == 1
    err = capsys.readouterr().err
    assert "hellora_trl.recipes.ablation" in err and "Traceback" not in err


def test_router_imports_no_torch_and_no_command_module():
    code = ("import sys; from hellora_trl import cli; from hellora_trl.cli.main import top_parser; top_parser(); "
            "heavy = [m for m in sys.modules if m == 'torch' or m.startswith('hellora_trl.cli.commands.')]; "
            "print(heavy)")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


@pytest.mark.slow
def test_train_then_eval_merge_and_report_end_to_end(tmp_path, capsys):
    """The offline recipe for real (a couple of steps), then every downstream command on its outputs."""
    run_dir = tmp_path / "run"
    code, _, err = run(["train", "--output_dir", run_dir, "--train_limit", 16, "--max_steps", 2, "--eval_limit", 0,
                        "--hellora_profile_mode", "forward", "--per_device_train_batch_size", 4, "--max_length", 64,
                        "--disable_tqdm", "true", "--hellora_plots", "false"], capsys)
    assert code == 0, err
    assert (run_dir / "adapter_config.json").is_file() and (run_dir / "hellora_profile.json").is_file()
    from hellora_trl.recipes.lab import lab_model_path

    base = str(lab_model_path(os.environ["HELLORA_LAB_RECIPE"]))  # `hellora train` with no model: the lab model
    code, _, err = run(["eval", "--adapter", run_dir, "--model_name_or_path", base, "--limit", 2, "--max_new_tokens", 4,
                        "--train_limit", 16, "--output_dir", tmp_path / "eval", "--disable_tqdm"], capsys)
    assert code == 0, err
    scored = json.loads((tmp_path / "eval" / "results.json").read_text())["arithmetic"]["records"]
    from hellora_trl.recipes.eval import held_out_arithmetic

    assert [r["question"] for r in scored] == [r["question"] for r in held_out_arithmetic(2, 42, train_rows=16)]
    code, _, err = run(["merge", "--adapter", run_dir, "--model_name_or_path", base, "--output_dir", tmp_path / "merged"],
                       capsys)
    assert code == 0, err
    code, _, err = run(["eval", "--model_name_or_path", tmp_path / "merged", "--limit", 2, "--max_new_tokens", 4,
                        "--output_dir", tmp_path / "eval_merged", "--disable_tqdm"], capsys)
    assert code == 0, err
    code, _, err = run(["report", "--profiles", f"trained={run_dir / 'hellora_profile.json'}",
                        "--output_dir", tmp_path / "report"], capsys)
    assert code == 0, err
    assert "stored hot map" in (tmp_path / "report" / "report.md").read_text()


def test_os_errors_and_broken_yaml_are_one_line_errors(tmp_path, capsys):
    """Review 5.19 / 7.16: an output path that is a folder, and a --config YAML that does not parse, printed
    tracebacks."""
    (tmp_path / "dir.json").mkdir()
    assert cli.main(["profile", "--tiny", "olmoe", "--limit", "4", "--disable_tqdm", "true",
                     "--output", str(tmp_path / "dir.json")]) == 1
    err = capsys.readouterr().err
    assert "hellora profile: error:" in err and "Traceback" not in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("k: [unclosed\n")
    assert cli.main(["select", "--config", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "does not parse" in err and "Traceback" not in err


@pytest.mark.parametrize("flag", ["--limit", "--max_length", "--batch_size"])
def test_zero_sizes_are_refused_instead_of_meaning_no_limit(tmp_path, capsys, flag):
    """Review 4.22/4.23: --limit 0 profiled every row; --max_length 0 ended in 'empty dataset'."""
    assert cli.main(["profile", "--tiny", "olmoe", flag, "0", "--output", str(tmp_path / "p.json")]) == 1
    err = capsys.readouterr().err
    assert f"{flag} must be at least 1" in err and not (tmp_path / "p.json").exists()


def test_a_missing_or_file_model_path_is_named(tmp_path, capsys):
    """Review 7.13/7.14: a local path that does not exist (or is a file) gave the hub's 'Repo id must be...'."""
    (tmp_path / "model.bin").write_text("")
    for path, what in ((tmp_path / "nope", "does not exist"), (tmp_path / "model.bin", "is a file")):
        assert cli.main(["profile", "--model_name_or_path", str(path), "--output", str(tmp_path / "p.json")]) == 1
        assert what in capsys.readouterr().err
