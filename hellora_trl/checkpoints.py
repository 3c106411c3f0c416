"""Run identity and checkpoints: what makes two trainings the same run, which checkpoint of ``output_dir`` a run
may resume from, and the in-progress marker of an unfinished run.

Functions of ``(output_dir, fingerprint)``, beside the trainer the way transformers keeps ``get_last_checkpoint``
in ``trainer_utils``. A fingerprint is a JSON-able dict of sections (``model``, ``data``, ``hellora``,
``adapter``); it is saved in every profile record (``selection.run``) and resuming from a checkpoint with another
one is refused.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR
from transformers.utils import logging

from .constants import PROFILE_FILE, RUN_MARKER_FILE
from .selection import load_plan
from .utils import atomic_write_text

logger = logging.get_logger(__name__)

__all__ = [
    "RUN_NEUTRAL",
    "checkpoint_problem",
    "clear_in_progress",
    "checkpoint_run_differences",
    "data_fingerprint",
    "hellora_settings",
    "last_checkpoint_of_run",
    "list_checkpoints",
    "mark_in_progress",
    "foreign_checkpoints",
    "fresh_output_dir",
    "other_runs_checkpoints",
    "refuse_other_runs",
    "rotate_own_checkpoints",
    "run_differences",
    "warn_about_other_runs",
]

CHECKPOINT_RE = re.compile(rf"^{re.escape(PREFIX_CHECKPOINT_DIR)}-(\d+)$")
# hellora_* options that change neither the hot map nor the adapter's training: not part of a run's fingerprint.
RUN_NEUTRAL = ("hellora_plots", "hellora_profile_batch_size", "hellora_overwrite_output_dir")
_HASH_BATCH = 1024  # rows per Arrow batch while hashing a dataset


# ------------------------------------------------------------------------------------------------ fingerprint
def hellora_settings(args: Any, seed: int) -> dict[str, Any]:
    """Every ``hellora_*`` field of ``args`` that can change the hot map or the adapter (subclass configs' fields
    included), with the effective seed."""
    settings = {
        name: value for name, value in sorted(vars(args).items()) if name.startswith("hellora_") and name not in RUN_NEUTRAL
    }
    settings["hellora_seed"] = seed
    return settings


def data_fingerprint(data: Any) -> dict[str, Any] | None:
    """Row count and SHA-256 of every row of a prepared (tokenized) dataset; None for data without a length.

    The hash streams over all token-id columns (every column whose name ends in ``input_ids``: ``input_ids`` for
    SFT, ``prompt_input_ids``/``chosen_input_ids``/... for preference data), row by row in dataset order, each row
    as its length followed by its ids (int64), so two datasets of the same size that differ in one token differ
    here. Datasets without token ids hash each row as sorted JSON instead.
    """
    if data is None or not hasattr(data, "__len__"):
        return None
    rows = len(data)
    digest = hashlib.sha256(f"rows={rows}".encode())
    columns = [c for c in (getattr(data, "column_names", None) or []) if c.endswith("input_ids")]
    if columns and hasattr(data, "select_columns"):
        digest.update(json.dumps(sorted(columns)).encode())
        table = data.select_columns(sorted(columns)).with_format("arrow")
        for batch in table.iter(batch_size=_HASH_BATCH):
            for name in sorted(columns):
                _hash_token_column(digest, batch.column(name))
    else:
        for row in data:
            digest.update(json.dumps(row, default=str, sort_keys=True).encode())
            digest.update(b"\n")
    return {"rows": rows, "sha256": digest.hexdigest()[:16]}


def _hash_token_column(digest, column) -> None:
    """One batch of a list-of-ints Arrow column: per row its length, then all ids, as little-endian int64."""
    import pyarrow as pa

    array = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    offsets = np.asarray(array.offsets, dtype=np.int64)
    digest.update(np.diff(offsets).astype("<i8").tobytes())
    digest.update(np.asarray(array.flatten().to_numpy(zero_copy_only=False), dtype="<i8").tobytes())


# ------------------------------------------------------------------------------------------------ comparing runs
def run_differences(stored: Mapping[str, Any] | None, current: Mapping[str, Any]) -> list[str]:
    """The fingerprint entries (``section.key``) where a checkpoint's run and this run differ, as readable lines."""
    if not stored:
        return []
    lines = []
    for section in sorted(set(stored) | set(current)):
        old, new = stored.get(section) or {}, current.get(section) or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                lines.append(f"{section}: {old!r} (checkpoint) != {new!r} (this run)")
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                lines.append(f"{section}.{key}: {old.get(key)!r} (checkpoint) != {new.get(key)!r} (this run)")
    return lines


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (missing, torn by a kill mid-save, not HELLoRA's), or None when it can.

    The Trainer writes ``trainer_state.json`` last, after the adapter (published from staging) and the optimizer,
    so a checkpoint without a readable one was interrupted while saving.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist" if not path.exists() else f"{path} is not a directory"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "incomplete: no trainer_state.json (the save was interrupted; the Trainer writes it last)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"incomplete: trainer_state.json is unreadable ({err})"
    if not (path / "adapter_config.json").is_file():
        return "incomplete: no adapter_config.json"
    if not (path / PROFILE_FILE).is_file():
        return f"not written by HELLoRATrainer: no {PROFILE_FILE}, so its hot experts are unknown"
    return None


def checkpoint_run_differences(checkpoint: str | os.PathLike, fingerprint: Mapping[str, Any]) -> list[str]:
    """:func:`run_differences` between the run recorded in ``checkpoint``'s profile file and ``fingerprint``."""
    try:
        _, _, record = load_plan(Path(checkpoint) / PROFILE_FILE)
    except (OSError, ValueError) as err:
        return [f"unreadable {PROFILE_FILE} ({err})"]
    return run_differences(record.get("run"), fingerprint)


# ------------------------------------------------------------------------------------------------ discovery
def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """``checkpoint-N`` folders of ``output_dir``, newest step first."""
    out = Path(output_dir)
    if not out.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in out.iterdir() if (m := CHECKPOINT_RE.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found, reverse=True)]


def last_checkpoint_of_run(output_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> str:
    """``resume_from_checkpoint=True``: the newest complete checkpoint of the run ``fingerprint`` describes. Torn
    checkpoints (a kill mid-save) and other runs' checkpoints in a reused output_dir are skipped, each with the
    reason logged; a ValueError says why none fits."""
    skipped = []
    for checkpoint in list_checkpoints(output_dir):
        problem = checkpoint_problem(checkpoint)
        if problem is None:
            differences = checkpoint_run_differences(checkpoint, fingerprint)
            if differences:
                problem = "from another run (" + "; ".join(differences[:4]) + ")"
        if problem is None:
            for name, why in skipped:
                logger.warning("HELLoRA: not resuming from %s: %s.", name, why)
            return str(checkpoint)
        skipped.append((checkpoint.name, problem))
    if not skipped:
        raise ValueError(f"No checkpoint found in output_dir ({output_dir}) to resume from.")
    reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
    raise ValueError(
        f"No checkpoint of this run in output_dir ({output_dir}) to resume from: {reasons}. Train without "
        "resume_from_checkpoint (or in another output_dir), or pass the checkpoint path and the settings it was "
        "trained with."
    )


def other_runs_checkpoints(output_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> list[str]:
    """Names of the complete checkpoints in ``output_dir`` that another run wrote."""
    return [
        c.name
        for c in list_checkpoints(output_dir)
        if checkpoint_problem(c) is None and checkpoint_run_differences(c, fingerprint)
    ]


def foreign_checkpoints(output_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> list[str]:
    """Names of the ``checkpoint-N`` folders of ``output_dir`` that are not complete checkpoints of the run
    ``fingerprint`` describes: another run's, torn ones, and ones not written by HELLoRATrainer."""
    return [
        c.name
        for c in list_checkpoints(output_dir)
        if checkpoint_problem(c) is not None or checkpoint_run_differences(c, fingerprint)
    ]


def fresh_output_dir(output_dir: str | os.PathLike) -> str:
    """A sibling path that does not exist yet (``<output_dir>-2``, ``-3``, ...), to suggest in messages."""
    base = str(output_dir).rstrip("/\\") or "."
    n = 2
    while os.path.exists(f"{base}-{n}"):
        n += 1
    return f"{base}-{n}"


def refuse_other_runs(others: Iterable[str], output_dir: str | os.PathLike, save_total_limit: int | None) -> None:
    """A new run (not a resume) in an output_dir holding checkpoints it did not write: refused before any work,
    naming the overwrite flag and a fresh path (its same-numbered saves would replace them)."""
    others = list(others)
    if not others:
        return
    rotation = f"; save_total_limit={save_total_limit} would also rotate" if save_total_limit else ""
    raise ValueError(
        f"output_dir {output_dir} holds checkpoints this run did not write ({', '.join(others[:5])}"
        f"{', ...' if len(others) > 5 else ''}): a new run there would replace its same-numbered ones{rotation}. "
        f"Train in a fresh output_dir (e.g. {fresh_output_dir(output_dir)}), resume that run with "
        "resume_from_checkpoint=True, or pass --hellora_overwrite_output_dir true to write there anyway (other "
        "runs' checkpoints are then never deleted by rotation, but same-numbered ones are replaced)."
    )


# The files that make a folder a transformers model (beside its config.json), whatever its format.
MODEL_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                      "pytorch_model.bin.index.json")


def model_files(output_dir: str | os.PathLike) -> list[str]:
    """The files that make ``output_dir`` a transformers model folder (``config.json`` plus weights), or []."""
    folder = Path(output_dir)
    weights = [name for name in MODEL_WEIGHT_FILES if (folder / name).is_file()]
    return ["config.json", *weights] if weights and (folder / "config.json").is_file() else []


def refuse_model_folder(files: Iterable[str], output_dir: str | os.PathLike) -> None:
    """A new run whose output_dir holds a model: refused before any work, naming the overwrite flag and a fresh
    path (its adapter and tokenizer would be written beside the model, and transformers then tries to attach
    that adapter whenever the folder is loaded as a model)."""
    files = list(files)
    if not files:
        return
    raise ValueError(
        f"output_dir {output_dir} holds a model ({', '.join(files)}): a run there writes its adapter and tokenizer "
        "files beside it, and transformers would then try to attach that adapter whenever the folder is loaded as "
        f"a model. Train in a fresh output_dir (e.g. {fresh_output_dir(output_dir)}), or pass "
        "--hellora_overwrite_output_dir true to write there anyway."
    )


def rotate_own_checkpoints(
    output_dir: str | os.PathLike, save_total_limit: int | None, keep: Iterable[str] = (), best: str | None = None
) -> list[str]:
    """transformers' checkpoint rotation limited to this run's checkpoints: the oldest of them beyond
    ``save_total_limit`` are deleted (the newest and ``best`` kept); folders named in ``keep`` (other runs')
    are never touched and do not count. Returns the deleted names."""
    import shutil

    if not save_total_limit or save_total_limit <= 0:
        return []
    keep = set(keep)
    own = [c for c in reversed(list_checkpoints(output_dir)) if c.name not in keep]  # oldest step first
    if len(own) <= save_total_limit:
        return []
    protected = {own[-1].name}
    if best:
        protected.add(Path(best).name)
    deleted = []
    remaining = len(own)
    for checkpoint in own:
        if remaining <= max(save_total_limit, len(protected)):
            break
        if checkpoint.name not in protected:
            shutil.rmtree(checkpoint, ignore_errors=True)
            deleted.append(checkpoint.name)
            remaining -= 1
    return deleted


def warn_about_other_runs(others: Iterable[str], output_dir: str | os.PathLike, save_total_limit: int | None) -> None:
    """A new run let into an output_dir that holds checkpoints it did not write (``hellora_overwrite_output_dir``):
    say what happens to them."""
    others = list(others)
    if not others:
        return
    rotation = f" save_total_limit={save_total_limit} rotates only this run's checkpoints." if save_total_limit else ""
    logger.warning(
        "HELLoRA: hellora_overwrite_output_dir: output_dir %s holds checkpoints this run did not write (%s); its "
        "same-numbered saves replace them, the others stay.%s",
        output_dir, ", ".join(others[:5]), rotation,
    )


# ------------------------------------------------------------------------------------------------ in progress
def mark_in_progress(output_dir: str | os.PathLike, fingerprint: Mapping[str, Any]) -> Path:
    """Mark ``output_dir`` as holding an unfinished run until its final adapter is saved there (the trainer's
    ``save_model`` removes the marker)."""
    marker = {
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "note": "A HELLoRA training run is writing here; removed when its final adapter is saved. If the run "
        "was interrupted, the adapter in this folder is from an earlier run and the profile/figures may not be.",
        "run": dict(fingerprint),
    }
    return atomic_write_text(Path(output_dir) / RUN_MARKER_FILE, json.dumps(marker, indent=1, default=str))


def clear_in_progress(output_dir: str | os.PathLike) -> None:
    """Remove the in-progress marker: the run's final adapter is now the folder's."""
    marker = Path(output_dir) / RUN_MARKER_FILE
    if marker.exists():
        marker.unlink()
