"""Routing profiles for frameworks that own the training loop (Axolotl...), where HELLoRATrainer's warm-up
phase is not available: a short plain-PyTorch LoRA warm-up over the profiling slice, counting routes."""

from __future__ import annotations

import math
import random
from typing import Any, Iterator, Mapping

import torch
from peft import LoraConfig
from torch import nn

from ..adapter import apply_hellora
from ..baselines import all_experts_hot
from ..profile import ExpertProfile
from ..profiling import RoutingCounter, pad_collate


def padded_batches(
    rows: Any, batch_size: int, pad_token_id: int, *, seed: int = 0, shuffle: bool = True
) -> Iterator[dict[str, torch.Tensor]]:
    """Right-padded ``input_ids``/``attention_mask``/``labels`` batches of a tokenized dataset, one epoch.

    Labels come from a ``labels`` column when there is one (prompt tokens already masked by the framework),
    else from ``input_ids``; padding is never a target.
    """
    columns = getattr(rows, "column_names", None) or list(rows[0].keys())
    if "input_ids" not in columns:
        raise ValueError(f"Profiling needs a tokenized dataset with `input_ids`; got columns {columns}.")
    order = list(range(len(rows)))
    if shuffle:
        random.Random(seed).shuffle(order)
    collate = pad_collate(pad_token_id, labels=True)
    for start in range(0, len(order), batch_size):
        yield collate([rows[i] for i in order[start : start + batch_size]])


def lora_warmup_profile(
    model: nn.Module,
    rows: Any,
    lora_config: LoraConfig,
    *,
    epochs: float = 1.0,
    learning_rate: float = 2e-4,
    batch_size: int = 1,
    seed: int = 0,
    components: str = "all",
    fuse_gate_up: bool = False,
    include_shared_experts: bool = True,
    source: Mapping[str, Any] | None = None,
) -> ExpertProfile:
    """The paper's profiling: LoRA on attention, routers and *every* expert, trained briefly on ``rows`` while
    the router's assignments are counted; the warm-up adapter is then removed and ``model`` left as it was.

    Routes are counted as the adapter learns, so the profile reflects where the fine-tuning data sends tokens
    once the router starts to adapt, not only the base model's routing.
    """
    if epochs <= 0 or batch_size < 1 or len(rows) == 0:
        raise ValueError(f"Need epochs > 0, batch_size >= 1 and a non-empty slice (got {epochs}, {batch_size}, {len(rows)}).")
    if any(p.device.type == "meta" for p in model.parameters()):
        raise ValueError(
            "The model's weights are not materialised on this rank (meta device, e.g. FSDP cpu_ram_efficient_loading). "
            "Profile beforehand and pass hellora_profile_path."
        )
    warm = apply_hellora(
        model,
        all_experts_hot(model),
        lora_config,
        components=components,
        fuse_gate_up=fuse_gate_up,
        include_shared_experts=include_shared_experts,
    )
    counter = RoutingCounter(warm)
    try:
        losses = _train_counting(warm, rows, epochs, learning_rate, batch_size, seed, counter)
        info = dict(source or {})
        info.update({"mode": "lora_warmup", "warmup_epochs": epochs, "warmup_loss": losses[-1] if losses else None})
        return counter.to_profile(info)
    finally:
        warm.unload()  # in place: the caller's model object is the base model again, warm-up adapter gone


def _train_counting(warm, rows, epochs, learning_rate, batch_size, seed, counter: RoutingCounter) -> list[float]:
    pad_id = getattr(getattr(warm, "config", None), "pad_token_id", None) or 0
    device = next(p for p in warm.parameters()).device
    params = [p for p in warm.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=learning_rate)
    steps = max(1, math.ceil(epochs * math.ceil(len(rows) / batch_size)))
    losses: list[float] = []
    was_training = warm.training
    warm.train()
    try:
        with counter:
            epoch = 0
            while len(losses) < steps:
                for batch in padded_batches(rows, batch_size, pad_id, seed=seed + epoch):
                    if len(losses) >= steps:
                        break
                    loss = warm(**{k: v.to(device) for k, v in batch.items()}, use_cache=False).loss
                    loss.backward()
                    optimizer.step()
                    optimizer.zero_grad(set_to_none=True)
                    losses.append(float(loss.detach()))
                epoch += 1
    finally:
        warm.train(was_training)
    return losses
