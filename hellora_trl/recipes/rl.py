"""The DPO and GRPO recipes behind ``examples/{dpo,grpo}_arithmetic.py`` and ``hellora dpo`` / ``hellora grpo``.

With no model and no dataset they run on the lab model (:mod:`hellora_trl.recipes.lab`) and its held-out arithmetic
task, in the prompt format of the SFT recipe (so ``--hellora_init_adapter outputs/sft_gsm8k_offline`` continues
from the SFT example's adapter):

* GRPO: exact-match reward (the answer after ``####`` equals the gold number) plus a small format reward (a
  ``####`` marker followed by a number); the summary holds the mean reward of greedy completions on held-out prompts
  before and after training.
* DPO: preference pairs (the correct solution vs the same solution with a wrong final answer); the summary holds
  held-out preference accuracy before and after: the share of pairs whose DPO reward margin
  ``beta * ((log pi(c) - log ref(c)) - (log pi(r) - log ref(r)))`` is > 0, and the share where the policy alone
  gives the chosen answer more log-probability.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
from datasets import Dataset
from transformers import TrainerCallback

from ..constants import SUMMARY_FILE
from ..utils import atomic_write_text
from .data import format_gsm8k, load_source
from .eval.generation import generate_batched
from .eval.gsm8k import extract_gsm8k_answer, gsm8k_is_correct

FORMAT_WEIGHT = 0.1  # the format reward, small next to the exact-match reward of 1


# ------------------------------------------------------------------------------------------------ rewards
def answer_reward(completions: Sequence[Any], answer: Sequence[str], **kwargs) -> list[float]:
    """1.0 when the completion's final answer (after the last ``####``, else its last number) equals the gold
    answer's, else 0.0. ``answer`` is the dataset column of gold solutions or numbers."""
    return [float(gsm8k_is_correct(extract_gsm8k_answer(text_of(c)), gold)) for c, gold in zip(completions, answer)]


def format_reward(completions: Sequence[Any], **kwargs) -> list[float]:
    """:data:`FORMAT_WEIGHT` when the completion ends its reasoning with ``#### <number>``, else 0.0."""
    out = []
    for c in completions:
        text = text_of(c)
        out.append(FORMAT_WEIGHT if "####" in text and extract_gsm8k_answer(text) is not None else 0.0)
    return out


def text_of(completion: Any) -> str:
    """A completion's text, for plain (a string) and conversational (a list of messages) completions."""
    if isinstance(completion, list):
        return completion[-1]["content"] if completion else ""
    return completion


# ------------------------------------------------------------------------------------------------ data
def grpo_rows(rows: Sequence[dict]) -> Dataset:
    """GRPO's prompt-only format from ``question``/``answer`` rows: ``prompt`` (the SFT recipe's prompt) and
    ``answer`` (the gold solution, passed to the reward functions)."""
    prompts = format_gsm8k([r["question"] for r in rows], [r["answer"] for r in rows], "prompt_completion")["prompt"]
    return Dataset.from_dict({"prompt": prompts, "answer": [r["answer"] for r in rows]})


def wrong_answer(answer: str, offset: int = 1) -> str:
    """The same solution with its final number changed (``#### 9`` -> ``#### 10`` and the ``<<..=9>>9`` before it)."""
    body, _, final = answer.rpartition("####")
    gold = final.strip()
    try:
        value = int(float(gold))
    except ValueError:
        return f"{body}#### {gold}0"
    bad = str(value + offset)
    if body.rstrip().endswith(gold):  # "... = <<14-5=9>>9\n" -> keep the text consistent with the wrong answer
        trimmed = body.rstrip()
        body = trimmed[: len(trimmed) - len(gold)] + bad + body[len(trimmed):]
    body = body.replace(f"={gold}>>", f"={bad}>>")
    return f"{body}#### {bad}"


def dpo_rows(rows: Sequence[dict], seed: int = 0) -> Dataset:
    """DPO's preference format: ``prompt``, ``chosen`` (the correct solution), ``rejected`` (a wrong final answer;
    the offset cycles through +-1, +-2, +10 by row so the wrong number is not one fixed shift)."""
    offsets = [1, -1, 2, -2, 10]
    prompts = format_gsm8k([r["question"] for r in rows], [r["answer"] for r in rows], "prompt_completion")
    chosen = prompts["completion"]
    rejected = [" " + wrong_answer(r["answer"].strip(), offsets[(i + seed) % len(offsets)]) for i, r in enumerate(rows)]
    return Dataset.from_dict({"prompt": prompts["prompt"], "chosen": chosen, "rejected": rejected})


def load_rl_rows(dataset_name: str | None, split: str, limit: int | None, config: str | None = None) -> list[dict]:
    """``question``/``answer`` rows of a local file or hub dataset (GSM8K schema)."""
    ds = load_source(dataset_name, split, config)
    missing = {"question", "answer"} - set(ds.column_names)
    if missing:
        raise ValueError(f"{dataset_name} needs question/answer columns (GSM8K schema); missing {sorted(missing)}.")
    rows = [{"question": q, "answer": a} for q, a in zip(ds["question"], ds["answer"])]
    return rows[:limit] if limit else rows


# ------------------------------------------------------------------------------------------------ measures
def mean_reward(model, tokenizer, data: Dataset, max_new_tokens: int, reward_funcs=(answer_reward, format_reward),
                batch_size: int = 16) -> dict[str, float]:
    """Mean reward (and exact match) of greedy completions of ``data``'s prompts."""
    completions = generate_batched(
        model, tokenizer, list(data["prompt"]), max_new_tokens=max_new_tokens, batch_size=batch_size, progress=False
    )
    completions = [c.split("\nQuestion:")[0] for c in completions]  # a follow-up question the model invents
    columns = {k: list(data[k]) for k in data.column_names if k != "prompt"}
    per_func = [func(completions=completions, prompts=list(data["prompt"]), **columns) for func in reward_funcs]
    totals = [sum(values) for values in zip(*per_func)]
    exact = answer_reward(completions, columns["answer"])
    return {"mean_reward": sum(totals) / len(totals), "exact_match": sum(exact) / len(exact)}


@torch.no_grad()
def completion_logps(model, tokenizer, prompts: Sequence[str], completions: Sequence[str]) -> torch.Tensor:
    """Summed log-probability of each completion given its prompt (completion tokens + EOS), one row at a time."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for prompt, completion in zip(prompts, completions):
            p = tokenizer(prompt, add_special_tokens=False)["input_ids"]
            c = tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            ids = torch.tensor([p + c], device=device)
            logits = model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].float()
            out.append(torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None]).sum())
    finally:
        model.train(was_training)
    return torch.stack(out).cpu()


def preference_accuracy(model, tokenizer, pairs: Dataset, beta: float) -> dict[str, float]:
    """Held-out DPO numbers: ``preference_accuracy`` (reward margin > 0 against the reference, i.e. the model with
    adapters disabled; 0 for a fresh adapter, whose policy is the reference), ``mean_margin`` and
    ``logp_accuracy`` (the policy gives the chosen completion more log-probability than the rejected one)."""
    prompts, chosen, rejected = list(pairs["prompt"]), list(pairs["chosen"]), list(pairs["rejected"])
    pol_c, pol_r = completion_logps(model, tokenizer, prompts, chosen), completion_logps(model, tokenizer, prompts, rejected)
    if hasattr(model, "disable_adapter"):
        with model.disable_adapter():
            ref_c = completion_logps(model, tokenizer, prompts, chosen)
            ref_r = completion_logps(model, tokenizer, prompts, rejected)
    else:
        ref_c, ref_r = pol_c, pol_r
    margin = beta * ((pol_c - ref_c) - (pol_r - ref_r))
    return {
        "preference_accuracy": (margin > 0).float().mean().item(),
        "mean_margin": margin.mean().item(),
        "logp_accuracy": (pol_c > pol_r).float().mean().item(),
    }


# ------------------------------------------------------------------------------------------------ arguments
@dataclass
class RLScriptArguments:
    """What to train on and how much to hold out (the model and LoRA shape come from TRL's ``ModelConfig``)."""

    dataset_name: str | None = field(
        default=None,
        metadata={"help": "A GSM8K-schema dataset (question/answer; local file or hub id), or for DPO a TRL "
                          "preference dataset (prompt/chosen/rejected or chosen/rejected), passed through. None = the "
                          "lab's generated arithmetic problems (held-out questions differ in wording from the training ones; "
                          "lab.corpus.arithmetic_splits)."},
    )
    dataset_config: str | None = field(default=None, metadata={"help": "Hub dataset config (e.g. 'main' for GSM8K)."})
    dataset_train_split: str = field(default="train", metadata={"help": "Split to train on."})
    train_limit: int | None = field(default=None, metadata={"help": "Use at most this many training rows."})
    eval_limit: int = field(default=32, metadata={"help": "Held-out rows scored before and after training."})
    eval_max_new_tokens: int = field(default=48, metadata={"help": "Greedy tokens per held-out completion (GRPO)."})
    lab_recipe: str | None = field(default=None, metadata={"help": "Lab model recipe when no model is given."})


def write_summary(output_dir: str | os.PathLike, summary: dict[str, Any]) -> Path:
    path = Path(output_dir) / SUMMARY_FILE
    atomic_write_text(path, json.dumps(summary, indent=2, default=float) + "\n")
    return path


class Stopwatch:
    def __init__(self) -> None:
        self.start = time.perf_counter()

    def seconds(self) -> float:
        return round(time.perf_counter() - self.start, 1)


# ------------------------------------------------------------------------------------------------ the recipes
# The lab defaults: minutes on 2 CPU cores (see docs/rl.md for the measured runs).
LAB_COMMON: dict[str, Any] = dict(
    per_device_train_batch_size=8,
    learning_rate=5e-3,
    lr_scheduler_type="constant",
    logging_steps=5,
    save_strategy="no",
    report_to="none",
    disable_tqdm=True,
    lora_r=8,
    lora_alpha=16,
)
OFFLINE_DEFAULTS: dict[str, dict[str, Any]] = {
    "grpo": dict(
        LAB_COMMON,
        output_dir="outputs/grpo_arithmetic",
        max_steps=80,
        learning_rate=1e-3,  # 5e-3 (the DPO/SFT lab rate) lowered the held-out reward in a 200-step try
        num_generations=8,
        max_completion_length=48,
        temperature=1.0,
        beta=0.0,
        train_limit=320,
    ),
    "dpo": dict(
        LAB_COMMON,
        output_dir="outputs/dpo_arithmetic",
        max_steps=40,
        beta=0.1,
        max_length=160,
        train_limit=320,
    ),
}
GPU_DEFAULTS: dict[str, Any] = dict(lora_r=32, lora_alpha=64, lora_dropout=0.0)


def config_class(kind: str):
    from ..rl_trainers import HELLoRADPOConfig, HELLoRAGRPOConfig

    if kind not in OFFLINE_DEFAULTS:
        raise ValueError(f"kind must be 'dpo' or 'grpo', got {kind!r}.")
    return HELLoRADPOConfig if kind == "dpo" else HELLoRAGRPOConfig


def _parser(kind: str, defaults: dict[str, Any], prog: str | None):
    from trl import ModelConfig, TrlParser

    parser = TrlParser((RLScriptArguments, config_class(kind), ModelConfig), prog=prog)
    parser.set_defaults(output_dir=f"outputs/hellora-{kind}", **GPU_DEFAULTS)
    parser.set_defaults(**defaults)
    return parser


def parse_args(kind: str, argv: Sequence[str] | None = None, prog: str | None = None):
    """``TrlParser`` over (script, HELLoRADPOConfig or HELLoRAGRPOConfig, ModelConfig): ``--config x.yaml`` plus
    command-line overrides. With neither a model nor a dataset, the lab defaults (:data:`OFFLINE_DEFAULTS`) replace
    the parser's and the arguments are parsed again, so what the user wrote still wins."""
    import sys

    from .sft import refuse_full_finetuning

    argv = list(argv) if argv is not None else sys.argv[1:]
    refuse_full_finetuning(argv, kind)
    parsed = _parser(kind, {}, prog).parse_args_and_config(list(argv))
    script_args, _, model_args = parsed
    if model_args.model_name_or_path is None and script_args.dataset_name is None:
        parsed = _parser(kind, OFFLINE_DEFAULTS[kind], prog).parse_args_and_config(list(argv))
    return parsed


def task_rows(script_args: RLScriptArguments, seed: int) -> tuple[list[dict], list[dict]]:
    """(train rows, held-out rows) as question/answer dicts: the lab's arithmetic splits (no held-out question in
    training), or the dataset's train split and the rows after it (its last ``eval_limit`` rows held out)."""
    if script_args.dataset_name is None:
        from .lab.corpus import arithmetic_splits

        return arithmetic_splits(script_args.train_limit or 320, script_args.eval_limit, seed=seed)
    rows = load_rl_rows(script_args.dataset_name, script_args.dataset_train_split, None, script_args.dataset_config)
    held = rows[-script_args.eval_limit:] if script_args.eval_limit else []
    train = rows[: len(rows) - len(held)]
    return (train[: script_args.train_limit] if script_args.train_limit else train), held


def build(kind: str, script_args: RLScriptArguments, training_args, model_args):
    """(trainer, tokenizer, held-out dataset) of a recipe run."""
    from ..rl_trainers import HELLoRADPOTrainer, HELLoRAGRPOTrainer
    from .sft import build_model_and_tokenizer, lora_config_from

    peft_config = lora_config_from(model_args)  # also refuses QLoRA / target_parameters flags
    if training_args.hellora_init_adapter:
        peft_config = None  # the SFT adapter's own shape (adapter_config.json)
    model, tokenizer = build_model_and_tokenizer(model_args, training_args, script_args.lab_recipe)
    if kind == "dpo" and script_args.dataset_name is not None:
        pairs = load_source(script_args.dataset_name, script_args.dataset_train_split, script_args.dataset_config)
        if {"chosen", "rejected"} <= set(pairs.column_names):  # a TRL preference dataset: passed through
            held_n = min(script_args.eval_limit, len(pairs) // 10) if "prompt" in pairs.column_names else 0
            train = pairs.select(range(len(pairs) - held_n))
            if script_args.train_limit:
                train = train.select(range(min(script_args.train_limit, len(train))))
            held = pairs.select(range(len(pairs) - held_n, len(pairs)))
            if held_n and not isinstance(held[0]["prompt"], str):
                held = held.select([])  # conversational pairs: no held-out log-prob measure
            trainer = HELLoRADPOTrainer(
                model=model, args=training_args, train_dataset=train, processing_class=tokenizer,
                peft_config=peft_config,
            )
            return trainer, tokenizer, held
    train_rows, held_rows = task_rows(script_args, training_args.seed)
    if kind == "grpo":
        trainer = HELLoRAGRPOTrainer(
            model=model, reward_funcs=[answer_reward, format_reward], args=training_args,
            train_dataset=grpo_rows(train_rows), processing_class=tokenizer, peft_config=peft_config,
        )
        return trainer, tokenizer, grpo_rows(held_rows)
    trainer = HELLoRADPOTrainer(
        model=model, args=training_args, train_dataset=dpo_rows(train_rows, seed=training_args.seed),
        processing_class=tokenizer, peft_config=peft_config,
    )
    return trainer, tokenizer, dpo_rows(held_rows, seed=training_args.seed + 1)


def measure(kind: str, model, tokenizer, held: Dataset, script_args: RLScriptArguments, beta: float) -> dict[str, float]:
    if len(held) == 0:
        return {}
    if kind == "grpo":
        return mean_reward(model, tokenizer, held, script_args.eval_max_new_tokens)
    return preference_accuracy(model, tokenizer, held, beta)


class MeasureAtStart(TrainerCallback):
    """The held-out number on the model training starts from: after profiling and the adapter build (a fresh
    adapter equals the base; with ``hellora_init_adapter``, the SFT adapter), before the first step."""

    def __init__(self, score) -> None:
        self.score = score
        self.before: dict[str, float] | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if self.before is None:
            self.before = self.score(model)


def run(kind: str, script_args: RLScriptArguments, training_args, model_args) -> dict[str, Any]:
    """Build, train (profile -> select -> HELLoRA) with the held-out number measured as training starts and after
    it ends, save the adapter and write ``hellora_summary.json``."""
    watch = Stopwatch()
    trainer, tokenizer, held = build(kind, script_args, training_args, model_args)
    start = MeasureAtStart(lambda model: measure(kind, model, tokenizer, held, script_args, training_args.beta))
    trainer.add_callback(start)
    output = trainer.train()
    after = measure(kind, trainer.model, tokenizer, held, script_args, training_args.beta)
    trainer.save_model(training_args.output_dir)
    summary = {
        "trainer": type(trainer).__name__,
        "held_out_rows": len(held),
        "before": start.before,
        "after": after,
        "train_metrics": output.metrics,
        "hellora_init_adapter": training_args.hellora_init_adapter,
        "hellora_profile_source": training_args.hellora_profile_source,
        "hot_experts_per_layer": {k: len(v) for k, v in (trainer.hot_experts or {}).items()},
        "wall_seconds": watch.seconds(),
    }
    if kind == "dpo":
        summary["note"] = (
            "preference_accuracy: share of held-out pairs with DPO reward margin > 0 against the reference (the "
            "adapter-disabled base); a fresh adapter starts at 0 by construction (policy = reference). "
            "logp_accuracy: the policy gives the correct answer more log-probability than the wrong one."
        )
    if trainer.is_world_process_zero():
        write_summary(training_args.output_dir, summary)
        print(json.dumps({"before": start.before, "after": after, "wall_seconds": summary["wall_seconds"]}))
    return summary


def main(kind: str, argv: Sequence[str] | None = None, prog: str | None = None) -> dict[str, Any]:
    from ..distributed import end_distributed

    script_args, training_args, model_args = parse_args(kind, argv, prog)
    os.makedirs(training_args.output_dir, exist_ok=True)
    try:
        return run(kind, script_args, training_args, model_args)
    finally:
        end_distributed()
