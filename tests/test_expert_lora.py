"""The expert-LoRA layer against an independent dense reference, for every fused family and implementation."""

import copy
import re

import pytest
import torch

from hellora_trl import HotExpertLoraLayer, apply_hellora, default_lora_config, find_moe_layers

from conftest import FUSED_FAMILIES, random_batch, tiny_model

IMPLEMENTATIONS = ["eager", "grouped_mm", "batched_mm"]


def dense_reference(layer: HotExpertLoraLayer, adapter: str = "default") -> torch.nn.Module:
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
                    gate_up = torch.empty(2 * gate.shape[0], gate.shape[1], dtype=gate.dtype)
                    gate_up[0::2], gate_up[1::2] = gate, up
            down = delta("down", j)
            if transposed:
                gate_up, down = gate_up.T, down.T
            ref.gate_up_proj[e] += gate_up
            ref.down_proj[e] += down
    return ref


def randomize_factors(model, seed=0, std=0.3):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.copy_(torch.randn(p.shape, generator=generator, dtype=p.dtype) * std)


def routing(num_tokens, num_experts, top_k, seed=0, dtype=torch.float64, force=None):
    generator = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_tokens, num_experts, generator=generator, dtype=dtype)
    if force is not None:  # route every token through the given experts
        logits[:, force] += 100.0
    weights, index = torch.topk(torch.softmax(logits, -1), top_k, dim=-1)
    return index, weights / weights.sum(-1, keepdim=True)


def adapted_experts(family, hot=(1, 3), fuse=False, seed=0):
    model = tiny_model(family, dtype=torch.float64)
    layers = find_moe_layers(model)
    peft_model = apply_hellora(
        model, {l.name: list(hot) for l in layers}, default_lora_config(r=4, lora_alpha=8), fuse_gate_up=fuse
    )
    randomize_factors(peft_model, seed)
    layer = peft_model.get_base_model().get_submodule(layers[0].name)
    assert isinstance(layer, HotExpertLoraLayer)
    return peft_model, layer


@pytest.mark.parametrize("family", FUSED_FAMILIES)
@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_matches_dense_reference(family, implementation):
    # torch._grouped_mm rejects float64 ("Expected mat_a to be Float32, BFloat16 or Float16"): float32 there.
    dtype = torch.float32 if implementation == "grouped_mm" else torch.float64
    peft_model, layer = adapted_experts(family)
    peft_model.to(dtype)
    base = layer.get_base_layer()
    ref = dense_reference(layer)
    base.config._experts_implementation = ref.config._experts_implementation = implementation
    E, H = layer.num_experts, base.down_proj.shape[1] if not layer.is_transposed else base.down_proj.shape[2]
    top_k = peft_model.config.num_experts_per_tok
    hidden = torch.randn(23, H, dtype=dtype, generator=torch.Generator().manual_seed(1))
    cases = [
        routing(23, E, top_k, dtype=dtype),
        routing(23, E, top_k, dtype=dtype, force=[1]),  # every token through a hot expert
        routing(23, E, top_k, dtype=dtype, force=[0, 2][:top_k]),  # no token reaches a hot expert
    ]
    for index, weights in cases:
        out = layer(hidden, index, weights)
        expected = ref(hidden, index, weights)
        # float32 (grouped_mm) accumulates in another order than the reference: relative tolerance there
        tol = dict(rtol=0, atol=1e-5) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-4)
        torch.testing.assert_close(out, expected, **tol)
    # a layer whose hot experts get no rows at all: output equals the base module
    index, weights = cases[2]
    assert not torch.isin(index, torch.tensor(layer.hot_experts())).any()
    torch.testing.assert_close(layer(hidden, index, weights), base(hidden, index, weights), rtol=0, atol=1e-12)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_fused_gate_up_option_matches_reference(family):
    _, layer = adapted_experts(family, fuse=True)
    base = layer.get_base_layer()
    H = base.down_proj.shape[2] if layer.is_transposed else base.down_proj.shape[1]
    base.config._experts_implementation = "eager"
    index, weights = routing(17, layer.num_experts, 2)
    hidden = torch.randn(17, H, dtype=torch.float64)
    torch.testing.assert_close(layer(hidden, index, weights), dense_reference(layer)(hidden, index, weights), rtol=0, atol=1e-5)
    assert "lora_gate_up_A" in dict(layer.named_parameters(recurse=False)) or layer.lora_gate_up_A


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_fresh_adapter_keeps_logits_exactly(family):
    model = tiny_model(family)
    batch = random_batch(model)
    with torch.no_grad():
        before = model(**batch).logits
    hot = {l.name: [0, 2] for l in find_moe_layers(model)}
    peft_model = apply_hellora(model, hot, default_lora_config(r=4, lora_alpha=8))
    with torch.no_grad():
        after = peft_model(**batch).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", FUSED_FAMILIES)
def test_gradients_reach_only_hot_factors_and_cold_weights_stay_bit_identical(family):
    model = tiny_model(family)
    snapshot = {n: p.detach().clone() for n, p in model.named_parameters()}
    hot = {l.name: [1, 2] for l in find_moe_layers(model)}
    peft_model = apply_hellora(model, hot, default_lora_config(r=4, lora_alpha=8))
    batch = random_batch(model, batch=2, seq=16)
    optimizer = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(2):
        loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        for name, p in peft_model.named_parameters():
            if "lora_" not in name:
                assert p.grad is None, name
        optimizer.step()
        optimizer.zero_grad()
    # B factors start at zero: attention ("lora_B") and expert ("lora_up_B", ...) ones must have moved
    moved = [n for n, p in peft_model.named_parameters() if re.search(r"lora_(\w+_)?B\b", n) and p.abs().sum() > 0]
    assert any("experts.lora_" in n for n in moved) and any("self_attn" in n for n in moved)
    for name, p in peft_model.get_base_model().named_parameters():
        if "lora_" in name:
            continue
        original = name.replace(".base_layer", "")
        assert torch.equal(p, snapshot[original]), f"{original} changed"
    # the factor stacks hold exactly the hot experts
    for l in find_moe_layers(peft_model.get_base_model()):
        layer = peft_model.get_base_model().get_submodule(l.name)
        assert layer.hot_experts() == [1, 2]
        assert layer.lora_down_A["default"].shape[0] == 2


def test_hot_expert_without_rows_gets_zero_gradient():
    _, layer = adapted_experts("olmoe", hot=(1, 3))
    base = layer.get_base_layer()
    base.config._experts_implementation = "eager"
    hidden = torch.randn(9, base.down_proj.shape[1], dtype=torch.float64)
    index, weights = routing(9, layer.num_experts, 2, force=[1, 0])  # expert 3 is never used
    layer(hidden, index, weights).sum().backward()
    grad = layer.lora_down_B["default"].grad
    assert grad[0].abs().sum() > 0 and torch.equal(grad[1], torch.zeros_like(grad[1]))


def test_bf16_forward_backward_runs():
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    hot = {l.name: [0, 1] for l in find_moe_layers(model)}
    peft_model = apply_hellora(model, hot, default_lora_config(r=4, lora_alpha=8))
    batch = random_batch(model)
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    assert torch.isfinite(loss)
