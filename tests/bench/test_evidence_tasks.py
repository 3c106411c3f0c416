"""bench/evidence/tasks.py: per-task hot sets and the cross-task Jaccard matrix (issue 20 item 5)."""

from __future__ import annotations

import itertools
import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "evidence"))

import tasks  # noqa: E402


@pytest.mark.parametrize("k,experts", [(1, 2), (2, 16), (8, 64)])
def test_chance_jaccard_is_the_expected_overlap_of_two_uniform_subsets(k, experts):
    exact = tasks.chance_jaccard(k, experts)
    if (k, experts) == (1, 2):
        assert exact == pytest.approx(0.5)  # same expert (J=1) half the time, else 0
    rng = random.Random(0)
    draws = [tasks.jaccard(rng.sample(range(experts), k), rng.sample(range(experts), k)) for _ in range(20000)]
    assert exact == pytest.approx(sum(draws) / len(draws), abs=0.01)


def test_mean_jaccard_averages_layers_and_refuses_other_layers():
    one = {"l0": [0, 1], "l1": [2, 3]}
    assert tasks.mean_jaccard(one, {"l0": [0, 1], "l1": [4, 5]}) == pytest.approx(0.5)
    assert tasks.mean_jaccard(one, {"l0": [1, 2], "l1": [2, 3]}) == pytest.approx((1 / 3 + 1) / 2)
    with pytest.raises(ValueError, match="different layers"):
        tasks.mean_jaccard(one, {"l0": [0, 1]})


def test_tiny_lab_matrix(tmp_path):
    from hellora_trl.recipes.lab import lab_cache_dir

    assert tasks.main(["--recipe", "tiny", "--pretrain-seeds", "0", "--cache", str(lab_cache_dir()),
                       "--runs", str(tmp_path / "none"), "--out", str(tmp_path)]) == 0
    data = json.loads((tmp_path / "evidence-tasks-tiny.json").read_text())
    model = data["models"][0]
    matrix, hot = model["jaccard"], model["hot_sets"]
    assert list(matrix) == list(tasks.TARGETS + tasks.DOMAINS)
    for a, b in itertools.product(matrix, repeat=2):
        assert matrix[a][b] == pytest.approx(matrix[b][a])
        assert matrix[a][b] == pytest.approx(tasks.mean_jaccard(hot[a], hot[b]))
    assert all(matrix[a][a] == 1.0 for a in matrix)
    assert all(len(experts) == model["k"] for sets in hot.values() for experts in sets.values())
    assert len({json.dumps(sets, sort_keys=True) for sets in hot.values()}) > 1  # the tasks do not all route alike
    assert model["warmup_vs_forward"] == {}  # no evidence runs in that folder
    md = (tmp_path / "evidence-tasks-tiny.md").read_text()
    assert "chance Jaccard" in md and "| **prose** |" in md
