"""The expert-LoRA layer against an independent dense reference, for every fused family and implementation."""

import re

import pytest
import torch

from hellora_trl import HotExpertLoraLayer, apply_hellora, default_lora_config, find_moe_layers

from testing_utils import (
    FUSED_FAMILIES,
    IMPLEMENTATIONS,
    dense_reference,
    random_batch,
    randomize_factors,
    routing,
    tiny_model,
)


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
    # (the fused path sums in its own order, so float32 agrees to rounding; the split path calls the base module)
    exact = dict(rtol=0, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(layer(hidden, index, weights), base(hidden, index, weights), **exact)


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


def test_bf16_forward_backward_matches_float32():
    import copy

    model = tiny_model("olmoe")
    hot = {l.name: [0, 1] for l in find_moe_layers(model)}
    reference = apply_hellora(model, hot, default_lora_config(r=4, lora_alpha=8))
    randomize_factors(reference)  # B != 0, so the adapters change the loss and every factor gets a gradient
    bf16 = copy.deepcopy(reference).to(torch.bfloat16)
    batch = random_batch(model)
    losses, grads = [], []
    for m in (reference, bf16):
        loss = m(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        losses.append(loss.item())
        grads.append({n: p.grad.float().flatten() for n, p in m.named_parameters() if p.requires_grad})
    assert all(p.dtype == torch.bfloat16 for p in bf16.parameters())
    assert losses[1] == pytest.approx(losses[0], rel=2e-2)
    assert grads[0].keys() == grads[1].keys() and any("lora_down_B" in n for n in grads[0])
    cosine = torch.nn.functional.cosine_similarity
    for name, ref in grads[0].items():  # per factor: bf16 may route a near-tie token to another expert
        got = grads[1][name]
        assert ref.norm() > 0 and cosine(got, ref, dim=0) > 0.9, name
    ref, got = torch.cat(list(grads[0].values())), torch.cat([grads[1][n] for n in grads[0]])
    assert cosine(got, ref, dim=0) > 0.98 and (got.norm() / ref.norm()).item() == pytest.approx(1.0, rel=0.05)


# ----------------------------------------------------------------------------------------- fast paths
FAST_PATHS = ["fused", "split"]


def _routing_cases(num_tokens, num_experts, top_k, hot, dtype):
    """Random routing, every token through one hot expert, no token on any hot expert, one hot expert idle."""
    cold = [e for e in range(num_experts) if e not in hot]
    return {
        "random": routing(num_tokens, num_experts, top_k, dtype=dtype),
        "all_to_one_hot": routing(num_tokens, num_experts, top_k, dtype=dtype, force=[hot[0]]),
        "no_hot": routing(num_tokens, num_experts, top_k, dtype=dtype, force=cold[:top_k]),
        "idle_hot": routing(num_tokens, num_experts, top_k, dtype=dtype, force=[hot[0]] + cold[: top_k - 1]),
    }


def _forward_and_grads(layer, hidden, index, weights):
    hidden = hidden.clone().requires_grad_(True)
    weights = weights.clone().requires_grad_(True)
    out = layer(hidden, index, weights)
    out.backward(torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(5)))
    factors = {n: p.grad.clone() for n, p in layer.named_parameters() if "lora_" in n}
    layer.zero_grad(set_to_none=True)
    return out.detach(), hidden.grad, weights.grad, factors


@pytest.mark.parametrize("family", FUSED_FAMILIES)
@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_paths_match_loop_and_dense_reference(family, path):
    """float64 (grouped GEMMs fall back to their per-group loop): outputs and every gradient vs the loop path."""
    _, layer = adapted_experts(family, hot=(1, 3))
    base = layer.get_base_layer()
    # transformers' grouped_mm has no float64 kernel: the wrapped module (loop/split cold part) runs eager here
    base.config._experts_implementation = "eager"
    ref = dense_reference(layer)
    H = base.down_proj.shape[2] if layer.is_transposed else base.down_proj.shape[1]
    top_k = layer.get_base_layer().config.num_experts_per_tok
    hidden = torch.randn(19, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    for case, (index, weights) in _routing_cases(19, layer.num_experts, top_k, [1, 3], torch.float64).items():
        layer.expert_path = "loop"
        expected = _forward_and_grads(layer, hidden, index, weights)
        layer.expert_path = path
        got = _forward_and_grads(layer, hidden, index, weights)
        torch.testing.assert_close(got[0], ref(hidden, index, weights), rtol=0, atol=1e-5, msg=case)
        for g, e in zip(got[:3], expected[:3]):
            torch.testing.assert_close(g, e, rtol=0, atol=1e-10, msg=case)
        assert got[3].keys() == expected[3].keys()
        for name in got[3]:
            torch.testing.assert_close(got[3][name], expected[3][name], rtol=0, atol=1e-10, msg=f"{case}: {name}")
        if case == "no_hot":  # factors stay in the graph with a zero gradient
            assert all(not g.any() for g in got[3].values())


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_fused_path_with_every_expert_hot(family):
    """k = E: no hot-row gather at all (the LoRA warm-up's configuration)."""
    model = tiny_model(family, dtype=torch.float64)
    E = find_moe_layers(model)[0].num_experts
    _, layer = adapted_experts(family, hot=tuple(range(E)))
    base = layer.get_base_layer()
    base.config._experts_implementation = "eager"  # float64: the loop reference's wrapped module runs eager
    H = base.down_proj.shape[2] if layer.is_transposed else base.down_proj.shape[1]
    index, weights = routing(15, E, 2)
    hidden = torch.randn(15, H, dtype=torch.float64)
    layer.expert_path = "loop"
    expected = _forward_and_grads(layer, hidden, index, weights)
    layer.expert_path = "fused"
    got = _forward_and_grads(layer, hidden, index, weights)
    torch.testing.assert_close(got[0], dense_reference(layer)(hidden, index, weights), rtol=0, atol=1e-5)
    for g, e in zip(got[:3], expected[:3]):
        torch.testing.assert_close(g, e, rtol=0, atol=1e-10)
    for name in got[3]:
        torch.testing.assert_close(got[3][name], expected[3][name], rtol=0, atol=1e-10)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_fast_paths_with_grouped_kernel_float32(path):
    """float32 runs torch's grouped GEMM kernel (where this torch has a CPU one): same values and grads as loop."""
    _, layer = adapted_experts("olmoe", hot=(1, 3))
    layer.to(torch.float32)
    layer.get_base_layer().config._experts_implementation = "eager"  # the loop reference's cold part
    H = layer.get_base_layer().down_proj.shape[1]
    hidden = torch.randn(31, H, generator=torch.Generator().manual_seed(3))
    for case, (index, weights) in _routing_cases(31, layer.num_experts, 2, [1, 3], torch.float32).items():
        layer.expert_path = "loop"
        expected = _forward_and_grads(layer, hidden, index, weights)
        layer.expert_path = path
        got = _forward_and_grads(layer, hidden, index, weights)
        # float32 summation orders differ between paths: compare relative to each tensor's scale
        for what, g, e in [("out/hidden/weights", g, e) for g, e in zip(got[:3], expected[:3])] + [
            (name, got[3][name], expected[3][name]) for name in got[3]
        ]:
            err = (g - e).abs().max().item()
            assert err <= 1e-5 * max(e.abs().max().item(), 1.0), f"{case}: {what} differs by {err}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_mm_matches_loop_with_empty_groups_and_expanded_grads(dtype):
    from hellora_trl.expert_lora import grouped_mm, grouped_mm_available, grouped_mm_loop

    generator = torch.Generator().manual_seed(0)
    offsets = torch.tensor([3, 0, 5, 0, 0, 4]).cumsum(0, dtype=torch.int32)
    x = torch.randn(12, 16, generator=generator).to(dtype).requires_grad_(True)
    stack = torch.randn(6, 8, 16, generator=generator).to(dtype).requires_grad_(True)  # (G, out, in) like experts
    w = stack.transpose(1, 2)  # the (G, in, out) view the layer passes
    assert grouped_mm_available(x, w) == hasattr(torch, "_grouped_mm")
    out = grouped_mm(x, w, offsets)
    out.sum().backward()  # an expanded (stride-0) gradient: the kernel's backward needs a contiguous one
    gx, gw = x.grad.clone(), stack.grad.clone()
    x.grad = stack.grad = None
    ref = grouped_mm_loop(x, w, offsets)
    ref.sum().backward()
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=5e-2)
    torch.testing.assert_close(out, ref, **tol)
    torch.testing.assert_close(gx, x.grad, **tol)
    torch.testing.assert_close(gw, stack.grad, **tol)
    assert not gw[1].any() and not gw[3].any()  # empty groups get a zero gradient
    with pytest.raises(ValueError, match="offsets cover"):
        grouped_mm_loop(x, w, torch.tensor([3, 3], dtype=torch.int32))


def test_grouped_mm_falls_back_where_the_kernel_refuses():
    """float64, and strides that are not 16-byte multiples (a bf16 rank-4 factor), take the per-group loop."""
    from hellora_trl.expert_lora import grouped_mm, grouped_mm_available

    offsets = torch.tensor([2, 5], dtype=torch.int32)
    assert not grouped_mm_available(torch.randn(5, 16, dtype=torch.float64), torch.randn(2, 16, 8, dtype=torch.float64))
    x, a = torch.randn(5, 16).bfloat16(), torch.randn(2, 4, 16).bfloat16()  # (k, r=4, in)
    assert not grouped_mm_available(x, a.transpose(1, 2))
    out = grouped_mm(x, a.transpose(1, 2), offsets)
    torch.testing.assert_close(out[:2], x[:2] @ a[0].T)
    torch.testing.assert_close(out[2:], x[2:] @ a[1].T)


def test_expert_path_is_validated():
    _, layer = adapted_experts("olmoe")
    with pytest.raises(ValueError, match="expert_path"):
        layer.expert_path = "fast"


def test_bf16_fused_path_close_to_float32():
    _, layer = adapted_experts("olmoe", hot=(1, 3))
    layer.to(torch.float32)
    layer.get_base_layer().config._experts_implementation = "grouped_mm"
    H = layer.get_base_layer().down_proj.shape[1]
    hidden = torch.randn(40, H, generator=torch.Generator().manual_seed(4))
    index, weights = routing(40, layer.num_experts, 2, dtype=torch.float32)
    expected = layer(hidden, index, weights)
    layer.to(torch.bfloat16)
    out = layer(hidden.bfloat16(), index, weights.bfloat16())
    assert out.dtype == torch.bfloat16
    layer.expert_path = "loop"
    loop = layer(hidden.bfloat16(), index, weights.bfloat16())
    scale = expected.abs().max()
    # bf16 keeps ~3 significant digits: the fused path is as close to float32 as the per-expert loop is
    assert (out.float() - expected).abs().max() / scale < 2e-2
    assert (out.float() - expected).abs().max() <= 2 * (loop.float() - expected).abs().max() + 1e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_grouped_outer_matches_loop_with_empty_groups(dtype):
    from hellora_trl.expert_lora import grouped_outer

    generator = torch.Generator().manual_seed(1)
    a = torch.randn(37, 32, generator=generator).to(dtype)  # odd row count: groups of any size
    b = torch.randn(37, 16, generator=generator).to(dtype)
    offsets = torch.tensor([10, 10, 30, 37], dtype=torch.int32)
    out = grouped_outer(a, b, offsets)
    bounds = [(0, 10), (10, 10), (10, 30), (30, 37)]
    expected = torch.stack([a[s:e].float().T @ b[s:e].float() for s, e in bounds])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=0.2)
    torch.testing.assert_close(out.float(), expected, **tol)
    assert not out[1].any()
    # a layout the kernel refuses (rank 4 in bf16: 8-byte rows) goes through the loop
    small = grouped_outer(a[:, :4].contiguous(), b, offsets)
    torch.testing.assert_close(small.float(), expected[:, :4], **tol)


def test_lora_dropout_path_trains_and_is_exact_in_eval():
    """With dropout the layer uses plain autograd (one mask per projection); in eval mode it is the identity."""
    model = tiny_model("olmoe", dtype=torch.float64)
    layers = find_moe_layers(model)
    peft_model = apply_hellora(model, {l.name: [1, 3] for l in layers}, default_lora_config(r=4, lora_alpha=8, lora_dropout=0.5))
    randomize_factors(peft_model)
    layer = peft_model.get_base_model().get_submodule(layers[0].name)
    layer.get_base_layer().config._experts_implementation = "eager"
    hidden = torch.randn(21, layer.get_base_layer().down_proj.shape[1], dtype=torch.float64)
    index, weights = routing(21, layer.num_experts, 2, force=[1])
    layer.train()
    layer.expert_path = "fused"
    _, _, _, grads = _forward_and_grads(layer, hidden, index, weights)
    assert all(g.abs().sum() > 0 for g in grads.values())
    layer.eval()
    expected = dense_reference(layer)(hidden, index, weights)
    for path in ("fused", "split"):
        layer.expert_path = path
        torch.testing.assert_close(layer(hidden, index, weights), expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", FAST_PATHS)
def test_float32_factors_on_bf16_base(path):
    """PEFT's autocast keeps adapters in float32 on a bf16 model: gradients come back in each tensor's dtype."""
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    layers = find_moe_layers(model)
    peft_model = apply_hellora(model, {l.name: [1, 3] for l in layers}, default_lora_config(r=8, lora_alpha=16))
    randomize_factors(peft_model, std=0.05)
    layer = peft_model.get_base_model().get_submodule(layers[0].name)
    assert layer.lora_down_A["default"].dtype == torch.float32
    layer.expert_path = path
    layer.get_base_layer().config._experts_implementation = "grouped_mm"
    hidden = torch.randn(33, layer.get_base_layer().down_proj.shape[1]).bfloat16()
    index, weights = routing(33, layer.num_experts, 2, dtype=torch.bfloat16, force=[1])
    out, grad_hidden, grad_weights, grads = _forward_and_grads(layer, hidden, index, weights)
    assert out.dtype == grad_hidden.dtype == grad_weights.dtype == torch.bfloat16
    assert all(g.dtype == torch.float32 and torch.isfinite(g).all() and g.abs().sum() > 0 for g in grads.values())
    layer.expert_path = "loop"
    reference = layer(hidden, index, weights)
    assert (out.float() - reference.float()).abs().max() <= 2e-2 * reference.float().abs().max()


def test_every_path_trains_under_bf16_autocast():
    """Trainer-style mixed precision (float32 weights, bf16 autocast): same loss on every path, finite gradients."""
    losses = {}
    for path in ("fused", "split", "loop"):
        model = tiny_model("olmoe")
        layers = find_moe_layers(model)
        peft_model = apply_hellora(model, {l.name: [1, 3] for l in layers}, default_lora_config(r=8, lora_alpha=16))
        randomize_factors(peft_model, std=0.05)
        for l in layers:
            peft_model.get_base_model().get_submodule(l.name).expert_path = path
        batch = random_batch(model)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = peft_model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        grads = [p.grad for n, p in peft_model.named_parameters() if "experts.lora_" in n]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)
        losses[path] = loss.item()
    assert abs(losses["fused"] - losses["loop"]) < 1e-2 * abs(losses["loop"])
    assert abs(losses["split"] - losses["loop"]) < 1e-2 * abs(losses["loop"])


# ------------------------------------------------------------------------- kernel counter, autocast compute dtype
def test_kernel_counter_records_kernel_or_loop():
    """KERNEL_CALLS says which way each grouped GEMM went: the kernel where torch has one for the operands (float32
    on this torch's CPU kernel), the per-group loop for float64. The GPU suite asserts the same on CUDA."""
    from hellora_trl.expert_lora import grouped_mm, grouped_mm_available, grouped_outer, kernel_calls, reset_kernel_calls

    offsets = torch.tensor([3, 3, 8], dtype=torch.int32)
    for dtype in (torch.float32, torch.float64):
        x, w = torch.randn(8, 16, dtype=dtype), torch.randn(3, 16, 16, dtype=dtype)
        reset_kernel_calls()
        grouped_mm(x, w, offsets)
        grouped_outer(x, x, offsets)
        way = "kernel" if grouped_mm_available(x, w) else "loop"
        assert kernel_calls() == {f"grouped_mm/{way}": 1, f"grouped_outer/{way}": 1}, dtype
        if dtype == torch.float64:
            assert way == "loop"
    if hasattr(torch, "_grouped_mm") and tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 9):
        # a whole layer forward + backward in float32 goes through the kernel only
        _, layer = adapted_experts("olmoe", hot=(1, 3))
        layer.to(torch.float32).get_base_layer().config._experts_implementation = "grouped_mm"
        hidden = torch.randn(24, layer.get_base_layer().down_proj.shape[1])
        index, weights = routing(24, layer.num_experts, 2, dtype=torch.float32, force=[1])
        reset_kernel_calls()
        _forward_and_grads(layer, hidden, index, weights)
        calls = kernel_calls()
        assert calls.get("grouped_mm/kernel", 0) > 0 and calls.get("grouped_outer/kernel", 0) > 0
        assert not calls.get("grouped_mm/loop") and not calls.get("grouped_outer/loop"), calls


@pytest.mark.parametrize("path", FAST_PATHS)
def test_autocast_runs_lora_gemms_in_bf16_with_float32_master_factors(path):
    """Under bf16 autocast the low-rank GEMMs run in bf16 on casts of the float32 factors (as PEFT's LoRA does under
    autocast): same output and gradients as bf16 factors without autocast, gradients delivered in float32."""
    from hellora_trl.expert_lora import lora_compute_dtype

    assert lora_compute_dtype(torch.float32, "cpu") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_compute_dtype(torch.float32, "cpu") == torch.bfloat16
        assert lora_compute_dtype(torch.float64, "cpu") == torch.float64  # only float32 masters are cast
    model = tiny_model("olmoe", dtype=torch.bfloat16)
    layers = find_moe_layers(model)
    peft_model = apply_hellora(model, {l.name: [1, 3] for l in layers}, default_lora_config(r=8, lora_alpha=16))
    randomize_factors(peft_model, std=0.05)
    layer = peft_model.get_base_model().get_submodule(layers[0].name)
    layer.expert_path = path
    layer.get_base_layer().config._experts_implementation = "grouped_mm"
    hidden = torch.randn(33, layer.get_base_layer().down_proj.shape[1]).bfloat16()
    index, weights = routing(33, layer.num_experts, 2, dtype=torch.bfloat16, force=[1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grad_hidden, grad_weights, grads = _forward_and_grads(layer, hidden, index, weights)
    assert all(g.dtype == torch.float32 for g in grads.values())
    float32_out = _forward_and_grads(layer, hidden, index, weights)[0]  # no autocast: float32 low-rank path
    layer.to(torch.bfloat16)  # the same factors, rounded to bf16: what autocast computes with
    expected = _forward_and_grads(layer, hidden, index, weights)
    torch.testing.assert_close(out, expected[0], rtol=0, atol=0)
    torch.testing.assert_close(grad_hidden, expected[1], rtol=0, atol=0)
    torch.testing.assert_close(grad_weights, expected[2], rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(g, expected[3][name].float(), rtol=0, atol=0, msg=name)
    assert (out.float() - float32_out.float()).abs().max() <= 2e-2 * float32_out.float().abs().max()


def test_hot_rows_read_off_expert_boundaries_match_a_mask_over_all_rows():
    """Issue 22: the fused path's hot rows come from the k hot experts' boundaries (O(k + hot rows)), not from an
    (E,) slot lookup and a mask over every row; same positions and per-slot offsets as the mask, empty hot
    experts and hot experts at both ends of the range included."""
    _, layer = adapted_experts("olmoe", hot=(1, 3))
    layer.num_experts = 256  # _group_rows only reads the expert count
    generator = torch.Generator().manual_seed(0)
    for hot_list in ([0, 5, 7, 255], [3], [2, 9, 100, 101, 102, 200, 254, 255], list(range(0, 256, 2))):
        hot = torch.tensor(hot_list)
        expert = torch.sort(torch.randint(0, 256, (600,), generator=generator)).values
        expert = expert[expert != 9]  # a hot expert without rows
        groups = layer._group_rows(expert, hot, every_hot=False)
        mask = torch.isin(expert, hot)
        assert torch.equal(groups.hot_rows, mask.nonzero().squeeze(1)) and groups.num_hot_rows == int(mask.sum())
        counts = torch.bincount(expert, minlength=256)
        assert torch.equal(groups.offsets, counts.cumsum(0).int())
        assert torch.equal(groups.hot_offsets, counts[hot].cumsum(0).int())
    none_routed = layer._group_rows(torch.tensor([4, 4, 6]), torch.tensor([1, 3]), every_hot=False)
    assert none_routed.num_hot_rows == 0 and none_routed.hot_rows.numel() == 0


def test_split_path_slot_lookup_is_cached_and_follows_hot_list_changes():
    """The split path's (E+1,) expert -> slot lookup is built once, not per step, and rebuilt when the hot list
    is modified in place (e.g. a loaded adapter's hot map)."""
    _, layer = adapted_experts("olmoe", hot=(1, 3))
    first = layer._slot_lookup("default", torch.device("cpu"))
    assert layer._slot_lookup("default", torch.device("cpu")) is first
    assert first.tolist()[:5] == [-1, 0, -1, 1, -1] and first[-1] == -1
    layer.lora_hot_experts["default"].copy_(torch.tensor([2, 5]))
    again = layer._slot_lookup("default", torch.device("cpu"))
    assert again is not first and again.tolist()[:6] == [-1, -1, 0, -1, -1, 1]


@pytest.mark.parametrize("path", FAST_PATHS)
def test_gate_up_deltas_are_freed_before_the_down_projection(path, monkeypatch):
    """Issue 22 (peak memory): the hot rows' gate and up deltas and their concatenation, (hot rows, 2 x
    intermediate) floats in all, are dead once added to the gate_up rows; held by ``_expert_rows`` they stayed alive
    through the down projection, where the layer's memory peaks (E=16 sweep shape: 5.8 MB of a 43.6 MB transient
    peak)."""
    import weakref

    _, layer = adapted_experts("olmoe", hot=(1, 3))
    layer.get_base_layer().config._experts_implementation = "eager"  # float64: no grouped kernel for the cold part
    layer.expert_path = path
    refs, alive_at_down = [], []
    interleave, base_rows = layer._interleave_gate_up, layer._base_rows

    def recording_interleave(gate, up):
        delta = interleave(gate, up)
        refs.extend(weakref.ref(t) for t in (gate, up, delta))
        return delta

    def checking_base_rows(base, x, name, groups):
        if name == "down_proj":
            alive_at_down.append([r() is not None for r in refs])
        return base_rows(base, x, name, groups)

    monkeypatch.setattr(layer, "_interleave_gate_up", recording_interleave)
    monkeypatch.setattr(layer, "_base_rows", checking_base_rows)
    H = layer.get_base_layer().down_proj.shape[1]
    top_k = layer.get_base_layer().config.num_experts_per_tok
    index, weights = routing(19, layer.num_experts, top_k, dtype=torch.float64, force=[1])
    hidden = torch.randn(19, H, dtype=torch.float64, generator=torch.Generator().manual_seed(2), requires_grad=True)
    layer(hidden, index, weights.requires_grad_(True)).sum().backward()
    assert refs and alive_at_down == [[False, False, False]]


def test_lora_rows_backward_frees_the_gathered_rows_before_the_dense_input_gradient(monkeypatch):
    """Issue 22 (peak memory): LoraRows' backward re-gathers the hot rows ``source[rows]``; they must be dead before
    the dense ``zeros_like(source)`` input gradient is allocated, the moment a HELLoRA training step's memory peaks
    (E=16 sweep shape: 1.3 MB of the peak)."""
    import weakref

    from hellora_trl.expert_lora import ops

    g = torch.Generator().manual_seed(0)
    source = torch.randn(10, 8, dtype=torch.float64, generator=g, requires_grad=True)
    rows, offsets = torch.tensor([1, 4, 5, 9]), torch.tensor([2, 4], dtype=torch.int32)
    a = torch.randn(2, 3, 8, dtype=torch.float64, generator=g, requires_grad=True)
    b = torch.randn(2, 6, 3, dtype=torch.float64, generator=g, requires_grad=True)
    (out,) = ops.LoraRows.apply(source, rows, offsets, 2.0, None, a, b)
    gathered, alive = [], []
    select, zeros_like = torch.Tensor.index_select, torch.zeros_like

    def recording_select(self, *args, **kwargs):
        t = select(self, *args, **kwargs)
        gathered.append(weakref.ref(t))
        return t

    def checking_zeros_like(t, *args, **kwargs):
        alive.append([r() is not None for r in gathered])
        return zeros_like(t, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "index_select", recording_select)
    monkeypatch.setattr(torch, "zeros_like", checking_zeros_like)
    out.sum().backward()
    monkeypatch.undo()
    assert gathered and alive == [[False] * len(gathered)]
    assert source.grad is not None and torch.count_nonzero(source.grad[[0, 2, 3, 6, 7, 8]]) == 0


@pytest.mark.parametrize("fused", [True, False])
def test_no_grad_forward_sees_factors_a_fused_optimizer_updated(fused):
    """Issue 21 (found by the GRPO ZeRO-3/DDP reload test): a no-grad forward while B == 0 (GRPO's first
    generation, an evaluation before training) cached "B is zero" keyed on the factors' version counters, which
    ``torch.optim.AdamW(fused=True)`` (the Trainer's default optimizer) does not bump; every later no-grad forward
    then skipped the trained expert adapter: generation and evaluation ran the base experts."""
    model = tiny_model("olmoe")
    peft_model = apply_hellora(model, {l.name: [0, 1] for l in find_moe_layers(model)}, default_lora_config(r=4, lora_alpha=8))
    batch = random_batch(model)
    with torch.no_grad():
        fresh = peft_model(**batch).logits  # B == 0: the adapter is the identity here
    params = [p for n, p in peft_model.named_parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-2, fused=fused, foreach=None if fused else False)
    peft_model(**batch).logits.float().pow(2).mean().backward()
    optimizer.step()
    layer = peft_model.get_base_model().get_submodule(find_moe_layers(model)[0].name)
    assert layer.lora_down_B["default"].abs().sum() > 0  # the step moved the expert factors
    with torch.no_grad():
        after = peft_model(**batch).logits
        with torch.enable_grad():
            expected = peft_model(**batch).logits.detach()  # the grad path always runs the adapter
    torch.testing.assert_close(after, expected, rtol=1e-5, atol=1e-6)
    assert not torch.allclose(after, fresh)
