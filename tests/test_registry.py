"""Model families: registered ones train end to end, unsupported MoE layouts are refused before any work (#13)."""

from __future__ import annotations

import pytest
import torch
import transformers

from hellora_trl import HELLoRAConfig, HELLoRATrainer, default_lora_config, find_moe_layers, profile_experts
from hellora_trl.recipes.data import synthetic_gsm8k
from hellora_trl.recipes.offline import build_tokenizer
from hellora_trl.registry import family_for, supported_model_types

from testing_utils import random_batch, tiny_model


def tiny_llama4():
    config = transformers.Llama4TextConfig(
        vocab_size=512, hidden_size=64, intermediate_size=64, intermediate_size_mlp=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4, num_experts_per_tok=1,
        moe_layers=[0, 1], interleave_moe_layer_step=1, max_position_embeddings=512,
    )
    return transformers.AutoModelForCausalLM.from_config(config)


def test_llama4_is_refused_up_front_with_the_supported_list(tmp_path):
    """Review 1.12-1.14: Llama4 profiled to all zeros with rc 0, then crashed in training."""
    model = tiny_llama4()
    with pytest.raises(ValueError, match=r"not supported.*top_k_index.*Supported model types: \[.*'olmoe'"):
        family_for(model)
    with pytest.raises(ValueError, match="not supported"):
        profile_experts(model, [random_batch(model)], progress=False)
    with pytest.raises(ValueError, match="not supported"):
        HELLoRATrainer(
            model=model,
            args=HELLoRAConfig(output_dir=str(tmp_path), report_to=[], use_cpu=True, hellora_plots=False),
            train_dataset=synthetic_gsm8k(4, seed=0),
            processing_class=build_tokenizer(),
        )


@pytest.mark.parametrize("family", ["granitemoe", "phimoe"])
def test_granite_and_phimoe_are_registered_and_train(tmp_path, family):
    """Review 1.15/1.16: both profiled through the generic fallback, then crashed in TRL's fused loss
    (`'GraniteMoeConfig' object has no attribute 'num_experts'`) with the router aux loss on (their default)."""
    model = tiny_model(family)
    assert family_for(model).name == family and family in supported_model_types()
    assert [layer.num_experts for layer in find_moe_layers(model)] == [8, 8]
    args = HELLoRAConfig(
        output_dir=str(tmp_path / "run"), max_steps=2, per_device_train_batch_size=4, report_to=[], use_cpu=True,
        max_length=64, save_strategy="no", disable_tqdm=True, hellora_k=2, hellora_plots=False,
        hellora_profile_mode="forward", hellora_warmup_fraction=0.5,
    )
    trainer = HELLoRATrainer(
        model=model, args=args, train_dataset=synthetic_gsm8k(16, seed=0), processing_class=build_tokenizer(),
        peft_config=default_lora_config(r=4, lora_alpha=8),
    )
    assert trainer.aux_loss_enabled  # the case that crashed
    output = trainer.train()
    assert torch.isfinite(torch.tensor(output.training_loss))
    profile = trainer.hellora_profile
    assert profile.family == family and profile.counts.sum() == 2 * profile.tokens_seen * 2  # 2 layers x top-2
    assert all(len(ids) == 2 for ids in trainer.hot_experts.values())
