"""hellora_trl: Hot-Experts Layer-Level LoRA (HELLoRA) for Mixture-of-Experts models on TRL and PEFT."""

from .config import HELLoRAConfig
from .accounting import adapter_flops_per_token, trainable_parameter_report
from .adapter import apply_hellora, default_lora_config, hot_map_from_model, load_hellora
from .expert_lora import HotExpertLoraLayer, RouterLoraLayer
from .profiling import ExpertProfile, RoutingCounter, profile_experts
from .registry import FAMILIES, MoEFamily, find_moe_layers, register_family
from .selection import select_hot_experts
from .trainer import HELLoRATrainer
from .variants import (
    VARIANTS,
    all_experts_hot,
    apply_masks,
    apply_peft_all_experts,
    apply_peft_dora,
    copy_lora_A,
    enforce_masks,
    freeze_lora_A,
    load_masks,
    lori_s_from_lori_d,
    lori_s_masks,
    save_masks,
    variant_of,
)

__version__ = "0.1.0"

__all__ = [
    "ExpertProfile",
    "FAMILIES",
    "HELLoRAConfig",
    "HELLoRATrainer",
    "HotExpertLoraLayer",
    "MoEFamily",
    "RouterLoraLayer",
    "RoutingCounter",
    "VARIANTS",
    "all_experts_hot",
    "apply_masks",
    "apply_peft_all_experts",
    "apply_peft_dora",
    "copy_lora_A",
    "enforce_masks",
    "freeze_lora_A",
    "load_masks",
    "lori_s_from_lori_d",
    "lori_s_masks",
    "save_masks",
    "variant_of",
    "adapter_flops_per_token",
    "apply_hellora",
    "default_lora_config",
    "find_moe_layers",
    "hot_map_from_model",
    "load_hellora",
    "profile_experts",
    "register_family",
    "select_hot_experts",
    "trainable_parameter_report",
]
