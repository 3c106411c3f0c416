"""Analyse the raw evidence runs against the pre-registration (bench/evidence/PLAN.md).

Reads ``bench/evidence/runs/*.json`` (bench/evidence/run.py) and writes ``bench/results/evidence.{md,json}``:
per model and pooled means per arm and target, S(arm) and P(arm), paired differences with 95% percentile
bootstrap intervals over pretrained models (10,000 resamples of the per-model means over the fine-tune seeds both
arms ran), sign
counts over models, and a verdict for H1-H6 by PLAN.md's decision rules:

- **supported**: the interval entirely on the predicted side and the predicted sign in at least 4 of 5 models
  (``olmoe``: 3 of 3), with at least the minimum number of models (5; ``olmoe`` 3);
- **refuted**: the interval entirely on the other side, with at least the minimum number of models;
- **inconclusive** otherwise, including every comparison with fewer models than the minimum (the report says so).

A hypothesis made of several comparisons (H1: random and cold, on both targets) is supported when every one is,
refuted when any one is, inconclusive otherwise.

H5 (forgetting) is computed only from runs that carry the in-vocabulary forgetting documents (``domain_loss_v2``,
PLAN.md Deviation 12), and the report says how many runs had them; the older forgetting (out of the lab model's
vocabulary) is still tabulated. Small-data runs (``regime``, run.py ``--small-data``) are kept out of the main
tables: they get their own tables with per-epoch held-out curves, and the 10-epoch ones feed H6's small-data part.
The markdown uses ``###`` headings so ``bench/render_readme.py`` can place it in the README.

    python bench/evidence/analyze.py                 # runs/ -> bench/results/evidence.{md,json}
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable, Iterable

sys.path.insert(0, str(Path(__file__).resolve().parent))

import figures  # noqa: E402  (bench/evidence/figures.py)

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
RESAMPLES = 10_000
MIN_MODELS = {"default": 5, "olmoe": 3}
MIN_SIGNS = {"default": 4, "olmoe": 3}  # of MIN_MODELS; scaled to the models present when there are more
MIN_FT_SEEDS = {"default": 3, "olmoe": 2}
# the hot arm whose expert-adapter parameters equal all-matched's (r=1 on every expert; Deviation 17)
MATCHED_HOT = {"default": "hot-k2", "olmoe": "hot-k8"}
DOMAINS = ("math", "code", "safety", "prose")
# Deviation 18(e): added after the olmoe results were seen, so reported with intervals but never as a verdict
EXPLORATORY = (("olmoe", "random-k8", "hot-k8"), ("olmoe", "cold-k8", "hot-k8"))


# --------------------------------------------------------------------------------------------------- loading
def load_runs(folder: Path) -> list[dict[str, Any]]:
    """A model is its weights, not its seed (Deviation 15): a seed rebuilt on another machine gave other bits, so
    ``pretrain_seed`` becomes ``"<seed>:<first 8 hex of weights_sha256>"`` and units of different weights are never
    averaged together."""
    runs = [json.loads(p.read_text()) for p in sorted(Path(folder).glob("*.json"))]
    for r in runs:
        if r.get("weights_sha256"):
            r["pretrain_seed"] = f"{r['pretrain_seed']}:{r['weights_sha256'][:8]}"
    return runs


def forgetting(run: dict, base: dict | None, key: str = "domain_loss") -> dict[str, float] | None:
    """Held-out document loss after minus before, per domain and their mean (``key``: ``domain_loss``, or
    ``domain_loss_v2`` for the in-vocabulary documents)."""
    if base is None or not run.get(key) or not base.get(key):
        return None
    change = {d: run[key][d] - base[key][d] for d in DOMAINS if d in run[key] and d in base[key]}
    if not change:
        return None
    change["mean"] = statistics.fmean(change.values())
    return change


def metrics_of(run: dict, base: dict | None) -> dict[str, float]:
    split = run.get("target_split") or {}
    out = {"result": split.get("result"), "format": split.get("format"), "whole": split.get("whole", run.get("target_loss"))}
    if run.get("exact_match") is not None:
        out["exact_match"] = run["exact_match"]
    f = forgetting(run, base)
    if f:
        out.update({f"forget_{k}": v for k, v in f.items()})
    f2 = forgetting(run, base, "domain_loss_v2")
    if f2:
        out.update({f"forget_v2_{k}": v for k, v in f2.items()})
    curves = run.get("curves") or []
    if curves:  # small-data runs: the last point's training-row loss, and the best held-out point
        out["train_result"] = curves[-1]["train"]["result"]
        best = min(curves, key=lambda p: p["held_out"]["result"])
        out["best_result"], out["best_epoch"] = best["held_out"]["result"], best["epoch"]
    parts = run.get("trainable_by_component") or {}
    if "experts" in parts:
        out["expert_params"] = parts["experts"]
    return {k: v for k, v in out.items() if v is not None}


def per_model(runs: list[dict]) -> dict[tuple, dict[str, dict[int, dict[str, float]]]]:
    """{(recipe, target): {arm: {pretrain_seed: {metric: mean over fine-tune seeds}}}}, plus 'base' arms; and
    the fine-tune seeds behind each mean under the metric ``n_ft``."""
    bases = {(r["recipe"], r["pretrain_seed"], r["target"]): r for r in runs if r["arm"] == "base"}
    grouped: dict[tuple, dict[str, dict[int, list[dict]]]] = defaultdict(lambda: defaultdict(lambda: defaultdict(list)))
    for r in runs:
        base = bases.get((r["recipe"], r["pretrain_seed"], r["target"]))
        metrics = metrics_of(r, base if r["arm"] != "base" else None)
        metrics["ft_seed"] = r.get("ft_seed")
        grouped[(r["recipe"], r["target"])][r["arm"]][r["pretrain_seed"]].append(metrics)
    out: dict[tuple, dict] = {}
    for key, arms in grouped.items():
        out[key] = {}
        for arm, models in arms.items():
            out[key][arm] = {}
            for seed, rows in models.items():
                names = set.intersection(*(set(m) for m in rows)) - {"ft_seed"}
                out[key][arm][seed] = {n: statistics.fmean(m[n] for m in rows) for n in names}
                out[key][arm][seed]["n_ft"] = len(rows)
                out[key][arm][seed]["by_ft"] = {m["ft_seed"]: m for m in rows}
    return out


# ------------------------------------------------------------------------------------------------ statistics
def bootstrap(values: list[float], resamples: int = RESAMPLES, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of the mean, resampling the values (one per model) with replacement."""
    if not values:
        return (float("nan"), float("nan"))
    rng = random.Random(seed)
    n = len(values)
    means = sorted(statistics.fmean(rng.choices(values, k=n)) for _ in range(resamples))
    return means[int(0.025 * resamples)], means[min(resamples - 1, int(0.975 * resamples))]


def min_ft(table: dict, *arms: str, metric: str | None = None) -> int:
    """The fewest fine-tune seeds behind any per-model mean of ``arms`` (``metric``: counting only the seeds whose
    run has it)."""
    if metric is None:
        counts = [v["n_ft"] for arm in arms for v in table.get(arm, {}).values()]
    else:
        counts = [sum(metric in m for m in v["by_ft"].values()) for arm in arms for v in table.get(arm, {}).values()]
        counts = [c for c in counts if c]
    return min(counts) if counts else 0


def run_count(table: dict, *arms: str) -> int:
    """Fine-tuning runs of ``arms`` in ``table`` (models x fine-tune seeds, summed over the arms)."""
    return sum(v["n_ft"] for arm in arms for v in table.get(arm, {}).values())


def verdict(values: list[float], threshold: float, recipe: str, predicted: str = ">", ft: int | None = None,
            runs: int | None = None) -> dict[str, Any]:
    """PLAN.md's rule for "per-model statistic ``predicted`` threshold" over models (``ft``: the fewest fine-tune
    seeds behind a model's mean; below the minimum the verdict is inconclusive too; ``runs``: the fine-tuning runs
    behind the comparison, reported only)."""
    n = len(values)
    lo, hi = bootstrap(values)
    on_side = sum((v > threshold) if predicted == ">" else (v < threshold) for v in values)
    minimum = MIN_MODELS.get(recipe, 5)
    needed = MIN_SIGNS.get(recipe, 4) if n <= minimum else -(-MIN_SIGNS.get(recipe, 4) * n // minimum)
    above, below = lo > threshold, hi < threshold
    supports, refutes = (above, below) if predicted == ">" else (below, above)
    if n < minimum:
        word = "inconclusive"
        why = f"{n} model(s), below the pre-registered minimum of {minimum}"
    elif ft is not None and ft < MIN_FT_SEEDS.get(recipe, 3):
        word = "inconclusive"
        why = f"{ft} fine-tune seed(s) per model, below the pre-registered minimum of {MIN_FT_SEEDS.get(recipe, 3)}"
    elif supports and on_side >= needed:
        word, why = "supported", f"interval on the predicted side, sign {on_side}/{n}"
    elif refutes:
        word, why = "refuted", f"interval on the other side, sign {on_side}/{n}"
    else:
        word, why = "inconclusive", f"interval [{lo:.4g}, {hi:.4g}] vs {threshold}, sign {on_side}/{n}"
    return {"verdict": word, "why": why, "mean": statistics.fmean(values) if values else None, "ci95": [lo, hi],
            "sign": f"{on_side}/{n}", "threshold": threshold, "predicted": predicted, "models": n,
            "runs": runs, "per_model": values}


def common_means(table: dict, model: int, arms: tuple[str, ...], metric: str) -> list[float] | None:
    """Each arm's mean of ``metric`` over the fine-tune seeds all ``arms`` ran on ``model`` (paired by seed);
    None if they share no seed."""
    runs = [table[a][model]["by_ft"] for a in arms]
    seeds = set.intersection(*(set(r) for r in runs))
    seeds = {s for s in seeds if all(metric in r[s] for r in runs)}
    if not seeds:
        return None
    return [statistics.fmean(r[s][metric] for s in seeds) for r in runs]


def paired(table: dict, a: str, b: str, metric: str) -> list[float]:
    """Per model: metric(a) - metric(b), on the fine-tune seeds both arms ran, over models where both ran."""
    out = []
    for m in sorted(set(table.get(a, {})) & set(table.get(b, {}))):
        means = common_means(table, m, (a, b), metric)
        if means is not None:
            out.append(means[0] - means[1])
    return out


def share_above_floor(table: dict, arm: str, metric: str = "result") -> list[float]:
    """S(arm) per model: (L_floor - L_arm) / (L_floor - L_all)."""
    out = []
    for m in sorted(set(table.get(arm, {})) & set(table.get("floor", {})) & set(table.get("all-r8", {}))):
        means = common_means(table, m, ("floor", arm, "all-r8"), metric)
        if means is None:
            continue
        floor, arm_l, all_l = means
        if floor - all_l != 0:
            out.append((floor - arm_l) / (floor - all_l))
    return out


def floor_recovery(table: dict, metric: str = "result") -> dict[int, float]:
    """R_floor per model: (L_base - L_floor) / (L_base - L_all)."""
    out = {}
    for m in sorted(set(table.get("base", {})) & set(table.get("floor", {})) & set(table.get("all-r8", {}))):
        means = common_means(table, m, ("floor", "all-r8"), metric)
        if means is None or metric not in table["base"][m]:
            continue
        base, (floor, all_l) = table["base"][m][metric], means
        if base - all_l != 0:
            out[m] = (base - floor) / (base - all_l)
    return out


def parameter_share(table: dict, arm: str) -> float | None:
    arm_p = [v["expert_params"] for v in table.get(arm, {}).values() if "expert_params" in v]
    all_p = [v["expert_params"] for v in table.get("all-r8", {}).values() if "expert_params" in v]
    return statistics.fmean(arm_p) / statistics.fmean(all_p) if arm_p and all_p and statistics.fmean(all_p) else None


def combine(parts: Iterable[dict]) -> str:
    words = [p["verdict"] for p in parts]
    if not words:
        return "inconclusive"
    if all(w == "supported" for w in words):
        return "supported"
    if any(w == "refuted" for w in words):
        return "refuted"
    return "inconclusive"


# ----------------------------------------------------------------------------------------------- hypotheses
def hypotheses(tables: dict[tuple, dict], small: dict[tuple, dict] | None = None,
               v2_runs: tuple[int, int] = (0, 0)) -> dict[str, Any]:
    """Verdicts of H1-H6 from the main tables, and H6's small-data part from ``small`` (keyed (recipe, target,
    regime)); ``v2_runs``: (runs with in-vocabulary forgetting, all fine-tuning runs), reported with H5."""
    out: dict[str, Any] = {}
    for h in ("H1", "H2", "H3", "H4", "H5", "H6"):
        out[h] = {"parts": {}}
    for (recipe, target, regime), t in sorted((small or {}).items()):
        if regime.endswith("-e10"):
            d = paired(t, "all-r8", "hot-k8", "result")
            if d:
                out["H6"]["parts"][f"{recipe}/{target} {regime}: all-r8 - hot-k8"] = verdict(
                    d, 0.0, recipe, ft=min_ft(t, "all-r8", "hot-k8"), runs=run_count(t, "all-r8", "hot-k8"))
    for (recipe, target), t in sorted(tables.items()):
        tag = f"{recipe}/{target}"
        for other in ("random-k2", "cold-k2"):
            d = paired(t, other, "hot-k2", "result")
            if d:
                out["H1"]["parts"][f"{tag}: {other} - hot-k2"] = verdict(
                    d, 0.0, recipe, ft=min_ft(t, other, "hot-k2"), runs=run_count(t, other, "hot-k2"))
        matched = MATCHED_HOT.get(recipe, "hot-k2")
        d = paired(t, "all-matched", matched, "result")
        if d:
            out["H2"]["parts"][f"{tag}: all-matched - {matched}"] = verdict(
                d, 0.0, recipe, ft=min_ft(t, "all-matched", matched), runs=run_count(t, "all-matched", matched))
        if recipe == "default":
            s = share_above_floor(t, "hot-k2")
            p = parameter_share(t, "hot-k2")
            if s and p is not None:
                out["H3"]["parts"][f"{tag}: S(hot-k2) vs P={p:.3f}"] = verdict(
                    s, p, recipe, ft=min_ft(t, "floor", "hot-k2", "all-r8"),
                    runs=run_count(t, "floor", "hot-k2", "all-r8"))
        d = paired(t, "all-r8", "hot-k2", "forget_v2_mean")  # in-vocabulary documents only (Deviation 12)
        if d:
            out["H5"]["parts"][f"{tag}: forgetting (in vocabulary) all-r8 - hot-k2"] = verdict(
                d, 0.0, recipe, ft=min_ft(t, "all-r8", "hot-k2", metric="forget_v2_mean"),
                runs=sum(sum("forget_v2_mean" in m for m in v["by_ft"].values())
                         for a in ("all-r8", "hot-k2") for v in t.get(a, {}).values()))
        if recipe == "olmoe":
            d = paired(t, "all-r8", "hot-k8", "result")
            if d:
                out["H6"]["parts"][f"{tag}: all-r8 - hot-k8"] = verdict(
                    d, 0.0, recipe, ft=min_ft(t, "all-r8", "hot-k8"), runs=run_count(t, "all-r8", "hot-k8"))
    for recipe in sorted({r for r, _ in tables}):
        arith, facts = tables.get((recipe, "arithmetic")), tables.get((recipe, "facts"))
        if arith is None or facts is None:
            continue
        ra, rf = floor_recovery(arith), floor_recovery(facts)
        if not rf:
            continue
        ft = min(min_ft(arith, "floor", "all-r8"), min_ft(facts, "floor", "all-r8"))
        runs = run_count(arith, "floor", "all-r8") + run_count(facts, "floor", "all-r8")
        out["H4"]["parts"][f"{recipe}: R_floor(facts) < 0.8"] = verdict(
            list(rf.values()), 0.8, recipe, "<", ft=ft, runs=run_count(facts, "floor", "all-r8"))
        both = sorted(set(ra) & set(rf))
        if both:
            out["H4"]["parts"][f"{recipe}: R_floor(arithmetic) - R_floor(facts)"] = verdict(
                [ra[m] - rf[m] for m in both], 0.0, recipe, ft=ft, runs=runs)
        if ra and statistics.fmean(ra.values()) >= 0.9 and statistics.fmean(rf.values()) >= 0.9:
            out["H4"]["note"] = ("R_floor >= 0.9 on both targets: on these targets the expert adapter is not needed.")
    with_v2, trained = v2_runs
    out["H5"]["runs_with_forgetting_v2"] = with_v2
    out["H5"]["note"] = (f"H5 uses only the in-vocabulary forgetting documents (PLAN.md Deviation 12): {with_v2} of "
                         f"{trained} fine-tuning runs have them; the older forgetting is tabulated, not used.")
    for h, entry in out.items():
        entry["verdict"] = combine(entry["parts"].values()) if entry["parts"] else "inconclusive"
        if not entry["parts"]:
            entry["why"] = "no runs of the arms this hypothesis needs"
    return out


# --------------------------------------------------------------------------------------------------- report
def pooled(table: dict, arm: str, metric: str) -> tuple[float | None, int]:
    values = [v[metric] for v in table.get(arm, {}).values() if metric in v]
    return (statistics.fmean(values) if values else None), len(values)


def fmt(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


QUESTIONS = {  # PLAN.md's hypotheses in a line each (the predicted side)
    "H1": "selection matters: random k=2 and cold k=2 lose to hot k=2 (result tokens)",
    "H2": "hot k=2 beats all experts at the matched rank",
    "H3": "hot k=2 gets more than its parameter share of the gain above the floor",
    "H4": "on facts the floor recovers clearly less than on arithmetic",
    "H5": "HELLoRA forgets less than all-experts LoRA (in-vocabulary documents)",
    "H6": "the paper's direction: hot k=8 at least as good as all experts (olmoe; small data, 10 epochs)",
}


def count_words(entry: dict) -> str:
    words = [p["verdict"] for p in entry["parts"].values()]
    return ", ".join(f"{words.count(w)} {w}" for w in ("supported", "refuted", "inconclusive") if words.count(w)) or "-"


def exploratory_lines(tables: dict) -> list[str]:
    """EXPLORATORY comparisons (result tokens) that have runs: mean, interval and sign, and no verdict."""
    rows = []
    for recipe, a, b in EXPLORATORY:
        for (rec, target), t in sorted(tables.items()):
            values = paired(t, a, b, "result") if rec == recipe else []
            if values:
                lo, hi = bootstrap(values)
                rows.append(f"| {recipe}/{target}: {a} - {b} | {fmt(statistics.fmean(values))} | "
                            f"[{lo:.4f}, {hi:.4f}] | {sum(v > 0 for v in values)}/{len(values)} | "
                            f"{run_count(t, a, b)} |")
    if not rows:
        return []
    return ["", "#### Exploratory (PLAN.md Deviation 18(e): added after the `olmoe` results were seen; no verdict)",
            "", "| comparison (positive favours the second arm) | mean | 95% CI (models) | sign | runs |",
            "|---|---|---|---|---|", *rows]


def render(tables: dict, hyp: dict, runs: list[dict], small: dict | None = None) -> str:
    trained = [r for r in runs if r["arm"] != "base" and not r.get("regime")]
    small_runs = [r for r in runs if r.get("regime")]
    models = sorted({(r["recipe"], r["pretrain_seed"]) for r in runs})
    partial = any(len({r["pretrain_seed"] for r in runs if r["recipe"] == rec}) < MIN_MODELS.get(rec, 5)
                  for rec in {r["recipe"] for r in runs}) or not runs
    lines = ["### Evidence (issue 20): results against the pre-registration, bench/evidence/PLAN.md", ""]
    if partial:
        lines += ["**PARTIAL: below PLAN.md's minimum counts (5 pretrained models x 3 fine-tune seeds on `default`, "
                  "3 x 2 on `olmoe`). No hypothesis can be decided from these runs; every verdict below is "
                  "`inconclusive` for that reason, and the numbers are descriptive only.**", ""]
    lines += [f"{len(trained)} fine-tuning runs (main budget) and {len(small_runs)} small-data runs on {len(models)} "
              "pretrained model(s): " + ", ".join(f"{rec} seed {s}" for rec, s in models) + ". Loss in nats per token "
              "on held-out rows; `result` = the answer value's tokens (primary), `format` = the other completion "
              "tokens; forgetting = held-out document loss after fine-tuning minus before (mean of math, code, "
              "safety, prose): `v1` on documents out of the lab model's vocabulary (not used for H5, PLAN.md "
              "Deviation 10), `v2` on in-vocabulary ones (Deviation 12). Generated by `bench/evidence/analyze.py` "
              "from `bench/evidence/runs/`; the discussion is in `docs/evidence.md`.", ""]
    lines += ["#### Verdicts", "", "| | hypothesis (predicted side) | verdict | comparisons | runs (summed over "
              "comparisons) |", "|---|---|---|---|---|"]
    for h, entry in hyp.items():
        n_runs = sum(p.get("runs") or 0 for p in entry["parts"].values())
        lines.append(f"| {h} | {QUESTIONS[h]} | **{entry['verdict']}** | {count_words(entry)} | {n_runs} |")
    lines += ["", "#### Comparisons", "", "| | verdict | comparison | mean | 95% CI (models) | sign | runs | why |",
              "|---|---|---|---|---|---|---|---|"]
    for h, entry in hyp.items():
        if not entry["parts"]:
            lines.append(f"| {h} | {entry['verdict']} | - | - | - | - | 0 | {entry.get('why', '')} |")
        for name, part in entry["parts"].items():
            lo, hi = part["ci95"]
            lines.append(f"| {h} | {part['verdict']} (overall: {entry['verdict']}) | {name} | {fmt(part['mean'])} | "
                         f"[{fmt(lo)}, {fmt(hi)}] | {part['sign']} | {part.get('runs') or '-'} | {part['why']} |")
        if entry.get("note"):
            lines.append(f"| {h} | note | {entry['note']} | | | | | |")
    lines += exploratory_lines(tables)
    for (recipe, target), t in sorted(tables.items()):
        lines += ["", f"#### {recipe} / {target}", "",
                  "| arm | models | ft seeds | result loss | format loss | whole loss | exact match | forgetting v1 (mean) | "
                  "forgetting v1 (math) | forgetting v2 (mean) | forgetting v2 (math) | S(arm) | P(arm) |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for arm in sorted(t, key=lambda a: (a != "base", a)):
            result, n = pooled(t, arm, "result")
            seeds = sorted({v["n_ft"] for v in t[arm].values()})
            s = share_above_floor(t, arm) if arm not in ("base",) else []
            p = parameter_share(t, arm)
            lines.append(
                f"| {arm} | {n} | {'/'.join(map(str, seeds))} | {fmt(result)} | {fmt(pooled(t, arm, 'format')[0])} | "
                f"{fmt(pooled(t, arm, 'whole')[0])} | {fmt(pooled(t, arm, 'exact_match')[0], 3)} | "
                f"{fmt(pooled(t, arm, 'forget_mean')[0])} | {fmt(pooled(t, arm, 'forget_math')[0])} | "
                f"{fmt(pooled(t, arm, 'forget_v2_mean')[0])} | {fmt(pooled(t, arm, 'forget_v2_math')[0])} | "
                f"{fmt(statistics.fmean(s), 3) if s else '-'} | {fmt(p, 3)} |")
        if any(pooled(t, arm, "forget_v2_mean")[1] for arm in t):
            lines += ["", "Forgetting on the in-vocabulary documents (v2) per domain, mean over models that have it:", "",
                      "| arm | models | " + " | ".join(DOMAINS) + " | mean |", "|---|---|" + "---|" * (len(DOMAINS) + 1)]
            for arm in sorted(a for a in t if a != "base" and pooled(t, a, "forget_v2_mean")[1]):
                lines.append(f"| {arm} | {pooled(t, arm, 'forget_v2_mean')[1]} | " + " | ".join(
                    fmt(pooled(t, arm, f"forget_v2_{d}")[0]) for d in (*DOMAINS, "mean")) + " |")
        seeds_all = sorted({m for a in t.values() for m in a})
        lines += ["", "Per model (result loss, mean over fine-tune seeds):", "",
                  "| arm | " + " | ".join(f"seed {m}" for m in seeds_all) + " |", "|---|" + "---|" * len(seeds_all)]
        for arm in sorted(t, key=lambda a: (a != "base", a)):
            lines.append(f"| {arm} | " + " | ".join(fmt(t[arm].get(m, {}).get("result")) for m in seeds_all) + " |")
    held_out_curves = figures.mean_curves(small_runs, "held_out")  # the same means the small-data figure draws
    for (recipe, target, regime), t in sorted((small or {}).items()):
        lines += ["", f"#### small data: {recipe} / {target} / {regime}", "",
                  "Held-out and training-row result loss after the last epoch, the best held-out point of the curve, "
                  "and the held-out curve (result loss before training and after each epoch), means over models.", "",
                  "| arm | models | ft seeds | held-out result | train result | best held-out (epoch) | held-out curve |",
                  "|---|---|---|---|---|---|---|"]
        for arm in sorted(t):
            seeds = sorted({v["n_ft"] for v in t[arm].values()})
            curve = held_out_curves.get((recipe, target, regime), {}).get(arm, [])
            lines.append(
                f"| {arm} | {pooled(t, arm, 'result')[1]} | {'/'.join(map(str, seeds))} | {fmt(pooled(t, arm, 'result')[0])} | "
                f"{fmt(pooled(t, arm, 'train_result')[0])} | {fmt(pooled(t, arm, 'best_result')[0])} "
                f"({fmt(pooled(t, arm, 'best_epoch')[0], 1)}) | {', '.join(fmt(c, 2) for c in curve)} |")
    return "\n".join(lines) + "\n"


def analyze(runs: list[dict]) -> tuple[dict, str]:
    main_runs = [r for r in runs if not r.get("regime")]
    small_runs = [r for r in runs if r.get("regime")]
    tables = per_model(main_runs)
    bases = [r for r in runs if r["arm"] == "base"]
    # small-data runs grouped per (recipe, "target regime"), each with a copy of its model's base run
    regimes = sorted({r["regime"] for r in small_runs})
    relabelled = [{**r, "target": f"{r['target']} {r['regime']}"} for r in small_runs]
    relabelled += [{**b, "target": f"{b['target']} {g}"} for b in bases for g in regimes]
    small = {(rec, tgt.rsplit(" ", 1)[0], tgt.rsplit(" ", 1)[1]): t
             for (rec, tgt), t in per_model(relabelled).items()
             if any(a != "base" for a in t)}
    bases_v2 = {(r["recipe"], r["pretrain_seed"], r["target"]) for r in bases if r.get("domain_loss_v2")}
    trained = [r for r in main_runs if r["arm"] != "base"]
    with_v2 = sum(bool(r.get("domain_loss_v2")) and (r["recipe"], r["pretrain_seed"], r["target"]) in bases_v2
                  for r in trained)
    hyp = hypotheses(tables, small, (with_v2, len(trained)))
    data = {
        "plan": "bench/evidence/PLAN.md",
        "runs": len(runs),
        "tables": {f"{r}/{t}": {arm: {str(m): v for m, v in ms.items()} for arm, ms in tab.items()}
                   for (r, t), tab in tables.items()},
        "small_data": {f"{r}/{t}/{g}": {arm: {str(m): v for m, v in ms.items()} for arm, ms in tab.items()}
                       for (r, t, g), tab in small.items()},
        "hypotheses": hyp,
    }
    return data, render(tables, hyp, runs, small)


def draw_figures(runs: list[dict], out: Path) -> str:
    """Draw the report's figures into ``out`` (figures.py) and return the markdown that shows them."""
    tables = per_model([r for r in runs if not r.get("regime")])
    points = {key: figures.share_points(table, share_above_floor, parameter_share) for key, table in tables.items()}
    lines = []
    if figures.share_figure(points, out / "evidence-share.png"):
        lines.append("![share of the all-experts gain above the floor against parameter share, per arm]"
                     "(evidence-share.png)")
    if figures.small_data_figure(runs, out / "evidence-small-data.png"):
        lines.append("![small-data arm: held-out and training result-token loss per epoch]"
                     "(evidence-small-data.png)")
    return "\n#### Figures\n\n" + "\n\n".join(lines) + "\n" if lines else ""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=Path, default=HERE / "runs")
    parser.add_argument("--out", type=Path, default=REPO / "bench" / "results")
    args = parser.parse_args(argv)
    sys.path.insert(0, str(REPO))
    from hellora_trl.utils import atomic_write_text

    runs = load_runs(args.runs)
    data, md = analyze(runs)
    args.out.mkdir(parents=True, exist_ok=True)
    md += draw_figures(runs, args.out)
    atomic_write_text(args.out / "evidence.json", json.dumps(data, indent=1, sort_keys=True) + "\n")
    atomic_write_text(args.out / "evidence.md", md)
    print(md)
    return 0


if __name__ == "__main__":
    sys.exit(main())
