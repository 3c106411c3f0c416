"""Builders shared by the tests: tiny random MoE models, batches, factor randomisation, short training loops, the
dense ``W + BA`` reference of the expert-LoRA layer, the GPU suite's device and the shared-datasets location. Test
modules import from here, never from each other or from ``conftest``."""

from __future__ import annotations

import copy
import os
from pathlib import Path

import pytest
import torch

SHARED_DATASETS = Path(__file__).resolve().parents[2] / "shared" / "datasets"
FUSED_FAMILIES = ["olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3", "gpt_oss", "granitemoe", "phimoe"]
IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]
# tests/gpu: "cuda" when torch sees a GPU; HELLORA_GPU_TESTS_ON_CPU=1 runs the suite's logic on the CPU instead
# (a check of the tests themselves, not of CUDA); otherwise its tests skip with this reason.
GPU_SKIP_REASON = "needs CUDA (run `python -m pytest -m gpu` on a GPU machine, e.g. through bench/gpu/run.sh)"


def gpu_test_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if os.environ.get("HELLORA_GPU_TESTS_ON_CPU") == "1":
        return "cpu"
    pytest.skip(GPU_SKIP_REASON)


requires_gpu = pytest.mark.skipif(
    not torch.cuda.is_available() and os.environ.get("HELLORA_GPU_TESTS_ON_CPU") != "1", reason=GPU_SKIP_REASON
)


def tiny_model(family: str = "olmoe", seed: int = 0, dtype: torch.dtype = torch.float32, **overrides):
    """A tiny random model of ``family`` (same weights for the same seed)."""
    from hellora_trl.recipes.offline import tiny_moe_model

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


def dense_reference(layer, adapter: str = "default") -> torch.nn.Module:
    """A copy of the base experts module whose hot experts hold W + (alpha/r) * B @ A (cold ones unchanged)."""
    ref = copy.deepcopy(layer.get_base_layer())
    s = layer.lora_alpha[adapter] / layer.r[adapter]
    transposed = getattr(ref, "is_transposed", False)
    concatenated = getattr(ref, "is_concatenated", True)

    def delta(proj: str, j: int) -> torch.Tensor:
        a = getattr(layer, f"lora_{proj}_A")[adapter][j].detach()
        b = getattr(layer, f"lora_{proj}_B")[adapter][j].detach()
        return s * torch.einsum("or,ri->oi", b, a)  # (out, in)

    with torch.no_grad():
        for j, e in enumerate(layer.hot_experts(adapter)):
            if layer.fuse_gate_up:
                gate_up = delta("gate_up", j)
            else:
                gate, up = delta("gate", j), delta("up", j)
                if concatenated:
                    gate_up = torch.cat([gate, up], dim=0)
                else:  # GPT-OSS: rows alternate gate, up
                    gate_up = torch.empty(2 * gate.shape[0], gate.shape[1], dtype=gate.dtype, device=gate.device)
                    gate_up[0::2], gate_up[1::2] = gate, up
            down = delta("down", j)
            if transposed:
                gate_up, down = gate_up.T, down.T
            ref.gate_up_proj[e] += gate_up
            ref.down_proj[e] += down
    return ref


def routing(num_tokens, num_experts, top_k, seed=0, dtype=torch.float64, force=None):
    """Seeded softmax top-k routing (index, renormalised weights); ``force`` sends every token to those experts."""
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator, dtype=dtype)
    if force is not None:  # route every token through the given experts
        logits[:, force] += 100.0
    weights, index = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)
