"""Per-task hot sets and their cross-task Jaccard matrix on the lab models (issue 20 item 5; the paper's Appendix G).

Descriptive, no hypothesis (PLAN.md Deviation 18): for each pretrained model, a forward-only routing profile on six
inputs -- the two fine-tuning targets' training rows (``arithmetic``, ``facts``: prompt + completion) and the
held-out in-vocabulary documents of the four pretraining domains (``math``, ``code``, ``safety``, ``prose``;
``targets.forgetting_texts_v2``) -- the per-layer top-k hot set of each (k = the model's experts per token), and the
Jaccard index of every pair of tasks, averaged over layers. Chance level is the expected Jaccard of two independent
uniform k-subsets of E experts. Where the evidence runs saved the LoRA warm-up profile of a target (fine-tune seed
0), the Jaccard of its hot sets with the forward-only ones on the same rows is reported too.

    python bench/evidence/tasks.py --recipe olmoe --pretrain-seeds 0 1 2
    python bench/evidence/tasks.py --recipe default --pretrain-seeds 0 1 2 3 4

Writes ``bench/results/evidence-tasks-<recipe>.{json,md}``. Models come from the lab cache (built if missing, as
``run.py`` builds them).
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
from math import comb
from pathlib import Path
from typing import Any, Sequence

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402
from hellora_trl.recipes.lab.corpus import DOMAINS  # noqa: E402

RESULTS = Path(__file__).resolve().parents[1] / "results"
TARGETS = ("arithmetic", "facts")


def chance_jaccard(k: int, experts: int) -> float:
    """Expected |A & B| / |A | B| of two independent uniform k-subsets of ``experts`` (exact, hypergeometric)."""
    total = comb(experts, k)
    return sum(comb(k, i) * comb(experts - k, k - i) / total * i / (2 * k - i) for i in range(k + 1))


def jaccard(a: Sequence[int], b: Sequence[int]) -> float:
    a, b = set(a), set(b)
    return len(a & b) / len(a | b) if a | b else 1.0


def mean_jaccard(one: dict[str, list[int]], other: dict[str, list[int]]) -> float:
    """Mean over layers of the per-layer Jaccard of two hot maps (same layer names)."""
    if set(one) != set(other):
        raise ValueError(f"hot maps name different layers: {sorted(set(one) ^ set(other))}")
    return statistics.mean(jaccard(one[name], other[name]) for name in one)


def task_texts(recipe_settings, tokenizer) -> dict[str, list[str]]:
    """The six profiling inputs as plain texts (bos + text + eos)."""
    from hellora_trl.recipes.lab import quality as q
    from hellora_trl.recipes.lab.targets import target_task

    texts: dict[str, list[str]] = {}
    for target in TARGETS:
        settings = run.settings_for(target, 150)
        train, _ = target_task(target, settings.train_rows, settings.eval_rows, seed=0)
        texts[target] = [f"{tokenizer.bos_token}{r['prompt']}{r['completion']}{tokenizer.eos_token}" for r in train]
    docs = q.domain_texts_v2(recipe_settings, seed=0)
    for domain in DOMAINS:  # the lab's pretraining domains, in its own order
        texts[domain] = [f"{tokenizer.bos_token}{d}{tokenizer.eos_token}" for d in docs[domain]]
    return texts


def hot_sets(model, tokenizer, texts: dict[str, list[str]], k: int) -> dict[str, dict[str, list[int]]]:
    """Per task: layer name -> sorted top-k expert ids by forward-only routing count."""
    from datasets import Dataset

    from hellora_trl.profiling import profile_experts

    out = {}
    for task, items in texts.items():
        ids = tokenizer(items, add_special_tokens=False, truncation=True, max_length=192)["input_ids"]
        profile = profile_experts(model, Dataset.from_dict({"input_ids": ids}), batch_size=32, progress=False,
                                  reduce=False)
        out[task] = top_k_map(profile, k)
    return out


def top_k_map(profile, k: int) -> dict[str, list[int]]:
    """Layer name -> sorted ids of the layer's top-k experts by count (the package's own ``layer`` selection)."""
    from hellora_trl.selection import select_hot_experts

    return {name: sorted(int(e) for e in experts)
            for name, experts in select_hot_experts(profile, k=k, strategy="layer").items()}


def warmup_hot_sets(runs: Path, recipe: str, pseed: int, sha: str, k: int) -> dict[str, dict[str, list[int]]]:
    """The evidence runs' LoRA warm-up profiles (fine-tune seed 0) of this model, as top-k hot maps."""
    from hellora_trl.selection import load_plan

    out = {}
    for target in TARGETS:
        path = run.profile_path_for(runs, recipe, pseed, sha, 0, target)
        if path.is_file():
            out[target] = top_k_map(load_plan(path)[0], k)
    return out


def analyse_model(path: Path, identity: dict[str, Any], runs: Path) -> dict[str, Any]:
    from hellora_trl.recipes.lab import quality as q
    from hellora_trl.recipes.lab import read_card

    card = read_card(path)
    experts, k = card["recipe"]["num_experts"], card["recipe"]["num_experts_per_tok"]
    model, tokenizer = q._load(path)
    texts = task_texts(run.settings_for("arithmetic", 150), tokenizer)
    hot = hot_sets(model, tokenizer, texts, k)
    tasks = list(hot)
    matrix = {a: {b: mean_jaccard(hot[a], hot[b]) for b in tasks} for a in tasks}
    warm = warmup_hot_sets(runs, identity["recipe"], identity["pretrain_seed"], identity["weights_sha256"], k)
    return {**identity, "experts": experts, "k": k, "chance": chance_jaccard(k, experts),
            "documents": {t: len(v) for t, v in texts.items()}, "hot_sets": hot, "jaccard": matrix,
            "warmup_vs_forward": {t: mean_jaccard(warm[t], hot[t]) for t in warm}}


def pooled(models: list[dict[str, Any]]) -> dict[str, Any]:
    """Mean, min and max over models of every matrix entry and of the warm-up agreement."""
    tasks = list(models[0]["jaccard"])
    cell = {a: {b: [m["jaccard"][a][b] for m in models] for b in tasks} for a in tasks}
    warm = {t: [m["warmup_vs_forward"][t] for m in models if t in m["warmup_vs_forward"]] for t in TARGETS}
    summary = lambda v: {"mean": statistics.mean(v), "min": min(v), "max": max(v), "models": len(v)}  # noqa: E731
    return {"jaccard": {a: {b: summary(v) for b, v in row.items()} for a, row in cell.items()},
            "warmup_vs_forward": {t: summary(v) for t, v in warm.items() if v}}


def render(recipe: str, models: list[dict[str, Any]], command: str) -> str:
    pool = pooled(models)
    tasks = list(models[0]["jaccard"])
    first = models[0]
    names = ", ".join(f"seed {m['pretrain_seed']}:{m['weights_sha256'][:8]}" for m in models)
    lines = [
        f"### Per-task hot sets and cross-task Jaccard: `{recipe}` lab recipe",
        "",
        f"{len(models)} pretrained model(s) ({names}); "
        f"{first['experts']} experts, hot set = per-layer top-{first['k']} by forward-only routing count "
        f"(chance Jaccard of two uniform {first['k']}-subsets: {first['chance']:.3f}). Inputs: the targets' training "
        f"rows (prompt + completion; {first['documents']['arithmetic']} and {first['documents']['facts']} rows) and "
        f"the held-out in-vocabulary documents of the pretraining domains ({first['documents']['math']} per domain). "
        "Entry = Jaccard averaged over layers; mean over models, [min-max] in brackets. Descriptive: no hypothesis "
        "(PLAN.md Deviation 18). Generated by `bench/evidence/tasks.py`.",
        "",
        "| | " + " | ".join(tasks) + " |",
        "|---|" + "---|" * len(tasks),
    ]
    for a in tasks:
        cells = []
        for b in tasks:
            s = pool["jaccard"][a][b]
            cells.append("1" if a == b else f"{s['mean']:.2f} [{s['min']:.2f}-{s['max']:.2f}]")
        lines.append(f"| **{a}** | " + " | ".join(cells) + " |")
    if pool["warmup_vs_forward"]:
        lines += ["", "LoRA warm-up profile (the evidence runs', fine-tune seed 0) vs forward-only on the same rows, "
                  "Jaccard of the hot sets averaged over layers: " + "; ".join(
                      f"{t} {s['mean']:.2f} [{s['min']:.2f}-{s['max']:.2f}] over {s['models']} model(s)"
                      for t, s in pool["warmup_vs_forward"].items()) + "."]
    off = [pool["jaccard"][a][b]["mean"] for a, b in itertools.combinations(tasks, 2)]
    lines += ["", f"Off-diagonal mean {statistics.mean(off):.2f} (range {min(off):.2f}-{max(off):.2f}) against "
              f"chance {first['chance']:.3f}.", "", f"Command: `{command}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="olmoe")
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--build-estimate", type=float, default=900.0)
    parser.add_argument("--cache", type=Path, default=None)
    parser.add_argument("--runs", type=Path, default=run.RUNS, help="evidence runs (for the warm-up profiles)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)

    import torch

    from hellora_trl.recipes.lab import LAB_RECIPES, lab_cache_dir
    from hellora_trl.utils import atomic_write_text

    if args.recipe not in LAB_RECIPES:
        raise SystemExit(f"unknown recipe {args.recipe!r}; choose one of {sorted(LAB_RECIPES)}.")
    torch.set_num_threads(args.threads)
    args.cache = args.cache or lab_cache_dir()
    budget = run.Budget(float("inf"))
    models = []
    for pseed in args.pretrain_seeds:
        path, _, identity = run.pretrained(args, pseed, budget)
        models.append(analyse_model(path, identity, args.runs))
    command = "python bench/evidence/tasks.py --recipe {} --pretrain-seeds {}".format(
        args.recipe, " ".join(map(str, args.pretrain_seeds)))
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.out / f"evidence-tasks-{args.recipe}"
    atomic_write_text(stem.with_suffix(".json"), json.dumps(
        {"command": command, "models": models, "pooled": pooled(models)}, indent=1) + "\n")
    atomic_write_text(stem.with_suffix(".md"), render(args.recipe, models, command))
    print(stem.with_suffix(".md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
