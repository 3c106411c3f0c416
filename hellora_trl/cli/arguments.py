"""What several ``hellora`` commands share: the model and data argument dataclasses, the parser, the error type.

Torch-free at import: the router imports :class:`CLIError` from here.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..constants import TASKS, TINY_FAMILIES

TRAINER_SEED = 42  # transformers' default seed: the offline base model and warm-up slices of `hellora train`
CONFIG_EPILOG = "Every option can also be set in a YAML file passed as --config x.yaml; command-line values win."

__all__ = [
    "CONFIG_EPILOG",
    "CLIError",
    "DataArguments",
    "ModelArguments",
    "TRAINER_SEED",
    "existing",
    "parse_command",
    "require",
]


class CLIError(Exception):
    """A problem with the user's input that a one-line message explains."""


@dataclass
class ModelArguments:
    """The base model: a local directory / hub id, or an offline tiny random model (tests, demos)."""

    model_name_or_path: str | None = field(
        default=None, metadata={"help": "Base (or merged) model: local directory or hub id."}
    )
    tiny: str | None = field(
        default=None,
        metadata={
            "help": "Use an offline tiny random MoE model of this family instead. Not the lab model `hellora train` "
            "fine-tunes when given no model: for that run's adapter pass --model_name_or_path <path `hellora "
            "pretrain` prints>.",
            "choices": list(TINY_FAMILIES),
        },
    )
    tiny_seed: int = field(
        default=TRAINER_SEED, metadata={"help": "Weight seed of the tiny model."}
    )
    dtype: str = field(
        default="auto",
        metadata={"help": "Weights dtype for a loaded model.", "choices": ["auto", "float32", "bfloat16", "float16"]},
    )
    device: str | None = field(default=None, metadata={"help": "cpu, cuda, cuda:1... (default: cuda if available)."})
    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub."})

    def given(self) -> bool:
        return self.model_name_or_path is not None or self.tiny is not None

    def describe(self) -> str:
        return self.model_name_or_path or f"tiny:{self.tiny}(seed={self.tiny_seed})"


@dataclass
class DataArguments:
    """Text to route through the model: the sources of ``hellora train``, tokenized for forward passes."""

    task: str = field(default="gsm8k", metadata={"help": "Data format of the source.", "choices": list(TASKS)})
    dataset_name: str | None = field(
        default=None,
        metadata={
            "help": "Hub id, local JSON/JSONL file or folder (e.g. ../shared/datasets/gsm8k). None: the lab's "
            "generated one-step arithmetic problems in GSM8K format (task gsm8k only, as `hellora train` with no "
            "dataset)."
        },
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to read."})
    limit: int | None = field(default=None, metadata={"help": "Keep only the first N rows."})
    fraction: float = field(
        default=1.0, metadata={"help": "Profile a seeded random share of the rows (the trainer's warm-up slice)."}
    )
    seed: int = field(default=TRAINER_SEED, metadata={"help": "Seed of the fraction slice (trainer default: 42)."})
    chat_format: bool = field(default=False, metadata={"help": "GSM8K as chat messages instead of prompt-completion."})
    max_length: int | None = field(
        default=None,
        metadata={"help": "Truncate each row to this many tokens, as the trainer does (default: the trainer's, TRL "
                  "SFTConfig's 1024; `hellora train` with no model uses 160)."},
    )
    batch_size: int = field(default=8, metadata={"help": "Rows per forward pass."})
    max_batches: int | None = field(default=None, metadata={"help": "Stop after this many batches."})
    disable_tqdm: bool = field(default=False, metadata={"help": "No progress bars."})

    def __post_init__(self) -> None:
        # 0 used to mean "no limit" (`limit or N`) or to end in "empty dataset" deep inside profiling.
        for name in ("limit", "max_length", "batch_size", "max_batches"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise CLIError(f"--{name} must be at least 1 (got {value}); leave it out for no limit.")


def parse_command(name: str, types: Sequence[type], argv: Sequence[str], description: str) -> tuple:
    """``TrlParser`` over ``types`` named ``hellora <name>``, with ``--config`` support; ``--help`` exits like any
    argparse program."""
    from trl import TrlParser

    parser = TrlParser(list(types), prog=f"hellora {name}", description=description, epilog=CONFIG_EPILOG)
    return parser.parse_args_and_config(list(argv))


def require(value: Any, flag: str, what: str) -> Any:
    if value is None or value == []:
        raise CLIError(f"{flag} is required ({what}).")
    return value


def existing(path: str | os.PathLike, what: str) -> Path:
    path = Path(path)
    if not path.exists():
        raise CLIError(f"{what} not found: {path}")
    return path
