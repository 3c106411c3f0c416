"""Attach / save / load / merge like any PEFT adapter, and clear errors for bad input."""

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

from hellora_trl import (
    apply_hellora,
    default_lora_config,
    find_moe_layers,
    hot_map_from_model,
    load_hellora,
    profile_experts,
    select_hot_experts,
)

from testing_utils import random_batch, tiny_model
from modulelist_model import LegacyMoEConfig, LegacyMoEForCausalLM
from testing_utils import randomize_factors


def adapted(family="olmoe", hot=(0, 3), **kwargs):
    model = tiny_model(family)
    hot_map = {l.name: list(hot) for l in find_moe_layers(model)}
    peft_model = apply_hellora(model, hot_map, default_lora_config(r=4, lora_alpha=8), **kwargs)
    randomize_factors(peft_model, std=0.1)
    return peft_model.eval(), hot_map


@pytest.mark.parametrize("family", ["olmoe", "qwen2_moe", "gpt_oss"])
def test_save_load_roundtrip_is_exact(tmp_path, family):
    peft_model, hot_map = adapted(family)
    batch = random_batch(peft_model)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path / "adapter")
    loaded = load_hellora(tiny_model(family), tmp_path / "adapter")
    assert hot_map_from_model(loaded) == hot_map
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    assert not any(p.requires_grad for p in loaded.parameters())
    trainable = load_hellora(tiny_model(family), tmp_path / "adapter", is_trainable=True)
    assert any(p.requires_grad for p in trainable.parameters())


def test_adapter_file_holds_hot_experts_only(tmp_path):
    from safetensors.torch import load_file

    peft_model, hot_map = adapted(hot=(2, 5))
    peft_model.save_pretrained(tmp_path)
    weights = load_file(tmp_path / "adapter_model.safetensors")
    stacks = {k: v for k, v in weights.items() if ".experts.lora_" in k and "hot_experts" not in k}
    assert stacks and all(v.shape[0] == 2 for v in stacks.values())
    assert not any("base_layer" in k for k in weights)


@pytest.mark.parametrize("family", ["olmoe", "gpt_oss"])
def test_merge_and_unload_reloads_with_vanilla_transformers(tmp_path, family):
    peft_model, _ = adapted(family)
    batch = random_batch(peft_model)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    merged = peft_model.merge_and_unload()
    assert not any("lora_" in n for n, _ in merged.named_parameters())
    merged.save_pretrained(tmp_path / "merged")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        torch.testing.assert_close(reloaded(**batch).logits, expected, rtol=1e-4, atol=1e-4)


def test_disable_adapter_and_merge_unmerge():
    peft_model, _ = adapted()
    batch = random_batch(peft_model)
    base = tiny_model("olmoe").eval()
    with torch.no_grad():
        adapted_logits = peft_model(**batch).logits
        with peft_model.disable_adapter():
            torch.testing.assert_close(peft_model(**batch).logits, base(**batch).logits)
        peft_model.merge_adapter()
        torch.testing.assert_close(peft_model(**batch).logits, adapted_logits, rtol=1e-5, atol=1e-5)
        peft_model.unmerge_adapter()
        torch.testing.assert_close(peft_model(**batch).logits, adapted_logits, rtol=1e-5, atol=1e-5)
    assert not torch.equal(adapted_logits, base(**batch).logits)


def assert_exact_roundtrip(peft_model, fresh_model, batch, hot, tmp_path):
    """Random factors survive save_pretrained + load_hellora bit for bit, hot map included (seed-0 base)."""
    randomize_factors(peft_model, std=0.1)
    with torch.no_grad():
        expected = peft_model(**batch).logits
    peft_model.save_pretrained(tmp_path)
    torch.manual_seed(0)
    loaded = load_hellora(fresh_model(), tmp_path)
    assert hot_map_from_model(loaded) == hot
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)


def test_modulelist_layout_uses_plain_peft_targets(tmp_path):
    torch.manual_seed(0)
    model = LegacyMoEForCausalLM(LegacyMoEConfig())
    batch = random_batch(model)
    profile = profile_experts(model, [batch], progress=False)
    assert profile.counts.sum() == batch["input_ids"].numel() * 2 * 2  # tokens x top-2 x 2 layers
    hot = select_hot_experts(profile, k=2)
    peft_model = apply_hellora(model, hot, default_lora_config(r=4, lora_alpha=8))
    wrapped = {n for n, m in peft_model.get_base_model().named_modules() if hasattr(m, "lora_A")}
    for name, ids in hot.items():
        for e in range(6):
            present = any(t.startswith(f"{name}.{e}.") for t in wrapped)
            assert present == (e in ids), (name, e)
    assert any(t.endswith("block_sparse_moe.gate") for t in wrapped)
    assert_exact_roundtrip(peft_model, lambda: LegacyMoEForCausalLM(LegacyMoEConfig()), batch, hot, tmp_path)


def test_components_select_targets():
    model = tiny_model("olmoe")
    hot = {l.name: [0] for l in find_moe_layers(model)}
    pure = apply_hellora(model, hot, default_lora_config(r=2), components="experts")
    names = [n for n, p in pure.named_parameters() if p.requires_grad]
    assert names and all(".experts.lora_" in n for n in names)
    with pytest.raises(ValueError, match="components"):
        apply_hellora(tiny_model("olmoe"), hot, components="attention")


def test_bad_input_errors(tmp_path):
    model = tiny_model("olmoe")
    names = [l.name for l in find_moe_layers(model)]
    with pytest.raises(ValueError, match="does not match the model's MoE layers"):
        apply_hellora(model, {"model.layers.0.mlp.experts": [0]})
    with pytest.raises(ValueError, match=r"distinct ids in \[0, 8\)"):
        apply_hellora(model, {n: [0, 99] for n in names})
    with pytest.raises(ValueError, match="target_parameters"):
        apply_hellora(model, {n: [0] for n in names}, LoraConfig(target_parameters=["mlp.experts.gate_up_proj"]))
    wrapped = get_peft_model(tiny_model("olmoe"), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(ValueError, match="not a PeftModel"):
        apply_hellora(wrapped, {n: [0] for n in names})
    with pytest.raises(FileNotFoundError, match="adapter_config.json"):
        load_hellora(tiny_model("olmoe"), tmp_path)
    plain = get_peft_model(tiny_model("olmoe"), LoraConfig(target_modules=["q_proj"]))
    plain.save_pretrained(tmp_path / "plain")
    with pytest.raises(ValueError, match="no hot-expert map"):
        load_hellora(tiny_model("olmoe"), tmp_path / "plain")
    with pytest.raises(ValueError, match="No MoE layers"):
        from transformers import LlamaConfig, LlamaForCausalLM

        apply_hellora(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=16,
                                                   num_hidden_layers=1, num_attention_heads=2)), {})


def test_deepseek_moe_remote_code_layout(tmp_path):
    """DeepSeek-MoE 16B remote code: custom MoEGate returning top-k ids, per-expert MLPs, shared experts."""
    from modulelist_model import DeepseekStyleConfig, DeepseekStyleForCausalLM

    from hellora_trl.registry import family_for

    torch.manual_seed(0)
    model = DeepseekStyleForCausalLM(DeepseekStyleConfig())
    assert family_for(model).name == "deepseek_moe"
    assert family_for(model).default_k(model.config) == 4  # 2 per token, doubled for shared experts
    batch = random_batch(model)
    profile = profile_experts(model, [batch], progress=False)
    assert profile.counts.sum() == batch["input_ids"].numel() * 2 * 2
    hot = select_hot_experts(profile)
    assert all(len(ids) == 4 for ids in hot.values())
    peft_model = apply_hellora(model, hot, default_lora_config(r=4, lora_alpha=8))
    trainable = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert any(".mlp.gate.lora_A" in n for n in trainable)  # the custom router got LoRA
    assert any(".shared_experts.gate_proj.lora_A" in n for n in trainable)
    for name, ids in hot.items():
        for e in range(8):
            adapted = any(n.startswith(f"base_model.model.{name}.{e}.") for n in trainable)
            assert adapted == (e in ids), (name, e)
    assert_exact_roundtrip(peft_model, lambda: DeepseekStyleForCausalLM(DeepseekStyleConfig()), batch, hot, tmp_path)


@pytest.mark.parametrize(
    "option, message",
    [({"use_dora": True}, "use_dora"), ({"lora_bias": True}, "lora_bias"),
     ({"init_lora_weights": "gaussian"}, "init_lora_weights")],
)
def test_options_our_layers_cannot_honour_are_refused_before_any_peft_work(option, message):
    """As PEFT's ParamWrapper refuses them: DoRA, LoRA bias and named inits would silently train plain LoRA."""
    from hellora_trl.adapter import check_layer_options

    model = tiny_model()
    hot = {layer.name: [0] for layer in find_moe_layers(model)}
    with pytest.raises(ValueError, match=message):
        apply_hellora(model, hot, default_lora_config(r=2, lora_alpha=4, **option))
    assert not any("lora_" in n for n, _ in model.named_parameters())  # nothing was injected
    check_layer_options(default_lora_config(r=2, lora_alpha=4, init_lora_weights=False))  # plain options pass

