"""``hellora train``: the SFT recipe (:mod:`hellora_trl.recipes.sft`) with every SFTConfig / HELLoRAConfig /
ModelConfig field; see ``hellora train --help``."""

from __future__ import annotations

from typing import Sequence


def run(argv: Sequence[str]) -> int:
    from ...recipes import sft

    sft.main(list(argv), prog="hellora train")
    return 0
