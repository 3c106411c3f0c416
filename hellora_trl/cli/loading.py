"""Models, tokenizers, adapters and data for the ``hellora`` commands, through the recipes' one loader
(:mod:`hellora_trl.recipes.models`) and the training data loader (:func:`hellora_trl.recipes.sft.load_task_data`).

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
    "load_model",
    "load_tokenizer",
    "meta_model",
    "model_source",
    "row_text",
    "tokenized_rows",
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


def model_source(model_args: ModelArguments):
    """The command's model options as the recipes' :class:`~hellora_trl.recipes.models.ModelSource`."""
    from ..recipes.models import ModelSource

    check_model_source(model_args)
    if model_args.tiny:
        return ModelSource(tiny_family=model_args.tiny, tiny_seed=model_args.tiny_seed, dtype=model_args.dtype)
    return ModelSource(name_or_path=model_args.model_name_or_path, dtype=model_args.dtype,
                       trust_remote_code=model_args.trust_remote_code)


def device_of(model_args: ModelArguments) -> str:
    import torch

    return model_args.device or ("cuda" if torch.cuda.is_available() else "cpu")


def load_model(model_args: ModelArguments):
    """The base model (float32 tiny model, or from_pretrained in the requested dtype) on its device."""
    from ..recipes import models

    return models.load_model(model_source(model_args), device=device_of(model_args))


def meta_model(model_args: ModelArguments):
    """The model's module tree without weights: enough to check a profile against it, at no memory cost."""
    from ..recipes import models

    return models.load_model(model_source(model_args), meta=True)


def load_tokenizer(model_args: ModelArguments, *preferred: str | os.PathLike | None):
    """From the first of ``preferred`` that holds tokenizer files (an adapter dir), else the base model's."""
    from ..recipes import models

    return models.load_tokenizer(model_source(model_args), *preferred)


@contextlib.contextmanager
def base_model_path(model_args: ModelArguments) -> Iterator[str]:
    """A path/hub id for functions that load the base themselves; a tiny model is saved to a temporary directory
    with its tokenizer, so exports get a tokenizer to carry over."""
    from ..recipes.models import save_model_and_tokenizer

    check_model_source(model_args)
    if not model_args.tiny:
        yield model_args.model_name_or_path
        return
    with tempfile.TemporaryDirectory(prefix="hellora_tiny_") as tmp:
        save_model_and_tokenizer(load_model(model_args), load_tokenizer(model_args), tmp)
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
def row_text(row: dict[str, Any], tokenizer) -> str:
    """One training row as the text the model reads (prompt+completion, chat messages, or plain text)."""
    if "messages" in row:
        if getattr(tokenizer, "chat_template", None):
            return tokenizer.apply_chat_template(row["messages"], tokenize=False)
        return "\n".join(m["content"] for m in row["messages"])
    if "prompt" in row:
        prompt, completion = row["prompt"], row.get("completion", "")
        if isinstance(prompt, list):  # conversational prompt-completion
            return row_text({"messages": prompt + (completion or [])}, tokenizer)
        return prompt + completion
    if "text" in row:
        return row["text"]
    raise CLIError(f"Cannot read text from a row with columns {sorted(row)} (expected messages, prompt or text).")


def tokenized_rows(data_args: DataArguments, tokenizer):
    """The task's training rows (as `hellora train` loads them), sliced by fraction and tokenized."""
    from datasets import Dataset

    from ..recipes.data import sample_fraction
    from ..recipes.sft import HELLoRAScriptArguments, load_task_data

    script = HELLoRAScriptArguments(
        task=data_args.task, dataset_name=data_args.dataset_name, dataset_train_split=data_args.dataset_split,
        train_limit=data_args.limit, chat_format=data_args.chat_format, eval_limit=0,
    )
    rows, _ = load_task_data(script, seed=data_args.seed)
    if data_args.fraction < 1.0:
        rows = sample_fraction(rows, data_args.fraction, data_args.seed)
    texts = [row_text(row, tokenizer) for row in rows]
    enc = tokenizer(texts, truncation=True, max_length=data_args.max_length)
    keep = [i for i, ids in enumerate(enc["input_ids"]) if ids]
    return Dataset.from_dict({
        "input_ids": [enc["input_ids"][i] for i in keep],
        "attention_mask": [enc["attention_mask"][i] for i in keep],
    })


def data_source(data_args: DataArguments, model_args: ModelArguments, rows: int) -> dict[str, Any]:
    """The ``source`` record of a profile taken on ``data_args``."""
    return {
        "task": data_args.task, "dataset": data_args.dataset_name or "offline:synthetic_gsm8k",
        "split": data_args.dataset_split, "rows": rows, "fraction": data_args.fraction, "seed": data_args.seed,
        "max_length": data_args.max_length, "model": model_args.describe(),
    }
