"""``hellora pretrain``: build (or reuse the cached) small lab MoE whose routing is learned, not random
(:mod:`hellora_trl.recipes.lab.model`)."""

from __future__ import annotations

import importlib
from typing import Sequence


def run(argv: Sequence[str]) -> int:
    lab = importlib.import_module("hellora_trl.recipes.lab.model")  # a broken install fails here, in one line
    lab.main(list(argv), prog="hellora pretrain")
    return 0
