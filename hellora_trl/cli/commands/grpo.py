"""``hellora grpo``: the GRPO recipe (:mod:`hellora_trl.recipes.rl`) with every GRPOConfig / hellora_* / ModelConfig
field, like ``trl grpo``; see ``hellora grpo --help``."""

from __future__ import annotations

from typing import Sequence


def run(argv: Sequence[str]) -> int:
    from ...recipes import rl

    rl.main("grpo", list(argv), prog="hellora grpo")
    return 0
