"""Run the pre-registered evidence experiments (bench/evidence/PLAN.md), resumable and chunked.

One raw JSON per (recipe, pretraining seed, fine-tune seed, target, arm) under ``bench/evidence/runs/``, plus one
``base`` JSON per (recipe, pretraining seed, target): the untrained model's target and forgetting losses. A unit
whose file exists for the same weights is skipped, so the same command continues where the last one stopped (a
file written for other weights is moved to ``runs/superseded/<hash>/`` and the unit runs again; profiles are named
by the weights hash). ``--budget`` (seconds)
stops the process before it starts a unit it cannot finish in time (exit code 3: more to do), so no single
command runs past the limit; a driver repeats the command until it exits 0:

    until python bench/evidence/run.py --budget 540; do :; done
    python bench/evidence/run.py --pretrain-seeds 0 1 2 --targets arithmetic facts --arms floor hot-k2 random-k2
    until python bench/evidence/run.py --small-data --budget 540; do :; done

``--small-data`` runs PLAN.md's small-data, long-training arm instead: the first ``--small-rows`` (200) training
rows for each of ``--epochs`` (3 and 10), arms :data:`SMALL_DATA_ARMS` unless ``--arms`` is given, one unit per
(model, fine-tune seed, target, rows and epochs, arm) named ``...-<target>-small200-e3-<arm>.json`` with
``"regime": "small200-e3"``; each records ``curves``: result/format/whole loss on the training rows and on the
held-out rows before training and after every epoch. Every unit (both modes) also scores the in-vocabulary
forgetting documents (``domain_loss_v2``, PLAN.md Deviation 12), and a ``base`` file written before they existed
gets that key added (its other keys are kept as they are).

Pretraining a lab model is one indivisible unit (minutes); it is cached per recipe and seed under ``--cache`` with
the thread count recorded in its card (``--threads``, default 1), so every model of a run is built the same way.
Every unit trains from the same checkpoint with the same rows, order, steps and learning rate; HELLoRA arms select
from one routing profile per (model, fine-tune seed, target), taken once (the paper's LoRA warm-up) and saved.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))

RUNS = Path(__file__).resolve().parent / "runs"
MORE_TO_DO = 3
PRIORITY_ARMS = ("floor", "attention", "hot-k2", "random-k2", "cold-k2", "all-r8", "all-matched")
# PLAN.md's small-data arms, plus hot-k8 (Deviation 13: H6 compares all r=8 with hot k=8 in the 10-epoch arm)
SMALL_DATA_ARMS = ("floor", "hot-k2", "all-r8", "all-matched", "hot-k8")
SMALL_DATA_EPOCHS = (3, 10)
ALL_ARMS = PRIORITY_ARMS + ("hot-k1", "hot-k4", "hot-k8", "model-k2", "mass", "lori-d", "hellori-d-k2",
                            "random-weighted-k2")


def settings_for(target: str, steps: int):
    from hellora_trl.recipes.lab.quality import FineTuneSettings

    # fixed for every arm: steps, rows, batch, learning rate, rank 8 (PLAN.md "Arms")
    return FineTuneSettings(steps=steps, train_rows=1200, eval_rows=128 if target == "arithmetic" else 48,
                            domain_rows=32, generate_rows=32 if target == "arithmetic" else 0)


def arm_config(arm: str, num_experts: int, lora_r: int):
    """The QualityConfig of an arm name (``hot-k<k>``, ``random-k2``, ``all-matched``...)."""
    from hellora_trl.recipes.lab.quality import QualityConfig

    if arm == "floor":
        return QualityConfig(arm, kind="floor")
    if arm == "attention":
        return QualityConfig(arm, kind="attention")
    if arm == "all-r8":
        return QualityConfig(arm, k=num_experts)
    if arm == "all-matched":  # every expert at the rank whose expert parameters equal hot k=2 at rank lora_r
        rank = max(1, round(2 * lora_r / num_experts))
        pattern = r".*\.mlp\.experts"
        return QualityConfig(arm, k=num_experts, lora={"rank_pattern": {pattern: rank}, "alpha_pattern": {pattern: 2 * rank}})
    if arm == "mass":
        return QualityConfig(arm, k=None, selection="mass")
    if arm == "lori-d":
        return QualityConfig(arm, k=num_experts, variant="lori_d")
    if arm == "hellori-d-k2":
        return QualityConfig(arm, k=2, variant="lori_d")
    kind, _, k = arm.rpartition("-k")
    strategies = {"hot": "layer", "random": "random", "cold": "cold", "model": "model",
                  "random-weighted": "random_weighted"}
    if kind in strategies and k.isdigit():
        return QualityConfig(arm, k=int(k), selection=strategies[kind])
    raise SystemExit(f"unknown arm {arm!r}; choose from {', '.join(ALL_ARMS)} or hot-k<k>.")


def unit_path(out: Path, recipe: str, pseed: int, fseed: int | None, target: str, arm: str, regime: str | None = None) -> Path:
    ft = "base" if fseed is None else f"f{fseed}"
    target = target if regime is None else f"{target}-{regime}"
    return out / f"{recipe}-p{pseed}-{ft}-{target}-{arm}.json"


def small_settings(target: str, rows: int, epochs: int):
    """The small-data regime's settings: the main budget's batch, rate and evaluation sizes, ``rows`` training rows
    and ``epochs`` passes over them (steps = epochs x ceil(rows / batch))."""
    base = settings_for(target, 1)
    per_epoch = -(-rows // base.batch_size)
    return dataclasses.replace(base, steps=epochs * per_epoch, train_rows=rows), per_epoch


def stated_held_out(train: list[dict], held_out: list[dict]) -> int | None:
    """Facts only: how many held-out questions have their fact stated in ``train`` (learnable at all)."""
    if not held_out or "entity" not in held_out[0]:
        return None
    stated = {(r["entity"], r["attribute"]) for r in train if r.get("kind") == "statement"}
    return sum((r["entity"], r["attribute"]) in stated for r in held_out)


def ensure_base(path: Path, base_file: Path, identity: dict, target: str, settings, held_out, domains, domains_v2) -> None:
    """Write the untrained model's scores once; add ``domain_loss_v2`` to a base file that predates it."""
    from hellora_trl.recipes.lab import quality as q

    if done(base_file, identity.get("weights_sha256")):
        data = json.loads(base_file.read_text())
        if "domain_loss_v2" in data:
            return
        model, tokenizer = q._load(path)
        write_json(base_file, {**data, "domain_loss_v2": q.domain_losses(model, tokenizer, domains_v2)})
        return
    model, tokenizer = q._load(path)
    write_json(base_file, {**identity, "target": target, "arm": "base", "ft_seed": None,
                           "settings": dataclasses.asdict(settings),
                           **q.score(model, tokenizer, held_out, domains, settings, domains_v2)})


def profile_path_for(out: Path, recipe: str, pseed: int, sha: str | None, fseed: int, target: str,
                     regime: str | None = None) -> Path:
    """Named by the weights hash, so a profile taken on other weights is never reused (Deviation 16)."""
    suffix = f"-{regime}" if regime else ""
    return out / "profiles" / f"{recipe}-p{pseed}-{(sha or 'nohash')[:8]}-f{fseed}-{target}{suffix}.json"


def done(path: Path, sha: str | None) -> bool:
    """True when ``path`` holds a result of these weights. A result of other weights (the same seed rebuilt on
    another machine, Deviation 15) is moved, never deleted, to ``superseded/<its hash>/`` and the unit runs again."""
    if not path.is_file():
        return False
    recorded = json.loads(path.read_text()).get("weights_sha256")
    if recorded == sha:
        return True
    dest = path.parent / "superseded" / (recorded or "nohash")[:8] / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    os.replace(path, dest)
    print(f"{path.name}: written for weights {(recorded or 'unknown')[:8]}, this model is {(sha or 'unknown')[:8]}; "
          f"moved to {dest.parent} and run again", flush=True)
    return False


def set_aside_without_v2(path: Path, result: dict[str, Any]) -> dict[str, Any]:
    """Deviation 18: a unit run again only to add ``domain_loss_v2``. Its old file is moved (never deleted) to
    ``superseded/without-v2/``; the new unit records whether every metric the old one had came out the same."""
    old = json.loads(path.read_text())
    dest = path.parent / "superseded" / "without-v2" / path.name
    dest.parent.mkdir(parents=True, exist_ok=True)
    n = 1
    while dest.exists():  # an earlier set-aside copy is never overwritten
        dest, n = dest.with_name(f"{path.stem}.{n}{path.suffix}"), n + 1
    os.replace(path, dest)
    keys = ("target_loss", "target_split", "domain_loss", "train_loss", "exact_match", "hot_experts")
    same = {key: old.get(key) == result.get(key) for key in keys if key in old}
    return {"file": str(dest.relative_to(path.parent)), "identical": all(same.values()), "same": same}


def write_json(path: Path, data: dict[str, Any]) -> None:
    from hellora_trl.utils import atomic_write_text

    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


class Budget:
    def __init__(self, seconds: float) -> None:
        self.start, self.seconds = time.perf_counter(), seconds

    def allows(self, estimate: float) -> bool:
        return time.perf_counter() - self.start + estimate <= self.seconds


def model_path(recipe_name: str, pseed: int, cache: Path, threads: int, budget: Budget, build_estimate: float):
    """The cached checkpoint of (recipe, seed), built with ``threads`` threads; None if it cannot be built in time."""
    from hellora_trl.recipes.lab import LAB_RECIPES, lab_model_path

    recipe = dataclasses.replace(LAB_RECIPES[recipe_name], seed=pseed)
    if not (cache / recipe.key() / "lab_card.json").is_file() and not budget.allows(build_estimate):
        return None
    return lab_model_path(recipe, cache_dir=cache, threads=threads, progress=False)


def pretrained(args: argparse.Namespace, pseed: int, budget: "Budget"):
    """(path, expert count, identity recorded in every unit), or None when no time is left to pretrain it. The
    identity carries the weights hash because a seed rebuilt on another machine is another model (Deviation 15)."""
    from hellora_trl.recipes.lab import read_card

    path = model_path(args.recipe, pseed, args.cache, args.threads, budget, args.build_estimate)
    if path is None:
        print(f"stop: no time left to pretrain {args.recipe} seed {pseed}")
        return None
    card = read_card(path)
    identity = {"recipe": args.recipe, "pretrain_seed": pseed, "weights_sha256": card.get("weights_sha256"),
                "pretrain_threads": card["threads"], "recipe_key": card["key"]}
    return path, card["recipe"]["num_experts"], identity


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="default")
    parser.add_argument("--pretrain-seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--ft-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--targets", nargs="+", default=["arithmetic", "facts"])
    parser.add_argument("--arms", nargs="+", default=None,
                        help=f"default: {' '.join(PRIORITY_ARMS)}; with --small-data: {' '.join(SMALL_DATA_ARMS)}")
    parser.add_argument("--small-data", action="store_true",
                        help="run the small-data, long-training arm (PLAN.md) instead of the main budget")
    parser.add_argument("--small-rows", type=int, default=200, help="--small-data: training rows (default 200)")
    parser.add_argument("--epochs", type=int, nargs="+", default=list(SMALL_DATA_EPOCHS),
                        help="--small-data: epochs over the rows, one unit each (default 3 10)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--budget", type=float, default=540.0, help="seconds this command may run (default 540)")
    parser.add_argument("--unit-estimate", type=float, default=150.0, help="seconds one fine-tune unit may take")
    parser.add_argument("--build-estimate", type=float, default=480.0, help="seconds one pretraining may take")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=None, help="lab model cache (default: the lab's own cache)")
    parser.add_argument("--out", type=Path, default=RUNS)
    parser.add_argument("--complete-v2", action="store_true",
                        help="run again the units of these arms that lack the in-vocabulary forgetting "
                             "(domain_loss_v2, Deviation 18); the old file is kept in superseded/without-v2/")
    args = parser.parse_args(argv)

    import torch

    from hellora_trl.recipes.lab import LAB_RECIPES
    from hellora_trl.recipes.lab import quality as q

    if args.recipe not in LAB_RECIPES:
        raise SystemExit(f"unknown recipe {args.recipe!r}; choose one of {sorted(LAB_RECIPES)}.")
    torch.set_num_threads(args.threads)
    if args.cache is None:
        from hellora_trl.recipes.lab import lab_cache_dir

        args.cache = lab_cache_dir()
    if args.arms is None:
        args.arms = list(SMALL_DATA_ARMS if args.small_data else PRIORITY_ARMS)
    if args.small_rows < 1 or any(e < 1 for e in args.epochs):
        raise SystemExit(f"--small-rows and --epochs must be >= 1, got {args.small_rows} and {args.epochs}.")
    for arm in args.arms:
        arm_config(arm, LAB_RECIPES[args.recipe].num_experts, 8)  # refuse bad names before any work
    if args.small_data:
        return run_small_data(args)
    budget = Budget(args.budget)
    last_unit = args.unit_estimate
    for pseed in args.pretrain_seeds:
        model = pretrained(args, pseed, budget)
        if model is None:
            return MORE_TO_DO
        path, experts, identity = model
        for target in args.targets:
            settings = settings_for(target, args.steps)
            train, held_out = q.target_data(settings, seed=0, target=target)  # one held-out set for every unit
            domains, domains_v2 = q.domain_texts(settings, seed=0), q.domain_texts_v2(settings, seed=0)
            base_file = unit_path(args.out, args.recipe, pseed, None, target, "base")
            ensure_base(path, base_file, identity, target, settings, held_out, domains, domains_v2)
            for fseed in args.ft_seeds:
                profile_path = profile_path_for(args.out, args.recipe, pseed, identity["weights_sha256"], fseed,
                                                target)
                for arm in args.arms:
                    out = unit_path(args.out, args.recipe, pseed, fseed, target, arm)
                    previous = None
                    if done(out, identity["weights_sha256"]):
                        if not (args.complete_v2 and "domain_loss_v2" not in json.loads(out.read_text())):
                            continue
                        previous = out
                    if not budget.allows(last_unit * 1.2):
                        print(f"stop: budget reached before {out.name}")
                        return MORE_TO_DO
                    started = time.perf_counter()
                    config = arm_config(arm, experts, settings.lora_r)
                    if config.kind == "hellora" and not profile_path.is_file():
                        profile_path.parent.mkdir(parents=True, exist_ok=True)
                        q.take_profile(path, train, settings, fseed, profile_path)
                    result = q.finetune(config, path, train, settings, fseed, profile_path, held_out, domains,
                                        domains_v2)
                    result["unit_seconds"] = time.perf_counter() - started
                    if previous is not None:
                        result["rerun_of"] = set_aside_without_v2(previous, result)
                    write_json(out, {**identity, "target": target, "arm": arm, "ft_seed": fseed,
                                     "config": dataclasses.asdict(config), "settings": dataclasses.asdict(settings),
                                     "threads": args.threads, **result})
                    last_unit = max(args.unit_estimate / 2, result["unit_seconds"])
                    print(f"{out.name}: result loss {result['target_split']['result']:.4f} "
                          f"({result['unit_seconds']:.0f}s)", flush=True)
    return 0


def run_small_data(args) -> int:
    """PLAN.md's small-data, long-training arm (see the module docstring); same chunking and exit codes."""
    from hellora_trl.recipes.lab import quality as q
    from hellora_trl.recipes.lab.targets import target_task, to_dataset
    from transformers import AutoTokenizer

    budget = Budget(args.budget)
    last_seconds, last_steps = args.unit_estimate, args.steps  # the last unit's time and steps
    for pseed in args.pretrain_seeds:
        model = pretrained(args, pseed, budget)
        if model is None:
            return MORE_TO_DO
        path, experts, identity = model
        for target in args.targets:
            main_settings = settings_for(target, args.steps)
            # the main budget's held-out rows and documents; training rows: the first small_rows of the same split
            train_rows, held_out = target_task(target, args.small_rows, main_settings.eval_rows, seed=0)
            train = to_dataset(train_rows)
            domains = q.domain_texts(main_settings, seed=0)
            domains_v2 = q.domain_texts_v2(main_settings, seed=0)
            base_file = unit_path(args.out, args.recipe, pseed, None, target, "base")
            ensure_base(path, base_file, identity, target, main_settings, held_out, domains, domains_v2)
            for fseed in args.ft_seeds:
                for epochs in args.epochs:
                    settings, per_epoch = small_settings(target, args.small_rows, epochs)
                    regime = f"small{args.small_rows}-e{epochs}"
                    profile_path = profile_path_for(args.out, args.recipe, pseed, identity["weights_sha256"], fseed,
                                                    target, regime)
                    for arm in args.arms:
                        out = unit_path(args.out, args.recipe, pseed, fseed, target, arm, regime)
                        if done(out, identity["weights_sha256"]):
                            continue
                        estimate = last_seconds * 1.2 * max(1.0, settings.steps / last_steps)
                        if not budget.allows(estimate):
                            print(f"stop: budget reached before {out.name}")
                            return MORE_TO_DO
                        started = time.perf_counter()
                        config = arm_config(arm, experts, settings.lora_r)
                        if config.kind == "hellora" and not profile_path.is_file():
                            profile_path.parent.mkdir(parents=True, exist_ok=True)
                            q.take_profile(path, train, settings, fseed, profile_path)
                        tokenizer = AutoTokenizer.from_pretrained(path)
                        curves = q.epoch_curves(tokenizer, train_rows, held_out, per_epoch)
                        result = q.finetune(config, path, train, settings, fseed, profile_path, held_out, domains,
                                            domains_v2, callbacks=[curves])
                        result["unit_seconds"] = time.perf_counter() - started
                        write_json(out, {**identity, "target": target, "arm": arm, "ft_seed": fseed,
                                         "regime": regime, "small_data": {
                                             "rows": args.small_rows, "epochs": epochs, "steps_per_epoch": per_epoch,
                                             "held_out_stated": stated_held_out(train_rows, held_out)},
                                         "curves": curves.points,
                                         "config": dataclasses.asdict(config), "settings": dataclasses.asdict(settings),
                                         "threads": args.threads, **result})
                        last_seconds, last_steps = result["unit_seconds"], settings.steps
                        final = curves.points[-1]
                        print(f"{out.name}: held-out result loss {final['held_out']['result']:.4f}, train "
                              f"{final['train']['result']:.4f} after {final['epoch']:g} epochs "
                              f"({result['unit_seconds']:.0f}s)", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
