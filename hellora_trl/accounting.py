"""Trainable-parameter and adapter-FLOP accounting (the paper's Tables 1 and 3)."""

from __future__ import annotations

from typing import Any

from torch import nn

from .adapter_state import changeable_entries
from .expert_lora import HotExpertLoraLayer, expert_factor_shapes
from .profile import ExpertProfile
from .registry import find_moe_layers
from .utils import unwrap_model


def _numel(param) -> int:
    """Real element count, also under DeepSpeed ZeRO-3 (ds_numel) and for bitsandbytes 4-bit packing."""
    n = getattr(param, "ds_numel", None) or param.numel()
    if param.__class__.__name__ == "Params4bit":
        n *= 2
    return int(n)


def _component(name: str, routers: list[str], experts: list[str]) -> str:
    if any(f"{r}." in name or name.endswith(r) for r in routers):
        return "router"
    if any(f"{e}." in name for e in experts) or ".shared_expert" in name:
        return "experts"
    return "attention"


def trainable_parameter_report(model: nn.Module, profile: ExpertProfile | None = None) -> dict[str, Any]:
    """``total``/``trainable``/``trainable_percent`` as PEFT counts them (adapters in the total), a breakdown by
    component, and, given a routing profile, the adapter FLOPs per token of this placement vs LoRA on all experts.

    Only entries that can change count as trainable: LoRI's frozen A factors do not (they stay in ``total``), and a
    LoRI-S B factor counts its mask's nonzeros, or its planned ``density`` before masks exist (meta-device models).
    Matched by parameter identity, so any wrapper (PeftModel, DDP) and adapter name works.
    """
    total = trainable = 0
    base = unwrap_model(model)
    layers = find_moe_layers(base)
    routers = [layer.router_name for layer in layers]
    experts = [layer.name for layer in layers]
    by_component = {"attention": 0, "router": 0, "experts": 0}
    changeable = changeable_entries(base)  # LoRI-S masks, inactive dynamic-rank components
    for name, param in model.named_parameters():
        n = _numel(param)
        total += n
        if param.requires_grad:
            count = changeable.get(id(param))
            n = count(n) if count is not None else n
            trainable += n
            by_component[_component(name, routers, experts)] += n
    report: dict[str, Any] = {
        "total": total,
        "trainable": trainable,
        "trainable_percent": 100.0 * trainable / total if total else 0.0,
        "by_component": by_component,
    }
    if profile is not None:
        report["adapter_flops_per_token"] = adapter_flops_per_token(model, profile)
    return report


def adapter_flops_per_token(model: nn.Module, profile: ExpertProfile) -> dict[str, float]:
    """Expected forward multiply-add FLOPs (2 per MAC) per token spent in expert adapters under ``profile``'s
    routing: this placement (only assignments to hot experts pay) vs LoRA on every expert (all pay)."""
    base = unwrap_model(model)
    profile.check_matches(base)
    tokens = max(profile.tokens_seen, 1)
    ours = everyone = 0.0
    for i, layer_name in enumerate(profile.layer_names):
        per_expert = _expert_adapter_flops(base.get_submodule(layer_name), profile.num_experts)
        rate = profile.counts[i].double() / tokens  # expected assignments per token, per expert
        full = max(per_expert) if per_expert else 0.0
        ours += sum(float(rate[e]) * f for e, f in enumerate(per_expert))
        everyone += float(rate.sum()) * full
    return {"hellora": ours, "all_experts": everyone, "ratio": ours / everyone if everyone else 0.0}


def _expert_adapter_flops(experts: nn.Module, num_experts: int) -> list[float]:
    """Adapter FLOPs of one routed token in each expert (0 for experts without an adapter)."""
    flops = [0.0] * num_experts
    if isinstance(experts, HotExpertLoraLayer):
        adapter = experts.active_adapters[0]
        r = experts.r[adapter]
        shapes = expert_factor_shapes(experts.get_base_layer(), experts.fuse_gate_up).values()
        per = float(sum(2 * r * (fan_in + fan_out) for fan_in, fan_out in shapes))
        for e in experts.hot_experts(adapter):
            flops[e] = per
        return flops
    if isinstance(experts, nn.ModuleList):
        for e, expert in enumerate(experts):
            for module in expert.modules():
                lora_a = getattr(module, "lora_A", None)
                if isinstance(lora_a, nn.ModuleDict) and len(lora_a):
                    a = next(iter(lora_a.values())).weight
                    b = next(iter(module.lora_B.values())).weight
                    flops[e] += 2.0 * (_numel(a) + _numel(b))  # ds_numel under ZeRO-3
    return flops
