"""hellora_trl: Hot-Experts Layer-Level LoRA (HELLoRA) for Mixture-of-Experts models on TRL and PEFT.

Public names are imported lazily (PEP 562), so `hellora --help` and light tools do not pay for importing
torch, PEFT and TRL up front; `from hellora_trl import X` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ExpertProfile": "profiling",
    "FAMILIES": "registry",
    "HELLoRAConfig": "config",
    "HELLoRATrainer": "trainer",
    "HotExpertLoraLayer": "expert_lora",
    "MoEFamily": "registry",
    "RouterLoraLayer": "expert_lora",
    "RoutingCounter": "profiling",
    "VARIANTS": "variants",
    "adapter_flops_per_token": "accounting",
    "all_experts_hot": "variants",
    "apply_hellora": "adapter",
    "apply_masks": "variants",
    "apply_peft_all_experts": "variants",
    "apply_peft_dora": "variants",
    "copy_lora_A": "variants",
    "default_lora_config": "adapter",
    "enforce_masks": "variants",
    "find_moe_layers": "registry",
    "freeze_lora_A": "variants",
    "hot_map_from_model": "adapter",
    "load_hellora": "adapter",
    "load_masks": "variants",
    "lori_s_from_lori_d": "variants",
    "lori_s_masks": "variants",
    "profile_experts": "profiling",
    "register_family": "registry",
    "save_masks": "variants",
    "select_hot_experts": "selection",
    "trainable_parameter_report": "accounting",
    "variant_of": "variants",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # static analysers and IDEs see the real imports
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
