"""Shared fixtures: tiny random MoE models built from configs (no downloads)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Tiny models gain nothing from intra-op threads, and on a shared 2-core box oversubscribed threads made one
# training step take seconds instead of milliseconds. Subprocesses (examples) inherit the setting.
os.environ.setdefault("OMP_NUM_THREADS", "1")
torch.set_num_threads(1)
# The main job fine-tunes the lab model when given no model. Tests (and the example subprocesses they start) use
# the seconds-sized "tiny" lab recipe in a per-session cache, never the multi-minute default or the user's cache.
os.environ.setdefault("HELLORA_LAB_RECIPE", "tiny")
if "HELLORA_LAB_CACHE" not in os.environ:
    import tempfile

    os.environ["HELLORA_LAB_CACHE"] = tempfile.mkdtemp(prefix="hellora-lab-cache-")

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FUSED_FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss"]


def tiny_model(family: str = "olmoe", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    from hellora_trl.offline import tiny_moe_model

    model = tiny_moe_model(family, seed=seed, **overrides)
    return model.to(dtype)


def random_batch(model, batch: int = 2, seq: int = 12, seed: int = 0) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (batch, seq), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


@pytest.fixture
def olmoe():
    return tiny_model("olmoe")


def shared_dataset(*parts: str) -> Path:
    path = SHARED_DATASETS.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/datasets is only available beside the checkout)")
    return path
