"""bench/evidence/run.py on the tiny lab: the small-data arm's units and curves, the usage-weighted random arm, and
the in-vocabulary forgetting key added to base files written before it existed."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "evidence"))

import run  # noqa: E402


def test_arm_names_map_to_their_selection():
    weighted = run.arm_config("random-weighted-k2", 16, 8)
    assert (weighted.kind, weighted.k, weighted.selection) == ("hellora", 2, "random_weighted")
    assert run.arm_config("random-k2", 16, 8).selection == "random"  # the uniform arm is unchanged
    assert "random-weighted-k2" in run.ALL_ARMS and "random-weighted-k2" not in run.PRIORITY_ARMS
    assert set(run.SMALL_DATA_ARMS) >= {"floor", "hot-k2", "all-r8", "all-matched"}  # PLAN.md's list
    with pytest.raises(SystemExit, match="unknown arm"):
        run.arm_config("weighted-random", 16, 8)


def test_small_data_settings_and_names():
    settings, per_epoch = run.small_settings("arithmetic", 200, 10)
    assert per_epoch == 25 and settings.steps == 250 and settings.train_rows == 200
    main = run.settings_for("arithmetic", 150)
    assert (settings.batch_size, settings.learning_rate, settings.eval_rows) == (
        main.batch_size, main.learning_rate, main.eval_rows)
    path = run.unit_path(Path("r"), "default", 0, 1, "facts", "hot-k2", "small200-e3")
    assert path.name == "default-p0-f1-facts-small200-e3-hot-k2.json"
    assert run.unit_path(Path("r"), "default", 0, 1, "facts", "hot-k2").name == "default-p0-f1-facts-hot-k2.json"


def test_small_data_smoke_on_tiny_writes_curves_per_epoch(tmp_path):
    from hellora_trl.recipes.lab import lab_cache_dir

    out = tmp_path / "runs"
    argv = ["--recipe", "tiny", "--small-data", "--pretrain-seeds", "0", "--ft-seeds", "0", "--targets", "arithmetic",
            "--arms", "hot-k2", "--small-rows", "16", "--epochs", "2", "--cache", str(lab_cache_dir()),
            "--out", str(out)]
    assert run.main(argv) == 0
    names = sorted(p.name for p in out.glob("*.json"))
    assert names == ["tiny-p0-base-arithmetic-base.json", "tiny-p0-f0-arithmetic-small16-e2-hot-k2.json"]
    for epochs in (2,):
        unit = json.loads((out / f"tiny-p0-f0-arithmetic-small16-e{epochs}-hot-k2.json").read_text())
        assert unit["regime"] == f"small16-e{epochs}" and unit["arm"] == "hot-k2"
        assert unit["small_data"] == {"rows": 16, "epochs": epochs, "steps_per_epoch": 2, "held_out_stated": None}
        assert unit["settings"]["steps"] == 2 * epochs and unit["settings"]["train_rows"] == 16
        curves = unit["curves"]
        assert [p["epoch"] for p in curves] == list(range(epochs + 1)) and [p["step"] for p in curves][-1] == 2 * epochs
        assert [p["trainer_epoch"] for p in curves[1:]] == pytest.approx(list(range(1, epochs + 1)))  # boundaries agree
        for point in curves:
            assert set(point["train"]) >= {"result", "format", "whole"} and point["held_out"]["result_tokens"] > 0
        # the last point is the trained model the unit's own scores come from
        assert curves[-1]["held_out"]["result"] == pytest.approx(unit["target_split"]["result"], rel=1e-6)
        assert curves[0]["train"]["result"] != curves[-1]["train"]["result"]  # training moved it
        assert set(unit["domain_loss_v2"]) == set(unit["domain_loss"]) == {"math", "code", "safety", "prose"}
    # a base file from before the in-vocabulary documents gets their key added, the rest kept as written
    base_file = out / "tiny-p0-base-arithmetic-base.json"
    old = json.loads(base_file.read_text())
    v2 = old.pop("domain_loss_v2")
    base_file.write_text(json.dumps(old))
    assert run.main(argv) == 0  # every unit exists: only the base file is completed
    new = json.loads(base_file.read_text())
    assert new == {**old, "domain_loss_v2": pytest.approx(v2)}
    with pytest.raises(SystemExit, match="unknown arm"):
        run.main(argv[:-2] + ["--arms", "nope", "--out", str(out)])


def test_held_out_stated_counts_facts_whose_statement_was_trained():
    from hellora_trl.recipes.lab.targets import facts_task

    train, held = facts_task(200, 48, seed=0)
    stated = run.stated_held_out(train, held)
    full_train, _ = facts_task(1200, 48, seed=0)
    assert 0 < stated < 48 and run.stated_held_out(full_train, held) == 48
    assert run.stated_held_out([], [{"prompt": "x", "completion": " 1", "result": [1, 2]}]) is None


def test_epoch_curves_do_not_change_the_training(tmp_path):
    """The same unit with and without the curve callback ends with the same scores (scoring between steps is
    eval-mode, gradient-free and draws no random numbers)."""
    from hellora_trl.recipes.lab import LAB_RECIPES, lab_cache_dir, lab_model_path
    from hellora_trl.recipes.lab import quality as q
    from hellora_trl.recipes.lab.targets import target_task, to_dataset
    from transformers import AutoTokenizer

    path = lab_model_path(LAB_RECIPES["tiny"], cache_dir=lab_cache_dir(), progress=False)
    settings, per_epoch = run.small_settings("arithmetic", 16, 2)
    settings.domain_rows = 2
    rows, held_out = target_task("arithmetic", 16, 8, seed=0)
    domains = q.domain_texts(settings)
    config = run.arm_config("floor", 8, 8)
    plain = q.finetune(config, path, to_dataset(rows), settings, 0, tmp_path / "p.json", held_out, domains)
    curves = q.epoch_curves(AutoTokenizer.from_pretrained(path), rows, held_out, per_epoch)
    watched = q.finetune(config, path, to_dataset(rows), settings, 0, tmp_path / "p.json", held_out, domains,
                         callbacks=[curves])
    assert len(curves.points) == 3 and "domain_loss_v2" not in plain
    assert watched["target_split"] == plain["target_split"] and watched["domain_loss"] == plain["domain_loss"]
    assert watched["train_loss"] == plain["train_loss"]


def test_a_unit_of_other_weights_is_kept_aside_and_run_again(tmp_path, capsys):
    """Deviations 15-16: a seed rebuilt on another machine is another model; its old result is moved, never deleted,
    and a profile is named by the weights it was taken on, so it cannot be reused for other weights."""
    unit = tmp_path / "default-p0-f0-facts-hot-k2.json"
    assert not run.done(unit, "a" * 64)
    unit.write_text(json.dumps({"weights_sha256": "a" * 64, "arm": "hot-k2"}))
    assert run.done(unit, "a" * 64) and unit.is_file()
    assert not run.done(unit, "b" * 64)
    kept = tmp_path / "superseded" / "aaaaaaaa" / unit.name
    assert not unit.exists() and json.loads(kept.read_text())["arm"] == "hot-k2"
    assert "aaaaaaaa" in capsys.readouterr().out
    one = run.profile_path_for(tmp_path, "default", 0, "a" * 64, 1, "facts")
    other = run.profile_path_for(tmp_path, "default", 0, "b" * 64, 1, "facts")
    assert one != other and one.name == "default-p0-aaaaaaaa-f1-facts.json"
    assert run.profile_path_for(tmp_path, "default", 0, "a" * 64, 1, "facts", "small200-e3").name == (
        "default-p0-aaaaaaaa-f1-facts-small200-e3.json")


def test_complete_v2_reruns_only_units_without_it_and_keeps_the_old_file(tmp_path):
    """Deviation 18: units written before the in-vocabulary documents run again with --complete-v2 only; the old
    file is moved aside and the new unit says whether every old metric came out the same (here: bit for bit)."""
    from hellora_trl.recipes.lab import lab_cache_dir

    out = tmp_path / "runs"
    argv = ["--recipe", "tiny", "--pretrain-seeds", "0", "--ft-seeds", "0", "--targets", "arithmetic",
            "--arms", "hot-k2", "--steps", "2", "--cache", str(lab_cache_dir()), "--out", str(out)]
    assert run.main(argv) == 0
    unit = out / "tiny-p0-f0-arithmetic-hot-k2.json"
    first = json.loads(unit.read_text())
    assert "rerun_of" not in first
    first.pop("domain_loss_v2")
    unit.write_text(json.dumps(first))
    assert run.main(argv) == 0  # without the flag a unit lacking v2 counts as done
    assert json.loads(unit.read_text()) == first
    assert run.main(argv + ["--complete-v2"]) == 0
    second = json.loads(unit.read_text())
    assert set(second["domain_loss_v2"]) == {"math", "code", "safety", "prose"}
    kept = out / "superseded" / "without-v2" / unit.name
    assert json.loads(kept.read_text()) == first
    assert second["rerun_of"]["identical"] and second["rerun_of"]["same"]["target_split"]
    assert second["target_split"] == first["target_split"]
    mtime = unit.stat().st_mtime_ns
    assert run.main(argv + ["--complete-v2"]) == 0  # now complete: not run a third time
    assert unit.stat().st_mtime_ns == mtime
    # a changed metric is reported, not hidden
    tampered = {**second, "train_loss": second["train_loss"] + 1.0}
    tampered.pop("domain_loss_v2")
    unit.write_text(json.dumps(tampered))
    assert run.main(argv + ["--complete-v2"]) == 0
    third = json.loads(unit.read_text())
    assert not third["rerun_of"]["identical"] and third["rerun_of"]["same"]["train_loss"] is False
    assert json.loads(kept.read_text()) == first  # the first copy set aside is still there
    assert third["rerun_of"]["file"] == "superseded/without-v2/tiny-p0-f0-arithmetic-hot-k2.1.json"
