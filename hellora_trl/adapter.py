"""Attaching, saving and loading HELLoRA adapters through PEFT.

``apply_hellora`` turns a hot-expert map into a ``LoraConfig`` with explicit targets (attention projections,
routers, the hot experts) and lets PEFT inject the layers; our :class:`HotExpertLoraLayer` and
:class:`RouterLoraLayer` are registered as PEFT custom modules for the fused expert and router classes, so
everything PEFT offers for an adapter (``save_pretrained``, ``merge_and_unload``, ``disable_adapter``...)
applies unchanged.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import warnings
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import load_peft_weights, set_peft_model_state_dict
from torch import nn

from .adapter_card import AdapterCard, check_block, read_lora_config
from .adapter_state import install_saver, restore_extras, set_extra
from .constants import COMPONENTS, DEFAULT_DENSITY, HOT_KEY, PEFT_PREFIX, RUN_MARKER_FILE
from .expert_lora import HotExpertLoraLayer, RouterLoraLayer
from .profile import HotMap
from .registry import MoEFamily, MoELayer, family_for, find_moe_layers
from .selection import validate_hot_map
from .variants import check_variant_args, prepare_variant


def check_layer_options(config: LoraConfig) -> None:
    """Refuse ``LoraConfig`` options our expert and router layers cannot honour (as PEFT's ``ParamWrapper`` does),
    instead of silently training something else."""
    problems = []
    if config.use_dora:
        problems.append("use_dora=True (DoRA)")
    if getattr(config, "lora_bias", False):
        problems.append("lora_bias=True")
    if not isinstance(config.init_lora_weights, bool):
        problems.append(f"init_lora_weights={config.init_lora_weights!r} (only True or False)")
    if problems:
        raise ValueError(
            "HELLoRA's expert and router LoRA layers do not support " + ", ".join(problems) + ". Use a plain LoRA "
            "config (r, lora_alpha, lora_dropout, use_rslora, init_lora_weights=True/False), or "
            "hellora_trl.apply_peft_dora for a DoRA baseline on nn.Linear targets."
        )


class _HotExpertFactory:
    """PEFT custom-module constructor that knows which experts are hot in each layer."""

    def __init__(self, hot_experts: HotMap, fuse_gate_up: bool, eager_accepts_sentinel: bool) -> None:
        self.hot_experts = {k: list(v) for k, v in hot_experts.items()}
        self.fuse_gate_up = fuse_gate_up
        self.eager_accepts_sentinel = eager_accepts_sentinel

    def __call__(self, target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
        check_layer_options(config)
        name = kwargs.get("target_name")
        if name not in self.hot_experts:
            raise ValueError(f"No hot-expert list for experts module {name!r}.")
        return HotExpertLoraLayer(
            target,
            adapter_name,
            self.hot_experts[name],
            r=kwargs["r"],
            lora_alpha=kwargs["lora_alpha"],
            lora_dropout=config.lora_dropout,
            init_lora_weights=config.init_lora_weights,
            use_rslora=config.use_rslora,
            fuse_gate_up=self.fuse_gate_up,
            eager_accepts_sentinel=self.eager_accepts_sentinel,
        )


def _router_factory(target: nn.Module, adapter_name: str, config: LoraConfig, **kwargs: Any) -> nn.Module:
    check_layer_options(config)
    return RouterLoraLayer(
        target,
        adapter_name,
        r=kwargs["r"],
        lora_alpha=kwargs["lora_alpha"],
        init_lora_weights=config.init_lora_weights,
        use_rslora=config.use_rslora,
    )


def default_lora_config(**overrides: Any) -> LoraConfig:
    """The paper's adapter: r=32, alpha=64, no dropout, causal LM."""
    kwargs = dict(r=32, lora_alpha=64, lora_dropout=0.0, task_type="CAUSAL_LM")
    kwargs.update(overrides)
    return LoraConfig(**kwargs)


def _matches(name: str, targets: str | Iterable[str]) -> bool:
    """PEFT's matching rule: a regex string must fully match; list entries match the name or its suffix."""
    if isinstance(targets, str):
        return re.fullmatch(targets, name) is not None
    return any(name == t or name.endswith("." + t) for t in targets)


def _under(name: str, prefixes: Iterable[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def resolve_targets(
    model: nn.Module,
    hot_experts: HotMap,
    lora_config: LoraConfig,
    components: str = "all",
    include_shared_experts: bool = True,
    family: MoEFamily | None = None,
) -> list[str]:
    """Explicit module names to adapt: never a cold expert, whatever the user's ``target_modules`` says."""
    if components not in COMPONENTS:
        raise ValueError(f"components must be one of {COMPONENTS} (paper: All / +Gate / Pure), got {components!r}.")
    family = family or family_for(model)
    layers = find_moe_layers(model, family)
    expert_containers = [layer.name for layer in layers]
    routers = [layer.router_name for layer in layers]
    shared = [f"{layer.block_name}.{attr}" for layer in layers for attr in family.shared_expert_attrs]
    moe_parts = expert_containers + routers + shared
    names: list[str] = []
    if components == "all":
        user = lora_config.target_modules or family.attention_targets
        if user == "all-linear":
            user = r"^(?!.*lm_head$).*$"
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and _matches(name, user) and not _under(name, moe_parts):
                names.append(name)
        if not names:
            raise ValueError(f"target_modules={user!r} matched no nn.Linear outside the MoE blocks.")
    if components in ("all", "router"):
        names += routers
        if include_shared_experts:
            names += [n for n in shared if isinstance(model.get_submodule(n), nn.Linear)]
    for layer in layers:
        names += _expert_targets(model, layer, hot_experts[layer.name], family)
    if include_shared_experts:
        for prefix in shared:
            module = model.get_submodule(prefix)
            names += [f"{prefix}.{n}" for n, m in module.named_modules() if n and isinstance(m, nn.Linear)]
    return list(dict.fromkeys(names))


def _expert_targets(model: nn.Module, layer: MoELayer, hot: list[int], family: MoEFamily) -> list[str]:
    if family.layout == "fused":
        return [layer.name]
    names = []
    for e in hot:
        expert = model.get_submodule(f"{layer.name}.{e}")
        for child, module in expert.named_modules():
            if child and isinstance(module, nn.Linear):
                names.append(f"{layer.name}.{e}.{child}")
    return names


def apply_hellora(
    model: nn.Module,
    hot_experts: HotMap,
    lora_config: LoraConfig | None = None,
    *,
    components: str = "all",
    fuse_gate_up: bool = False,
    include_shared_experts: bool = True,
    adapter_name: str = "default",
    autocast_adapter_dtype: bool = True,
    variant: str = "lora",
    masks: Mapping[str, torch.Tensor] | None = None,
    density: float = DEFAULT_DENSITY,
) -> PeftModel:
    """Wrap ``model`` in a PEFT model with LoRA on attention, routers and the hot experts only.

    ``components``: ``"all"`` (attention + router + hot experts, the paper's All), ``"router"`` (router + hot
    experts, +Gate) or ``"experts"`` (hot experts only, Pure). Cold experts get no parameters and no FLOPs.
    Shared experts, when the family has them, are always routed to and are adapted like hot experts unless
    ``include_shared_experts=False``. ``autocast_adapter_dtype`` is PEFT's: float32 adapters on a bf16/fp16 base
    (turn it off under DeepSpeed ZeRO-3, which needs one dtype).

    ``variant`` (see :mod:`hellora_trl.variants`): ``"lora"``; ``"lori_d"`` (A frozen at its random init, B dense);
    ``"lori_s"`` (A frozen, B held to ``masks`` from a finished LoRI-D adapter; without masks yet, ``density`` is
    the planned share, enough for accounting, and training refuses to start).
    """
    check_variant_args(variant, masks, density)
    if isinstance(model, PeftModel):
        raise ValueError(
            "apply_hellora expects the base transformers model, not a PeftModel. Use `model.unload()` (or "
            "`model.get_base_model()` after merging) first; HELLoRA builds its own adapter."
        )
    lora_config = lora_config if lora_config is not None else default_lora_config()
    if getattr(lora_config, "target_parameters", None):
        raise ValueError(
            "lora_config.target_parameters targets expert parameters for the whole expert stack, which is what "
            "HELLoRA replaces. Leave target_parameters empty; HELLoRA adds the hot experts itself."
        )
    family = family_for(model)
    layers = find_moe_layers(model, family)
    if family.layout == "fused" or not isinstance(layers[0].router, nn.Linear):
        check_layer_options(lora_config)  # before any PEFT work: our layers will wrap experts/routers
    validate_hot_map(hot_experts, [layer.name for layer in layers], layers[0].num_experts)
    config = copy.deepcopy(lora_config)
    config.target_modules = resolve_targets(model, hot_experts, lora_config, components, include_shared_experts, family)
    peft_model = inject_adapter(model, config, hot_experts, family, layers, fuse_gate_up, adapter_name, autocast_adapter_dtype)
    prepare_variant(peft_model, variant, masks=masks, density=density, adapter_name=adapter_name)
    return peft_model


def inject_adapter(
    model: nn.Module,
    config: LoraConfig,
    hot_experts: HotMap,
    family: MoEFamily,
    layers: list[MoELayer],
    fuse_gate_up: bool,
    adapter_name: str,
    autocast_adapter_dtype: bool = True,
) -> PeftModel:
    """Let PEFT build ``config``'s adapter on ``model`` with our expert and router layers as custom modules (the
    one injection path of apply_hellora, load_hellora and the baselines)."""
    mapping: dict[type, Any] = {}
    if family.layout == "fused":
        mapping[type(layers[0].experts)] = _HotExpertFactory(hot_experts, fuse_gate_up, family.eager_accepts_sentinel)
    router_type = type(layers[0].router)
    if router_type is not nn.Linear:  # custom router modules (OLMoE/Qwen TopKRouter, DeepSeek MoEGate...)
        mapping[router_type] = _router_factory
    if mapping:
        config._register_custom_module(mapping)
    with explicit_v5_targets(), warnings.catch_warnings():
        # PEFT reads the model's deprecated `is_gradient_checkpointing` alias (transformers renamed it to
        # is_activation_checkpointing); the warning is PEFT's to fix and tells our users nothing.
        warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated", category=FutureWarning)
        peft_model = get_peft_model(model, config, adapter_name=adapter_name, autocast_adapter_dtype=autocast_adapter_dtype)
    install_saver(peft_model)  # saves write (or clear stale) side files of every adapter-state kind
    # saves tag adapter_config.json (hellora block) and README.md as HELLoRA, with how to load or export it
    set_extra(peft_model, adapter_name, "card", AdapterCard(
        {name: [int(e) for e in ids] for name, ids in hot_experts.items()}, layers[0].num_experts))
    return peft_model


@contextlib.contextmanager
def explicit_v5_targets():
    """Keep PEFT from renaming our explicit transformers-5 module names as if they were v4 names.

    PEFT 0.21 rewrites ``target_modules`` entries ending in ``.gate``, ``.gate_proj``, ``.up_proj``, ``.down_proj``
    (Mixtral/Qwen2-MoE conversion patterns, also applied to DeepSeek-V2/V3, GLM-MoE...) into fused
    ``target_parameters`` so that v4 adapters load on v5 models. Our targets are already full v5 names (the router
    module, shared-expert projections), so that rewrite would wrap the whole expert stack. It is switched off only
    for the duration of our own ``get_peft_model`` call.
    """
    from peft.utils import transformers_weight_conversion as conversion

    original = conversion.convert_peft_config_for_transformers
    conversion.convert_peft_config_for_transformers = lambda *args, **kwargs: None
    try:
        yield
    finally:
        conversion.convert_peft_config_for_transformers = original


def hot_map_from_model(model: nn.Module, adapter_name: str = "default") -> HotMap:
    """The hot map of an adapted model, read from its expert-LoRA layers (fused) or targets (ModuleList)."""
    base = model.get_base_model() if isinstance(model, PeftModel) else model
    hot: HotMap = {}
    for name, module in base.named_modules():
        if isinstance(module, HotExpertLoraLayer) and adapter_name in module.lora_hot_experts:
            hot[name] = module.hot_experts(adapter_name)
    if hot:
        return hot
    family = family_for(base)
    for layer in find_moe_layers(base, family):
        ids = []
        for e, expert in enumerate(layer.experts):
            if any(hasattr(m, "lora_A") and adapter_name in getattr(m, "lora_A", {}) for m in expert.modules()):
                ids.append(e)
        hot[layer.name] = ids
    return hot


def _hot_map_from_weights(weights: Mapping[str, torch.Tensor]) -> HotMap:
    hot: HotMap = {}
    for key, value in weights.items():
        if key.endswith("." + HOT_KEY):
            name = key[: -len(HOT_KEY) - 1].removeprefix(PEFT_PREFIX)
            hot[name] = sorted(int(e) for e in value.tolist())
    return hot


def _hot_map_from_weight_keys(keys: Iterable[str], layers: list[MoELayer]) -> HotMap:
    """ModuleList layout: an expert is hot iff the adapter holds LoRA weights under it.

    (PEFT may shorten a long ``target_modules`` list to minimal suffixes when it saves, so the config's targets
    cannot be read back as module names; the weight keys always can.)
    """
    hot: HotMap = {layer.name: [] for layer in layers}
    for key in keys:
        name = key.removeprefix(PEFT_PREFIX)
        for layer in layers:
            prefix = layer.name + "."
            if name.startswith(prefix):
                hot[layer.name].append(int(name[len(prefix) :].split(".")[0]))
    return {k: sorted(set(v)) for k, v in hot.items()}


def load_hellora(
    model: nn.Module, path: str | os.PathLike, *, is_trainable: bool = False, adapter_name: str = "default"
) -> PeftModel:
    """Rebuild a saved HELLoRA adapter on ``model`` and load its weights exactly (and its LoRI variant, if any)."""
    path = Path(path)
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No adapter_config.json in {path}: not a saved PEFT/HELLoRA adapter directory.")
    if (path / RUN_MARKER_FILE).is_file():
        warnings.warn(
            f"{path} holds {RUN_MARKER_FILE}: a training run started writing there and did not save its final "
            "adapter (interrupted?). The adapter loaded now is from an earlier run, and the folder's "
            "hellora_profile.json and figures may belong to the unfinished one.",
            stacklevel=2,
        )
    config = read_lora_config(path)  # the hellora block is read by check_block below
    weights = load_peft_weights(str(path), device="cpu")
    family = family_for(model)
    layers = find_moe_layers(model, family)
    if family.layout == "fused":
        hot = _hot_map_from_weights(weights)
        if not hot:
            raise ValueError(f"{path} holds no hot-expert map ({HOT_KEY}); was it saved by hellora_trl?")
    else:
        hot = _hot_map_from_weight_keys(weights, layers)
    validate_hot_map(hot, [layer.name for layer in layers], layers[0].num_experts)
    check_block(path, hot)  # the hellora block of adapter_config.json: a known format, the same hot map
    fuse = any(".lora_gate_up_A" in k for k in weights)
    config.inference_mode = not is_trainable
    peft_model = inject_adapter(model, config, hot, family, layers, fuse, adapter_name)
    result = set_peft_model_state_dict(peft_model, weights, adapter_name=adapter_name)
    missing = [k for k in result.missing_keys if "lora_" in k]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"Adapter at {path} does not fit this model: missing {missing[:3]}, unexpected "
            f"{list(result.unexpected_keys)[:3]}."
        )
    restore_extras(peft_model, path, adapter_name=adapter_name)  # LoRI masks, dynamic ranks (their side files)
    if not is_trainable:
        peft_model.eval()
        for param in peft_model.parameters():
            param.requires_grad_(False)
    return peft_model
