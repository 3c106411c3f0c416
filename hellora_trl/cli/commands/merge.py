"""``hellora merge``: base + adapter -> one plain transformers checkpoint."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ...utils import check_output_dir
from ..arguments import ModelArguments, parse_command, require
from ..loading import adapter_base, base_model_path, check_adapter

DESCRIPTION = "Fold a HELLoRA adapter into its base model and write a plain transformers checkpoint (any engine serves it)."


@dataclass
class MergeArguments:
    adapter: str = field(default=None, metadata={"help": "HELLoRA adapter directory."})
    output_dir: str = field(default=None, metadata={"help": "Directory to write."})
    overwrite: bool = field(default=False, metadata={"help": "Replace a non-empty output_dir."})


def write_export(args: MergeArguments, model_args: ModelArguments, fmt: str) -> Path:
    """The adapter on its base, written as ``fmt`` ("merged" or "peft") by :mod:`hellora_trl.export`."""
    from ... import export

    require(args.adapter, "--adapter", "the HELLoRA adapter directory")
    require(args.output_dir, "--output_dir", "where to write the export")
    check_adapter(args.adapter)
    adapter_base(args.adapter, model_args)
    write = export.merge_adapter if fmt == "merged" else export.export_peft_target_parameters
    check_output_dir(args.output_dir, overwrite=args.overwrite, inputs=(args.adapter, model_args.model_name_or_path))
    with base_model_path(model_args) as base:
        return write(base, args.adapter, args.output_dir, overwrite=args.overwrite)


def run(argv: Sequence[str]) -> int:
    args, model_args = parse_command("merge", (MergeArguments, ModelArguments), argv, DESCRIPTION)
    print(f"Wrote merged checkpoint {write_export(args, model_args, 'merged')}")
    return 0
