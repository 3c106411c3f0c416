"""Method variants on HELLoRA's placement: LoRA, LoRI-D and LoRI-S (HELLoRI).

LoRI (Zhang et al., 2025) keeps every LoRA ``A`` at its random init as a fixed projection (frozen: no gradient, no
optimizer state) and trains only ``B``: densely (LoRI-D), or, in a second run from a fresh start (B = 0), only the
top ``density`` of the B entries of a finished LoRI-D adapter, ranked by magnitude (LoRI-S).

Masks live beside the model, not inside the adapter modules (their code is shared with PEFT): a
:class:`VariantState` in :mod:`hellora_trl.adapter_state`'s table plus a gradient hook on each B factor. A masked entry starts at 0 and never receives a gradient,
so AdamW (decoupled weight decay included) leaves it at exactly 0. The variant travels with the adapter directory as
``hellora_variant.json`` and, for LoRI-S, ``hellora_masks.safetensors``; ``load_hellora`` restores both.

Mask keys are parameter names relative to the transformers model with PEFT's adapter segment removed, which is also
the PEFT file key without ``base_model.model.`` (e.g. ``model.layers.0.self_attn.q_proj.lora_B.weight``,
``model.layers.0.mlp.experts.lora_down_B``), so masks computed from a live model or a saved directory agree.
"""

from __future__ import annotations

import copy
import json
import math
import os
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import load_peft_weights
from torch import nn

from .adapter_state import get_extra, set_extra
from .constants import DEFAULT_DENSITY, MASKS_FILE, PEFT_PREFIX, SCOPES, VARIANT_FILE, VARIANTS
from .utils import atomic_write, atomic_write_text, unwrap_model

_KIND = "variant"  # this module's entry kind in the adapter-state table
_FORMAT_VERSION = 1


@dataclass
class VariantState:
    """What one adapter's variant needs at run time: its B factors, their masks and the gradient hooks."""

    variant: str
    density: float = DEFAULT_DENSITY
    params: dict[str, nn.Parameter] = field(default_factory=dict)  # B factors by mask key
    masks: dict[str, torch.Tensor] = field(default_factory=dict)
    hooks: dict[str, Any] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> "VariantState":
        """A deep-copied model gets its own factors (through ``memo``) and fresh hooks: tensor hooks are not copied."""
        params = copy.deepcopy(self.params, memo)
        state = VariantState(self.variant, self.density, params, copy.deepcopy(self.masks, memo))
        if self.hooks:
            _hook_all(state)
        return state

    def changeable_entries(self) -> dict[int, Callable[[int], int]]:
        """LoRI-S: each B factor changes on its mask's True entries (``density`` of them before masks exist)."""
        if self.variant != "lori_s":
            return {}
        entries: dict[int, Callable[[int], int]] = {}
        for key, param in self.params.items():
            mask = self.masks.get(key)
            kept = int(mask.sum()) if mask is not None else None
            entries[id(param)] = (lambda n, kept=kept: kept) if kept is not None else (
                lambda n: kept_count(n, self.density)
            )
        return entries

    def save(self, directory: Path) -> None:
        """``hellora_variant.json`` (and, for LoRI-S, the masks) next to a saved adapter."""
        record: dict[str, Any] = {"format_version": _FORMAT_VERSION, "variant": self.variant}
        if self.variant == "lori_s":
            if len(self.masks) != len(self.params):
                raise ValueError("Cannot save a LoRI-S adapter before its masks exist (apply_masks first).")
            save_masks(self.masks, directory / MASKS_FILE)
            record.update(
                density=self.density,
                kept=sum(int(m.sum()) for m in self.masks.values()),
                entries=sum(m.numel() for m in self.masks.values()),
                masks=MASKS_FILE,
            )
        elif (directory / MASKS_FILE).exists():
            (directory / MASKS_FILE).unlink()  # a stale LoRI-S mask must not describe this adapter
        atomic_write_text(directory / VARIANT_FILE, json.dumps(record, indent=2))


# --------------------------------------------------------------------------------------------- validation
def check_variant_args(
    variant: str, masks: Mapping[str, torch.Tensor] | None = None, density: float = DEFAULT_DENSITY
) -> None:
    """Fail before any PEFT work on a bad variant request."""
    if variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}.")
    if masks is not None and variant != "lori_s":
        raise ValueError(f"masks only apply to variant='lori_s' (got variant={variant!r}).")
    _check_density(density)


def _check_density(density: float) -> None:
    if not 0.0 < float(density) <= 1.0:
        raise ValueError(f"density must be in (0, 1] (share of B entries kept; LoRI uses 0.1), got {density!r}.")


def _check_scope(scope: str) -> None:
    if scope not in SCOPES:
        raise ValueError(f"scope must be one of {SCOPES} (one threshold per model / layer / module), got {scope!r}.")


def kept_count(numel: int, density: float) -> int:
    """Entries kept at ``density``: rounded half up, at least one, so a group is never emptied."""
    return max(1, min(numel, math.floor(density * numel + 0.5)))


# ------------------------------------------------------------------------------------------- parameter names
def mask_key(name: str, adapter_name: str = "default") -> str:
    """A LoRA parameter or file key as a mask key: no ``base_model.model.`` prefix, no adapter segment."""
    name = name.removeprefix(PEFT_PREFIX)
    return re.sub(rf"(\.lora_[A-Za-z_]+?)\.{re.escape(adapter_name)}(?=\.|$)", r"\1", name)


def _factor_pattern(letter: str, adapter_name: str | None) -> re.Pattern:
    adapter = rf"\.{re.escape(adapter_name)}" if adapter_name is not None else ""
    return re.compile(rf"(?:^|\.)lora_(?:[a-z_]+_)?{letter}{adapter}(?:\.weight)?$")


def lora_factors(model: nn.Module, letter: str, adapter_name: str = "default") -> dict[str, nn.Parameter]:
    """The A or B factors of one adapter (attention/router/expert LoRA, PEFT ParamWrapper), by mask key."""
    if letter not in ("A", "B"):
        raise ValueError(f"letter must be 'A' or 'B', got {letter!r}.")
    pattern = _factor_pattern(letter, adapter_name)
    return {
        mask_key(name, adapter_name): param
        for name, param in unwrap_model(model).named_parameters()
        if pattern.search(name)
    }


def _b_entries(source: Mapping[str, torch.Tensor], adapter_name: str) -> dict[str, torch.Tensor]:
    """B tensors of a state dict, whether keyed like a saved adapter (no adapter segment) or a live model."""
    found = {}
    for key, value in source.items():
        key = mask_key(key, adapter_name)
        if _factor_pattern("B", None).search(key):
            found[key] = value
    return found


# ------------------------------------------------------------------------------------------- state on the model
def variant_state(model: nn.Module, adapter_name: str = "default") -> VariantState | None:
    """The variant state of ``adapter_name``, None for plain LoRA."""
    return get_extra(model, adapter_name, _KIND)


def variant_of(model: nn.Module, adapter_name: str = "default") -> str:
    state = variant_state(model, adapter_name)
    return state.variant if state is not None else "lora"


# ------------------------------------------------------------------------------------------- LoRI mechanics
def freeze_lora_A(model: nn.Module, adapter_name: str = "default") -> int:
    """Freeze every A factor of the adapter (LoRI's fixed random projection). Idempotent; call it again after
    anything that re-marks adapters trainable (PEFT's ``set_adapter``). Returns how many tensors were frozen."""
    factors = lora_factors(model, "A", adapter_name)
    if not factors:
        raise ValueError(f"No LoRA A factors for adapter {adapter_name!r}: is this an adapted (PEFT) model?")
    for param in factors.values():
        param.requires_grad_(False)
    _declare_frozen_a(model, adapter_name)
    return len(factors)


def _declare_frozen_a(model: nn.Module, adapter_name: str) -> None:
    """Declare the A factors frozen through PEFT's ``frozen_peft_weight_names`` (peft >= 0.20), so PEFT itself keeps
    them frozen when it re-marks adapters trainable (``set_adapter``...)."""
    for module in unwrap_model(model).modules():
        if not isinstance(module, BaseTunerLayer):
            continue
        names = tuple(n for n in module.adapter_layer_names if _factor_pattern("A", None).search(n))
        names = tuple(n for n in names if adapter_name in getattr(module, n, {}))
        if names:
            declared = dict(module.frozen_peft_weight_names)
            declared[adapter_name] = tuple(dict.fromkeys(declared.get(adapter_name, ()) + names))
            module.frozen_peft_weight_names = declared


def prepare_variant(
    model: nn.Module,
    variant: str,
    *,
    masks: Mapping[str, torch.Tensor] | None = None,
    density: float = DEFAULT_DENSITY,
    adapter_name: str = "default",
) -> VariantState | None:
    """Turn a freshly adapted model into ``variant`` (what ``apply_hellora(variant=...)`` calls).

    ``lori_s`` without masks keeps ``density`` as the planned share (so accounting is already right, e.g. on a
    meta-device model); its B factors refuse gradients until :func:`apply_masks` provides the masks.
    """
    check_variant_args(variant, masks, density)
    if variant == "lora":
        return None
    freeze_lora_A(model, adapter_name)
    state = VariantState(variant, float(density), lora_factors(model, "B", adapter_name))
    if not state.params:
        raise ValueError(f"No LoRA B factors for adapter {adapter_name!r}.")
    set_extra(model, adapter_name, _KIND, state)
    if variant == "lori_s":
        _hook_all(state)
        if masks is not None:
            apply_masks(model, masks, adapter_name)
    return state


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor], adapter_name: str = "default") -> VariantState:
    """Hold every B factor of the adapter to ``masks`` (True = trainable): masked entries are zeroed now and get no
    gradient from here on. Makes the adapter LoRI-S (A frozen) if it was not already."""
    state = variant_state(model, adapter_name)
    if state is None or state.variant != "lori_s":
        density = state.density if state is not None else DEFAULT_DENSITY
        state = prepare_variant(model, "lori_s", density=density, adapter_name=adapter_name)
    checked = _check_masks(state.params, masks)
    _hook_all(state)  # factors may have become trainable since the variant was prepared
    with torch.no_grad():
        for key, mask in checked.items():
            param = state.params[key]
            state.masks[key] = mask.to(param.device)
            param.masked_fill_(~state.masks[key], 0.0)
    total = sum(m.numel() for m in checked.values())
    state.density = sum(int(m.sum()) for m in checked.values()) / total
    return state


def _check_masks(params: Mapping[str, nn.Parameter], masks: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    missing = sorted(set(params) - set(masks))
    unknown = sorted(set(masks) - set(params))
    if missing or unknown:
        raise ValueError(
            f"Masks do not fit this adapter's B factors: missing {missing[:3]} ({len(missing)}), unknown "
            f"{unknown[:3]} ({len(unknown)}). Were they computed on the same model, hot map and targets?"
        )
    checked = {}
    for key, param in params.items():
        if hasattr(param, "ds_numel"):
            raise NotImplementedError("LoRI-S masks are not supported on DeepSpeed ZeRO-3 partitioned parameters.")
        mask = torch.as_tensor(masks[key])
        if tuple(mask.shape) != tuple(param.shape):
            raise ValueError(f"Mask {key!r} has shape {tuple(mask.shape)}, the factor {tuple(param.shape)}.")
        checked[key] = mask.bool()
    return checked


def _hook_all(state: VariantState) -> None:
    for key, param in state.params.items():
        if key not in state.hooks and param.requires_grad:
            state.hooks[key] = param.register_hook(_masked_grad(state, key))


def _masked_grad(state: VariantState, key: str) -> Callable[[torch.Tensor], torch.Tensor]:
    """A gradient hook that zeroes the masked entries' gradient (before it reaches ``.grad`` and the optimizer)."""

    def hook(grad: torch.Tensor) -> torch.Tensor:
        mask = state.masks.get(key)
        if mask is None:
            raise RuntimeError(
                f"LoRI-S factor {key!r} has no mask yet: compute masks from a finished LoRI-D adapter "
                "(lori_s_from_lori_d) and pass them to apply_hellora(masks=...) or apply_masks before training."
            )
        if mask.device != grad.device:
            mask = state.masks[key] = mask.to(grad.device)
        return grad.masked_fill(~mask, 0.0)

    return hook


def enforce_masks(model: nn.Module, adapter_name: str = "default") -> None:
    """Zero the masked B entries again. Not needed with standard optimizers (the gradient hooks suffice); a safety net
    for optimizers that move entries without a gradient (call it after each optimizer step)."""
    state = variant_state(model, adapter_name)
    if state is None or state.variant != "lori_s" or not state.masks:
        raise ValueError(f"Adapter {adapter_name!r} is not a LoRI-S adapter with masks.")
    with torch.no_grad():
        for key, mask in state.masks.items():
            state.params[key].masked_fill_(~mask.to(state.params[key].device), 0.0)


# ------------------------------------------------------------------------------------------- LoRI-S masks
def lori_s_masks(
    source: nn.Module | Mapping[str, torch.Tensor],
    density: float = DEFAULT_DENSITY,
    scope: str = "global",
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """Boolean masks keeping the top ``density`` of B entries by magnitude of a finished LoRI-D adapter.

    ``scope``: ``"global"`` one threshold over the whole model (LoRI's default), ``"layer"`` one per transformer
    layer, ``"module"`` one per adapted module (all B factors of an expert stack share one). Exactly
    ``round(density * n)`` entries are kept per group (ties broken by index), on CPU.
    """
    _check_density(density)
    _check_scope(scope)
    if isinstance(source, nn.Module):
        factors = {k: p.detach() for k, p in lora_factors(source, "B", adapter_name).items()}
    else:
        factors = _b_entries(source, adapter_name)
    if not factors:
        raise ValueError("No LoRA B factors found in the LoRI-D source.")
    groups: dict[str, list[str]] = {}
    for key in factors:
        groups.setdefault(_group_of(key, scope), []).append(key)
    masks: dict[str, torch.Tensor] = {}
    for keys in groups.values():
        masks.update(zip(keys, _top_magnitude([factors[k] for k in keys], density)))
    return masks


def _group_of(key: str, scope: str) -> str:
    if scope == "global":
        return ""
    if scope == "layer":
        match = re.search(r"(?:^|\.)(\d+)\.", key)  # first index in the path: the transformer layer
        return match.group(1) if match else ""
    return re.sub(r"\.lora_(?:[a-z_]+_)?B(?:\.weight)?$", "", key)


def _top_magnitude(tensors: list[torch.Tensor], density: float) -> list[torch.Tensor]:
    if any(t.device.type == "meta" for t in tensors):
        raise ValueError("LoRI-S masks need trained B values; got meta-device tensors.")
    flat = torch.cat([t.detach().reshape(-1).abs().float().cpu() for t in tensors])
    if not torch.isfinite(flat).all():
        raise ValueError("LoRI-D B factors hold NaN/inf; refusing to derive masks from them.")
    if not bool(flat.any()):
        raise ValueError("Every LoRI-D B entry is zero: the adapter was not trained, masks would be arbitrary.")
    keep = torch.zeros_like(flat, dtype=torch.bool)
    keep[torch.topk(flat, kept_count(flat.numel(), density), sorted=False).indices] = True
    return [m.view(t.shape) for m, t in zip(keep.split([t.numel() for t in tensors]), tensors)]


def lori_s_from_lori_d(
    lori_d: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor],
    density: float = DEFAULT_DENSITY,
    scope: str = "global",
    adapter_name: str = "default",
) -> dict[str, torch.Tensor]:
    """Stage-two masks from a LoRI-D adapter directory, model or state dict (the trainer's one call).

    Train LoRI-S on a fresh ``apply_hellora(..., variant="lori_s", masks=...)`` with the same hot map, and give it
    the LoRI-D projections with :func:`copy_lora_A` (the masks rank B entries against those A's).
    """
    if isinstance(lori_d, (str, os.PathLike)):
        path = Path(lori_d)
        recorded = read_variant_file(path).get("variant", "lora")
        if recorded != "lori_d":
            warnings.warn(f"{path} holds a {recorded!r} adapter, not LoRI-D; deriving LoRI-S masks anyway.")
        lori_d = _load_adapter_weights(path)
    return lori_s_masks(lori_d, density, scope, adapter_name)


def copy_lora_A(
    model: nn.Module,
    source: str | os.PathLike | nn.Module | Mapping[str, torch.Tensor],
    adapter_name: str = "default",
) -> None:
    """Copy the frozen A projections of a LoRI-D adapter into ``model`` (every A must match by key and shape)."""
    if isinstance(source, (str, os.PathLike)):
        source = _load_adapter_weights(Path(source))
    if isinstance(source, nn.Module):
        given = {k: p.detach() for k, p in lora_factors(source, "A", adapter_name).items()}
    else:
        pattern = _factor_pattern("A", None)
        given = {mask_key(k, adapter_name): v for k, v in source.items() if pattern.search(mask_key(k, adapter_name))}
    targets = lora_factors(model, "A", adapter_name)
    if set(given) != set(targets):
        raise ValueError(f"A factors differ between source and model: {sorted(set(given) ^ set(targets))[:3]}.")
    with torch.no_grad():
        for key, param in targets.items():
            if given[key].shape != param.shape:
                raise ValueError(f"A factor {key!r}: source {tuple(given[key].shape)}, model {tuple(param.shape)}.")
            param.copy_(given[key])


def _load_adapter_weights(path: Path) -> dict[str, torch.Tensor]:
    if not (path / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No adapter_config.json in {path}: not a saved adapter directory.")
    return load_peft_weights(str(path), device="cpu")


# ------------------------------------------------------------------------------------------- save / load
def save_masks(masks: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    from safetensors.torch import save_file

    tensors = {k: torch.as_tensor(v).detach().bool().cpu().contiguous() for k, v in masks.items()}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata={"format": "hellora_masks"}))


def load_masks(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return {k: v.bool() for k, v in load_file(str(path)).items()}


def read_variant_file(directory: str | os.PathLike) -> dict[str, Any]:
    """The recorded variant of an adapter directory ({} when none was recorded: plain LoRA)."""
    path = Path(directory) / VARIANT_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def save_variant(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write ``hellora_variant.json`` (and the LoRI-S masks) next to a saved adapter (nothing for plain LoRA)."""
    state = variant_state(model, adapter_name)
    if state is not None:
        Path(directory).mkdir(parents=True, exist_ok=True)
        state.save(Path(directory))


def restore_variant(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> VariantState | None:
    """Re-create the variant recorded in an adapter directory on a model that just loaded its weights."""
    directory = Path(directory)
    record = read_variant_file(directory)
    variant = record.get("variant", "lora")
    if variant not in VARIANTS:
        raise ValueError(f"{directory / VARIANT_FILE} records unknown variant {variant!r}.")
    if variant != "lori_s":
        return prepare_variant(model, variant, adapter_name=adapter_name)
    if not (directory / MASKS_FILE).is_file():
        raise FileNotFoundError(f"{directory} is a LoRI-S adapter but {MASKS_FILE} is missing.")
    masks = load_masks(directory / MASKS_FILE)
    density = float(record.get("density", DEFAULT_DENSITY))
    state = prepare_variant(model, "lori_s", density=density, adapter_name=adapter_name)
    checked = _check_masks(state.params, masks)
    for key, mask in checked.items():
        if bool(state.params[key].detach().cpu().masked_select(~mask).any()):
            raise ValueError(f"Saved factor {key!r} is nonzero outside its LoRI-S mask: adapter and masks disagree.")
    return apply_masks(model, checked, adapter_name)
