"""Axolotl plugin: HELLoRA as an Axolotl adapter type.

In the Axolotl YAML::

    plugins:
      - hellora_trl.integrations.axolotl.HELLoRAPlugin
    adapter: hellora          # instead of lora
    lora_r: 32
    lora_alpha: 64
    hellora_k: 8              # flat hellora_* keys, validated by HELLoRAArgs

Axolotl (tested against the hook contract of 0.19) builds the base model, then asks plugins for an adapter it
does not know (``BasePlugin.load_adapter``). The plugin then profiles routing on a seeded slice of the
prepared training set (or loads ``hellora_profile_path``), selects the hot experts and returns the HELLoRA
``PeftModel``; Axolotl's own trainer trains it and ``save_pretrained`` writes the compact adapter. The routing
profile and hot map go to ``output_dir/hellora_profile.json``.

Axolotl is imported only when ``HELLoRAPlugin`` is first accessed, so this module (and ``HELLoRAArgs``) can be
imported without it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal, Mapping

from peft import LoraConfig, PeftModel
from pydantic import BaseModel, Field

from ..adapter import apply_hellora, load_hellora
from ..profiling import ExpertProfile, profile_experts
from ..selection import HotMap, select_hot_experts
from .profiling import lora_warmup_profile

ADAPTER = "hellora"
PLUGIN_PATH = f"{__name__}.HELLoRAPlugin"
ARGS_PATH = f"{__name__}.HELLoRAArgs"
PROFILE_FILE = "hellora_profile.json"  # same name and format as HELLoRATrainer's
INSTALL_HINT = (
    "HELLoRAPlugin needs Axolotl: `pip install axolotl` (in an environment whose torch/transformers/peft satisfy "
    "hellora-trl), then list hellora_trl.integrations.axolotl.HELLoRAPlugin under `plugins:`."
)


class HELLoRAArgs(BaseModel):
    """The plugin's flat YAML keys (merged into Axolotl's config schema, so typos and bad values fail early)."""

    hellora_k: int | None = Field(default=None, ge=1, description="Hot experts per MoE layer (None: family default).")
    hellora_selection: Literal["layer", "model", "cold", "random", "mass"] = Field(
        default="layer", description="Hot-expert selection: per-layer top-k (the paper) or an ablation."
    )
    hellora_profile_mode: Literal["lora_warmup", "forward"] = Field(
        default="lora_warmup", description="Short LoRA warm-up on all experts while counting (paper), or forward only."
    )
    hellora_warmup_fraction: float = Field(default=0.1, gt=0.0, le=1.0, description="Share of the training set profiled.")
    hellora_warmup_epochs: float = Field(default=1.0, gt=0.0, description="Warm-up epochs over the slice (lora_warmup).")
    hellora_components: Literal["all", "router", "experts"] = Field(
        default="all", description="all = attention + router + hot experts; router = router + hot experts; experts."
    )
    hellora_profile_path: str | None = Field(
        default=None, description="Existing profile JSON: loaded, profiling skipped. Missing: the new profile is written."
    )
    hellora_profile_batch_size: int | None = Field(default=None, ge=1, description="Default: micro_batch_size.")
    hellora_mass: float = Field(default=0.5, gt=0.0, le=1.0, description="'mass' selection: routing share per layer.")
    hellora_fuse_gate_up: bool = False
    hellora_include_shared_experts: bool = True
    hellora_seed: int | None = Field(default=None, description="Seed of the slice and random selection (default: seed).")


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """Axolotl's DictDefault answers None for missing keys; plain dicts and namespaces work too."""
    value = cfg.get(key) if isinstance(cfg, Mapping) else getattr(cfg, key, None)
    return default if value is None else value


def hellora_args(cfg: Any) -> HELLoRAArgs:
    """The hellora_* settings of a (parsed or raw) Axolotl config, validated."""
    return HELLoRAArgs(**{name: _get(cfg, name) for name in HELLoRAArgs.model_fields if _get(cfg, name) is not None})


def lora_config_from_cfg(cfg: Any) -> LoraConfig:
    """The LoRA shape from Axolotl's usual lora_* keys; HELLoRA decides where the expert adapters go."""
    if _get(cfg, "lora_target_parameters"):
        raise ValueError(
            "lora_target_parameters adapts every expert; with adapter: hellora the plugin places expert adapters. "
            "Remove lora_target_parameters (lora_target_modules picks the attention projections)."
        )
    for key in ("peft_use_dora", "lora_modules_to_save", "peft_layers_to_transform"):
        if _get(cfg, key):
            raise ValueError(f"{key} is not supported with adapter: hellora.")
    targets = "all-linear" if _get(cfg, "lora_target_linear") else _get(cfg, "lora_target_modules")
    return LoraConfig(
        r=int(_get(cfg, "lora_r", 32)),
        lora_alpha=_get(cfg, "lora_alpha", 64),
        lora_dropout=float(_get(cfg, "lora_dropout", 0.0)),
        target_modules=targets,
        use_rslora=bool(_get(cfg, "peft_use_rslora", False)),
        rank_pattern=dict(_get(cfg, "lora_rank_pattern", {})),
        alpha_pattern=dict(_get(cfg, "lora_alpha_pattern", {})),
        task_type="CAUSAL_LM",
    )


def _is_main_process() -> bool:
    import torch.distributed as dist

    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


class HELLoRAPluginMixin:
    """The plugin's behaviour, independent of Axolotl's base class (which is mixed in lazily)."""

    def get_input_args(self) -> str:
        return ARGS_PATH

    def register(self, cfg: dict) -> None:
        if cfg.get("adapter") != ADAPTER:
            import warnings

            warnings.warn(f"HELLoRAPlugin is listed but adapter is {cfg.get('adapter')!r}; set `adapter: {ADAPTER}`.")

    def get_adapter_capabilities(self) -> list:
        from axolotl.integrations.base import AdapterCapabilities

        return [AdapterCapabilities(name=ADAPTER, lora_like=True)]

    def get_trainer_cls(self, cfg: Any) -> None:
        """Axolotl's own trainer trains the returned PeftModel; no custom trainer class is needed."""
        return None

    def load_adapter(self, model, cfg, inference: bool = False, config_only: bool = False):
        """Axolotl's adapter hook: profile -> select -> attach (or reload ``lora_model_dir``)."""
        if _get(cfg, "adapter") != ADAPTER:
            return None
        lora_config = lora_config_from_cfg(cfg)
        if config_only:
            return None, lora_config
        if _get(cfg, "lora_model_dir"):
            peft_model = load_hellora(model, _get(cfg, "lora_model_dir"), is_trainable=not inference)
            return peft_model, peft_model.peft_config["default"]
        args = hellora_args(cfg)
        if _get(cfg, "gradient_checkpointing") and hasattr(model, "gradient_checkpointing_enable"):
            # Before profiling, so the LoRA warm-up runs with the memory profile of the real run.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_get(cfg, "gradient_checkpointing_kwargs"))
        profile = self.routing_profile(model, cfg, args, lora_config)
        hot = select_hot_experts(
            profile, k=args.hellora_k, strategy=args.hellora_selection, seed=self._seed(cfg, args), mass=args.hellora_mass
        )
        self._save_profile(cfg, args, profile, hot)
        peft_model = apply_hellora(
            model,
            hot,
            lora_config,
            components=args.hellora_components,
            fuse_gate_up=args.hellora_fuse_gate_up,
            include_shared_experts=args.hellora_include_shared_experts,
        )
        self.hot_experts = hot
        return peft_model, lora_config

    # ------------------------------------------------------------------------------------------- profiling
    @staticmethod
    def _seed(cfg: Any, args: HELLoRAArgs) -> int:
        return args.hellora_seed if args.hellora_seed is not None else int(_get(cfg, "seed", 42))

    def routing_profile(self, model, cfg: Any, args: HELLoRAArgs, lora_config: LoraConfig) -> ExpertProfile:
        """A saved profile when ``hellora_profile_path`` exists, else one taken now on the warm-up slice."""
        if args.hellora_profile_path and Path(args.hellora_profile_path).is_file():
            profile = ExpertProfile.load(args.hellora_profile_path)
            profile.check_matches(model)
            return profile
        from ..data import sample_fraction

        dataset = self.training_dataset(cfg)
        seed = self._seed(cfg, args)
        rows = sample_fraction(dataset, args.hellora_warmup_fraction, seed)
        batch_size = args.hellora_profile_batch_size or int(_get(cfg, "micro_batch_size", 1))
        source = {
            "mode": args.hellora_profile_mode,
            "warmup_fraction": args.hellora_warmup_fraction,
            "warmup_rows": len(rows),
            "train_rows": len(dataset),
            "seed": seed,
            "framework": "axolotl",
        }
        if args.hellora_profile_mode == "forward":
            return profile_experts(model, rows, batch_size=batch_size, progress=_is_main_process(), source=source)
        return lora_warmup_profile(
            model,
            rows,
            lora_config,
            epochs=args.hellora_warmup_epochs,
            learning_rate=float(_get(cfg, "learning_rate", 2e-4)),
            batch_size=batch_size,
            seed=seed,
            components=args.hellora_components,
            fuse_gate_up=args.hellora_fuse_gate_up,
            include_shared_experts=args.hellora_include_shared_experts,
            source=source,
        )

    def training_dataset(self, cfg: Any):
        """The tokenized training set exactly as Axolotl prepared it (read back from its prepared-dataset cache)."""
        try:
            from axolotl.common.datasets import load_datasets
        except ImportError as exc:  # pragma: no cover - Axolotl present but without this helper
            raise ImportError(f"{INSTALL_HINT} (axolotl.common.datasets.load_datasets not found)") from exc
        dataset = load_datasets(cfg=cfg).train_dataset
        if not hasattr(dataset, "__len__"):
            raise ValueError(
                "HELLoRA samples its profiling slice from a map-style dataset; with streaming datasets profile "
                "beforehand and set hellora_profile_path."
            )
        return dataset

    def _save_profile(self, cfg: Any, args: HELLoRAArgs, profile: ExpertProfile, hot: HotMap) -> None:
        if not _is_main_process():
            return
        extra = {
            "hot_experts": hot,
            "selection": {
                "strategy": args.hellora_selection,
                "k": args.hellora_k,
                "per_layer_k": {name: len(ids) for name, ids in hot.items()},
                "components": args.hellora_components,
            },
        }
        targets = [Path(_get(cfg, "output_dir", ".")) / PROFILE_FILE]
        if args.hellora_profile_path and not Path(args.hellora_profile_path).is_file():
            targets.append(Path(args.hellora_profile_path))
        for path in targets:
            path.parent.mkdir(parents=True, exist_ok=True)
            profile.save(path, extra=extra)


def _plugin_class() -> type:
    """``HELLoRAPluginMixin`` on Axolotl's ``BasePlugin``; a clear ImportError when Axolotl is missing or too old."""
    try:
        from axolotl.integrations.base import BasePlugin
    except ImportError as exc:
        raise ImportError(INSTALL_HINT) from exc
    try:
        from axolotl.integrations.base import AdapterCapabilities  # noqa: F401
    except ImportError as exc:
        raise ImportError(
            "This Axolotl has no plugin adapter loaders (axolotl.integrations.base.AdapterCapabilities); "
            "HELLoRAPlugin needs a release with BasePlugin.load_adapter (tested with 0.19)."
        ) from exc
    return type(
        "HELLoRAPlugin",
        (HELLoRAPluginMixin, BasePlugin),
        {"__module__": __name__, "__doc__": "HELLoRA hot-expert LoRA as Axolotl's `adapter: hellora`."},
    )


def __getattr__(name: str) -> Any:
    """Build ``HELLoRAPlugin`` on first access (PEP 562), so importing this module never imports Axolotl."""
    if name == "HELLoRAPlugin":
        cls = _plugin_class()
        globals()[name] = cls
        return cls
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# HELLoRAPlugin is left out of __all__ so that `import *` does not import Axolotl.
__all__ = ["ADAPTER", "HELLoRAArgs", "HELLoRAPluginMixin", "hellora_args", "lora_config_from_cfg"]
