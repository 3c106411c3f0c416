"""Exports of a HELLoRA adapter for stacks that do not run hellora_trl code.

Two formats:

* :func:`merge_adapter` folds the adapter into the base weights and writes a plain transformers checkpoint.
  Any engine that serves the base model (vLLM, SGLang, TGI, llama.cpp after conversion) serves it as is.
* :func:`export_peft_target_parameters` rewrites the adapter in PEFT's own layout: the fused expert stacks are
  targeted with ``LoraConfig.target_parameters`` (PEFT's ``ParamWrapper``), so
  ``PeftModel.from_pretrained(base, out_dir)`` loads it with stock PEFT. That layout has LoRA factors for every
  expert, so cold experts are written as zeros: the file is larger than our compact hot-expert layout (see
  :func:`adapter_size_report` and docs/serving.md).

Both accept the base model as an instance or a path / hub id, plus the directory of a HELLoRA adapter saved with
``save_pretrained``; a HELLoRA ``PeftModel`` can be passed instead with ``adapter_dir=None``.
"""

from __future__ import annotations

import copy
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora.layer import Linear as LoraLinear
from peft.tuners.lora.layer import ParamWrapper
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from torch import nn

from .adapter import hot_map_from_model, load_hellora
from .constants import PEFT_PREFIX
from .expert_lora import HotExpertLoraLayer, RouterLoraLayer, expert_factor_shapes
from .registry import family_for, find_moe_layers
from .utils import atomic_dir, check_output_dir, load_causal_lm

__all__ = [
    "ExportError",
    "adapter_size_report",
    "export_peft_target_parameters",
    "merge_adapter",
]

ModelOrPath = nn.Module | str | os.PathLike
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class ExportError(ValueError):
    """The adapter (or model) uses something the requested export format cannot express."""


# --------------------------------------------------------------------------------------------- loading inputs
def _load_base(base_model: ModelOrPath) -> nn.Module:
    """A base model instance; paths and hub ids load in their saved dtype (``dtype="auto"``)."""
    if isinstance(base_model, nn.Module):
        return base_model
    if not isinstance(base_model, (str, os.PathLike)):
        raise TypeError(f"base_model must be a model, a path or a hub id, got {type(base_model).__name__}.")
    return load_causal_lm(base_model)


def _adapted_model(
    base_model: ModelOrPath, adapter_dir: str | os.PathLike | None, adapter_name: str, out_dir: str | os.PathLike,
    overwrite: bool = False,
) -> PeftModel:
    """The HELLoRA PeftModel to export: given directly, or rebuilt from ``adapter_dir`` on the base model.

    ``out_dir`` is checked before anything is loaded (:func:`~hellora_trl.utils.check_output_dir`): it may not be,
    hold or lie inside the inputs, be the current folder, a dangling link or a file, or be non-empty without
    ``overwrite``."""
    if not isinstance(base_model, (nn.Module, str, os.PathLike)):
        raise TypeError(f"base_model must be a model, a path or a hub id, got {type(base_model).__name__}.")
    if isinstance(base_model, PeftModel):
        if adapter_dir is not None:
            raise ValueError(
                "base_model is already a PeftModel; pass the plain base model with adapter_dir, or the adapted "
                "PeftModel with adapter_dir=None."
            )
        if adapter_name not in base_model.peft_config:
            raise ValueError(f"Adapter {adapter_name!r} not found; the model has {sorted(base_model.peft_config)}.")
        check_output_dir(out_dir, overwrite=overwrite, flag="overwrite=True")
        return base_model
    if adapter_dir is None:
        raise ValueError("adapter_dir is required unless base_model is an adapted PeftModel.")
    check_output_dir(out_dir, overwrite=overwrite, inputs=(adapter_dir, base_model), flag="overwrite=True")
    if not (Path(adapter_dir) / "adapter_config.json").is_file():
        raise FileNotFoundError(f"No adapter_config.json in {adapter_dir}: not a saved HELLoRA adapter directory.")
    return load_hellora(_load_base(base_model), adapter_dir, adapter_name=adapter_name)


# --------------------------------------------------------------------------------------------- merged export
def merge_adapter(
    base_model: ModelOrPath,
    adapter_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
    safe_merge: bool = True,
    max_shard_size: str | int = "5GB",
) -> Path:
    """Write base + adapter as one plain transformers checkpoint (``merge_and_unload`` then ``save_pretrained``).

    The result loads with ``AutoModelForCausalLM.from_pretrained`` and serves on any engine that supports the
    base architecture. A model instance passed in is merged in place (as PEFT's ``merge_and_unload`` does).
    The merge runs in the base weights' dtype: a bf16 base loses the low bits of small updates, as any merge does.
    """
    peft_model = _adapted_model(base_model, adapter_dir, adapter_name, out_dir, overwrite)
    _check_mergeable(peft_model)
    merged = peft_model.merge_and_unload(safe_merge=safe_merge, adapter_names=[adapter_name])
    leftovers = [n for n, m in merged.named_modules() if isinstance(m, BaseTunerLayer)]
    if leftovers:
        raise ExportError(f"merge_and_unload left adapter layers behind: {leftovers[:3]}.")
    with atomic_dir(out_dir, overwrite, inputs=(adapter_dir, base_model)) as tmp:
        merged.save_pretrained(tmp, max_shard_size=max_shard_size)
        _copy_tokenizer(base_model, tmp)
    return Path(out_dir)


def _check_mergeable(peft_model: PeftModel) -> None:
    """Quantized (MXFP4, bnb...) expert weights cannot take a dense delta: say so before touching them."""
    for name, param in peft_model.get_base_model().named_parameters():
        if "lora_" not in name and not (param.dtype.is_floating_point or param.dtype.is_complex):
            raise ExportError(
                f"Parameter {name} is stored as {param.dtype} (quantized); load the base model dequantized "
                "(e.g. GPT-OSS with Mxfp4Config(dequantize=True)) before merging."
            )


TOKENIZER_FILES = ("tokenizer_config.json", "tokenizer.json", "tokenizer.model")


def _has_tokenizer_files(source: str) -> bool:
    """Whether ``source`` (dir or hub id) ships a tokenizer: transformers 5 otherwise builds a placeholder one from
    the model type, which must not end up in a checkpoint meant for serving."""
    path = Path(source)
    if path.is_dir():
        return any((path / name).is_file() for name in TOKENIZER_FILES)
    from transformers.utils import cached_file

    for name in TOKENIZER_FILES:
        try:
            found = cached_file(
                source,
                name,
                _raise_exceptions_for_missing_entries=False,
                _raise_exceptions_for_connection_errors=False,
            )
        except OSError:
            found = None
        if found:
            return True
    return False


def _copy_tokenizer(base_model: ModelOrPath, out: Path) -> None:
    """Serving engines read the tokenizer from the model directory; carry it over when the base has one."""
    if not isinstance(base_model, (str, os.PathLike)):
        return
    source = str(base_model)
    if not _has_tokenizer_files(source):
        warnings.warn(f"{source} has no tokenizer files; add a tokenizer to {out} before serving.", stacklevel=3)
        return
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(source).save_pretrained(out)


# --------------------------------------------------------------------------------------------- PEFT layout export
@dataclass
class PeftFactor:
    """One LoRA pair in stock PEFT layout, with the scaling it was trained with (folded into B on write).

    ``kind`` is ``"module"`` (a ``target_modules`` entry, PEFT ``lora.Linear``) or ``"parameter"`` (a
    ``target_parameters`` entry, PEFT ``ParamWrapper``); ``target`` is the base-model-relative name.
    For 3-D expert stacks ``lora_A`` is (E*r, in) expert-major and ``lora_B`` is (out, r*E) rank-major, which is
    how ``ParamWrapper.get_delta_weight`` reshapes them.
    """

    kind: str
    target: str
    lora_A: torch.Tensor
    lora_B: torch.Tensor
    rank: int
    scaling: float


def _expert_stacks(layer: HotExpertLoraLayer, adapter: str) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-hot-expert (A (k, r', in), B (k, out, r')) for each fused parameter of the experts module.

    Separate gate/up factors of rank r become one rank-2r pair on ``gate_up_proj``: A stacks [A_gate; A_up],
    B is block-diagonal, its rows placed the way the family lays out gate_up (concatenated or interleaved).
    """
    names = layer.factor_names

    def pair(proj: str) -> tuple[torch.Tensor, torch.Tensor]:
        return getattr(layer, f"lora_{proj}_A")[adapter].detach(), getattr(layer, f"lora_{proj}_B")[adapter].detach()

    stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {"down_proj": pair("down")}
    if "gate_up" in names:
        stacks["gate_up_proj"] = pair("gate_up")
    elif "gate" in names:
        (a_gate, b_gate), (a_up, b_up) = pair("gate"), pair("up")
        zeros = torch.zeros_like(b_gate)
        b_gate, b_up = torch.cat([b_gate, zeros], dim=-1), torch.cat([torch.zeros_like(b_up), b_up], dim=-1)
        if layer.is_concatenated:
            b = torch.cat([b_gate, b_up], dim=1)
        else:
            b = torch.stack([b_gate, b_up], dim=2).flatten(1, 2)
        stacks["gate_up_proj"] = (torch.cat([a_gate, a_up], dim=1), b)
    else:
        stacks["up_proj"] = pair("up")
    return stacks


def _to_peft_stack(a: torch.Tensor, b: torch.Tensor, hot: list[int], num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Scatter hot-expert factors into a zero (E, ...) stack and flatten it the way ParamWrapper reads it."""
    k, r, fan_in = a.shape
    fan_out = b.shape[1]
    full_a = a.new_zeros(num_experts, r, fan_in)
    full_b = b.new_zeros(num_experts, fan_out, r)
    full_a[hot] = a
    full_b[hot] = b
    return full_a.reshape(num_experts * r, fan_in), full_b.permute(1, 2, 0).reshape(fan_out, r * num_experts)


def _peft_stack_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, num_experts: int, experts: list[int]) -> torch.Tensor:
    """(len(experts), out, in) B @ A read back from the flattened layout (PEFT's reshape, written independently)."""
    a = lora_a.reshape(num_experts, -1, lora_a.shape[-1])[experts]
    b = lora_b.reshape(lora_b.shape[0], -1, num_experts).permute(2, 0, 1)[experts]
    return torch.bmm(b.double(), a.double())


def _expert_factors(name: str, layer: HotExpertLoraLayer, adapter: str) -> list[PeftFactor]:
    """The whole expert stack in PEFT layout, checked against the layer's own merge deltas."""
    hot = layer.hot_experts(adapter)
    scaling = float(layer.scaling[adapter])
    with torch.no_grad():
        reference = layer.delta_weights(adapter)
    factors = []
    for param, (a, b) in _expert_stacks(layer, adapter).items():
        lora_a, lora_b = _to_peft_stack(a, b, hot, layer.num_experts)
        delta = _peft_stack_delta(lora_a, lora_b, layer.num_experts, hot) * scaling
        if layer.is_transposed:
            delta = delta.transpose(1, 2)
        expected = reference[param]
        # delta_weights is cast to the base dtype (bf16 on real models): compare at that precision.
        tol = max(1e-5, 4 * torch.finfo(expected.dtype).eps)
        expected = expected.double()
        scale = float(expected.abs().max()) if expected.numel() else 0.0
        if delta.shape != expected.shape or not torch.allclose(delta, expected, rtol=tol, atol=tol * scale + 1e-12):
            raise ExportError(f"{name}.{param}: PEFT-layout factors do not reproduce the adapter's delta.")
        factors.append(PeftFactor("parameter", f"{name}.{param}", lora_a, lora_b, a.shape[1], scaling))
    return factors


def _linear_factor(name: str, layer: BaseTunerLayer, adapter: str, kind: str) -> PeftFactor:
    """A plain LoRA pair (PEFT lora.Linear or our RouterLoraLayer) on an (out, in) weight."""
    if isinstance(layer, LoraLinear):
        unsupported = [
            what
            for what, flag in (
                ("DoRA", layer.use_dora.get(adapter, False)),
                ("lora_bias", layer.lora_bias.get(adapter, False)),
                ("fan_in_fan_out", layer.fan_in_fan_out),
            )
            if flag
        ]
        if unsupported:
            raise ExportError(f"{name}: {', '.join(unsupported)} cannot be expressed on a PEFT ParamWrapper.")
    a = layer.lora_A[adapter].weight.detach()
    b = layer.lora_B[adapter].weight.detach()
    target = f"{name}.weight" if kind == "parameter" else name
    return PeftFactor(kind, target, a, b, a.shape[0], float(layer.scaling[adapter]))


def collect_peft_factors(peft_model: PeftModel, adapter: str = "default") -> list[PeftFactor]:
    """Every LoRA pair of a HELLoRA model, in stock-PEFT layout.

    Anything inside an MoE block (experts, router, shared experts) becomes a ``target_parameters`` entry: PEFT
    0.21 rewrites ``target_modules`` that end in ``gate``/``gate_proj``/``up_proj``/``down_proj`` into fused expert
    targets on load for several families, which would mis-target router and shared-expert adapters. Attention
    and other linear layers stay ``target_modules``.
    """
    base = peft_model.get_base_model()
    blocks = [layer.block_name for layer in find_moe_layers(base)]
    _check_no_auxiliary_modules(peft_model, adapter)
    factors: list[PeftFactor] = []
    for name, module in base.named_modules():
        if not isinstance(module, BaseTunerLayer) or adapter not in getattr(module, "r", {}):
            continue
        in_block = any(name == b or name.startswith(b + ".") for b in blocks)
        if isinstance(module, HotExpertLoraLayer):
            factors += _expert_factors(name, module, adapter)
        elif isinstance(module, RouterLoraLayer):
            factors.append(_linear_factor(name, module, adapter, "parameter"))
        elif isinstance(module, LoraLinear) and isinstance(module.get_base_layer(), nn.Linear):
            factors.append(_linear_factor(name, module, adapter, "parameter" if in_block else "module"))
        else:
            raise ExportError(f"{name}: {type(module).__name__} has no PEFT target_parameters equivalent.")
    if not factors:
        raise ExportError(f"Adapter {adapter!r} holds no LoRA layers to export.")
    return factors


def _check_no_auxiliary_modules(peft_model: PeftModel, adapter: str) -> None:
    config = peft_model.peft_config[adapter]
    for field in ("modules_to_save", "trainable_token_indices"):
        if getattr(config, field, None):
            raise ExportError(f"{field} is set; the PEFT-layout export covers LoRA only. Use merge_adapter instead.")


def _export_config(source: LoraConfig, factors: list[PeftFactor]) -> LoraConfig:
    """A stock LoraConfig naming every target explicitly; off-rank targets (fused gate_up) get their own rank."""
    rank_pattern: dict[str, int] = {}
    alpha_pattern: dict[str, float] = {}
    for f in factors:
        if f.rank != source.r:
            key = _pattern_key(f)
            rank_pattern[key] = f.rank
            alpha_pattern[key] = source.lora_alpha * f.rank / source.r
    modules = sorted(f.target for f in factors if f.kind == "module")
    parameters = sorted(f.target for f in factors if f.kind == "parameter")
    return LoraConfig(
        r=source.r,
        lora_alpha=source.lora_alpha,
        lora_dropout=0.0,
        bias="none",
        use_rslora=False,
        target_modules=modules or None,
        target_parameters=parameters,
        rank_pattern=rank_pattern,
        alpha_pattern=alpha_pattern,
        task_type=source.task_type,
        base_model_name_or_path=source.base_model_name_or_path,
        revision=source.revision,
        inference_mode=True,
    )


def _pattern_key(factor: PeftFactor) -> str:
    """A rank/alpha pattern matching exactly this target's key (PEFT matches patterns as regexes).

    PEFT 0.21 applies patterns to parameter targets but, when it warns about unused patterns, checks only
    module targets, so loading prints a spurious "keys did not match ... ignored" warning for them. The rank is
    applied all the same: a wrong rank could not load (shape mismatch) and the tests compare logits.
    """
    return re.escape(factor.target)


def _config_scaling(config: LoraConfig, factor: PeftFactor) -> float:
    key = _pattern_key(factor)
    r = config.rank_pattern.get(key, config.r)
    return config.alpha_pattern.get(key, config.lora_alpha) / r


def _skeleton_keys(model: nn.Module, config: LoraConfig) -> dict[str, tuple[str, dict[str, torch.Size]]]:
    """Attach ``config`` with stock PEFT to a weightless (meta) copy of the model and read back, per target,
    the saved-key prefix and the factor shapes PEFT expects. This is what ``PeftModel.from_pretrained`` will
    build, PEFT's own transformers-v5 config rewrites included."""
    with torch.device("meta"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        skeleton = type(model)(copy.deepcopy(model.config))
        skeleton = get_peft_model(skeleton, copy.deepcopy(config))
    state = get_peft_model_state_dict(skeleton)
    keys: dict[str, tuple[str, dict[str, torch.Size]]] = {}
    for name, module in skeleton.named_modules():
        if not isinstance(module, BaseTunerLayer) or not hasattr(module, "lora_A"):
            continue
        plain = re.sub(r"\.base_layer(?=\.|$)", "", name).removeprefix(PEFT_PREFIX)
        target = f"{plain}.{module.parameter_name}" if isinstance(module, ParamWrapper) else plain
        shapes = {ab: state[f"{name}.{ab}.weight"].shape for ab in ("lora_A", "lora_B")}
        keys[target] = (name, shapes)
    return keys


def peft_state_dict(model: nn.Module, config: LoraConfig, factors: list[PeftFactor]) -> dict[str, torch.Tensor]:
    """Saved-adapter tensors for ``factors`` under ``config``, keys and shapes checked against stock PEFT."""
    expected = _skeleton_keys(model, config)
    missing = sorted(set(expected) - {f.target for f in factors})
    unknown = sorted({f.target for f in factors} - set(expected))
    if missing or unknown:
        raise ExportError(f"Stock PEFT would target {missing[:3]} (not exported) and not {unknown[:3]}.")
    tensors: dict[str, torch.Tensor] = {}
    for f in factors:
        prefix, shapes = expected[f.target]
        ratio = f.scaling / _config_scaling(config, f)
        lora_b = f.lora_B if ratio == 1.0 else f.lora_B * ratio
        for ab, tensor in (("lora_A", f.lora_A), ("lora_B", lora_b)):
            if tensor.shape != shapes[ab]:
                raise ExportError(f"{f.target} {ab}: exported {tuple(tensor.shape)}, PEFT expects {tuple(shapes[ab])}.")
            tensors[f"{prefix}.{ab}.weight"] = tensor.detach().to("cpu").contiguous()
    return tensors


def export_peft_target_parameters(
    base_model: ModelOrPath,
    adapter_dir: str | os.PathLike | None,
    out_dir: str | os.PathLike,
    *,
    adapter_name: str = "default",
    overwrite: bool = False,
) -> Path:
    """Write the adapter in stock PEFT layout (``target_parameters`` expert stacks, zeros for cold experts).

    ``PeftModel.from_pretrained(base, out_dir)`` loads it without hellora_trl. Separate gate/up factors of rank r
    become one rank-2r pair on ``gate_up_proj`` (exact: block-diagonal B). The hot map is kept in the
    safetensors metadata (``hellora_hot_experts``) for reference.
    """
    peft_model = _adapted_model(base_model, adapter_dir, adapter_name, out_dir, overwrite)
    source = peft_model.peft_config[adapter_name]
    if not isinstance(source, LoraConfig):
        raise ExportError(f"Adapter {adapter_name!r} is {type(source).__name__}, not LoRA.")
    factors = collect_peft_factors(peft_model, adapter_name)
    config = _export_config(source, factors)
    tensors = peft_state_dict(peft_model.get_base_model(), config, factors)
    metadata = {"format": "pt", "hellora_hot_experts": json.dumps(hot_map_from_model(peft_model, adapter_name))}
    from safetensors.torch import save_file

    with atomic_dir(out_dir, overwrite, inputs=(adapter_dir, base_model)) as tmp:
        config.save_pretrained(str(tmp))
        save_file(tensors, str(tmp / ADAPTER_WEIGHTS), metadata=metadata)
    return Path(out_dir)


# --------------------------------------------------------------------------------------------- sizes
def adapter_size_report(
    config,
    k: int | Mapping[str, int],
    r: int = 32,
    *,
    fuse_gate_up: bool = False,
    components: str = "all",
    attention_targets: tuple[str, ...] | None = None,
) -> dict[str, int]:
    """Parameter counts of the compact HELLoRA adapter, its PEFT-layout export and the merged model.

    Computed on a weightless (meta) model built from ``config`` so it works for full-size configs
    (OLMoE-1B-7B...) on any machine. ``k`` is hot experts per layer (an int or per-layer mapping). Shared
    experts are not counted (families without them are exact).
    """
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(copy.deepcopy(config))
    family = family_for(model)
    layers = find_moe_layers(model, family)
    compact = peft = 0
    for layer in layers:
        hot = k[layer.name] if isinstance(k, Mapping) else k
        shapes = expert_factor_shapes(layer.experts, fuse_gate_up)
        compact += hot * sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes.values())
        peft += layer.num_experts * _peft_expert_params(shapes, r)
        if components in ("all", "router"):
            out_f, in_f = layer.router.weight.shape
            compact += r * (in_f + out_f)
            peft += r * (in_f + out_f)
    if components == "all":
        targets = attention_targets or family.attention_targets
        blocks = [layer.block_name for layer in layers]
        for name, module in model.named_modules():
            if isinstance(module, nn.Linear) and name.rsplit(".", 1)[-1] in targets:
                if not any(name.startswith(b + ".") for b in blocks):
                    n = r * (module.in_features + module.out_features)
                    compact += n
                    peft += n
    merged = sum(p.numel() for p in model.parameters())
    return {"compact": compact, "peft_target_parameters": peft, "merged_model": merged}


def _peft_expert_params(shapes: Mapping[str, tuple[int, int]], r: int) -> int:
    """Per-expert PEFT factors: separate gate/up become one rank-2r gate_up pair with a block-diagonal B, whose
    zero blocks are stored too."""
    if "gate" in shapes:
        fan_in, half = shapes["gate"]
        gate_up = 2 * r * (fan_in + 2 * half)
        return gate_up + r * sum(shapes["down"])
    return sum(r * (fan_in + fan_out) for fan_in, fan_out in shapes.values())
