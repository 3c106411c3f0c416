"""``hellora ablate``: the paper's ablations (selection, k, components, warm-up fraction, variant) in one run.

Every row trains a fresh copy of the same model on the same data with one setting changed from the baseline
(``--full_grid`` crosses all axes instead) and records trainable %, adapter FLOPs per token, training throughput,
final loss and, when an evaluation set is configured, the task metric. Results go to ``ablation.csv`` and
``ablation.md`` in the output directory, rewritten atomically after each row so an interrupted grid keeps what
it finished.
"""

from __future__ import annotations

import copy
import csv
import io
import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..constants import COMPONENTS, STRATEGIES, VARIANTS
from ..utils import atomic_write_text, markdown_table

AXES = ("selection", "k", "components", "warmup_fraction", "variant")
CONFIG_FIELD = {
    "selection": "hellora_selection",
    "k": "hellora_k",
    "components": "hellora_components",
    "warmup_fraction": "hellora_warmup_fraction",
    "variant": "hellora_variant",
}
COLUMNS = (
    "row", *AXES, "trainable_percent", "adapter_gflops_per_token", "all_experts_gflops_per_token",
    "samples_per_second", "tokens_per_second", "final_loss", "metric", "metric_value",
)


@dataclass
class AblationArguments:
    """The grid; everything else (model, data, training) is the `hellora train` arguments."""

    selections: str = field(default="layer,model,cold,random,mass", metadata={"help": "Comma-separated strategies."})
    ks: str = field(default="", metadata={"help": "Comma-separated k values ('' = the family default only)."})
    components: str = field(default="all,router,experts", metadata={"help": "Comma-separated component sets."})
    warmup_fractions: str = field(default="0.1", metadata={"help": "Comma-separated warm-up fractions."})
    variants: str = field(default="lora", metadata={"help": "Comma-separated variants (lora, lori_d, lori_s)."})
    full_grid: bool = field(
        default=False, metadata={"help": "Cross every axis (product) instead of varying one axis at a time."}
    )


def _values(text: str, cast, flag: str = "") -> list:
    try:
        return [cast(v.strip()) for v in text.split(",") if v.strip()]
    except ValueError as err:
        raise ValueError(f"--{flag} {text!r}: every comma-separated value must be a {cast.__name__} ({err}).") from err


def grid_rows(ablation: AblationArguments, baseline: dict[str, Any]) -> list[dict[str, Any]]:
    """The settings to run: one-at-a-time around ``baseline`` (the paper's tables) or the full product."""
    axes = {
        "selection": _values(ablation.selections, str),
        "k": _values(ablation.ks, int, "ks") or [baseline["k"]],
        "components": _values(ablation.components, str),
        "warmup_fraction": _values(ablation.warmup_fractions, float, "warmup_fractions"),
        "variant": _values(ablation.variants, str),
    }
    for name, values in axes.items():
        if not values:
            raise ValueError(f"The ablation axis {name!r} is empty; give at least one value.")
    if ablation.full_grid:
        return [dict(zip(AXES, combo)) for combo in itertools.product(*(axes[a] for a in AXES))]
    rows = [dict(baseline)]
    for axis in AXES:
        for value in axes[axis]:
            row = {**baseline, axis: value}
            if row not in rows:
                rows.append(row)
    return rows


def _baseline(training_args) -> dict[str, Any]:
    return {axis: getattr(training_args, CONFIG_FIELD[axis]) for axis in AXES}


def row_training_args(training_args, row: dict[str, Any], index: int):
    """A copy of the training arguments with this row's settings and its own output folder."""
    args = copy.deepcopy(training_args)
    for axis, value in row.items():
        setattr(args, CONFIG_FIELD[axis], value)
    args.output_dir = str(Path(training_args.output_dir) / f"row{index:02d}")
    args.hellora_profile_path = None  # every row profiles with its own warm-up fraction
    return args


def check_rows(rows: list[dict[str, Any]]) -> None:
    """Fail before the first (long) training run on any value the trainer would reject."""
    allowed = {"selection": STRATEGIES, "components": COMPONENTS, "variant": VARIANTS}
    for row in rows:
        for axis, values in allowed.items():
            if row[axis] not in values:
                raise ValueError(f"Ablation {axis} {row[axis]!r} is not one of {values}.")
        if not 0 < row["warmup_fraction"] <= 1:
            raise ValueError(f"Ablation warm-up fraction {row['warmup_fraction']} must be in (0, 1].")
        if row["k"] is not None and row["k"] < 1:
            raise ValueError(f"Ablation k={row['k']} must be >= 1.")


def check_ks_fit(rows: list[dict[str, Any]], model) -> None:
    """Every row's k against the experts per MoE layer of ``model`` (known once it is loaded), before training."""
    from ..registry import find_moe_layers

    num_experts = find_moe_layers(model)[0].num_experts
    too_big = sorted({row["k"] for row in rows if row["k"] is not None and row["k"] > num_experts})
    if too_big:
        raise ValueError(f"Ablation k={too_big} exceeds the {num_experts} experts per MoE layer of this model; give "
                         f"--ks values of at most {num_experts}. No row was trained.")


def run_row(script_args, training_args, model_args, before_train=None) -> dict[str, Any]:
    """Train one configuration on a fresh model and measure it; ``before_train(trainer)`` runs first when given."""
    from ..accounting import adapter_flops_per_token, trainable_parameter_report
    from .sft import build_trainer, evaluate

    trainer, tokenizer, held_out = build_trainer(script_args, training_args, model_args)
    if before_train is not None:
        before_train(trainer)
    output = trainer.train()
    report = trainable_parameter_report(trainer.model)
    flops = adapter_flops_per_token(trainer.model, trainer.hellora_profile)
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    tokens = next((log["num_tokens"] for log in reversed(trainer.state.log_history) if "num_tokens" in log), None)
    runtime = output.metrics.get("train_runtime") or 0.0
    measured = {
        "trainable_percent": report["trainable_percent"],
        "adapter_gflops_per_token": flops["hellora"] / 1e9,
        "all_experts_gflops_per_token": flops["all_experts"] / 1e9,
        "samples_per_second": output.metrics.get("train_samples_per_second"),
        "tokens_per_second": tokens / runtime if tokens and runtime else None,
        # the last logged loss; runs shorter than logging_steps only have the run's mean
        "final_loss": losses[-1] if losses else output.metrics.get("train_loss"),
        "metric": None,
        "metric_value": None,
    }
    results = evaluate(trainer.model, tokenizer, script_args, held_out, training_args)
    for task, result in results.items():
        name = {"arithmetic": "accuracy", "gsm8k": "accuracy", "humaneval": "pass@1", "safety": "refusal_rate"}[task]
        measured["metric"], measured["metric_value"] = f"{task}/{name}", result.get(name)
    return measured


def write_tables(rows: list[dict[str, Any]], out_dir: str | Path) -> tuple[Path, Path]:
    """CSV for tools and a markdown table for people; both rewritten atomically."""
    out_dir = Path(out_dir)
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    csv_path = atomic_write_text(out_dir / "ablation.csv", buffer.getvalue())
    lines = markdown_table(COLUMNS, ([row.get(c) for c in COLUMNS] for row in rows), empty="–")
    md_path = atomic_write_text(out_dir / "ablation.md", "\n".join(lines) + "\n")
    return csv_path, md_path


def run_grid(ablation: AblationArguments, script_args, training_args, model_args, progress: bool = True) -> list[dict]:
    from tqdm.auto import tqdm

    baseline = _baseline(training_args)
    plan = grid_rows(ablation, baseline)
    check_rows(plan)
    done: list[dict[str, Any]] = []
    for index, row in enumerate(tqdm(plan, desc="ablation", disable=not progress)):
        args = row_training_args(training_args, row, index)
        # the first row's model tells how many experts there are: every row's k is checked before any training
        check = (lambda trainer: check_ks_fit(plan, trainer.model)) if index == 0 else None
        measured = run_row(script_args, args, model_args, before_train=check)
        done.append({"row": index, **row, **measured})
        write_tables(done, training_args.output_dir)
    return done


def parse_args(argv: Sequence[str] | None = None, prog: str | None = None):
    """Ablation axes first; every other argument is a `hellora train` argument. ``prog`` names the program in
    usage and error messages (the CLI passes ``hellora ablate``)."""
    import sys

    from transformers import HfArgumentParser

    from .sft import parse_args as parse_train_args

    argv = list(argv) if argv is not None else sys.argv[1:]
    (ablation, rest) = HfArgumentParser(AblationArguments, prog=prog).parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    return ablation, *parse_train_args(rest, prog=prog)


def main(argv: Sequence[str] | None = None, prog: str | None = None) -> list[dict[str, Any]]:
    ablation, script_args, training_args, model_args = parse_args(argv, prog=prog)
    rows = run_grid(ablation, script_args, training_args, model_args, progress=not training_args.disable_tqdm)
    print(json.dumps({"rows": len(rows), "table": str(Path(training_args.output_dir) / "ablation.md")}))
    return rows
