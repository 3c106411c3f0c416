"""``hellora dpo``: the DPO recipe (:mod:`hellora_trl.recipes.rl`) with every DPOConfig / hellora_* / ModelConfig
field, like ``trl dpo``; see ``hellora dpo --help``."""

from __future__ import annotations

from typing import Sequence


def run(argv: Sequence[str]) -> int:
    from ...recipes import rl

    rl.main("dpo", list(argv), prog="hellora dpo")
    return 0
