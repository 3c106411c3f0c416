"""The expert-LoRA layer on CUDA: fused and split paths against the dense ``W + BA`` reference in float32 and
bfloat16 for every family and experts implementation, and the grouped kernel (not the loop) doing the work.

Marked ``gpu``; skipped with a reason without CUDA (``HELLORA_GPU_TESTS_ON_CPU=1`` runs the same logic on the CPU,
to check the tests themselves)."""

import pytest
import torch

from hellora_trl import apply_hellora, default_lora_config, find_moe_layers
from hellora_trl.expert_lora import grouped_mm_available, kernel_calls, reset_kernel_calls

from testing_utils import (
    FUSED_FAMILIES,
    IMPLEMENTATIONS,
    dense_reference,
    gpu_test_device,
    randomize_factors,
    requires_gpu,
    routing,
    tiny_model,
)

pytestmark = [pytest.mark.gpu, requires_gpu]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# relative to the reference's largest magnitude: float32 sums in another order; bf16 keeps ~3 significant digits
TOLERANCE = {"float32": 1e-4, "bfloat16": 3e-2}


def adapted_layer(family: str, device: str, hot=(1, 3), r: int = 8):
    """The first MoE layer of a tiny float32 model with random hot-expert factors (r=8: 16-byte bf16 rows)."""
    model = tiny_model(family, dtype=torch.float32)
    layers = find_moe_layers(model)
    peft_model = apply_hellora(model, {l.name: list(hot) for l in layers}, default_lora_config(r=r, lora_alpha=2 * r))
    randomize_factors(peft_model, std=0.1)
    peft_model.to(device)
    return peft_model.get_base_model().get_submodule(layers[0].name)


def hidden_size(layer) -> int:
    down = layer.get_base_layer().down_proj
    return down.shape[2] if layer.is_transposed else down.shape[1]


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fast_paths_match_dense_reference(family, implementation, dtype):
    device = gpu_test_device()
    layer = adapted_layer(family, device)
    ref = dense_reference(layer)  # float32 W + BA, built before the layer is cast
    layer.get_base_layer().config._experts_implementation = implementation
    ref.config._experts_implementation = "eager"
    layer.to(DTYPES[dtype])
    top_k = layer.get_base_layer().config.num_experts_per_tok
    generator = torch.Generator().manual_seed(1)
    hidden32 = torch.randn(37, hidden_size(layer), generator=generator).to(device)
    cases = {
        "random": routing(37, layer.num_experts, top_k, dtype=torch.float32),
        "all_to_one_hot": routing(37, layer.num_experts, top_k, dtype=torch.float32, force=[1]),
        "no_hot": routing(37, layer.num_experts, top_k, dtype=torch.float32, force=[0, 2][:top_k]),
    }
    for case, (index, weights) in cases.items():
        index, weights = index.to(device), weights.to(device)
        expected = ref(hidden32, index, weights)
        scale = expected.abs().max().item()
        for path in ("fused", "split"):
            layer.expert_path = path
            out = layer(hidden32.to(DTYPES[dtype]), index, weights.to(DTYPES[dtype]))
            assert out.dtype == DTYPES[dtype] and out.device.type == device
            err = (out.float() - expected).abs().max().item()
            assert err <= TOLERANCE[dtype] * max(scale, 1.0), f"{family}/{implementation}/{dtype}/{path}/{case}: {err}"


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("path", ["fused", "split"])
def test_grouped_kernel_runs_not_the_loop(path, dtype):
    """Where the kernel takes the operands (CUDA capability 8.0+, float32/bf16, 16-byte rows), every grouped GEMM of a
    forward + backward goes through it: the ops module's KERNEL_CALLS counts no loop."""
    device = gpu_test_device()
    layer = adapted_layer("olmoe", device)
    layer.get_base_layer().config._experts_implementation = "grouped_mm"
    layer.to(DTYPES[dtype])
    layer.expert_path = path
    probe_x = torch.randn(8, hidden_size(layer), device=device, dtype=DTYPES[dtype])
    if not grouped_mm_available(probe_x, layer.lora_down_A["default"].transpose(1, 2)):
        pytest.skip(f"this torch/device has no grouped kernel for {dtype} (CUDA capability < 8.0 or torch < 2.9 on CPU)")
    hidden = torch.randn(64, hidden_size(layer), device=device, dtype=DTYPES[dtype], requires_grad=True)
    index, weights = routing(64, layer.num_experts, 2, dtype=torch.float32, force=[1])
    reset_kernel_calls()
    out = layer(hidden, index.to(device), weights.to(device, DTYPES[dtype]))
    out.float().square().mean().backward()
    calls = kernel_calls()
    assert calls.get("grouped_mm/kernel", 0) >= 4 and calls.get("grouped_outer/kernel", 0) >= 3, calls
    assert calls.get("grouped_mm/loop", 0) == 0 and calls.get("grouped_outer/loop", 0) == 0, calls
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for n, p in layer.named_parameters() if "lora_" in n)
