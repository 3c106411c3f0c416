"""Result files: ``results.json`` (everything) and ``results.md`` (the scalar metrics as a table)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Mapping

from ...utils import atomic_write_text, markdown_table

__all__ = ["write_results"]


def _scalars(results: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Flatten nested dicts to dotted keys, keeping numbers, bools, short strings and None; lists are skipped."""
    rows = []
    for key, value in results.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            rows.extend(_scalars(value, name + "."))
        elif value is None or isinstance(value, (bool, int, float)) or (isinstance(value, str) and len(value) <= 80):
            rows.append((name, value))
    return rows


def write_results(results: dict, out_dir: str | os.PathLike) -> tuple[Path, Path]:
    """Write ``results.json`` (full, atomic) and ``results.md`` (table of the scalar metrics) into ``out_dir``.

    Per-example records stay in the JSON only; the markdown is for a quick look or a PR comment.
    Non-JSON values (e.g. Paths) are written as strings.
    """
    out_dir = Path(out_dir)
    json_path = atomic_write_text(out_dir / "results.json",
                                  json.dumps(results, indent=2, ensure_ascii=False, default=str, allow_nan=True) + "\n")
    lines = markdown_table(["metric", "value"], _scalars(results), float_format="{:.4f}")
    md_path = atomic_write_text(out_dir / "results.md", "\n".join(lines) + "\n")
    return json_path, md_path
