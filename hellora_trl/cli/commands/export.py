"""``hellora export``: adapter -> merged checkpoint or stock-PEFT ``target_parameters`` layout."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ..arguments import ModelArguments, parse_command
from .merge import MergeArguments, write_export

DESCRIPTION = ("Export a HELLoRA adapter for stacks without hellora_trl: --format merged (plain checkpoint) or peft "
               "(stock PEFT target_parameters layout, zeros for cold experts).")


@dataclass
class ExportArguments(MergeArguments):
    format: str = field(
        default="merged",
        metadata={"help": "merged: plain transformers checkpoint; peft: stock-PEFT target_parameters adapter.",
                  "choices": ["merged", "peft"]},
    )


def run(argv: Sequence[str]) -> int:
    args, model_args = parse_command("export", (ExportArguments, ModelArguments), argv, DESCRIPTION)
    print(f"Wrote {args.format} export {write_export(args, model_args, args.format)}")
    return 0
