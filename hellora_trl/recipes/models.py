"""The one model / tokenizer loader of the application layer (``hellora train``, the examples, every CLI command).

A model is either a checkpoint (local directory or hub id, loaded with ``from_pretrained``) or, with no checkpoint,
an offline tiny random MoE model built in process from a config (tests, demos). The tiny models are not the lab
model that ``hellora train`` fine-tunes when given no model (:mod:`hellora_trl.recipes.lab`, wider experts and
vocabulary), so an adapter of that offline run loads on the lab checkpoint, not on ``--tiny olmoe``.

Checkpoints load through the core's :func:`hellora_trl.utils.load_causal_lm`, which the exports use too, so the
package has one ``from_pretrained`` for models.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..utils import apply_default_mode, load_causal_lm

__all__ = ["OFFLINE_MODEL", "ModelSource", "load_model", "load_tokenizer", "save_model_and_tokenizer"]

# The tiny OLMoE of `--tiny olmoe` (tests, demos): small enough for a CPU box, large enough for a readable heatmap.
OFFLINE_MODEL = dict(
    hidden_size=128, intermediate_size=64, num_hidden_layers=4, num_experts=16, num_experts_per_tok=2
)


@dataclass(frozen=True)
class ModelSource:
    """Where a model comes from: ``name_or_path`` (checkpoint), else the offline tiny model of ``tiny_family``."""

    name_or_path: str | None = None
    tiny_family: str = "olmoe"
    tiny_seed: int = 42
    dtype: str | None = "auto"  # "auto", "float32", "bfloat16", "float16"; None = "auto"
    revision: str | None = None
    trust_remote_code: bool = False
    attn_implementation: str | None = None

    @property
    def is_tiny(self) -> bool:
        return self.name_or_path is None

    def tiny_overrides(self) -> dict[str, Any]:
        """OLMoE gets the offline recipe's shape; other families keep their tiny defaults."""
        return dict(OFFLINE_MODEL) if self.tiny_family == "olmoe" else {}

    def describe(self) -> str:
        return self.name_or_path or f"tiny:{self.tiny_family}(seed={self.tiny_seed})"


def _torch_dtype(name: str | None):
    import torch

    return "auto" if name in (None, "auto") else getattr(torch, name)


def load_model(source: ModelSource, *, device: str | None = None, meta: bool = False):
    """The model of ``source``: a tiny float32 model (cast when ``dtype`` is set), or ``from_pretrained`` in
    ``dtype``. ``device`` moves it there (None: left where it was built). ``meta=True`` gives the module tree
    without weights (enough to check a profile against it, at no memory cost)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if meta:
        if source.is_tiny:
            from .offline import tiny_moe_config

            config = tiny_moe_config(source.tiny_family, **source.tiny_overrides())
        else:
            config = AutoConfig.from_pretrained(
                source.name_or_path, revision=source.revision, trust_remote_code=source.trust_remote_code
            )
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=source.trust_remote_code)
    if source.is_tiny:
        from .offline import tiny_moe_model

        model = tiny_moe_model(source.tiny_family, seed=source.tiny_seed, **source.tiny_overrides())
        dtype = _torch_dtype(source.dtype)
        if dtype != "auto" and dtype != torch.float32:
            model = model.to(dtype)
    else:
        kwargs: dict[str, Any] = dict(trust_remote_code=source.trust_remote_code, dtype=_torch_dtype(source.dtype))
        if source.revision is not None:
            kwargs["revision"] = source.revision
        if source.attn_implementation is not None:
            kwargs["attn_implementation"] = source.attn_implementation
        model = load_causal_lm(source.name_or_path, **kwargs)
    return model if device is None else model.to(device)


def load_tokenizer(source: ModelSource, *preferred: str | os.PathLike | None):
    """From the first of ``preferred`` that holds tokenizer files (e.g. an adapter directory), else the model's
    (the locally trained tokenizer for a tiny model). A missing pad token becomes the EOS token."""
    from transformers import AutoTokenizer

    for path in preferred:
        if path and (Path(path) / "tokenizer_config.json").is_file():
            return _with_pad(AutoTokenizer.from_pretrained(str(path)))
    if source.is_tiny:
        from .offline import build_tokenizer

        return build_tokenizer()
    kwargs: dict[str, Any] = dict(trust_remote_code=source.trust_remote_code)
    if source.revision is not None:
        kwargs["revision"] = source.revision
    return _with_pad(AutoTokenizer.from_pretrained(source.name_or_path, **kwargs))


def _with_pad(tokenizer):
    if tokenizer.pad_token is None and tokenizer.eos_token is not None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def save_model_and_tokenizer(model, tokenizer, path: str | os.PathLike) -> Path:
    """``save_pretrained`` of both, with the package's one permission policy (safetensors writes 0600)."""
    start = time.time() - 1.0  # file systems with coarse timestamps
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    apply_default_mode(path, since=start)
    return Path(path)
