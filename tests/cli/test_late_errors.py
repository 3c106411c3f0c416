"""Errors that came after work was done, or said the wrong thing (issue 19 item 10; review 3.6, NR4, 5.18, 5.19,
7.33)."""

from __future__ import annotations

import json

import pytest
import torch

from hellora_trl import ExpertProfile, cli
from hellora_trl.constants import RUN_MARKER_FILE


def profile_dict(counts):
    return {"format": "hellora_trl.ExpertProfile", "counts": counts, "layer_names": ["l0"] * len(counts),
            "num_experts": 8, "experts_per_token": 2}


@pytest.mark.parametrize("counts", [[], [[]]])
def test_an_empty_profile_is_called_empty(counts):
    """Review 3.6: `counts: []` was rejected as 'whole numbers (got torch.float32 values, e.g. NaN or 1.5)'."""
    with pytest.raises(ValueError, match="counts is empty") as err:
        ExpertProfile.from_dict(profile_dict(counts))
    assert "NaN" not in str(err.value)


def test_select_on_an_empty_profile_says_so(tmp_path, capsys):
    path = tmp_path / "empty.json"
    path.write_text(json.dumps(profile_dict([])))
    assert cli.main(["select", "--profile", str(path)]) == 1
    assert "counts is empty" in capsys.readouterr().err


def test_report_warns_about_an_unfinished_runs_profile(tmp_path):
    """Review NR4: eval/export/merge/load_hellora warned about the in-progress marker; `hellora report` did not."""
    run = tmp_path / "run"
    profile = ExpertProfile(torch.arange(16).reshape(2, 8), ["a", "b"], num_experts=8, experts_per_token=2)
    profile.save(run / "hellora_profile.json")
    assert cli.main(["report", "--profiles", str(run / "hellora_profile.json"), "--output_dir",
                     str(tmp_path / "clean")]) == 0
    (run / RUN_MARKER_FILE).write_text("{}")
    with pytest.warns(UserWarning, match=RUN_MARKER_FILE):
        assert cli.main(["report", "--profiles", str(run / "hellora_profile.json"), "--output_dir",
                         str(tmp_path / "rep")]) == 0


def test_profile_output_on_a_directory_fails_before_profiling(tmp_path, capsys, monkeypatch):
    """Review 5.19: `hellora profile --output <a directory>` failed only after profiling (11 s)."""
    import hellora_trl.profiling as profiling

    monkeypatch.setattr(profiling, "profile_experts", lambda *a, **k: pytest.fail("profiled before the check"))
    assert cli.main(["profile", "--tiny", "olmoe", "--limit", "4", "--output", str(tmp_path)]) == 1
    assert "is a directory" in capsys.readouterr().err


def test_ablate_checks_every_k_before_training_a_row(tmp_path, monkeypatch):
    """Review 7.33: `hellora ablate --ks 100` trained one grid row before refusing."""
    from hellora_trl.recipes.ablation import main
    from hellora_trl.trainer import HELLoRATrainer

    monkeypatch.setattr(HELLoRATrainer, "train", lambda self, *a, **k: pytest.fail("a row trained before the check"))
    with pytest.raises(ValueError, match=r"k=\[100\] exceeds the 8 experts .* No row was trained"):
        main(["--selections", "layer", "--components", "all", "--ks", "2,100", "--hellora_k", "2",
              "--output_dir", str(tmp_path), "--max_steps", "1", "--train_limit", "8", "--eval_limit", "0",
              "--disable_tqdm", "true", "--max_length", "64", "--hellora_profile_mode", "forward"])
    assert not (tmp_path / "ablation.csv").exists()
