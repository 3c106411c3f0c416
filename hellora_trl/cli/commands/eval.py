"""``hellora eval``: adapter (on its base) or merged model -> task metric, results.json + results.md."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ...constants import EVAL_TASKS
from ...recipes.eval.gsm8k import ARITHMETIC_HELD_OUT_ROWS, ARITHMETIC_TRAIN_ROWS
from ..arguments import (
    TRAINER_SEED,
    CLIError,
    ModelArguments,
    existing,
    parse_command,
    require,
)
from ..loading import adapter_base, check_adapter, device_of, source_of

DESCRIPTION = ("Evaluate a HELLoRA adapter (on its base model) or a merged checkpoint: GSM8K accuracy (without a "
               "dataset: the lab's held-out arithmetic rows), HumanEval pass@1, or refusal / over-refusal rates.")


@dataclass
class EvalArguments:
    task: str = field(default="gsm8k", metadata={"help": "Benchmark.", "choices": list(EVAL_TASKS)})
    adapter: str | None = field(
        default=None,
        metadata={"help": "HELLoRA adapter directory (loaded on the base model). Without it, --model_name_or_path "
                  "is evaluated as is (e.g. a merged checkpoint)."},
    )
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "gsm8k: file, folder or hub id (None: the arithmetic rows `hellora train` without a "
                  "dataset held out, for the same --seed and --train_limit; scored as `arithmetic`); humaneval: "
                  "HumanEval .jsonl(.gz); safety: harmful instructions JSON/CSV."},
    )
    dataset_split: str = field(default="test", metadata={"help": "gsm8k split."})
    benign_path: str | None = field(default=None, metadata={"help": "safety: benign instructions (over-refusal)."})
    limit: int | None = field(default=None, metadata={
        "help": f"Evaluate only the first N examples (gsm8k without a dataset: the first N held-out rows, default "
                f"{ARITHMETIC_HELD_OUT_ROWS}, all that the offline `hellora train` run holds out)."})
    max_new_tokens: int = field(default=256, metadata={"help": "Generation budget per example."})
    batch_size: int = field(default=8, metadata={"help": "Prompts per generate call."})
    chat: bool = field(default=False, metadata={"help": "gsm8k: wrap prompts in the chat template."})
    backend: str = field(default="hf", metadata={"help": "Generation backend (vllm needs a merged model directory).",
                                                "choices": ["hf", "vllm"]})
    timeout: float = field(default=5.0, metadata={"help": "humaneval: seconds per program."})
    seed: int = field(default=TRAINER_SEED, metadata={
        "help": "gsm8k without a dataset: the --seed of the `hellora train` run whose held-out rows to score."})
    train_limit: int = field(default=ARITHMETIC_TRAIN_ROWS, metadata={
        "help": "gsm8k without a dataset: the --train_limit of that run (held-out rows exclude its train rows)."})
    output_dir: str = field(default="hellora_eval", metadata={"help": "Where results.json and results.md go."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})


def check_inputs(args: EvalArguments) -> None:
    """Fail on missing files before spending minutes loading a model."""
    if args.task != "gsm8k":
        existing(require(args.dataset_name, "--dataset_name", f"the {args.task} file"), f"{args.task} file")
    if args.benign_path:
        existing(args.benign_path, "Benign instructions file")
    check_adapter(args.adapter)


def eval_model(args: EvalArguments, model_args: ModelArguments):
    """(model, or a checkpoint path for vLLM; tokenizer)."""
    from ...recipes.models import load_model, load_tokenizer

    check_adapter(args.adapter)
    adapter_base(args.adapter, model_args)
    if args.backend == "vllm":
        if args.adapter or model_args.tiny:
            raise CLIError("--backend vllm serves a checkpoint directory: run `hellora merge` first and pass the merged "
                           "directory as --model_name_or_path.")
        from ...recipes.eval import check_backend

        check_backend("vllm")
        return model_args.model_name_or_path, load_tokenizer(source_of(model_args))
    source = source_of(model_args)
    model = load_model(source, device=device_of(model_args))
    if args.adapter:
        from ...adapter import load_hellora

        model = load_hellora(model, args.adapter)
    return model, load_tokenizer(source, args.adapter)


def gsm8k_rows(args: EvalArguments) -> list[dict]:
    """The given split, or the arithmetic rows `hellora train` without a dataset held out (same seed, train rows)."""
    if args.dataset_name is None:
        from ...recipes.eval import held_out_arithmetic

        return held_out_arithmetic(args.limit or ARITHMETIC_HELD_OUT_ROWS, args.seed, args.train_limit)
    from ...recipes.data import load_source

    raw = load_source(args.dataset_name, args.dataset_split, hub_config="main")
    return [dict(r) for r in raw.select(range(min(args.limit or len(raw), len(raw))))]


def task_rows(args: EvalArguments):
    """The rows :func:`~hellora_trl.recipes.eval.evaluate_task` scores for ``args.task``."""
    from ...recipes import eval as evaluation

    if args.task == "gsm8k":
        return gsm8k_rows(args)
    if args.task == "humaneval":
        return evaluation.load_humaneval(args.dataset_name)
    benign = evaluation.load_instruction_set(args.benign_path) if args.benign_path else []
    return {"harmful": evaluation.load_instruction_set(args.dataset_name), "benign": benign}


def evaluate(args: EvalArguments, model, tokenizer) -> dict[str, Any]:
    """The task's metrics through the evaluation path `hellora train` uses too."""
    from ...recipes.eval import EvalSettings, evaluate_task

    settings = EvalSettings(
        limit=args.limit, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, chat=args.chat,
        backend=args.backend, progress=not args.disable_tqdm, timeout=args.timeout,
        samples_path=Path(args.output_dir) / "humaneval_samples.jsonl",  # every verdict as soon as it is known
    )
    return evaluate_task(args.task, model, tokenizer, task_rows(args), settings)


def run(argv: Sequence[str]) -> int:
    from ...recipes.eval import metric_name, write_results

    args, model_args = parse_command("eval", (EvalArguments, ModelArguments), argv, DESCRIPTION)
    check_inputs(args)
    model, tokenizer = eval_model(args, model_args)
    result = evaluate(args, model, tokenizer)
    meta = {"model": model_args.describe(), "adapter": args.adapter, "task": args.task, "dataset": args.dataset_name,
            "limit": args.limit, "max_new_tokens": args.max_new_tokens, "backend": args.backend}
    name = metric_name(args.task, args.dataset_name)
    json_path, md_path = write_results({"run": meta, name: result}, args.output_dir)
    headline = {k: v for k, v in result.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    print(f"{name}: {json.dumps(headline)}\nWrote {json_path} and {md_path}")
    return 0
