"""Forward profiling on CUDA counts what it counts on the CPU for the same model and data (gpu marker)."""

import pytest
import torch

from hellora_trl import profile_experts

from testing_utils import gpu_test_device, random_batch, requires_gpu, tiny_model

pytestmark = [pytest.mark.gpu, requires_gpu]


@pytest.mark.parametrize("family", ["olmoe", "qwen3_moe", "gpt_oss"])
def test_cuda_profile_equals_cpu_profile(family):
    device = gpu_test_device()
    batches = [random_batch(tiny_model(family), batch=4, seq=24, seed=s) for s in range(3)]
    batches[1]["attention_mask"][0, 10:] = 0  # padding is skipped on both devices
    # float64: no near-tie in the router can flip between devices, so the counts must be identical
    model = tiny_model(family, dtype=torch.float64)
    model.config._experts_implementation = "eager"  # transformers' grouped_mm has no float64 kernel
    cpu = profile_experts(model, batches, progress=False)
    gpu = profile_experts(model.to(device), batches, progress=False)
    assert torch.equal(cpu.counts, gpu.counts) and cpu.tokens_seen == gpu.tokens_seen
    # float32 (what a real profile uses): the same up to the rare near-tie, which may route one assignment elsewhere
    model = tiny_model(family, dtype=torch.float32)
    cpu = profile_experts(model, batches, progress=False)
    gpu = profile_experts(model.to(device), batches, progress=False)
    moved = (cpu.counts - gpu.counts).abs().sum().item() / 2
    assert moved <= 1e-3 * cpu.counts.sum().item(), f"{moved} assignments differ"
    assert cpu.tokens_seen == gpu.tokens_seen
