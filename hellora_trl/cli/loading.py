"""What the ``hellora`` commands need beyond their arguments: the command's model options as the recipes'
:class:`~hellora_trl.recipes.models.ModelSource` (:func:`source_of`; the commands load through
:mod:`hellora_trl.recipes.models`, the one loader), adapter checks, and the training rows as the trainer prepares
them (:func:`prepared_rows`, through :mod:`hellora_trl.recipes.prepare`).

Heavy imports happen inside the functions, so importing this module stays cheap.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

from .arguments import CLIError, DataArguments, ModelArguments

__all__ = [
    "adapter_base",
    "base_model_path",
    "check_adapter",
    "check_model_source",
    "data_source",
    "device_of",
    "max_length_of",
    "prepared_rows",
    "source_of",
]


# ------------------------------------------------------------------------------------------------ models
def check_model_source(model_args: ModelArguments) -> None:
    if model_args.model_name_or_path and model_args.tiny:
        raise CLIError("Give either --model_name_or_path or --tiny, not both.")
    if not model_args.given():
        raise CLIError("No model: pass --model_name_or_path (directory or hub id) or --tiny olmoe.")
    name = model_args.model_name_or_path
    if name and _looks_local(str(name)) and not Path(name).is_dir():
        what = "is a file, not a model directory" if Path(name).exists() else "does not exist"
        raise CLIError(f"--model_name_or_path {name} {what}: pass a saved model folder or a hub id (org/name).")


def _looks_local(name: str) -> bool:
    """A path rather than a hub id: absolute, relative (./, ../, ~), or more than one '/'."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1 or os.sep != "/" and os.sep in name


def source_of(model_args: ModelArguments):
    """The command's model options as the recipes' :class:`~hellora_trl.recipes.models.ModelSource`; load it with
    ``recipes.models.load_model(source_of(args), device=device_of(args))`` (or ``meta=True`` for the module tree
    without weights) and ``recipes.models.load_tokenizer(source_of(args), *preferred)``."""
    from ..recipes.models import ModelSource

    check_model_source(model_args)
    if model_args.tiny:
        return ModelSource(tiny_family=model_args.tiny, tiny_seed=model_args.tiny_seed, dtype=model_args.dtype)
    return ModelSource(name_or_path=model_args.model_name_or_path, dtype=model_args.dtype,
                       trust_remote_code=model_args.trust_remote_code)


def device_of(model_args: ModelArguments) -> str:
    import torch

    return model_args.device or ("cuda" if torch.cuda.is_available() else "cpu")


@contextlib.contextmanager
def base_model_path(model_args: ModelArguments) -> Iterator[str]:
    """A path/hub id for functions that load the base themselves; a tiny model is saved to a temporary directory
    with its tokenizer, so exports get a tokenizer to carry over."""
    from ..recipes.models import load_model, load_tokenizer, save_model_and_tokenizer

    check_model_source(model_args)
    if not model_args.tiny:
        yield model_args.model_name_or_path
        return
    with tempfile.TemporaryDirectory(prefix="hellora_tiny_") as tmp:
        source = source_of(model_args)
        save_model_and_tokenizer(load_model(source, device=device_of(model_args)), load_tokenizer(source), tmp)
        yield tmp


# ------------------------------------------------------------------------------------------------ adapters
def check_adapter(path: str | None) -> None:
    if path is not None and not (Path(path) / "adapter_config.json").is_file():
        raise CLIError(f"No adapter_config.json in {path}: not a saved HELLoRA adapter directory.")


def adapter_base(adapter: str | None, model_args: ModelArguments) -> None:
    """With an adapter and no base given, use the base the adapter was trained on (its adapter_config.json)."""
    if adapter is None or model_args.given():
        return
    config = json.loads((Path(adapter) / "adapter_config.json").read_text())
    base = config.get("base_model_name_or_path")
    if not base:
        raise CLIError(f"{adapter} does not name its base model: pass --model_name_or_path or --tiny.")
    model_args.model_name_or_path = base


# ------------------------------------------------------------------------------------------------ data
def max_length_of(data_args: DataArguments) -> int:
    """``--max_length``, else the trainer's default (``HELLoRAConfig.max_length``, TRL's SFTConfig default, which
    `hellora train` keeps unless told otherwise)."""
    if data_args.max_length is not None:
        return data_args.max_length
    from ..recipes.prepare import sft_arguments

    return sft_arguments().max_length


def prepared_rows(data_args: DataArguments, tokenizer):
    """The task's training rows as `hellora train` loads them, prepared as its trainer prepares them (TRL's own
    preparation: chat template or EOS, tokens, truncation to max_length), then its warm-up slice of ``fraction``
    (the same rows and the same token ids as the trainer's warm-up with that fraction and seed)."""
    from ..recipes.prepare import sft_arguments, warmup_rows
    from ..recipes.sft import HELLoRAScriptArguments, load_task_data

    script = HELLoRAScriptArguments(
        task=data_args.task, dataset_name=data_args.dataset_name, dataset_train_split=data_args.dataset_split,
        train_limit=data_args.limit, chat_format=data_args.chat_format, eval_limit=0,
    )
    rows, _ = load_task_data(script, seed=data_args.seed)
    args = sft_arguments(max_length=max_length_of(data_args), seed=data_args.seed)
    return warmup_rows(rows, tokenizer, args, data_args.fraction, data_args.seed)


def data_source(data_args: DataArguments, model_args: ModelArguments, rows: int) -> dict[str, Any]:
    """The ``source`` record of a profile taken on ``data_args``."""
    return {
        "task": data_args.task, "dataset": data_args.dataset_name or "offline:lab_arithmetic",
        "split": data_args.dataset_split, "rows": rows, "fraction": data_args.fraction, "seed": data_args.seed,
        "max_length": max_length_of(data_args), "model": model_args.describe(),
    }
