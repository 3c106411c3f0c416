"""Output paths are checked before any work (issue 19 items 1, 8, 9): ``utils.check_output_dir`` /
``check_output_file`` and the commands that use them (``pretrain``, ``merge``/``export``, ``profile``)."""

import os

import pytest
import torch

from hellora_trl import apply_hellora, cli, default_lora_config, find_moe_layers, utils
from hellora_trl.recipes import lab


def run(argv, capsys):
    code = cli.main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


# ------------------------------------------------------------------------------------------------ helpers
def test_check_output_dir_refuses_what_a_publish_could_not_replace(tmp_path, monkeypatch):
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    with pytest.raises(ValueError, match="does not exist; remove the link"):
        utils.check_output_dir(tmp_path / "dangling")
    with pytest.raises(FileExistsError, match="not a directory"):
        utils.check_output_dir(tmp_path / "afile")
    with pytest.raises(ValueError, match="afile, which is not a directory"):
        utils.check_output_dir(tmp_path / "afile" / "sub")
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "keep.txt").write_text("keep")
    monkeypatch.chdir(work / "sub")
    for target in (".", "..", str(work)):
        with pytest.raises(ValueError, match="current directory"):
            utils.check_output_dir(target, overwrite=True)
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "config.json").write_text("{}")
    with pytest.raises(FileExistsError, match="pass --overwrite_output_dir to replace it, or choose a fresh"):
        utils.check_output_dir(tmp_path / "full", flag="--overwrite_output_dir")
    assert utils.check_output_dir(tmp_path / "full", overwrite=True) == tmp_path / "full"
    assert utils.check_output_dir(work / "new") == work / "new"
    assert utils.check_output_dir(work / "sub" / "new") == work / "sub" / "new"


def test_atomic_dir_refuses_the_current_folder_before_the_body_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "keep.txt").write_text("keep")
    ran = []
    with pytest.raises(ValueError, match="current directory"):
        with utils.atomic_dir(".", overwrite=True):
            ran.append(1)
    assert ran == [] and sorted(p.name for p in tmp_path.iterdir()) == ["keep.txt"]


def test_atomic_dir_leaves_no_old_folder_when_the_swap_fails(tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "a.txt").write_text("old")
    real_replace = os.replace

    def busy(src, dst):
        if os.fspath(src) == os.fspath(out):
            raise OSError(16, "Device or resource busy")
        return real_replace(src, dst)

    monkeypatch.setattr(utils.os, "replace", busy)
    with pytest.raises(OSError, match="busy"):
        with utils.atomic_dir(out, overwrite=True) as tmp:
            (tmp / "b.txt").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no .out.old-* / .out.tmp-* litter
    assert (out / "a.txt").read_text() == "old"


def test_check_output_file(tmp_path):
    (tmp_path / "afile").write_text("x")
    os.symlink(tmp_path / "gone" / "p.json", tmp_path / "dangling.json")
    with pytest.raises(ValueError, match="is a directory; give a file path"):
        utils.check_output_file(tmp_path)
    with pytest.raises(ValueError, match="does not exist"):
        utils.check_output_file(tmp_path / "dangling.json")
    with pytest.raises(ValueError, match="not a directory"):
        utils.check_output_file(tmp_path / "afile" / "p.json")
    assert utils.check_output_file(tmp_path / "new" / "p.json") == tmp_path / "new" / "p.json"


# ------------------------------------------------------------------------------------------------ commands
def test_profile_refuses_a_directory_output_before_profiling(tmp_path, capsys, monkeypatch):
    from hellora_trl.recipes import models

    monkeypatch.setattr(models, "load_tokenizer", lambda *a, **k: pytest.fail("work started before the check"))
    code, _, err = run(["profile", "--tiny", "olmoe", "--limit", "4", "--output", tmp_path], capsys)
    assert code == 1 and "is a directory; give a file path" in err and len(err.strip().splitlines()) == 1


@pytest.fixture()
def no_build(monkeypatch):
    monkeypatch.setattr(lab, "lab_model_path", lambda *a, **k: pytest.fail("pretrain started before its checks"))


@pytest.mark.parametrize("flag,value", [("--steps", 0), ("--steps", -5), ("--threads", -1), ("--threads", 0),
                                        ("--seed", -1)])
def test_pretrain_checks_its_numbers_first(flag, value, capsys, no_build):
    code, _, err = run(["pretrain", "--recipe", "tiny", flag, value], capsys)
    assert code == 1 and f"{flag} must be a whole number" in err and len(err.strip().splitlines()) == 1


def test_pretrain_refuses_an_existing_model_folder(tmp_path, capsys, no_build):
    victim = tmp_path / "victim_model"
    victim.mkdir()
    (victim / "config.json").write_text('{"hidden_size": 64}')
    code, _, err = run(["pretrain", "--recipe", "tiny", "--output_dir", victim], capsys)
    assert code == 1 and "--overwrite_output_dir" in err and "fresh --output_dir" in err
    assert (victim / "config.json").read_text() == '{"hidden_size": 64}'


def test_pretrain_output_dir_cases_on_the_tiny_lab_model(tmp_path, capsys):
    cache = lab.lab_cache_dir()  # the session cache (conftest), shared with the other lab tests
    entry = lab.lab_model_path(lab.LAB_RECIPES["tiny"], cache_dir=cache, progress=False)
    capsys.readouterr()  # drop the build's progress output
    code, _, err = run(["pretrain", "--recipe", "tiny", "--cache_dir", cache, "--output_dir", entry,
                        "--overwrite_output_dir"], capsys)
    assert code == 1 and "is the input" in err and "'<'" not in err and len(err.strip().splitlines()) == 1
    assert (entry / "lab_card.json").is_file() and (entry / "model.safetensors").is_file()
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "notes.txt").write_text("mine")
    assert run(["pretrain", "--recipe", "tiny", "--cache_dir", cache, "--output_dir", victim], capsys)[0] == 1
    assert sorted(p.name for p in victim.iterdir()) == ["notes.txt"]
    code, out, _ = run(["pretrain", "--recipe", "tiny", "--cache_dir", cache, "--output_dir", victim,
                        "--overwrite_output_dir"], capsys)
    assert code == 0 and f"copied to {victim}" in out
    assert (victim / "lab_card.json").is_file() and not (victim / "notes.txt").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["victim"]  # nothing left beside it


@pytest.fixture(scope="module")
def adapter_dir(tmp_path_factory):
    from hellora_trl.recipes.offline import tiny_moe_model
    from hellora_trl.recipes.models import OFFLINE_MODEL

    model = tiny_moe_model("olmoe", seed=42, **OFFLINE_MODEL)
    peft_model = apply_hellora(model, {layer.name: [0, 3] for layer in find_moe_layers(model)},
                               default_lora_config(r=2, lora_alpha=4))
    path = tmp_path_factory.mktemp("adapter") / "adapter"
    peft_model.save_pretrained(path)
    return path


@pytest.mark.parametrize("command", ["merge", "export"])
def test_merge_and_export_refuse_bad_outputs_before_loading(command, adapter_dir, tmp_path, capsys, monkeypatch):
    from hellora_trl import export

    for name in ("merge_adapter", "export_peft_target_parameters"):
        monkeypatch.setattr(export, name, lambda *a, **k: pytest.fail("merged before the output check"))
    work = tmp_path / "dotdir"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    os.symlink(tmp_path / "gone", tmp_path / "dangling")
    monkeypatch.chdir(work)
    base = ["--adapter", adapter_dir, "--tiny", "olmoe"]
    code, _, err = run([command, *base, "--output_dir", ".", "--overwrite"], capsys)
    assert code == 1 and "current directory" in err
    code, _, err = run([command, *base, "--output_dir", tmp_path / "dangling", "--overwrite"], capsys)
    assert code == 1 and "does not exist; remove the link" in err
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    code, _, err = run([command, *base, "--output_dir", tmp_path / "full"], capsys)
    assert code == 1 and "pass --overwrite" in err
    assert sorted(p.name for p in work.iterdir()) == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dangling", "dotdir", "full"]  # no ..old-* folders
