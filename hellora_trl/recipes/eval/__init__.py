"""Downstream evaluation: GSM8K / arithmetic accuracy, HumanEval pass@k, refusal rates, and result files.

The paper judges HELLoRA adapters on three axes: the task they were tuned for (GSM8K, code), and whether safety
behaviour survived (refusals on harmful prompts, no over-refusal on benign ones). Everything here runs on CPU with
a Hugging Face model; vLLM is an optional backend.

Modules: :mod:`.gsm8k` (answer extraction and scoring, the lab's held-out arithmetic rows), :mod:`.humaneval` (the
harness) and :mod:`.humaneval_runner` (the sandbox program it runs), :mod:`.safety` (refusal judging),
:mod:`.generation` (backends), :mod:`.results` (result files) and :mod:`.tasks`, whose :func:`evaluate_task` is
the one evaluation path of ``hellora train`` and ``hellora eval``.
"""

from .generation import check_backend, cut_at_stops, generate_batched
from .gsm8k import (
    ARITHMETIC_HELD_OUT_ROWS,
    ARITHMETIC_TRAIN_ROWS,
    evaluate_gsm8k,
    extract_gsm8k_answer,
    gsm8k_is_correct,
    gsm8k_prompt,
    held_out_arithmetic,
)
from .humaneval import evaluate_humaneval, load_humaneval, pass_at_k, run_humaneval_sample
from .results import write_results
from .safety import (
    REFUSAL_PHRASES,
    REFUSAL_START_PREFIXES,
    RefusalJudge,
    evaluate_safety,
    is_refusal,
    load_instruction_set,
    refusal_rate,
)
from .tasks import HUMANEVAL_STOPS, EvalSettings, evaluate_task, metric_name

__all__ = [
    "ARITHMETIC_HELD_OUT_ROWS",
    "ARITHMETIC_TRAIN_ROWS",
    "HUMANEVAL_STOPS",
    "REFUSAL_PHRASES",
    "REFUSAL_START_PREFIXES",
    "EvalSettings",
    "RefusalJudge",
    "check_backend",
    "cut_at_stops",
    "evaluate_gsm8k",
    "evaluate_humaneval",
    "evaluate_safety",
    "evaluate_task",
    "extract_gsm8k_answer",
    "generate_batched",
    "gsm8k_is_correct",
    "gsm8k_prompt",
    "held_out_arithmetic",
    "is_refusal",
    "load_humaneval",
    "load_instruction_set",
    "metric_name",
    "pass_at_k",
    "refusal_rate",
    "run_humaneval_sample",
    "write_results",
]
