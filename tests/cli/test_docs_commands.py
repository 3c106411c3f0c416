"""The command blocks of README.md and docs/cli.md, run as written where they can run offline, and the files the
docs say they write checked (issue 23: claims that stay true).

Every ``bash`` block is split into commands (continuation lines joined, comments dropped, ``&&`` split). A command
runs here unless it names something this offline box lacks (:data:`NEEDS`, each with its reason); the test below
pins which commands that leaves, so a new offline example in the docs has to be added to a run test."""

from __future__ import annotations

import fnmatch
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from hellora_trl import cli

ROOT = Path(__file__).resolve().parents[2]
DOCS = (ROOT / "README.md", ROOT / "docs" / "cli.md")

# what a command needs that an offline CPU box does not have
NEEDS = {
    "allenai/": "a hub model (network, GPU-sized)",
    "../shared/": "the shared data sets (not in the repository)",
    "configs/olmoe_": "a GPU recipe (OLMoE-1B-7B)",
    "configs/mixtral_": "a GPU recipe (Mixtral)",
    "--num_processes 8": "8 GPUs",
    "--backend vllm": "vLLM",
    "<": "a placeholder the reader fills in",
    "pip install": "an install (network)",
    "python -m pytest": "the test suite itself",
    "outputs/olmoe_gsm8k": "the adapter of a GPU recipe run",
    "outputs/hellora-sft": "the adapter of a GPU recipe run",
    "outputs/merged": "the merged model of a GPU recipe run",
    "code.json": "a profile of a hub model",
    "gsm8k_hot.json": "a profile of a hub model",
    "DS_BUILD_OPS": "an install (network)",
}


def commands(path: Path) -> list[str]:
    """The shell commands of ``path``'s ```bash blocks, one string each."""
    found = []
    for block in re.findall(r"```bash\n(.*?)```", path.read_text(encoding="utf-8"), flags=re.S):
        joined = re.sub(r"\\\n\s*", " ", block)
        for line in joined.splitlines():
            line = re.sub(r"\s+#.*$", "", line).strip()
            if not line or line.startswith("#"):
                continue
            found.extend(part.strip() for part in line.split("&&"))
    return found


def runnable(command: str) -> bool:
    return not any(marker in command for marker in NEEDS)


def offline_commands() -> dict[str, list[str]]:
    return {path.name: [c for c in commands(path) if runnable(c)] for path in DOCS}


def test_the_offline_commands_of_the_docs_are_the_ones_run_here():
    # a new command in the docs that can run offline must be run by a test of this file
    assert offline_commands() == {
        "README.md": ["accelerate launch examples/sft_gsm8k.py"],
        "cli.md": [
            "hellora profile --tiny olmoe --limit 64 --output p.json --save_model_to tiny/",
            "hellora report --profiles p.json --tiny olmoe --limit 200 --stability_fractions 0.05 0.1 0.5 "
            "--output_dir rep/",
        ],
    }
    skipped = [c for path in DOCS for c in commands(path) if not runnable(c)]
    assert skipped and all(c.split()[0] in ("hellora", "accelerate", "pip", "python", "DS_BUILD_OPS=0") for c in skipped)


def report_outputs() -> list[str]:
    """The file patterns of docs/cli.md's `hellora report` output table (``<label>`` as a wildcard)."""
    text = (ROOT / "docs" / "cli.md").read_text(encoding="utf-8")
    section = text.split("Outputs in `--output_dir`:", 1)[1].split("\n\n", 2)[1]
    names = []
    for row in section.splitlines()[2:]:
        cell = row.split("|")[1]
        names.extend(re.findall(r"`([^`]+)`", cell))
    return [re.sub(r"<[^>]+>", "*", n) for n in names]


def test_cli_md_offline_examples_write_what_the_docs_say(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    profile_cmd, report_cmd = offline_commands()["cli.md"]
    assert cli.main(shlex.split(profile_cmd)[1:]) == 0
    assert (tmp_path / "p.json").is_file()
    for name in ("config.json", "model.safetensors", "tokenizer.json"):  # a checkpoint other commands can load
        assert (tmp_path / "tiny" / name).is_file(), name
    assert cli.main(shlex.split(report_cmd)[1:]) == 0
    written = [p.name for p in (tmp_path / "rep").iterdir()]
    patterns = report_outputs()
    assert {"heatmap_*.png", "concentration.png", "jaccard.png", "stability.png", "report.md", "report.json"} <= set(
        patterns)
    for pattern in patterns:  # (p.json plus the full-data profile: two profiles, so the Jaccard matrix is drawn)
        assert fnmatch.filter(written, pattern), (pattern, written)
    assert "full_profile.json" in written  # "The full profile is saved as `full_profile.json`"


def readme_main_job_outputs() -> tuple[str, list[str]]:
    """The output folder and files README.md's quick start says the main job writes."""
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    paragraph = text.split("writes to `", 1)[1].split("The second command", 1)[0]
    folder = paragraph.split("`", 1)[0]
    files = []
    for name in re.findall(r"`([^`]+\.[a-z]+|[^`]+\.\{[^}]+\})`", paragraph):
        if "{" in name:
            stem, alternatives = re.match(r"(.*)\{([^}]+)\}", name).groups()
            files.extend(stem + alt for alt in alternatives.split(","))
        else:
            files.append(name)
    return folder, files


@pytest.mark.slow
def test_readme_main_job_writes_what_the_readme_says(tmp_path):
    # the quick start's `accelerate launch examples/sft_gsm8k.py`, on the tiny lab recipe (conftest) with few steps
    (command,) = offline_commands()["README.md"]
    folder, files = readme_main_job_outputs()
    assert folder == "outputs/sft_gsm8k_offline/" and "hellora_summary.json" in files and "eval/results.md" in files
    (tmp_path / "examples").symlink_to(ROOT / "examples")
    launcher, script_and_args = shlex.split(command)[:2], shlex.split(command)[2:]
    assert launcher == ["accelerate", "launch"]
    argv = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "1", *script_and_args,
            "--max_steps", "3", "--train_limit", "48", "--eval_limit", "4", "--eval_max_new_tokens", "8",
            "--disable_tqdm", "true"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    result = subprocess.run(argv, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-3000:]
    out = tmp_path / folder
    assert (out / "adapter_model.safetensors").is_file() and (out / "adapter_config.json").is_file()  # PEFT layout
    for name in files:
        assert (out / name).is_file(), name


# ------------------------------------------------------------------------------------------------ --help
@pytest.mark.parametrize("name", sorted(cli.COMMANDS))
def test_help_is_generated_from_the_parser_fields(name, monkeypatch, capsys):
    # every option of every argument dataclass the command's parser uses is in its --help with the field's own help
    # text and choices (no hand-written copy to drift: the --tiny family list used to be one, and missed two)
    import argparse
    import dataclasses

    seen: list[type] = []
    format_help = argparse.ArgumentParser.format_help

    def recording(parser):
        seen.extend(getattr(parser, "dataclass_types", []))
        return format_help(parser)

    monkeypatch.setattr(argparse.ArgumentParser, "format_help", recording)
    try:
        code = cli.main([name, "--help"])
    except SystemExit as stop:
        code = stop.code
    assert code == 0
    squashed = re.sub(r"\s+", "", capsys.readouterr().out)  # argparse wraps (and splits hyphenated words)
    assert seen, "the help was not printed by a dataclass parser"
    for dtype in seen:
        for f in dataclasses.fields(dtype):
            if not f.init:
                continue
            assert f"--{f.name}" in squashed, (dtype.__name__, f.name)
            if f.metadata.get("help"):
                text = f.metadata["help"].replace("%%", "%")  # argparse's escape of a literal %
                assert re.sub(r"\s+", "", text) in squashed, (dtype.__name__, f.name)
            if f.metadata.get("choices"):
                assert "{" + ",".join(map(str, f.metadata["choices"])) + "}" in squashed, (dtype.__name__, f.name)


def test_tiny_choices_are_the_families_the_tiny_models_exist_for(capsys):
    from hellora_trl.cli.arguments import ModelArguments
    from hellora_trl.recipes.offline import MOE_FAMILIES, tiny_moe_config

    import dataclasses

    tiny = {f.name: f for f in dataclasses.fields(ModelArguments)}["tiny"]
    assert tuple(tiny.metadata["choices"]) == MOE_FAMILIES
    for family in MOE_FAMILIES:
        tiny_moe_config(family)  # every choice builds
    assert cli.main(["select", "--profile", "p.json", "--tiny", "olmoe2"]) == 1
    assert "argument --tiny: invalid choice: 'olmoe2'" in capsys.readouterr().err
