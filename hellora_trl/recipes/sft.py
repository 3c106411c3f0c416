"""The SFT recipe behind ``examples/sft_*.py`` and ``hellora train``: parse, load, profile + train, evaluate.

One function per step so the examples stay a few lines and every step can be tested. With no model given, the
recipe fine-tunes the lab model (:mod:`hellora_trl.recipes.lab`, through its face: a small OLMoE pretrained
in-project, cached after the first run); with no dataset either, the target task is generated one-step arithmetic
word problems held out by content (``lab.default_task``), and the summary reports base vs adapted held-out loss
and exact match.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from peft import LoraConfig

from ..config import CHECKPOINTING_FIELD, HELLoRAConfig
from ..constants import SUMMARY_FILE, TASKS
from ..utils import atomic_write_text
from .eval.gsm8k import ARITHMETIC_HELD_OUT_ROWS, ARITHMETIC_TRAIN_ROWS
from .models import ModelSource, load_model, load_tokenizer

PAPER_DEFAULTS: dict[str, Any] = dict(lora_r=32, lora_alpha=64, lora_dropout=0.0, output_dir="outputs/hellora-sft")

OFFLINE_TRAIN_ROWS = ARITHMETIC_TRAIN_ROWS  # the lab's arithmetic task: train rows without --train_limit
OFFLINE_DEFAULTS: dict[str, Any] = dict(
    output_dir="outputs/sft_gsm8k_offline",
    eval_max_new_tokens=24,
    eval_limit=ARITHMETIC_HELD_OUT_ROWS,  # `hellora eval` without a dataset scores the same rows by default
    num_train_epochs=2.0,
    per_device_train_batch_size=8,
    learning_rate=5e-3,
    lr_scheduler_type="cosine",
    warmup_steps=5,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    max_length=160,
    **{CHECKPOINTING_FIELD: False},  # TRL turns it on by default; a tiny model has no memory to save
    lora_r=8,
    lora_alpha=16,
)


@dataclass
class HELLoRAScriptArguments:
    """What to train on and how to evaluate; the model and LoRA shape come from TRL's ``ModelConfig``."""

    task: str = field(
        default="gsm8k",
        metadata={
            "help": "Data schema and evaluation: gsm8k (math, accuracy), codealpaca (code, HumanEval), saferpaca "
            "(safety, refusal rates), or sft (any TRL-format dataset passed through, no task metric).",
            "choices": list(TASKS),
        },
    )
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local JSON/JSONL file or folder (e.g. ../shared/datasets/gsm8k). None with no model "
            "either = the offline default (generated one-step arithmetic word problems in GSM8K's answer format)."
        },
    )
    dataset_train_split: str = field(default="train", metadata={"help": "Training split."})
    dataset_test_split: str = field(default="test", metadata={"help": "Held-out split for evaluation (GSM8K)."})
    train_limit: int | None = field(default=None, metadata={"help": "Keep only the first N training rows."})
    chat_format: bool = field(
        default=False, metadata={"help": "GSM8K as chat messages instead of prompt-completion."}
    )
    eval_limit: int = field(default=32, metadata={"help": "Held-out examples to evaluate after training (0: skip)."})
    eval_max_new_tokens: int = field(default=96, metadata={"help": "Generation budget per evaluation example."})
    eval_dataset_path: str | None = field(
        default=None,
        metadata={
            "help": "codealpaca: HumanEval .jsonl(.gz); saferpaca: a harmful-instruction JSON/CSV "
            "(e.g. ../shared/datasets/safety_eval/I-MaliciousInstructions.json)."
        },
    )
    benign_eval_path: str | None = field(
        default=None, metadata={"help": "saferpaca: benign instructions for the over-refusal rate."}
    )
    effective_batch_size: int | None = field(
        default=None,
        metadata={
            "help": "Target sequences per optimizer step (per_device_train_batch_size x gradient_accumulation_steps "
            "x processes). When set, gradient_accumulation_steps is derived from the number of processes, and a "
            "combination that cannot reach it exactly is refused. The recipe YAMLs set the paper's 128."
        },
    )
    lab_recipe: str = field(
        default_factory=lambda: os.environ.get("HELLORA_LAB_RECIPE", "default"),
        metadata={
            "help": "With no model: the lab model recipe to fine-tune (default, small, tiny; env HELLORA_LAB_RECIPE). "
            "It is pretrained once and cached (see `hellora pretrain`)."
        },
    )

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}.")


def _parser(task: str | None, defaults: dict[str, Any], prog: str | None = None):
    from trl import ModelConfig, TrlParser

    parser = TrlParser((HELLoRAScriptArguments, HELLoRAConfig, ModelConfig), prog=prog)
    parser.set_defaults(**{**PAPER_DEFAULTS, **defaults})
    if task is not None:
        parser.set_defaults(task=task)
    return parser


def parse_args(argv: Sequence[str] | None = None, task: str | None = None, prog: str | None = None):
    """``TrlParser`` over (script, HELLoRAConfig, ModelConfig): ``--config recipe.yaml`` plus CLI overrides.

    LoRA defaults are the paper's (r=32, alpha=64). When neither a model nor a dataset is given, the offline
    defaults (the lab model, smaller rank, short run) replace the parser defaults and the arguments are parsed again,
    so anything the user wrote on the command line or in the YAML still wins. ``prog`` names the program in
    ``--help`` and errors (``hellora train``; default: the script's file name).
    """
    import sys

    argv = list(argv) if argv is not None else sys.argv[1:]
    refuse_full_finetuning(argv, "sft")
    script_args, training_args, model_args = _parser(task, {}, prog).parse_args_and_config(list(argv))
    if is_offline_default(script_args, model_args):
        script_args, training_args, model_args = _parser(task, OFFLINE_DEFAULTS, prog).parse_args_and_config(list(argv))
    apply_effective_batch(script_args.effective_batch_size, training_args)
    return script_args, training_args, model_args


def accumulation_steps(target: int, per_device: int, num_processes: int) -> int:
    """``gradient_accumulation_steps`` that makes ``per_device x num_processes x steps == target`` exactly, or a
    ValueError that says which per-device batches would work."""
    for name, value in (("effective_batch_size", target), ("per_device_train_batch_size", per_device),
                        ("processes", num_processes)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a whole number >= 1, got {value!r}.")
    per_step = per_device * num_processes
    if target % per_step:
        fits = [b for b in range(1, target // num_processes + 1) if target % (b * num_processes) == 0]
        raise ValueError(
            f"effective batch {target} cannot be reached with per_device_train_batch_size {per_device} on "
            f"{num_processes} processes ({per_device} x {num_processes} = {per_step} does not divide {target}); "
            f"use a per-device batch in {fits} or another number of processes."
        )
    return target // per_step


def apply_effective_batch(target: int | None, training_args) -> None:
    """Derive ``training_args.gradient_accumulation_steps`` from ``target`` (``--effective_batch_size``), the
    per-device batch and the number of processes of this launch, so a recipe keeps its effective batch on any
    number of GPUs. An explicit ``gradient_accumulation_steps`` (not 1) that disagrees is refused; the main process
    logs ``effective batch T = b per device x n processes x s accumulation steps``."""
    if target is None:
        return
    per_device, processes = training_args.per_device_train_batch_size, training_args.world_size
    steps = accumulation_steps(target, per_device, processes)
    given = training_args.gradient_accumulation_steps
    if given not in (1, steps):
        raise ValueError(
            f"gradient_accumulation_steps {given} contradicts effective_batch_size {target} (which needs {steps} "
            f"with per-device batch {per_device} on {processes} processes); leave gradient_accumulation_steps out."
        )
    training_args.gradient_accumulation_steps = steps
    if training_args.process_index == 0:
        print(f"effective batch {target} = {per_device} per device x {processes} processes x {steps} gradient "
              "accumulation steps", flush=True)


def refuse_full_finetuning(argv: Sequence[str], trl_command: str) -> None:
    """``use_peft=false`` (command line or --config YAML) asks for full fine-tuning: refused in one line, naming
    TRL's own command (``trl sft``, ``trl dpo``, ``trl grpo``) for that."""
    if _asks_false(argv, "use_peft"):
        raise ValueError(
            "use_peft=false asks for full fine-tuning, but HELLoRA always trains a LoRA adapter (on attention, "
            f"routers and hot experts): drop use_peft, or use TRL's `trl {trl_command}` for full fine-tuning."
        )


def _asks_false(argv: Sequence[str], name: str) -> bool:
    """Whether ``--name false`` (or ``--name=false``) is on the command line or ``name: false`` in its --config YAML
    (TRL's ModelConfig defaults ``use_peft`` to False, so the parsed value cannot tell "not given" from "false")."""
    falsy = {"false", "0", "no"}
    for i, token in enumerate(argv):
        if token == f"--{name}" and i + 1 < len(argv) and argv[i + 1].lower() in falsy:
            return True
        if token.startswith(f"--{name}=") and token.split("=", 1)[1].lower() in falsy:
            return True
    if "--config" in argv and argv.index("--config") + 1 < len(argv):
        import yaml

        path = Path(argv[argv.index("--config") + 1])
        if path.is_file():
            config = yaml.safe_load(path.read_text()) or {}
            return isinstance(config, dict) and config.get(name) is False
    return False


def is_offline_default(script_args: HELLoRAScriptArguments, model_args) -> bool:
    return model_args.model_name_or_path is None and script_args.dataset_name is None


def check_model_flags(model_args) -> None:
    """Refuse TRL ``ModelConfig`` flags this recipe cannot honour, instead of parsing and ignoring them."""
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise ValueError(
            "load_in_4bit/load_in_8bit (QLoRA) are not supported: bitsandbytes quantizes nn.Linear layers, but "
            "transformers 5 MoE experts are fused 3-D parameters that HELLoRA's expert layer reads directly. Load "
            "the model in bf16 (--dtype bfloat16) instead."
        )
    if getattr(model_args, "lora_target_parameters", None):
        raise ValueError(
            "lora_target_parameters adapts every expert (PEFT's whole-stack LoRA); HELLoRA places expert adapters "
            "itself. Remove it (lora_target_modules picks the attention projections)."
        )


def lora_config_from(model_args) -> LoraConfig:
    """The adapter shape from TRL's ModelConfig; targets are attention projections unless the user names others.

    ``use_dora`` and ``lora_modules_to_save`` are passed on: PEFT honours them on nn.Linear targets, and HELLoRA's
    expert and router layers refuse DoRA with a clear error rather than train plain LoRA silently."""
    check_model_flags(model_args)
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        use_rslora=model_args.use_rslora,
        use_dora=model_args.use_dora,
        modules_to_save=model_args.lora_modules_to_save,
        task_type="CAUSAL_LM",
    )


def model_source(model_args, training_args: HELLoRAConfig) -> ModelSource:
    """TRL's ModelConfig as a :class:`~hellora_trl.recipes.models.ModelSource`; no model = the tiny random OLMoE
    with the run's seed (float32). (:func:`build_model_and_tokenizer` loads the lab model instead when no model is
    given, so ``hellora train`` never trains the tiny one.)"""
    if model_args.model_name_or_path is None:
        return ModelSource(tiny_family="olmoe", tiny_seed=training_args.seed)
    remote = bool(getattr(model_args, "trust_remote_code", False) or getattr(training_args, "trust_remote_code", False))
    return ModelSource(
        name_or_path=model_args.model_name_or_path,
        dtype=model_args.dtype,
        revision=model_args.model_revision,
        trust_remote_code=remote,
        attn_implementation=model_args.attn_implementation,
    )


def build_model_and_tokenizer(model_args, training_args: HELLoRAConfig, lab_recipe: str | None = None):
    """The cached lab model (no model given; built on first use), or a hub/local checkpoint through transformers."""
    if model_args.model_name_or_path is None:
        from . import lab

        return lab.load_lab_model(lab_recipe or os.environ.get("HELLORA_LAB_RECIPE", "default"))
    source = model_source(model_args, training_args)
    return load_model(source), load_tokenizer(source)


def load_task_data(script_args: HELLoRAScriptArguments, seed: int = 0):
    """(train, held-out rows or None) in TRL's formats: prompt-completion/chat for math, chat for code and safety."""
    from . import data

    if script_args.task == "gsm8k":
        fmt = "messages" if script_args.chat_format else "prompt_completion"
        if script_args.dataset_name is None:  # the lab target task: never in the pretraining corpus
            from . import lab

            # the held-out rows are what `hellora eval` rebuilds without a dataset (recipes.eval.held_out_arithmetic)
            return lab.default_task(script_args.train_limit or OFFLINE_TRAIN_ROWS, max(script_args.eval_limit, 1),
                                    seed=seed, fmt=fmt)
        train = data.load_gsm8k(script_args.dataset_name, script_args.dataset_train_split, fmt=fmt, limit=script_args.train_limit)
        held_out = None
        if script_args.eval_limit:
            raw = data.load_source(script_args.dataset_name, script_args.dataset_test_split, hub_config="main")
            held_out = [dict(r) for r in raw.select(range(min(script_args.eval_limit, len(raw))))]
        return train, held_out
    if script_args.task == "sft":
        if script_args.dataset_name is None:
            raise ValueError("--task sft needs --dataset_name: a TRL-format dataset (hub id or local JSON/JSONL).")
        return data.load_sft(script_args.dataset_name, script_args.dataset_train_split, limit=script_args.train_limit), None
    if script_args.dataset_name is None:
        shared = {
            "codealpaca": "../shared/datasets/code_alpaca/code_alpaca_2k.json",
            "saferpaca": "../shared/datasets/saferpaca/safety_only_data_Instructions.json",
        }[script_args.task]
        raise ValueError(
            f"--dataset_name is required for task {script_args.task!r} (a hub id or a local Alpaca-schema JSON, "
            f"e.g. {shared}). Only the GSM8K recipe has an embedded offline default."
        )
    loader = data.load_codealpaca if script_args.task == "codealpaca" else data.load_saferpaca
    return loader(script_args.dataset_name, split=script_args.dataset_train_split, limit=script_args.train_limit), None


EVAL_TASK = {"gsm8k": "gsm8k", "codealpaca": "humaneval", "saferpaca": "safety"}  # train task -> benchmark


def evaluate(model, tokenizer, script_args: HELLoRAScriptArguments, held_out, training_args: HELLoRAConfig) -> dict:
    """The task metric on held-out data, through the evaluation path of ``hellora eval``
    (:func:`hellora_trl.recipes.eval.evaluate_task`): arithmetic or GSM8K accuracy, HumanEval pass@1, or refusal /
    over-refusal rates, filed under :func:`~hellora_trl.recipes.eval.metric_name`."""
    from .eval import EvalSettings, evaluate_task, load_humaneval, load_instruction_set, metric_name

    if not script_args.eval_limit or script_args.task not in EVAL_TASK:
        return {}
    task = EVAL_TASK[script_args.task]
    if task == "gsm8k":
        rows = held_out
    elif script_args.eval_dataset_path is None:
        return {}
    elif task == "humaneval":
        rows = load_humaneval(script_args.eval_dataset_path)
    else:
        benign = load_instruction_set(script_args.benign_eval_path) if script_args.benign_eval_path else []
        rows = {"harmful": load_instruction_set(script_args.eval_dataset_path), "benign": benign}
    settings = EvalSettings(
        limit=script_args.eval_limit, max_new_tokens=script_args.eval_max_new_tokens, chat=script_args.chat_format,
        progress=not training_args.disable_tqdm,
        samples_path=Path(training_args.output_dir) / "eval" / "humaneval_samples.jsonl",  # written as it goes
    )
    result = evaluate_task(task, model, tokenizer, rows, settings)
    if result is None:  # HumanEval programs run on the main process only
        return {}
    return {metric_name(task, script_args.dataset_name): result}  # no dataset: the lab's arithmetic task


def build_trainer(script_args: HELLoRAScriptArguments, training_args: HELLoRAConfig, model_args):
    """(trainer, tokenizer, held-out rows) for one run of the recipe; shared with ``hellora ablate``."""
    from ..trainer import HELLoRATrainer

    model, tokenizer = build_model_and_tokenizer(model_args, training_args, script_args.lab_recipe)
    train_dataset, held_out = load_task_data(script_args, seed=training_args.seed)
    trainer = HELLoRATrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset,
        processing_class=tokenizer,
        peft_config=lora_config_from(model_args),
    )
    return trainer, tokenizer, held_out


def resume_checkpoint(value):
    """``--resume_from_checkpoint true`` (or ``last``) means the newest checkpoint in output_dir."""
    return True if value in ("true", "True", "last") else value


def write_run_outputs(train_metrics: dict, results: dict, output_dir: str | os.PathLike) -> dict[str, Any]:
    """``eval/results.{json,md}`` (when there are results) and ``hellora_summary.json``; returns the summary."""
    summary: dict[str, Any] = {"train": train_metrics, **results}
    if results:
        from .eval import write_results

        write_results(_without_records(results), Path(output_dir) / "eval")
    _write_summary(summary, Path(output_dir))
    return summary


def run(script_args: HELLoRAScriptArguments, training_args: HELLoRAConfig, model_args) -> dict[str, Any]:
    """Profile -> select -> attach -> train -> save -> evaluate; returns the metrics it wrote."""
    trainer, tokenizer, held_out = build_trainer(script_args, training_args, model_args)
    lab = lab_baseline(trainer, tokenizer, script_args, held_out, model_args)
    output = trainer.train(resume_from_checkpoint=resume_checkpoint(training_args.resume_from_checkpoint))
    # Evaluation and summary first, the final adapter last: saving it clears the folder's in-progress marker, so a
    # run killed while evaluating never leaves a new adapter beside the previous run's results unmarked.
    summary = evaluate_and_write(trainer, tokenizer, script_args, held_out, output.metrics, lab)
    trainer.save_model(training_args.output_dir)
    return summary


def evaluate_and_write(
    trainer, tokenizer, script_args: HELLoRAScriptArguments, held_out, train_metrics: dict, lab: dict | None = None
) -> dict:
    """Evaluate on every rank, write ``eval/`` and the summary on the main process; every rank returns the summary.

    Every rank takes part because under ZeRO-3 and FSDP a forward needs all ranks: generation shards the prompts
    over the ranks and runs them in lockstep (:func:`hellora_trl.recipes.eval.generate_batched`). Evaluating on
    rank 0 alone made rank 0 wait forever for weights the others, parked at a barrier, never sent. ``lab`` (from
    :func:`lab_baseline`) adds base vs adapted numbers of the lab model."""
    results = evaluate(trainer.model, tokenizer, script_args, held_out, trainer.args)
    if lab is not None:
        results = {**results, "lab": _lab_after(lab, trainer, tokenizer, held_out, results)}
    summary: dict[str, Any] = {"train": train_metrics, **results}
    if trainer.is_world_process_zero():
        summary = write_run_outputs(train_metrics, results, trainer.args.output_dir)
    trainer.accelerator.wait_for_everyone()
    return summary


# ---- lab model: base vs adapted on held-out target rows, routing concentration (see hellora_trl.recipes.lab)
def lab_baseline(trainer, tokenizer, script_args, held_out, model_args) -> dict | None:
    """Base-model numbers, taken before training, when a single-process run fine-tunes the lab model on the
    arithmetic task (None otherwise: multi-process runs skip the comparison, whose base forwards would run
    before any engine exists)."""
    if not (is_offline_default(script_args, model_args) and script_args.task == "gsm8k" and held_out):
        return None
    if trainer.accelerator.num_processes > 1 or script_args.chat_format:
        return None
    from . import lab

    exact_match = None
    if script_args.eval_limit:
        exact_match = evaluate(trainer.model, tokenizer, script_args, held_out, trainer.args)["arithmetic"]["accuracy"]
    return lab.baseline(trainer.model, tokenizer, held_out, exact_match=exact_match)


def _lab_after(base: dict, trainer, tokenizer, held_out, results: dict) -> dict:
    from . import lab

    exact_match = results["arithmetic"]["accuracy"] if "arithmetic" in results else None
    return lab.compare(base, trainer.model, tokenizer, held_out, exact_match=exact_match,
                       profile=getattr(trainer, "hellora_profile", None))


def _without_records(results: dict) -> dict:
    return {task: {k: v for k, v in r.items() if not k.endswith("records")} for task, r in results.items()}


def _write_summary(summary: dict, out: Path) -> None:

    lines = {
        "train_loss": summary["train"].get("train_loss"),
        "profile_seconds": summary["train"].get("hellora/profile_seconds"),
        "profile_share": summary["train"].get("hellora/profile_share"),
    }
    for task, result in _without_records({k: v for k, v in summary.items() if k != "train"}).items():
        lines.update({f"{task}/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    atomic_write_text(out / SUMMARY_FILE, json.dumps(lines, indent=2))
    print("HELLoRA run summary:", json.dumps(lines, indent=2))


def main(argv: Sequence[str] | None = None, task: str | None = None, prog: str | None = None) -> dict[str, Any]:
    script_args, training_args, model_args = parse_args(argv, task=task, prog=prog)
    os.makedirs(training_args.output_dir, exist_ok=True)
    try:
        return run(script_args, training_args, model_args)
    finally:
        from ..distributed import end_distributed

        end_distributed()  # multi-process runs exit cleanly (barrier + destroy_process_group)
