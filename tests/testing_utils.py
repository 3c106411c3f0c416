"""Builders shared by the tests: tiny random MoE models, batches, factor randomisation, short training loops and the
shared-datasets location. Test modules import from here, never from each other or from ``conftest``."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FUSED_FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe"]


def tiny_model(family: str = "olmoe", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model of ``family`` (same weights for the same seed)."""
    from hellora_trl.offline import tiny_moe_model

    model = tiny_moe_model(family, seed=seed, **overrides)
    return model.to(dtype)


def random_batch(model, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded random token ids (no padding)."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def shared_dataset(*parts: str) -> Path:
    """A file under ../shared/datasets, or a skip with the reason when the checkout has no shared folder beside it."""
    path = SHARED_DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/datasets is only available beside the checkout)")
    return path


def randomize_factors(model, seed: int = 0, std: float = 0.3) -> None:
    """Every LoRA factor to seeded random values, so adapters change the output (fresh B = 0 would not)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def train_steps(model, batch, steps: int = 5, lr: float = 1e-2, weight_decay: float = 0.1):
    """A few AdamW steps on the trainable parameters (decoupled weight decay on, as in the Trainer)."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    model.train()
    for _ in range(steps):
        model(**batch, labels=batch["input_ids"]).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return optimizer
