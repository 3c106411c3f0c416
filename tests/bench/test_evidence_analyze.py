"""bench/evidence/analyze.py on synthetic runs: a planted supported case, a planted refuted one, and the minimum
counts of PLAN.md (below them nothing is decided)."""

from __future__ import annotations

import json
import random
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench" / "evidence"))

import analyze  # noqa: E402

ARMS = {  # planted result-token loss per arm (before noise); expert parameters per arm
    "floor": (2.0, 0), "attention": (2.05, 0), "hot-k2": (1.5, 16), "random-k2": (1.8, 16), "cold-k2": (1.9, 16),
    "all-r8": (1.4, 128), "all-matched": (1.7, 16),
}


def synthetic(models=5, ft_seeds=3, flip=False, noise=0.02, seed=0, v2=True, v2_flip=None):
    """Runs where hot k=2 wins everywhere (``flip``: where it loses everywhere: hot and random swapped, hot and
    all-matched swapped, all-experts forgets less). ``v2``: runs also carry the in-vocabulary forgetting
    (``domain_loss_v2``), the same as the old one unless ``v2_flip`` gives it the other direction."""
    v2_flip = flip if v2_flip is None else v2_flip
    rng = random.Random(seed)
    runs = []
    for target in ("arithmetic", "facts"):
        base_loss = 3.0
        for m in range(models):
            domain = {d: 2.0 for d in analyze.DOMAINS}
            runs.append({"recipe": "default", "pretrain_seed": m, "ft_seed": None, "target": target, "arm": "base",
                         "target_split": {"result": base_loss, "format": 1.0, "whole": 1.2}, "domain_loss": domain,
                         **({"domain_loss_v2": dict(domain)} if v2 else {})})
            for f in range(ft_seeds):
                for arm, (loss, params) in ARMS.items():
                    if flip and arm in ("hot-k2", "random-k2"):
                        loss = ARMS["random-k2" if arm == "hot-k2" else "hot-k2"][0]
                    if flip and arm == "all-matched":
                        loss = 1.45
                    if target == "facts" and arm == "floor":
                        loss = 2.7 if not flip else 1.45  # facts: the floor recovers little (or nearly all)
                    forget = forget2 = {"all-r8": 0.3, "hot-k2": 0.1}.get(arm, 0.05)
                    if flip and arm in ("all-r8", "hot-k2"):
                        forget = 0.4 - forget
                    if v2_flip and arm in ("all-r8", "hot-k2"):
                        forget2 = 0.4 - forget2
                    extra = {"domain_loss_v2": {d: 2.0 + forget2 + rng.gauss(0, noise / 4) for d in analyze.DOMAINS}}
                    runs.append({**(extra if v2 else {}),
                        "recipe": "default", "pretrain_seed": m, "ft_seed": f, "target": target, "arm": arm,
                        "target_split": {"result": loss + rng.gauss(0, noise), "format": 0.5, "whole": 0.6},
                        "domain_loss": {d: 2.0 + forget + rng.gauss(0, noise / 4) for d in analyze.DOMAINS},
                        "trainable_by_component": {"experts": params, "attention": 10, "router": 1},
                        "exact_match": 0.5,
                    })
    return runs


def verdicts(runs):
    data, md = analyze.analyze(runs)
    return {h: e["verdict"] for h, e in data["hypotheses"].items()}, data, md


def test_planted_supported_case():
    v, data, md = verdicts(synthetic())
    assert v["H1"] == "supported" and v["H2"] == "supported" and v["H3"] == "supported"
    assert v["H4"] == "supported" and v["H5"] == "supported"
    assert v["H6"] == "inconclusive"  # no olmoe runs
    h3 = next(iter(data["hypotheses"]["H3"]["parts"].values()))
    assert h3["threshold"] == pytest.approx(16 / 128) and h3["mean"] == pytest.approx(5 / 6, abs=0.05)
    assert "PARTIAL" not in md and "| hot-k2 |" in md


def test_planted_refuted_case():
    v, data, _ = verdicts(synthetic(flip=True))
    assert v["H1"] == "refuted" and v["H2"] == "refuted" and v["H5"] == "refuted"
    parts = data["hypotheses"]["H1"]["parts"]
    random_part = parts["default/arithmetic: random-k2 - hot-k2"]
    assert random_part["verdict"] == "refuted" and random_part["ci95"][1] < 0 and random_part["sign"] == "0/5"
    assert parts["default/arithmetic: cold-k2 - hot-k2"]["verdict"] == "supported"  # cold still loses: H1 overall refuted
    assert v["H4"] == "refuted" and "note" not in data["hypotheses"]["H4"]


def test_below_minimum_counts_nothing_is_decided():
    v, data, md = verdicts(synthetic(models=3))
    assert set(v.values()) == {"inconclusive"}
    assert "below the pre-registered minimum of 5" in json.dumps(data)
    assert "PARTIAL" in md
    v, data, _ = verdicts(synthetic(ft_seeds=2))
    assert set(v.values()) == {"inconclusive"} and "fine-tune seed(s) per model" in json.dumps(data)


def test_mixed_signs_are_inconclusive():
    runs = synthetic(noise=0.0)
    for r in runs:  # hot wins against random in 3 models, loses in 2: the interval straddles 0
        if r["arm"] == "random-k2" and r["pretrain_seed"] in (3, 4):
            r["target_split"]["result"] = 1.2
    v, data, _ = verdicts(runs)
    part = data["hypotheses"]["H1"]["parts"]["default/arithmetic: random-k2 - hot-k2"]
    assert part["verdict"] == "inconclusive" and part["sign"] == "3/5" and part["ci95"][0] < 0 < part["ci95"][1]


def test_main_writes_json_and_markdown(tmp_path):
    runs_dir = tmp_path / "runs"
    runs_dir.mkdir()
    for i, r in enumerate(synthetic(models=2, ft_seeds=1)):
        (runs_dir / f"{i}.json").write_text(json.dumps(r))
    assert analyze.main(["--runs", str(runs_dir), "--out", str(tmp_path / "out")]) == 0
    saved = json.loads((tmp_path / "out" / "evidence.json").read_text())
    assert saved["runs"] == len(list(runs_dir.iterdir())) and "PARTIAL" in (tmp_path / "out" / "evidence.md").read_text()


def test_pairs_use_only_the_fine_tune_seeds_both_arms_ran():
    """A model where hot ran seeds 0 and 1 but random only seed 0 is compared on seed 0 alone."""
    runs = synthetic(models=1, ft_seeds=2, noise=0.0)
    runs = [r for r in runs if not (r["arm"] == "random-k2" and r["ft_seed"] == 1)]
    for r in runs:
        if r["arm"] == "hot-k2" and r["ft_seed"] == 1:
            r["target_split"]["result"] = 9.0  # a seed random never ran: must not enter the pair
    table = analyze.per_model(runs)[("default", "arithmetic")]
    assert analyze.paired(table, "random-k2", "hot-k2", "result") == [pytest.approx(0.3)]
    assert table["hot-k2"][0]["result"] == pytest.approx((1.5 + 9.0) / 2)  # the pooled mean still uses both


def test_h5_counts_only_runs_with_in_vocabulary_forgetting():
    # the old (out-of-vocabulary) forgetting favours HELLoRA everywhere; without v2 documents H5 decides nothing
    v, data, md = verdicts(synthetic(v2=False))
    h5 = data["hypotheses"]["H5"]
    assert v["H5"] == "inconclusive" and h5["runs_with_forgetting_v2"] == 0 and not h5["parts"]
    assert "0 of 210 fine-tuning runs" in h5["note"] and "0 of 210 fine-tuning runs" in md
    assert "in-vocabulary documents (v2) per domain" not in md
    assert v["H1"] == "supported"  # the rest is unaffected
    # v1 says supported, v2 says refuted: H5 follows v2
    v, data, md = verdicts(synthetic(v2_flip=True))
    assert v["H5"] == "refuted" and data["hypotheses"]["H5"]["runs_with_forgetting_v2"] == 210
    row = next(line for line in md.splitlines() if line.startswith("| hot-k2 | 5 | ") and line.count("|") == 8)
    assert float(row.split(" | ")[2]) == pytest.approx(0.3, abs=0.01)  # per-domain v2 forgetting: hot k=2 forgets 0.3 in the flipped case
    # old runs without v2 next to new ones with it: counted, and the old ones left out of H5
    runs = synthetic()
    for r in runs:
        if r["ft_seed"] == 2:
            r.pop("domain_loss_v2")
    _, data, _ = verdicts(runs)
    h5 = data["hypotheses"]["H5"]
    assert h5["runs_with_forgetting_v2"] == 140
    part = next(iter(h5["parts"].values()))
    assert part["runs"] == 2 * 5 * 2 and "fine-tune seed(s) per model" in part["why"]  # 2 seeds < the minimum 3


def small_data_runs(models=5, ft_seeds=3, hot_k8_wins=True):
    runs = []
    for m in range(models):
        for f in range(ft_seeds):
            for epochs in (3, 10):
                for arm, final in (("floor", 2.0), ("hot-k2", 1.6), ("all-r8", 1.5), ("all-matched", 1.7),
                                   ("hot-k8", 1.4 if hot_k8_wins else 1.6)):
                    final += 0.01 * m + 0.001 * f
                    curve = [3.0] + [final + 0.1 * (epochs - e) for e in range(1, epochs + 1)]
                    runs.append({
                        "recipe": "default", "pretrain_seed": m, "ft_seed": f, "target": "arithmetic", "arm": arm,
                        "regime": f"small200-e{epochs}", "target_split": {"result": curve[-1], "format": 0.5,
                                                                            "whole": 0.6},
                        "curves": [{"epoch": e, "step": 25 * e, "held_out": {"result": c},
                                    "train": {"result": c - 0.5}} for e, c in enumerate(curve)],
                    })
    return runs


def test_small_data_runs_have_their_own_tables_and_feed_h6():
    main = synthetic()
    _, before, md_before = verdicts(main)
    v, data, md = verdicts(main + small_data_runs())
    assert data["tables"] == before["tables"]  # the main tables do not see the small-data runs
    assert v["H1"] == "supported" and v["H6"] == "supported"
    (name, part), = data["hypotheses"]["H6"]["parts"].items()
    assert name == "default/arithmetic small200-e10: all-r8 - hot-k8" and part["mean"] == pytest.approx(0.1)
    assert part["runs"] == 2 * 5 * 3
    assert "#### small data: default / arithmetic / small200-e10" in md and "#### small data: default / arithmetic / small200-e3" in md
    row = next(line for line in md.splitlines() if line.startswith("| hot-k8 |") and "3.00, " in line
               and line.count(",") == 10)  # the 10-epoch curve: 11 points
    assert "3.00, 2.32, 2.22" in row
    table = data["small_data"]["default/arithmetic/small200-e10"]
    assert table["hot-k8"]["0"]["best_epoch"] == 10 and table["hot-k8"]["0"]["train_result"] == pytest.approx(0.9, abs=0.01)
    v, _, _ = verdicts(main + small_data_runs(hot_k8_wins=False))
    assert v["H6"] == "refuted"


def test_report_opens_with_a_verdict_table_under_readme_headings():
    _, _, md = verdicts(synthetic(models=3))
    lines = md.splitlines()
    assert lines[0].startswith("### Evidence (issue 20)") and not any(line.startswith(("# ", "## ")) for line in lines)
    at = lines.index("#### Verdicts")
    assert lines[at + 2].startswith("| | hypothesis") and "runs (summed over comparisons)" in lines[at + 2]
    table = lines[at + 4: at + 10]
    assert [line.split(" | ")[0] for line in table] == [f"| H{i}" for i in range(1, 7)]
    assert all("**inconclusive**" in line for line in table)  # 3 models: below the minimum, every verdict
    h1 = table[0].split(" | ")
    assert h1[3] == "4 inconclusive" and h1[4] == f"{4 * 3 * 3 * 2} |"  # 4 comparisons, 72 runs behind them


def test_olmoe_h2_compares_all_matched_with_the_parameter_matched_hot_k8():
    """Deviation 17: on 64 experts r=1 everywhere has hot k=8's expert parameters, so H2's olmoe part pairs
    all-matched with hot-k8; the default recipe's part keeps hot-k2."""
    runs = []
    for m in range(3):
        for f in range(2):
            for arm, loss in (("hot-k2", 1.9), ("hot-k8", 1.5), ("all-matched", 1.7), ("floor", 2.0), ("all-r8", 1.4)):
                runs.append({"recipe": "olmoe", "pretrain_seed": m, "ft_seed": f, "target": "facts", "arm": arm,
                             "target_split": {"result": loss + 0.01 * (m + f), "format": 0.5, "whole": 0.6},
                             "domain_loss": {d: 2.0 for d in analyze.DOMAINS},
                             "trainable_by_component": {"experts": 1, "attention": 1, "router": 1}})
    parts = analyze.analyze(runs)[0]["hypotheses"]["H2"]["parts"]
    assert list(parts) == ["olmoe/facts: all-matched - hot-k8"]
    assert parts["olmoe/facts: all-matched - hot-k8"]["mean"] == pytest.approx(0.2)
    assert "default/arithmetic: all-matched - hot-k2" in analyze.analyze(synthetic())[0]["hypotheses"]["H2"]["parts"]


def test_exploratory_olmoe_k8_controls_are_reported_without_a_verdict():
    """Deviation 18(e): random-k8 and cold-k8 against hot-k8 on olmoe, added after results were seen: a table with
    intervals and signs, and nothing in the verdicts."""
    runs = []
    for m in range(3):
        for f in range(2):
            for arm, loss in (("hot-k8", 1.5), ("random-k8", 1.6), ("cold-k8", 1.4 + 0.05 * m)):
                runs.append({"recipe": "olmoe", "pretrain_seed": m, "ft_seed": f, "target": "facts", "arm": arm,
                             "target_split": {"result": loss, "format": 0.5, "whole": 0.6},
                             "domain_loss": {d: 2.0 for d in analyze.DOMAINS},
                             "trainable_by_component": {"experts": 1, "attention": 1, "router": 1}})
    data, md = analyze.analyze(runs)
    section = md.split("#### Exploratory")[1].split("####")[0]
    assert "| olmoe/facts: random-k8 - hot-k8 | 0.1000 | [0.1000, 0.1000] | 3/3 | 12 |" in section
    assert "| olmoe/facts: cold-k8 - hot-k8 | -0.0500 |" in section and "| 0/3 | 12 |" in section
    assert "random-k8" not in json.dumps(data["hypotheses"]) and "cold-k8" not in json.dumps(data["hypotheses"])
    assert "#### Exploratory" not in analyze.analyze(synthetic())[1]  # no such runs: no section
