"""bench/evidence/figures.py: the share-vs-parameter-share figure and the small-data curves."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "evidence"))

import figures  # noqa: E402


def test_share_points_keep_arms_with_both_numbers_and_summarise_models():
    shares = {"hot-k2": [0.2, 0.4, 0.3], "random-k2": [0.1], "cold-k2": []}
    params = {"hot-k2": 0.125, "random-k2": 0.125, "cold-k2": 0.125, "hot-k8": None}
    pts = figures.share_points({}, lambda t, a: shares.get(a, []), lambda t, a: params.get(a))
    assert set(pts) == {"hot-k2", "random-k2"}  # cold: no models; hot-k8: no parameter share
    assert pts["hot-k2"] == {"P": 0.125, "S": pytest.approx(0.3), "lo": 0.2, "hi": 0.4, "models": 3}


def test_share_figure_writes_a_png_only_when_there_is_something_to_draw(tmp_path):
    point = {"P": 0.125, "S": 0.3, "lo": 0.2, "hi": 0.4, "models": 3}
    assert figures.share_figure({("default", "facts"): {}}, tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()
    out = figures.share_figure({("default", "facts"): {"hot-k2": point, "all-matched": point}}, tmp_path / "s.png")
    assert out == tmp_path / "s.png" and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_small_data_curves_are_means_per_epoch_cut_to_the_shortest_run(tmp_path):
    def run(arm, values):
        return {"recipe": "default", "target": "facts", "regime": "small200-e3", "arm": arm,
                "curves": [{"held_out": {"result": v}, "train": {"result": v / 2}} for v in values]}

    runs = [run("hot-k2", [4.0, 3.0, 2.0]), run("hot-k2", [6.0, 5.0]), run("floor", [5.0, 4.0, 3.0]),
            {"recipe": "default", "target": "facts", "arm": "hot-k2"}]  # a main-budget run: ignored
    held = figures.mean_curves(runs, "held_out")[("default", "facts", "small200-e3")]
    assert held == {"hot-k2": [5.0, 4.0], "floor": [5.0, 4.0, 3.0]}
    assert figures.mean_curves(runs, "train")[("default", "facts", "small200-e3")]["hot-k2"] == [2.5, 2.0]
    assert figures.small_data_figure(runs, tmp_path / "c.png").is_file()
    assert figures.small_data_figure(runs[-1:], tmp_path / "none.png") is None
