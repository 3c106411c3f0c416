"""GSM8K-style answers: final-number extraction, numeric grading, accuracy over generated solutions.

The same scoring serves GSM8K itself and the lab's arithmetic target task (one-step word problems in GSM8K's
``question`` / ``answer`` fields, whose held-out rows :func:`held_out_arithmetic` gives).
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, Sequence

from ..data import gsm8k_prompt
from .generation import check_backend, cut_at_stops, generate_batched

__all__ = [
    "ARITHMETIC_HELD_OUT_ROWS",
    "ARITHMETIC_TRAIN_ROWS",
    "evaluate_gsm8k",
    "extract_gsm8k_answer",
    "gsm8k_is_correct",
    "gsm8k_prompt",
    "held_out_arithmetic",
]

ARITHMETIC_TRAIN_ROWS = 1200  # arithmetic rows `hellora train` tunes on when no --train_limit is given
ARITHMETIC_HELD_OUT_ROWS = 64  # rows the offline default run (no model, no dataset) holds out and scores


# A number token: optional sign (only when not glued to a preceding word/digit, so "3-4" is two
# positives), optional "$", then either comma-grouped thousands ("1,234,567") or plain digits,
# then an optional decimal part. ".5" is accepted too. "72." leaves the final "." as punctuation.
_NUMBER = re.compile(
    r"(?P<sign>(?<![\w)\]])-\s?)?"
    r"(?:\$\s?(?P<sign2>-)?)?"
    r"(?P<num>(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?|\.\d+)"
)


def _normalise_number(sign: bool, num: str) -> str:
    """Canonical text of a number: no commas, no leading zeros, no trailing decimal zeros."""
    num = num.replace(",", "")
    whole, _, frac = num.partition(".")
    whole = whole.lstrip("0") or "0"
    frac = frac.rstrip("0")
    text = f"{whole}.{frac}" if frac else whole
    return f"-{text}" if sign and text != "0" else text


def _numbers(text: str) -> list[str]:
    return [_normalise_number(bool(m.group("sign") or m.group("sign2")), m.group("num")) for m in _NUMBER.finditer(text)]


def extract_gsm8k_answer(text: str) -> str | None:
    """The final answer of a GSM8K-style solution, as a canonical number string, or None.

    Rules, in order: if the text contains ``####`` (the GSM8K answer marker), the answer is the
    first number after the *last* marker, and None if no number follows it (a model that wrote
    the marker but no number did not answer; borrowing a number from its reasoning would give
    it free credit). Without a marker, the answer is the last number anywhere in the text.
    Normalisation: thousands commas dropped ("1,234" -> "1234"), "$" dropped, sign kept
    ("-5"), trailing decimal zeros dropped ("3.50" -> "3.5", "4.0" -> "4"), trailing
    punctuation ignored ("72." -> "72").
    """
    if text is None:
        return None
    if "####" in text:
        tail = _numbers(text.rsplit("####", 1)[1])
        return tail[0] if tail else None
    found = _numbers(text)
    return found[-1] if found else None


def _as_float(value: str) -> float | None:
    try:
        return float(value.replace(",", "").replace("$", "").strip())
    except ValueError:
        return None


def gsm8k_is_correct(pred: str | None, gold: str) -> bool:
    """True when ``pred`` equals ``gold`` numerically (absolute tolerance 1e-6).

    Both sides may be bare numbers or full solution texts; a text that is not itself a number
    goes through :func:`extract_gsm8k_answer` first, so a raw GSM8K ``answer`` field works as gold.
    """
    if pred is None or gold is None:
        return False
    values = []
    for side in (pred, gold):
        number = _as_float(side)
        if number is None:
            extracted = extract_gsm8k_answer(side)
            number = None if extracted is None else _as_float(extracted)
        if number is None or not math.isfinite(number):
            return False
        values.append(number)
    return math.isclose(values[0], values[1], rel_tol=0.0, abs_tol=1e-6)


def held_out_arithmetic(n: int, seed: int, train_rows: int = ARITHMETIC_TRAIN_ROWS) -> list[dict]:
    """The arithmetic rows a ``hellora train`` run without a dataset holds out: its first ``n`` eval rows.

    ``seed`` is the run's seed and ``train_rows`` its ``--train_limit`` (held-out questions exclude the train
    questions, so they depend on both). The rows are a prefix: asking for fewer gives the first of them.
    """
    from ..lab.targets import arithmetic_task

    if n < 1:
        raise ValueError(f"held_out_arithmetic needs n >= 1 rows, got {n}.")
    return arithmetic_task(train_rows, n, seed=seed)[1]


def evaluate_gsm8k(
    model,
    tokenizer,
    dataset_rows: list[dict],
    *,
    limit: int | None = None,
    batch_size: int = 8,
    max_new_tokens: int = 256,
    prompt_fn: Callable[[str], str] | None = None,
    chat: bool = False,
    stop: Sequence[str] = ("\nQuestion:", "\n\nQuestion"),
    progress: bool = True,
    backend: str = "hf",
) -> dict[str, Any]:
    """Greedy GSM8K accuracy over rows with ``question`` and ``answer`` (``... #### n``).

    ``prompt_fn(question)`` builds the prompt (default :func:`gsm8k_prompt`). Each completion is
    cut at the first ``stop`` string, so numbers from a hallucinated follow-up question are not
    scored, then graded with :func:`extract_gsm8k_answer` / :func:`gsm8k_is_correct`.
    """
    check_backend(backend)
    rows = list(dataset_rows if limit is None else dataset_rows[:limit])
    if not rows:
        raise ValueError("no GSM8K rows to evaluate")
    prompt_fn = prompt_fn or gsm8k_prompt
    prompts = [prompt_fn(row["question"]) for row in rows]
    completions = generate_batched(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                                   chat=chat, progress=progress, backend=backend)
    records = []
    for row, completion in zip(rows, completions):
        completion = cut_at_stops(completion, stop)
        prediction = extract_gsm8k_answer(completion)
        gold = extract_gsm8k_answer(row["answer"])
        records.append({"question": row["question"], "gold": gold, "prediction": prediction, "completion": completion,
                        "correct": gold is not None and gsm8k_is_correct(prediction, gold)})
    correct = sum(r["correct"] for r in records)
    return {"accuracy": correct / len(records), "correct": correct, "total": len(records), "records": records}
