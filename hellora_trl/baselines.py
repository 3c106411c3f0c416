"""The all-experts baselines HELLoRA is compared with: LoRA on every expert with our layer, PEFT's own
``target_parameters`` LoRA, and DoRA where PEFT supports it."""

from __future__ import annotations

import copy

from peft import LoraConfig, PeftModel, get_peft_model
from torch import nn

from .adapter import default_lora_config, explicit_v5_targets, inject_adapter, resolve_targets
from .profile import HotMap
from .registry import family_for, find_moe_layers
from .utils import unwrap_model


def all_experts_hot(model: nn.Module) -> HotMap:
    """Every expert of every MoE layer: "LoRA on all experts" with our expert layer (and LoRI with ``variant``)."""
    return {layer.name: list(range(layer.num_experts)) for layer in find_moe_layers(unwrap_model(model))}


def _peft_baseline_targets(
    model: nn.Module, config: LoraConfig, include_router: bool, include_shared_experts: bool
) -> tuple[list[str], list[str]]:
    """(target_modules, target_parameters) of PEFT's own LoRA on every expert, plus attention and router."""
    family = family_for(model)
    layers = find_moe_layers(model, family)
    routers = {layer.router_name for layer in layers}
    names = resolve_targets(model, all_experts_hot(model), config, "all", include_shared_experts, family)
    modules = [
        n for n in names if isinstance(model.get_submodule(n), nn.Linear) and (include_router or n not in routers)
    ]
    params: list[str] = []
    if family.layout == "fused":
        for layer in layers:
            for attr in ("gate_up_proj", "up_proj", "down_proj"):
                if isinstance(getattr(layer.experts, attr, None), nn.Parameter):
                    params.append(f"{layer.name}.{attr}")
            if include_router and not isinstance(layer.router, nn.Linear):
                params.append(f"{layer.router_name}.weight")
    return modules, params


def apply_peft_all_experts(
    model: nn.Module,
    lora_config: LoraConfig | None = None,
    *,
    include_router: bool = True,
    include_shared_experts: bool = True,
    adapter_name: str = "default",
) -> PeftModel:
    """Baseline: PEFT's own LoRA on every expert (``target_parameters`` on the fused 3-D expert weights, one pair
    per weight, so gate and up share one), plus the attention targets and the router, as PEFT builds it."""
    config = copy.deepcopy(lora_config if lora_config is not None else default_lora_config())
    modules, params = _peft_baseline_targets(model, config, include_router, include_shared_experts)
    if config.use_dora and params:
        raise ValueError(
            "PEFT 0.21 does not support DoRA on target_parameters (ParamWrapper rejects use_dora=True), so fused "
            "experts cannot get DoRA. Use apply_peft_dora for DoRA on the nn.Linear targets only."
        )
    config.target_modules = modules
    config.target_parameters = params or None
    with explicit_v5_targets():
        return get_peft_model(model, config, adapter_name=adapter_name)


def apply_peft_dora(
    model: nn.Module,
    lora_config: LoraConfig | None = None,
    *,
    include_router: bool = True,
    include_shared_experts: bool = True,
    adapter_name: str = "default",
) -> PeftModel:
    """Baseline: DoRA where PEFT supports it, i.e. every ``nn.Linear`` target (attention, Linear routers, shared
    experts, and all experts of ModuleList-layout models). Fused 3-D expert weights and custom router modules get
    no adapter: PEFT's ParamWrapper has no DoRA."""
    config = copy.deepcopy(lora_config if lora_config is not None else default_lora_config())
    config.use_dora = True
    modules, _ = _peft_baseline_targets(model, config, include_router, include_shared_experts)
    config.target_modules = modules
    config.target_parameters = None
    with explicit_v5_targets():
        return get_peft_model(model, config, adapter_name=adapter_name)


def apply_attention_router_only(model: nn.Module, lora_config: LoraConfig | None = None) -> PeftModel:
    """The floor every expert placement is measured against: LoRA on attention and the routers (our router layer
    for custom router modules), no expert adapter at all."""
    config = copy.deepcopy(lora_config if lora_config is not None else default_lora_config())
    family = family_for(model)
    layers = find_moe_layers(model, family)
    none_hot = {layer.name: [] for layer in layers}
    targets = resolve_targets(model, none_hot, config, "all", True, family)
    config.target_modules = [t for t in targets if t not in none_hot]
    return inject_adapter(model, config, none_hot, family, layers, False, "default")

