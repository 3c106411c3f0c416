"""The lab: a small MoE pretrained in-project, so routing is learned, and the measures taken on it.

- :mod:`~hellora_trl.recipes.lab.model`: the lab model's recipes, its pretraining, the checkpoint cache and
  ``hellora pretrain``;
- :mod:`~hellora_trl.recipes.lab.cache`: the cache's manifest check, stale-temp clean-up, build lock and the wait
  of the processes that do not build;
- :mod:`~hellora_trl.recipes.lab.corpus`: the multi-domain pretraining text and the held-out arithmetic target task;
- :mod:`~hellora_trl.recipes.lab.quality`: fine-tune one adapter configuration on the lab model and score it
  (``bench/quality.py``, the slow quality test).

This module is the face the SFT recipe uses when it is given no model (``hellora train`` with no arguments):
:func:`load_lab_model` (the cached checkpoint), :func:`default_task` (the target task's train and held-out rows),
and :func:`baseline` before training / :func:`compare` after it (base vs adapted held-out loss and exact match,
routing concentration). The model module's public names are re-exported here.
"""

from __future__ import annotations

from typing import Any, Sequence

from .corpus import arithmetic_splits
from .model import (
    LAB_RECIPES,
    LabRecipe,
    PretrainArguments,
    lab_cache_dir,
    lab_config,
    lab_model_path,
    load_lab_model,
    pretrain_lab_model,
    read_card,
)
from .quality import completion_loss

__all__ = [
    "LAB_RECIPES",
    "LabRecipe",
    "PretrainArguments",
    "baseline",
    "compare",
    "default_task",
    "heldout_loss",
    "lab_cache_dir",
    "lab_config",
    "lab_model_path",
    "load_lab_model",
    "pretrain_lab_model",
    "read_card",
]


def default_task(train_rows: int, eval_rows: int, seed: int = 0, fmt: str = "prompt_completion"):
    """(train dataset in TRL's ``fmt``, held-out rows) of the lab's target task: one-step arithmetic word problems
    in GSM8K's answer format, which pretraining never saw; no held-out question is among the training rows."""
    from ..data import format_gsm8k

    train, held_out = arithmetic_splits(train_rows, eval_rows, seed=seed)
    return format_gsm8k([r["question"] for r in train], [r["answer"] for r in train], fmt), held_out


def heldout_loss(model, tokenizer, held_out: Sequence[dict]) -> float:
    """Mean loss over the completion tokens (answer and end-of-sequence) of the held-out rows."""
    return completion_loss(model, tokenizer, held_out)


def baseline(model, tokenizer, held_out: Sequence[dict], exact_match: float | None = None) -> dict[str, Any]:
    """The base model's numbers, taken before training: held-out loss, and ``exact_match`` when the caller scored
    the held-out rows (the recipe's task evaluation)."""
    base: dict[str, Any] = {"base_heldout_loss": heldout_loss(model, tokenizer, held_out)}
    if exact_match is not None:
        base["base_exact_match"] = exact_match
    return base


def compare(
    base: dict[str, Any], model, tokenizer, held_out: Sequence[dict], exact_match: float | None = None, profile=None
) -> dict[str, Any]:
    """``base`` (from :func:`baseline`) plus the adapted model's numbers and, given the run's routing ``profile``,
    the top-k share of routing per layer against the uniform share (how concentrated the lab model's routing is)."""
    lab = dict(base)
    lab["adapted_heldout_loss"] = heldout_loss(model, tokenizer, held_out)
    if exact_match is not None:
        lab["adapted_exact_match"] = exact_match
    if profile is not None:
        shares = profile.concentration()
        lab["routing_uniform_top_k_share"] = profile.experts_per_token / profile.num_experts
        lab.update({f"routing_top_k_share_layer{i}": round(x, 4) for i, x in enumerate(shares)})
        lab["routing_min_top_k_share_over_uniform"] = min(shares) / lab["routing_uniform_top_k_share"]
    return lab
