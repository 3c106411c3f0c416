"""Datasets for the paper's three task families, already in the formats TRL's ``SFTTrainer`` consumes.

- math: GSM8K (``question``/``answer``) as prompt-completion or conversational ``messages``;
- code: CodeAlpaca and safety: Saferpaca, both Alpaca schema (``instruction``/``input``/``output``) as ``messages``;
- offline: :func:`synthetic_gsm8k`, generated GSM8K-style problems that need no file and no network.

Sources are local ``.json``/``.jsonl`` files (optionally ``.gz``), a directory holding ``{split}.jsonl``, or a
Hugging Face hub id. Local files are parsed with the standard library, so nothing is written to the datasets cache.
Problems with the input raise a ``ValueError`` that says what was expected and what was found.
"""

from __future__ import annotations

import gzip
import json
import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import datasets
from datasets import Dataset

from .offline import generate_math_problems

__all__ = [
    "FORMATS",
    "load_alpaca",
    "load_codealpaca",
    "load_gsm8k",
    "load_saferpaca",
    "synthetic_gsm8k",
]

FORMATS: tuple[str, ...] = ("prompt_completion", "messages")
_GSM8K_COLUMNS: tuple[str, ...] = ("question", "answer")
_ALPACA_COLUMNS: tuple[str, ...] = ("instruction", "output")  # `input` is optional (missing means empty)
_LOCAL_SUFFIXES: tuple[str, ...] = (".jsonl", ".json", ".jsonl.gz", ".json.gz")
# What a hub id can look like: "name" or "owner/name", no file extension.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")

PathOrId = str | os.PathLike


# --------------------------------------------------------------------------------------------------------------
# Reading sources
# --------------------------------------------------------------------------------------------------------------


def _is_local_file_name(name: str) -> bool:
    return name.lower().endswith(_LOCAL_SUFFIXES)


def _read_local(path: Path) -> Dataset:
    """Rows of a .json (list of objects, or columns as lists) or .jsonl file, optionally gzipped."""
    opener: Callable[..., Any] = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as handle:
            if path.name.lower().endswith((".jsonl", ".jsonl.gz")):
                rows = []
                for line_no, line in enumerate(handle, start=1):
                    if line.strip():
                        try:
                            rows.append(json.loads(line))
                        except json.JSONDecodeError as err:
                            raise ValueError(f"{path}: line {line_no} is not valid JSON ({err.msg}).") from err
            else:
                try:
                    rows = json.load(handle)
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path} is not valid JSON ({err}).") from err
    except (OSError, UnicodeDecodeError) as err:
        raise ValueError(f"Could not read {path}: {err}") from err

    if isinstance(rows, dict):
        # Columnar JSON ({"col": [...], ...}) or a wrapper like {"data": [ {...}, ... ]}.
        lists = [v for v in rows.values() if isinstance(v, list)]
        if len(rows) == 1 and lists and all(isinstance(r, dict) for r in lists[0]):
            rows = lists[0]
        elif lists and len(lists) == len(rows) and len({len(v) for v in lists}) == 1:
            return _columns_to_dataset(path, rows)
        else:
            raise ValueError(
                f"{path}: expected a JSON list of objects or an object of equal-length column lists; "
                f"got an object with keys {sorted(rows)[:10]}."
            )
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{path}: expected one JSON object per row (a list of objects, or one object per line).")
    if not rows:
        return Dataset.from_dict({})
    # Union of keys in first-seen order, so a key that only some rows have still becomes a column.
    columns: dict[str, None] = {}
    for row in rows:
        columns.update(dict.fromkeys(row))
    return _columns_to_dataset(path, {c: [row.get(c) for row in rows] for c in columns})


def _columns_to_dataset(path: Path, columns: dict[str, list]) -> Dataset:
    """``Dataset.from_dict``, with a message naming the row and column when a column mixes value types (pyarrow
    otherwise raises e.g. ``ArrowTypeError: Expected bytes, got a 'int' object``)."""
    import pyarrow as pa

    try:
        return Dataset.from_dict(columns)
    except (pa.ArrowException, TypeError, ValueError) as err:
        for name, values in columns.items():
            kinds = [(i, type(v).__name__) for i, v in enumerate(values) if v is not None]
            first = kinds[0] if kinds else None
            odd = next(((i, kind) for i, kind in kinds if kind != first[1]), None) if first else None
            if odd is not None:
                raise ValueError(
                    f"{path}: column {name!r} mixes value types: row {first[0]} has {first[1]}, row {odd[0]} has "
                    f"{odd[1]}. Every row must use the same type in a column (e.g. strings for text fields)."
                ) from err
        raise ValueError(f"{path}: the rows cannot be read as a table ({err}).") from err


def _resolve_local(source: PathOrId, split: str) -> Path | None:
    """The file to read for ``source``, or None when it should be treated as a hub id."""
    path = Path(source).expanduser()
    if path.is_dir():
        for suffix in _LOCAL_SUFFIXES:
            candidate = path / f"{split}{suffix}"
            if candidate.is_file():
                return candidate
        found = sorted(p.name for p in path.iterdir())
        raise ValueError(
            f"Directory {path} has no {split}.jsonl (or {split}.json); it contains {found[:20]}. "
            f"Pass the file itself, or the right split= for a directory with {{split}}.jsonl files."
        )
    if path.is_file():
        if not _is_local_file_name(path.name):
            raise ValueError(f"{path} is not a .json or .jsonl file (optionally .gz); convert it or pass a hub id.")
        return path
    text = os.fspath(source)
    if isinstance(source, os.PathLike) or _is_local_file_name(text) or not _HUB_ID.match(text):
        raise ValueError(
            f"Dataset file not found: {path}. Pass an existing .json/.jsonl file, a directory with "
            f"{split}.jsonl, or a Hugging Face hub id like 'openai/gsm8k'."
        )
    return None


def load_source(source: PathOrId, split: str, hub_config: str | None) -> Dataset:
    path = _resolve_local(source, split)
    if path is not None:
        return _read_local(path)
    args = (os.fspath(source),) if hub_config is None else (os.fspath(source), hub_config)
    try:
        loaded = datasets.load_dataset(*args, split=split)
    except Exception as err:  # the hub raises many types; give one clear message with the cause attached
        raise ValueError(
            f"{os.fspath(source)!r} is not a local file or directory, and loading it from the Hugging Face hub "
            f"(config={hub_config!r}, split={split!r}) failed: {type(err).__name__}: {err}. Offline, pass a local "
            f".json/.jsonl file or a directory with {split}.jsonl instead."
        ) from err
    if not isinstance(loaded, Dataset):
        raise ValueError(f"Expected a map-style datasets.Dataset from the hub for {source!r}, got {type(loaded)}.")
    return loaded


def _check_columns(ds: Dataset, required: Sequence[str], source: PathOrId, what: str) -> None:
    if len(ds) == 0:
        raise ValueError(f"{what} data from {os.fspath(source)!r} is empty (0 rows); rows need {list(required)}.")
    missing = [c for c in required if c not in ds.column_names]
    if missing:
        raise ValueError(
            f"{what} data from {os.fspath(source)!r} is missing column(s) {missing}; found columns "
            f"{ds.column_names}. {what} rows need {list(required)}."
        )


def _strings(ds: Dataset, column: str, source: PathOrId, *, optional: bool = False) -> list[str]:
    """A column as a list of str; None is allowed (as "") only for optional columns."""
    if column not in ds.column_names:
        return [""] * len(ds)
    values = list(ds[column])
    for i, value in enumerate(values):
        if value is None and optional:
            values[i] = ""
        elif not isinstance(value, str):
            raise ValueError(
                f"Row {i} of {os.fspath(source)!r}: column {column!r} should be a string, got {type(value).__name__}."
            )
    return values


def _check_fmt(fmt: str) -> None:
    if fmt not in FORMATS:
        raise ValueError(f"Unknown fmt {fmt!r}; use one of {list(FORMATS)}.")


def _apply_limit(ds: Dataset, limit: int | None) -> Dataset:
    if limit is None:
        return ds
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise ValueError(f"limit must be a positive integer or None, got {limit!r}.")
    return ds.select(range(limit)) if limit < len(ds) else ds


# --------------------------------------------------------------------------------------------------------------
# GSM8K
# --------------------------------------------------------------------------------------------------------------


def format_gsm8k(questions: Sequence[str], answers: Sequence[str], fmt: str) -> Dataset:
    """Prompt-completion uses the same prompt as evaluation (:func:`gsm8k_prompt`)."""
    if fmt == "prompt_completion":
        # The leading space keeps "Answer:" and the answer on separate tokens, so the prompt tokenizes the same
        # alone and inside prompt+completion (TRL finds the completion by that common prefix).
        return Dataset.from_dict(
            {"prompt": [gsm8k_prompt(q) for q in questions], "completion": [" " + a.strip() for a in answers]}
        )
    return Dataset.from_dict(
        {
            "messages": [
                [{"role": "user", "content": q.strip()}, {"role": "assistant", "content": a.strip()}]
                for q, a in zip(questions, answers, strict=True)
            ]
        }
    )


def load_gsm8k(
    source: PathOrId, split: str = "train", *, fmt: str = "prompt_completion", limit: int | None = None
) -> Dataset:
    """GSM8K in TRL format: ``prompt``/``completion`` strings (``fmt="prompt_completion"``) or ``messages``.

    ``source``: a .json/.jsonl file, a directory with ``{split}.jsonl`` (e.g. ``../shared/datasets/gsm8k``), or a
    hub id (loaded with ``datasets.load_dataset(source, "main", split=split)``). ``limit`` keeps the first rows.
    Only the formatted columns are returned.
    """
    _check_fmt(fmt)
    ds = load_source(source, split, hub_config="main")
    _check_columns(ds, _GSM8K_COLUMNS, source, "GSM8K")
    ds = _apply_limit(ds, limit)
    return format_gsm8k(_strings(ds, "question", source), _strings(ds, "answer", source), fmt)


def synthetic_gsm8k(n: int, seed: int = 0, fmt: str = "prompt_completion") -> Dataset:
    """``n`` generated GSM8K-style problems (see :func:`hellora_trl.recipes.offline.generate_math_problems`), no I/O."""
    _check_fmt(fmt)
    if n < 1:
        raise ValueError(f"synthetic_gsm8k needs n >= 1 rows, got {n}.")
    problems = generate_math_problems(n, seed=seed)
    return format_gsm8k([p["question"] for p in problems], [p["answer"] for p in problems], fmt)


# --------------------------------------------------------------------------------------------------------------
# Alpaca schema: CodeAlpaca, Saferpaca
# --------------------------------------------------------------------------------------------------------------


def _load_one_alpaca(source: PathOrId, split: str) -> Dataset:
    ds = load_source(source, split, hub_config=None)
    _check_columns(ds, _ALPACA_COLUMNS, source, "Alpaca")
    instructions = _strings(ds, "instruction", source)
    inputs = _strings(ds, "input", source, optional=True)
    outputs = _strings(ds, "output", source)
    messages = []
    for instruction, extra, output in zip(instructions, inputs, outputs, strict=True):
        user = instruction.strip()
        if extra.strip():
            user = f"{user}\n\n{extra.strip()}"
        messages.append([{"role": "user", "content": user}, {"role": "assistant", "content": output.strip()}])
    return Dataset.from_dict({"messages": messages})


def load_alpaca(
    source: PathOrId | Sequence[PathOrId], *, split: str = "train", limit: int | None = None
) -> Dataset:
    """Alpaca-schema rows (``instruction``, optional ``input``, ``output``) as conversational ``messages``.

    The user turn is ``instruction`` plus ``"\\n\\n" + input`` when the input is non-empty; the assistant turn is
    ``output``. A list of sources is concatenated in order (e.g. Saferpaca = Alpaca data + safety examples), and
    ``limit`` then keeps the first rows of the result, so shuffle first if you mix sources and limit.
    """
    sources = list(source) if isinstance(source, (list, tuple)) else [source]
    if not sources:
        raise ValueError("load_alpaca got an empty list of sources.")
    parts = [_load_one_alpaca(s, split) for s in sources]
    ds = parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)
    return _apply_limit(ds, limit)


def load_codealpaca(
    source: PathOrId | Sequence[PathOrId], *, split: str = "train", limit: int | None = None
) -> Dataset:
    """CodeAlpaca (e.g. ``../shared/datasets/code_alpaca/code_alpaca_2k.json``): Alpaca schema as ``messages``."""
    return load_alpaca(source, split=split, limit=limit)


def load_saferpaca(
    source: PathOrId | Sequence[PathOrId], *, split: str = "train", limit: int | None = None
) -> Dataset:
    """Saferpaca (e.g. ``../shared/datasets/saferpaca/safety_only_data_Instructions.json``) as ``messages``."""
    return load_alpaca(source, split=split, limit=limit)


# --------------------------------------------------------------------------------------------------------------
# Warm-up slice
# --------------------------------------------------------------------------------------------------------------


# TRL's dataset formats that SFTTrainer trains on as is: language modelling, conversational, prompt-completion.
# (Prompt-only rows are a format of TRL's online trainers, GRPO/RLOO; SFT has nothing to learn from them.)
TRL_FORMATS = (("text",), ("messages",), ("prompt", "completion"))
CHAT_ROLES = ("system", "user", "assistant", "tool")


def _message_problem(messages: Any, column: str) -> str | None:
    if not isinstance(messages, list):
        return f"{column!r} is a {type(messages).__name__}, not a list of {{'role', 'content'}} messages"
    if not messages:
        return f"{column!r} is an empty list"
    for j, message in enumerate(messages):
        if not isinstance(message, dict):
            return f"{column}[{j}] is a {type(message).__name__}, not a {{'role', 'content'}} message"
        if "role" not in message or message["role"] is None:
            return f"{column}[{j}] has no 'role'"
        if message["role"] not in CHAT_ROLES:
            return f"{column}[{j}] has role {message['role']!r}; chat templates take {list(CHAT_ROLES)}"
        if not isinstance(message.get("content"), (str, list)):
            return f"{column}[{j}] has no text 'content' (got {type(message.get('content')).__name__})"
    return None


def _row_problem(row: dict[str, Any]) -> str | None:
    """What is wrong with one TRL row (None: nothing). A column that is None is absent in that row (mixed files)."""
    if row.get("messages") is not None:
        return _message_problem(row["messages"], "messages")
    prompt, completion = row.get("prompt"), row.get("completion")
    if prompt is not None or completion is not None:
        if prompt is None or completion is None:
            return f"'{'completion' if prompt is not None else 'prompt'}' is missing (null)"
        if isinstance(prompt, str) and isinstance(completion, str):
            return None
        if isinstance(prompt, list) and isinstance(completion, list):
            return _message_problem(prompt, "prompt") or _message_problem(completion, "completion")
        return (f"'prompt' is a {type(prompt).__name__} and 'completion' a {type(completion).__name__}; both must be "
                "strings or both lists of messages")
    text = row.get("text")
    if text is None:
        return "it has no 'text', 'messages' or 'prompt' + 'completion' value"
    if not isinstance(text, str):
        return f"'text' is a {type(text).__name__}, not a string"
    return None


def check_sft_rows(ds: Dataset, name: str = "the dataset") -> None:
    """Check every row of a TRL-format dataset before training; one line naming the first bad row and what is
    wrong (missing or null keys, non-string text, empty or malformed messages, chat roles other than
    :data:`CHAT_ROLES`), instead of a KeyError, jinja2 TemplateError or misleading "empty after preparation"."""
    for i, row in enumerate(ds):
        problem = _row_problem(row)
        if problem:
            raise ValueError(
                f"{name} row {i}: {problem}. Task 'sft' takes TRL rows: {{'text': str}}, {{'messages': [{{'role', "
                "'content'}}, ...]}} or {'prompt', 'completion'} (both strings or both message lists)."
            )


def load_sft(source: PathOrId, split: str = "train", *, limit: int | None = None) -> Dataset:
    """Any TRL-format dataset (``text``, ``messages`` or ``prompt``/``completion`` columns), passed through as is:
    a hub id or a local JSON/JSONL file or folder. Fails early, naming the formats, when no TRL format fits, and
    naming the first malformed row (:func:`check_sft_rows`)."""
    ds = load_source(source, split, hub_config=None)
    if not any(all(c in ds.column_names for c in columns) for columns in TRL_FORMATS):
        raise ValueError(
            f"{os.fspath(source)!r} has columns {ds.column_names}; task 'sft' needs a TRL-format dataset: 'text', "
            "'messages', or 'prompt' + 'completion' (use --task gsm8k/codealpaca/saferpaca for those schemas)."
        )
    if len(ds) == 0:
        raise ValueError(f"{os.fspath(source)!r} (split {split!r}) is empty.")
    ds = _apply_limit(ds, limit)
    check_sft_rows(ds, repr(os.fspath(source)))
    return ds


def gsm8k_prompt(question: str) -> str:
    """Default zero-shot prompt; the model is expected to finish with ``#### <number>`` as in GSM8K train.

    Training data (prompt-completion) and evaluation use this same prompt."""
    return f"Question: {question.strip()}\nAnswer:"
