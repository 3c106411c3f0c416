"""One registry entry per MoE model family: where the router and experts live and how routing is read.

Everything the rest of the package knows about a model architecture comes from here, so adding a family
means adding one :class:`MoEFamily` entry, never an ``if model_type == ...`` elsewhere.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Iterator

import torch
from torch import nn

from .utils import full_shape, unwrap_layer


@dataclass(frozen=True)
class MoEFamily:
    """How one family lays out its MoE blocks.

    ``layout="fused"`` is the transformers 5.x layout: ``experts`` holds 3-D ``gate_up_proj`` (E, 2I, H) and
    ``down_proj`` (E, H, I) and its forward receives ``(hidden, top_k_index, top_k_weights)``.
    ``layout="modulelist"`` is the older/remote-code layout: ``experts`` is an ``nn.ModuleList`` of per-expert
    MLPs whose ``nn.Linear`` children (``expert_linear_names``) are plain PEFT targets, and routing is read from
    the router's logits.
    """

    name: str
    model_types: tuple[str, ...]
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attrs: tuple[str, ...] = ()
    layout: str = "fused"
    num_experts_keys: tuple[str, ...] = ("num_experts", "num_local_experts", "n_routed_experts")
    top_k_keys: tuple[str, ...] = ("num_experts_per_tok", "moe_topk", "top_k")
    # The eager experts loop accepts the sentinel index ``num_experts`` (skip) for every family except
    # GPT-OSS, whose one_hot uses exactly ``num_experts`` classes.
    eager_accepts_sentinel: bool = True
    expert_linear_names: tuple[str, ...] = ("gate_proj", "up_proj", "down_proj")
    attention_targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj")

    def default_k(self, config) -> int:
        """The paper's default hot-set size: experts per token, doubled when shared experts exist."""
        k = experts_per_token(config, self)
        return 2 * k if self.has_shared_experts(config) else k

    def has_shared_experts(self, config) -> bool:
        for key in ("n_shared_experts", "shared_expert_intermediate_size", "num_shared_experts"):
            if getattr(config, key, None):
                return True
        return False


FAMILIES: dict[str, MoEFamily] = {}


def register_family(family: MoEFamily) -> MoEFamily:
    """Add (or replace) a family; model types are matched against ``config.model_type``."""
    FAMILIES[family.name] = family
    return family


register_family(MoEFamily("olmoe", ("olmoe", "flex_olmo")))
register_family(MoEFamily("mixtral", ("mixtral", "minimax")))
register_family(MoEFamily("qwen2_moe", ("qwen2_moe",), shared_expert_attrs=("shared_expert", "shared_expert_gate")))
register_family(MoEFamily("qwen3_moe", ("qwen3_moe", "qwen3_next", "qwen3_vl_moe")))
register_family(MoEFamily("deepseek_v2", ("deepseek_v2",), shared_expert_attrs=("shared_experts",)))
register_family(MoEFamily("deepseek_v3", ("deepseek_v3", "glm4_moe", "kimi_k2"), shared_expert_attrs=("shared_experts",)))
register_family(MoEFamily("gpt_oss", ("gpt_oss",), router_attr="router", eager_accepts_sentinel=False))
# IBM Granite MoE (`block_sparse_moe.router` + fused experts) and Phi-3.5-MoE (`mlp.router`, sparsemixer routing):
# the fused layout with the experts fed (hidden, top_k_index, top_k_weights), like OLMoE.
register_family(MoEFamily("granitemoe", ("granitemoe",), router_attr="router"))
register_family(MoEFamily("phimoe", ("phimoe",), router_attr="router"))
# Older Mixtral-style remote code: `block_sparse_moe.gate` is an nn.Linear, experts are per-expert w1/w2/w3.
register_family(
    MoEFamily(
        "mixtral_modulelist",
        ("mixtral_modulelist", "qwen2_moe_legacy"),
        layout="modulelist",
        expert_linear_names=("w1", "w2", "w3", "gate_proj", "up_proj", "down_proj"),
    )
)
# DeepSeek-MoE (16B, remote code, model_type "deepseek"): `mlp.gate` is a custom MoEGate returning
# (topk_idx, topk_weight, aux_loss), experts are per-expert gate/up/down MLPs, plus always-on shared experts.
register_family(
    MoEFamily("deepseek_moe", ("deepseek",), layout="modulelist", shared_expert_attrs=("shared_experts",))
)


def supported_model_types() -> list[str]:
    """Every ``config.model_type`` a registered family claims."""
    return sorted({t for family in FAMILIES.values() for t in family.model_types})


def family_for(model: nn.Module) -> MoEFamily:
    """Pick the family entry for a model by ``config.model_type``; fall back to structural detection.

    An unregistered model is accepted only when its MoE blocks have the fused layout HELLoRA's expert layer
    adapts (3-D expert stacks fed ``(hidden, top_k_index, top_k_weights)``); anything else is refused here, before
    any work, with the supported model types.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for family in FAMILIES.values():
        if model_type in family.model_types:
            return family
    # Unknown model type: a fused experts module fed the routing is self-describing, so accept it generically.
    for router_attr in ("gate", "router"):
        for name, block in _iter_candidate_blocks(model, MoEFamily("probe", (), router_attr=router_attr)):
            experts = getattr(block, "experts")
            if not takes_routing(experts):
                raise ValueError(
                    f"{type(model).__name__} (model_type={model_type!r}) is not supported: its experts module "
                    f"{name}.experts ({type(unwrap_layer(experts)).__name__}) runs every expert on pre-routed inputs "
                    "instead of receiving (hidden_states, top_k_index, top_k_weights), so routing cannot be counted "
                    f"nor hot experts adapted. Supported model types: {supported_model_types()}."
                )
            return MoEFamily(f"generic:{model_type}", (model_type,), router_attr=router_attr)
    raise ValueError(
        f"No MoE layers found in {type(model).__name__} (model_type={model_type!r}). HELLoRA needs a "
        "Mixture-of-Experts model whose MoE blocks have an `experts` module and a `gate`/`router`; "
        f"supported model types: {supported_model_types()}. Register a new family with "
        "hellora_trl.registry.register_family()."
    )


def takes_routing(experts: nn.Module) -> bool:
    """Whether a fused experts module's forward receives the routing (``hidden, top_k_index, top_k_weights``)."""
    try:
        params = inspect.signature(unwrap_layer(experts).forward).parameters.values()
    except (TypeError, ValueError):  # pragma: no cover - builtins without a signature
        return False
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    return len(positional) >= 3 or any(p.kind == p.VAR_POSITIONAL for p in params)


def expose_num_experts(model: nn.Module) -> None:
    """Give configs that name their expert count only ``num_local_experts`` (GraniteMoE, PhiMoE) a ``num_experts``
    too: TRL's fused loss reads ``config.num_experts`` for the router auxiliary loss and fails without it."""
    config = getattr(model, "config", None)
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None or not hasattr(cfg, "output_router_logits") or getattr(cfg, "num_experts", None) is not None:
            continue
        count = getattr(cfg, "num_local_experts", None)
        if count is not None:
            cfg.num_experts = count


def _iter_candidate_blocks(model: nn.Module, family: MoEFamily) -> Iterator[tuple[str, nn.Module]]:
    for name, module in model.named_modules():
        experts = getattr(module, family.experts_attr, None)
        router = getattr(module, family.router_attr, None)
        if isinstance(experts, nn.Module) and isinstance(router, nn.Module):
            if family.layout == "fused" and is_fused_experts(experts):
                yield name, module
            elif family.layout == "modulelist" and isinstance(experts, nn.ModuleList):
                yield name, module


def is_fused_experts(module: nn.Module) -> bool:
    """A transformers 5.x fused experts module: 3-D stacked expert weights."""
    module = unwrap_layer(module)
    weight = getattr(module, "gate_up_proj", None)
    if weight is None:
        weight = getattr(module, "up_proj", None)
    # full_shape: under ZeRO-3 a partitioned parameter's .shape is an empty placeholder (real shape in ds_shape).
    return isinstance(weight, torch.Tensor) and len(full_shape(weight)) == 3 and hasattr(module, "down_proj")


@dataclass
class MoELayer:
    """One MoE block found in a model, with the names the rest of the package needs."""

    name: str  # module name of the experts container, e.g. "model.layers.3.mlp.experts"
    block_name: str
    router_name: str
    block: nn.Module = field(repr=False)
    num_experts: int = 0

    @property
    def experts(self) -> nn.Module:
        return self.block.get_submodule(self.name.rsplit(".", 1)[-1])

    @property
    def router(self) -> nn.Module:
        return self.block.get_submodule(self.router_name.rsplit(".", 1)[-1])


def find_moe_layers(model: nn.Module, family: MoEFamily | None = None) -> list[MoELayer]:
    """All MoE blocks of a model, in module order. Raises a clear error when there are none."""
    family = family or family_for(model)
    layers = []
    for block_name, block in _iter_candidate_blocks(model, family):
        experts = getattr(block, family.experts_attr)
        experts_name = f"{block_name}.{family.experts_attr}" if block_name else family.experts_attr
        router_name = f"{block_name}.{family.router_attr}" if block_name else family.router_attr
        layers.append(
            MoELayer(experts_name, block_name, router_name, block, num_experts=_count_experts(experts, model, family))
        )
    if not layers:
        raise ValueError(
            f"No MoE layers found in {type(model).__name__}: expected blocks with `{family.experts_attr}` and "
            f"`{family.router_attr}` children ({family.layout} layout, family {family.name!r})."
        )
    return layers


def _count_experts(experts: nn.Module, model: nn.Module, family: MoEFamily) -> int:
    experts = unwrap_layer(experts)
    if isinstance(experts, nn.ModuleList):
        return len(experts)
    n = getattr(experts, "num_experts", None)
    if n is None:
        n = config_value(getattr(model, "config", None), family.num_experts_keys)
    return int(n)


def config_value(config, keys: tuple[str, ...]):
    """First present attribute of ``config`` among ``keys`` (also looks into ``text_config``)."""
    for cfg in (config, getattr(config, "text_config", None)):
        if cfg is None:
            continue
        for key in keys:
            value = getattr(cfg, key, None)
            if value is not None:
                return value
    return None


def experts_per_token(config, family: MoEFamily) -> int:
    value = config_value(config, family.top_k_keys)
    if value is None:
        raise ValueError(f"Cannot read the number of experts per token from the config (tried {family.top_k_keys}).")
    return int(value)
