"""The SFT recipe behind ``examples/sft_*.py`` and ``hellora train``: parse, load, profile + train, evaluate.

One function per step so the examples stay a few lines and every step can be tested. With no model given, the
recipe fine-tunes the lab model (:mod:`hellora_trl.recipes.lab`: a small OLMoE pretrained in-project, cached after
the first run); with no dataset either, the target task is generated one-step arithmetic word problems that the
lab model never saw in pretraining, and the summary reports base vs adapted held-out loss and exact match.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from peft import LoraConfig

from .config import HELLoRAConfig

TASKS = ("gsm8k", "codealpaca", "saferpaca")

PAPER_DEFAULTS: dict[str, Any] = dict(lora_r=32, lora_alpha=64, lora_dropout=0.0, output_dir="outputs/hellora-sft")

# The embedded offline default: small enough for a CPU box, large enough for a readable heatmap.
OFFLINE_MODEL = dict(
    hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_experts=16, num_experts_per_tok=2
)
OFFLINE_TRAIN_ROWS = 1200
OFFLINE_EVAL_ROWS = 32
OFFLINE_DEFAULTS: dict[str, Any] = dict(
    output_dir="outputs/sft_gsm8k_offline",
    eval_max_new_tokens=24,
    eval_limit=64,
    num_train_epochs=2.0,
    per_device_train_batch_size=8,
    learning_rate=5e-3,
    lr_scheduler_type="cosine",
    warmup_steps=5,
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    max_length=160,
    gradient_checkpointing=False,  # TRL turns it on by default; a tiny model has no memory to save
    lora_r=8,
    lora_alpha=16,
)


@dataclass
class HELLoRAScriptArguments:
    """What to train on and how to evaluate; the model and LoRA shape come from TRL's ``ModelConfig``."""

    task: str = field(default="gsm8k", metadata={"help": f"Task family: one of {TASKS}."})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local JSON/JSONL file or folder (e.g. ../shared/datasets/gsm8k). None with no model "
            "either = the offline default (generated GSM8K-style problems)."
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


def _parser(task: str | None, defaults: dict[str, Any]):
    from trl import ModelConfig, TrlParser

    parser = TrlParser((HELLoRAScriptArguments, HELLoRAConfig, ModelConfig))
    parser.set_defaults(**{**PAPER_DEFAULTS, **defaults})
    if task is not None:
        parser.set_defaults(task=task)
    return parser


def parse_args(argv: Sequence[str] | None = None, task: str | None = None):
    """``TrlParser`` over (script, HELLoRAConfig, ModelConfig): ``--config recipe.yaml`` plus CLI overrides.

    LoRA defaults are the paper's (r=32, alpha=64). When neither a model nor a dataset is given, the offline
    defaults (tiny model, smaller rank, short run) replace the parser defaults and the arguments are parsed again,
    so anything the user wrote on the command line or in the YAML still wins.
    """
    import sys

    argv = list(argv) if argv is not None else sys.argv[1:]
    script_args, training_args, model_args = _parser(task, {}).parse_args_and_config(list(argv))
    if is_offline_default(script_args, model_args):
        script_args, training_args, model_args = _parser(task, OFFLINE_DEFAULTS).parse_args_and_config(list(argv))
    return script_args, training_args, model_args


def is_offline_default(script_args: HELLoRAScriptArguments, model_args) -> bool:
    return model_args.model_name_or_path is None and script_args.dataset_name is None


def lora_config_from(model_args) -> LoraConfig:
    """The adapter shape from TRL's ModelConfig; targets are attention projections unless the user names others."""
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=model_args.lora_target_modules,
        use_rslora=model_args.use_rslora,
        task_type="CAUSAL_LM",
    )


def build_model_and_tokenizer(model_args, training_args: HELLoRAConfig, lab_recipe: str | None = None):
    """The cached lab model (no model given; built on first use), or a hub/local checkpoint through transformers."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if model_args.model_name_or_path is None:
        from .recipes.lab import load_lab_model

        return load_lab_model(lab_recipe or os.environ.get("HELLORA_LAB_RECIPE", "default"))
    dtype = model_args.dtype if model_args.dtype in (None, "auto") else getattr(torch, model_args.dtype)
    remote = bool(getattr(model_args, "trust_remote_code", False) or getattr(training_args, "trust_remote_code", False))
    model = AutoModelForCausalLM.from_pretrained(
        model_args.model_name_or_path,
        revision=model_args.model_revision,
        trust_remote_code=remote,
        attn_implementation=model_args.attn_implementation,
        dtype=dtype if dtype is not None else "auto",
    )
    tokenizer = AutoTokenizer.from_pretrained(
        model_args.model_name_or_path, revision=model_args.model_revision, trust_remote_code=remote
    )
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


def load_task_data(script_args: HELLoRAScriptArguments, seed: int = 0):
    """(train, held-out rows or None) in TRL's formats: prompt-completion/chat for math, chat for code and safety."""
    from . import data

    if script_args.task == "gsm8k":
        fmt = "messages" if script_args.chat_format else "prompt_completion"
        if script_args.dataset_name is None:  # the lab target task: never in the pretraining corpus
            from .recipes.lab_corpus import arithmetic_splits

            rows, held_out = arithmetic_splits(script_args.train_limit or OFFLINE_TRAIN_ROWS,
                                               max(script_args.eval_limit, 1), seed=seed)
            train = data._format_gsm8k([r["question"] for r in rows], [r["answer"] for r in rows], fmt)
            return train, held_out
        train = data.load_gsm8k(script_args.dataset_name, script_args.dataset_train_split, fmt=fmt, limit=script_args.train_limit)
        held_out = None
        if script_args.eval_limit:
            raw = data._load_source(script_args.dataset_name, script_args.dataset_test_split, hub_config="main")
            held_out = [dict(r) for r in raw.select(range(min(script_args.eval_limit, len(raw))))]
        return train, held_out
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


def evaluate(model, tokenizer, script_args: HELLoRAScriptArguments, held_out, training_args: HELLoRAConfig) -> dict:
    """The task metric on held-out data: GSM8K accuracy, HumanEval pass@1, or refusal / over-refusal rates."""
    from . import eval as ev

    if not script_args.eval_limit:
        return {}
    progress = not training_args.disable_tqdm
    limit, budget = script_args.eval_limit, script_args.eval_max_new_tokens
    if script_args.task == "gsm8k":
        result = ev.evaluate_gsm8k(
            model, tokenizer, held_out, limit=limit, max_new_tokens=budget, chat=script_args.chat_format, progress=progress
        )
        return {"gsm8k": result}
    if script_args.eval_dataset_path is None:
        return {}
    if script_args.task == "codealpaca":
        problems = ev.load_humaneval(script_args.eval_dataset_path)[:limit]
        prompts = [p["prompt"] for p in problems]
        completions = ev.generate_batched(model, tokenizer, prompts, max_new_tokens=budget, progress=progress)
        samples = {p["task_id"]: [c] for p, c in zip(problems, completions)}
        return {"humaneval": ev.evaluate_humaneval(problems, samples, ks=(1,))}
    harmful = ev.load_instruction_set(script_args.eval_dataset_path)[:limit]
    benign = ev.load_instruction_set(script_args.benign_eval_path)[:limit] if script_args.benign_eval_path else []
    return {"safety": ev.evaluate_safety(model, tokenizer, harmful, benign, max_new_tokens=budget, progress=progress)}


def build_trainer(script_args: HELLoRAScriptArguments, training_args: HELLoRAConfig, model_args):
    """(trainer, tokenizer, held-out rows) for one run of the recipe; shared with ``hellora ablate``."""
    from .trainer import HELLoRATrainer

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


def run(script_args: HELLoRAScriptArguments, training_args: HELLoRAConfig, model_args) -> dict[str, Any]:
    """Profile -> select -> attach -> train -> save -> evaluate; returns the metrics it wrote."""
    trainer, tokenizer, held_out = build_trainer(script_args, training_args, model_args)
    lab = _lab_before(trainer, tokenizer, script_args, held_out, training_args, model_args)
    resume = training_args.resume_from_checkpoint
    if resume in ("true", "True", "last"):  # `--resume_from_checkpoint true`: the newest checkpoint in output_dir
        resume = True
    output = trainer.train(resume_from_checkpoint=resume)
    trainer.save_model(training_args.output_dir)
    summary: dict[str, Any] = {"train": output.metrics}
    if trainer.is_world_process_zero():
        results = evaluate(trainer.model, tokenizer, script_args, held_out, training_args)
        summary.update(results)
        if lab is not None:
            summary["lab"] = _lab_after(lab, trainer, tokenizer, held_out, results)
        if results:
            from .eval import write_results

            write_results(_without_records(results), Path(training_args.output_dir) / "eval")
        _write_summary(summary, Path(training_args.output_dir))
    trainer.accelerator.wait_for_everyone()
    return summary


# ---- lab model: base vs adapted on held-out target rows, routing concentration (see hellora_trl.recipes.lab)
def _lab_before(trainer, tokenizer, script_args, held_out, training_args, model_args) -> dict | None:
    """Base-model numbers, taken before training, when the run fine-tunes the lab model on the arithmetic task."""
    if not (is_offline_default(script_args, model_args) and script_args.task == "gsm8k" and held_out):
        return None
    if not trainer.is_world_process_zero() or script_args.chat_format:
        return None
    from .recipes.lab_quality import completion_loss

    base = {"base_heldout_loss": completion_loss(trainer.model, tokenizer, held_out)}
    if script_args.eval_limit:
        result = evaluate(trainer.model, tokenizer, script_args, held_out, training_args)
        base["base_exact_match"] = result["gsm8k"]["accuracy"]
    return base


def _lab_after(base: dict, trainer, tokenizer, held_out, results: dict) -> dict:
    from .recipes.lab_quality import completion_loss

    lab = dict(base)
    lab["adapted_heldout_loss"] = completion_loss(trainer.model, tokenizer, held_out)
    if "gsm8k" in results:
        lab["adapted_exact_match"] = results["gsm8k"]["accuracy"]
    profile = getattr(trainer, "hellora_profile", None)
    if profile is not None:
        shares = profile.concentration()
        lab["routing_uniform_top_k_share"] = profile.experts_per_token / profile.num_experts
        lab.update({f"routing_top_k_share_layer{i}": round(x, 4) for i, x in enumerate(shares)})
        lab["routing_min_top_k_share_over_uniform"] = min(shares) / lab["routing_uniform_top_k_share"]
    return lab


def _without_records(results: dict) -> dict:
    return {task: {k: v for k, v in r.items() if not k.endswith("records")} for task, r in results.items()}


def _write_summary(summary: dict, out: Path) -> None:
    from .profiling import atomic_write_text

    lines = {
        "train_loss": summary["train"].get("train_loss"),
        "profile_seconds": summary["train"].get("hellora/profile_seconds"),
        "profile_share": summary["train"].get("hellora/profile_share"),
    }
    lines.update({f"lab/{k}": v for k, v in summary.get("lab", {}).items()})
    for task, result in _without_records({k: v for k, v in summary.items() if k not in ("train", "lab")}).items():
        lines.update({f"{task}/{k}": v for k, v in result.items() if isinstance(v, (int, float))})
    atomic_write_text(out / "hellora_summary.json", json.dumps(lines, indent=2))
    print("HELLoRA run summary:", json.dumps(lines, indent=2))


def main(argv: Sequence[str] | None = None, task: str | None = None) -> dict[str, Any]:
    script_args, training_args, model_args = parse_args(argv, task=task)
    os.makedirs(training_args.output_dir, exist_ok=True)
    try:
        return run(script_args, training_args, model_args)
    finally:
        from .distributed import end_distributed

        end_distributed()  # multi-process runs exit cleanly (barrier + destroy_process_group)
