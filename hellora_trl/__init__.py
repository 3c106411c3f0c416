"""hellora_trl: Hot-Experts Layer-Level LoRA (HELLoRA) for Mixture-of-Experts models on TRL and PEFT.

The method (``trainer.py`` runs it in this order: profile -> select -> build -> train -> save)::

    warm-up slice of the training rows
        |  a short LoRA warm-up (or forward passes); hooks count each router's top-k (profiling.py)
        v
    routing counts  C[layer, expert]   (ExpertProfile)                          (profile.py)
        |  keep the k most-routed experts of EACH layer                         (selection.py)
        v
    hot map   {layer 0: [3, 7],  layer 1: [0, 5],  ...,  layer L: [2, 6]}
        |  LoRA on attention + router + hot experts only; cold experts get none (adapter.py, expert_lora/)
        v
    SFT on those adapters (HELLoRATrainer = HELLoRAMixin + TRL's SFTTrainer); save adapter + hot map

Public names are imported lazily (PEP 562), so `hellora --help` and light tools do not pay for importing
torch, PEFT and TRL up front; `from hellora_trl import X` works as usual.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS: dict[str, str] = {
    "ExpertProfile": "profile",
    "FAMILIES": "registry",
    "HELLoRAArguments": "config",
    "HELLoRAConfig": "config",
    "HELLoRADPOConfig": "rl_trainers",
    "HELLoRADPOTrainer": "rl_trainers",
    "HELLoRAGRPOConfig": "rl_trainers",
    "HELLoRAGRPOTrainer": "rl_trainers",
    "HELLoRAMixin": "trainer",
    "HELLoRATrainer": "trainer",
    "HotExpertLoraLayer": "expert_lora",
    "MoEFamily": "registry",
    "RouterLoraLayer": "expert_lora",
    "RoutingCounter": "profiling",
    "SelectionSettings": "selection",
    "VARIANTS": "constants",
    "adapter_flops_per_token": "accounting",
    "all_experts_hot": "baselines",
    "apply_hellora": "adapter",
    "apply_masks": "variants",
    "apply_peft_all_experts": "baselines",
    "apply_peft_dora": "baselines",
    "copy_lora_A": "variants",
    "default_lora_config": "adapter",
    "enforce_masks": "variants",
    "export_peft_target_parameters": "export",
    "find_moe_layers": "registry",
    "freeze_lora_A": "variants",
    "hot_map_from_model": "adapter",
    "load_hellora": "adapter",
    "load_masks": "variants",
    "lori_s_from_lori_d": "variants",
    "lori_s_masks": "variants",
    "merge_adapter": "export",
    "plan_hot_experts": "selection",
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
    from .accounting import adapter_flops_per_token, trainable_parameter_report
    from .adapter import apply_hellora, default_lora_config, hot_map_from_model, load_hellora
    from .baselines import all_experts_hot, apply_peft_all_experts, apply_peft_dora
    from .config import HELLoRAArguments, HELLoRAConfig
    from .constants import VARIANTS
    from .expert_lora import HotExpertLoraLayer, RouterLoraLayer
    from .export import export_peft_target_parameters, merge_adapter
    from .profile import ExpertProfile
    from .profiling import RoutingCounter, profile_experts
    from .rl_trainers import HELLoRADPOConfig, HELLoRADPOTrainer, HELLoRAGRPOConfig, HELLoRAGRPOTrainer
    from .registry import FAMILIES, MoEFamily, find_moe_layers, register_family
    from .selection import SelectionSettings, plan_hot_experts, select_hot_experts
    from .trainer import HELLoRAMixin, HELLoRATrainer
    from .variants import (
        apply_masks,
        copy_lora_A,
        enforce_masks,
        freeze_lora_A,
        load_masks,
        lori_s_from_lori_d,
        lori_s_masks,
        save_masks,
        variant_of,
    )

from .constants import VERSION as __version__  # noqa: E402  (torch-free)

__all__ = sorted(_EXPORTS)
