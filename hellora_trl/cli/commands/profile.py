"""``hellora profile``: forward-only routing profile of a model on a dataset -> profile JSON."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

from ...constants import PROFILE_FILE
from ...utils import check_output_file
from ..arguments import DataArguments, ModelArguments, parse_command
from ..loading import data_source, device_of, prepared_rows, source_of

DESCRIPTION = "Count how many tokens the router sends to each expert of each MoE layer (forward passes only)."


@dataclass
class ProfileArguments:
    output: str = field(default=PROFILE_FILE, metadata={"help": "Where to write the profile JSON."})
    save_model_to: str | None = field(
        default=None,
        metadata={"help": "Also save the base model and tokenizer there (handy with --tiny: later commands can "
                  "take that directory as --model_name_or_path)."},
    )


def print_profile_summary(profile, path: Path) -> None:
    from ...selection import default_k

    k = default_k(profile)
    conc = profile.concentration(k)
    print(
        f"Wrote {path}: {profile.num_layers} MoE layers x {profile.num_experts} experts, {profile.tokens_seen} tokens; "
        f"top-{k} experts take {sum(conc) / len(conc):.1%} of routing on average (uniform: {k / profile.num_experts:.1%})."
    )


def run(argv: Sequence[str]) -> int:
    from ...profiling import profile_experts
    from ...recipes.models import load_model, load_tokenizer, save_model_and_tokenizer

    model_args, data_args, args = parse_command("profile", (ModelArguments, DataArguments, ProfileArguments), argv,
                                                DESCRIPTION)
    check_output_file(args.output)  # a directory or read-only place fails now, not after profiling
    source = source_of(model_args)
    tokenizer = load_tokenizer(source)
    rows = prepared_rows(data_args, tokenizer)  # the trainer's tokens; data problems surface before the model loads
    model = load_model(source, device=device_of(model_args))
    if args.save_model_to:
        save_model_and_tokenizer(model, tokenizer, args.save_model_to)
    profile = profile_experts(
        model, rows, batch_size=data_args.batch_size, max_batches=data_args.max_batches,
        progress=not data_args.disable_tqdm, source=data_source(data_args, model_args, len(rows)),
    )
    print_profile_summary(profile, profile.save(args.output))
    return 0
