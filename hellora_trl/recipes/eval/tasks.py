"""One evaluation path: :func:`evaluate_task`, called by ``hellora train`` (and the examples) and ``hellora eval``.

Both used to dispatch on the task themselves and had drifted apart (HumanEval stop lines in one of them only, other
default arithmetic rows). Everything a task's score depends on, stop lines included, is decided here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ...distributed import is_main_process
from .generation import cut_at_stops, generate_batched
from .gsm8k import evaluate_gsm8k
from .humaneval import evaluate_humaneval
from .safety import evaluate_safety

__all__ = ["HUMANEVAL_STOPS", "EvalSettings", "evaluate_task", "metric_name"]

# A HumanEval completion ends where the model starts a new top-level statement; what follows is not the function.
HUMANEVAL_STOPS = ("\ndef ", "\nclass ", "\nif __name__", "\nprint(", "\n#")
TASKS = ("gsm8k", "humaneval", "safety")


@dataclass
class EvalSettings:
    """How to evaluate: the same fields for every task; a task ignores what it does not use.

    ``limit``: only the first N rows (None: all). ``chat``: gsm8k prompts go through the chat template (safety
    prompts do whenever the tokenizer has one; HumanEval prompts never). ``samples_path``: HumanEval's
    ``.jsonl`` of verdicts, written as they are known (None: not written). ``timeout``: seconds per HumanEval
    program.
    """

    limit: int | None = None
    max_new_tokens: int = 256
    batch_size: int = 8
    chat: bool = False
    backend: str = "hf"
    progress: bool = True
    timeout: float = 5.0
    samples_path: str | os.PathLike | None = None


def metric_name(task: str, dataset: str | None) -> str:
    """The name results are filed under: what was measured. ``gsm8k`` without a dataset is the lab's arithmetic
    task (:func:`~hellora_trl.recipes.eval.gsm8k.held_out_arithmetic`), so it is ``arithmetic``."""
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; choose one of {TASKS}.")
    return "arithmetic" if task == "gsm8k" and dataset is None else task


def evaluate_task(task: str, model, tokenizer, rows, settings: EvalSettings | None = None) -> dict[str, Any] | None:
    """The task's metrics on ``rows``; every rank of a distributed run calls it (generation is sharded).

    ``rows``: gsm8k, ``question`` / ``answer`` rows; humaneval, HumanEval problems; safety, either harmful
    prompts or ``{"harmful": [...], "benign": [...]}`` (benign ones measure over-refusal). HumanEval completions
    are cut at :data:`HUMANEVAL_STOPS` and their programs run once, on the main process: other ranks get None.
    """
    settings = settings or EvalSettings()
    if task not in TASKS:
        raise ValueError(f"unknown evaluation task {task!r}; choose one of {TASKS}.")
    limit = settings.limit
    common = dict(max_new_tokens=settings.max_new_tokens, batch_size=settings.batch_size, progress=settings.progress,
                  backend=settings.backend)
    if task == "gsm8k":
        return evaluate_gsm8k(model, tokenizer, list(rows)[:limit], chat=settings.chat, **common)
    if task == "humaneval":
        problems = list(rows)[:limit]
        if not problems:
            raise ValueError("no HumanEval problems to evaluate")
        completions = generate_batched(model, tokenizer, [p["prompt"] for p in problems], **common)
        if not is_main_process():
            return None
        samples = {p["task_id"]: [cut_at_stops(c, HUMANEVAL_STOPS)] for p, c in zip(problems, completions)}
        return evaluate_humaneval(problems, samples, ks=(1,), timeout=settings.timeout, progress=settings.progress,
                                  results_path=settings.samples_path)
    harmful, benign = _safety_rows(rows)
    return evaluate_safety(model, tokenizer, harmful[:limit], benign[:limit], **common)


def _safety_rows(rows) -> tuple[list[str], list[str]]:
    if isinstance(rows, Mapping):
        return list(rows.get("harmful") or []), list(rows.get("benign") or [])
    if isinstance(rows, str) or not isinstance(rows, Sequence):
        raise TypeError("safety rows are a list of harmful prompts or {'harmful': [...], 'benign': [...]}")
    return list(rows), []
