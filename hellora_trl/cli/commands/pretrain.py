"""``hellora pretrain``: build (or reuse the cached) small lab MoE whose routing is learned, not random
(:mod:`hellora_trl.recipes.lab.model`). Parsed like every other command (``TrlParser``, so ``--config x.yaml``
works)."""

from __future__ import annotations

import importlib
from typing import Sequence

from ..arguments import parse_command

DESCRIPTION = "Pretrain (or reuse the cached) small lab MoE with learned routing; prints its data card and path."


def run(argv: Sequence[str]) -> int:
    lab = importlib.import_module("hellora_trl.recipes.lab.model")  # a broken install fails here, in one line
    (args,) = parse_command("pretrain", (lab.PretrainArguments,), argv, DESCRIPTION)
    lab.run_pretrain(args)
    return 0
