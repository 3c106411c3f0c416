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
profile and hot map go to ``output_dir/hellora_profile.json``; a resumed run (``resume_from_checkpoint``, or
``auto_resume_from_checkpoints`` with a checkpoint in ``output_dir``) reuses that file instead of profiling again.
The plugin logs what it does (on Axolotl's logger) before and after profiling. With ``adapter: hellora`` the plugin makes
``axolotl merge-lora`` use its exact (legacy) merge, which loads the adapter through the plugin, and refuses the
memory-efficient one, which would drop the hot-expert updates (:func:`exact_merge_method`).

With ``rl: dpo``, ``ipo`` or ``grpo`` the plugin runs :class:`~hellora_trl.rl_trainers.HELLoRADPOTrainer` /
``HELLoRAGRPOTrainer`` instead (Axolotl's RL path skips ``load_adapter`` for DPO and builds a plugin's trainer class
without the model; see :func:`rl_trainer_class` and docs/axolotl.md).

Axolotl is imported only when ``HELLoRAPlugin`` is first accessed, so this module (and ``HELLoRAArgs``) can be
imported without it.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
import typing
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Literal, Mapping

from peft import LoraConfig
from pydantic import BaseModel, Field, create_model, model_validator

from ..adapter import apply_hellora, load_hellora
from ..config import HELLoRAConfig, hellora_defaults, validate_hellora_fields
from ..constants import PROFILE_FILE
from ..distributed import is_main_process
from ..profile import ExpertProfile
from ..profiling import profile_experts, warmup_row_cap, warmup_slice
from ..selection import SelectionSettings, load_plan, plan_hot_experts, save_plan
from .warmup import lora_warmup_profile

ADAPTER = "hellora"
# A child of Axolotl's own logger, so the plugin's lines appear with Axolotl's (its handler and INFO level).
logger = logging.getLogger("axolotl.integrations.hellora")
PLUGIN_PATH = f"{__name__}.HELLoRAPlugin"
ARGS_PATH = f"{__name__}.HELLoRAArgs"
INSTALL_HINT = (
    "HELLoRAPlugin needs Axolotl: `pip install axolotl` (in an environment whose torch/transformers/peft satisfy "
    "hellora-trl), then list hellora_trl.integrations.axolotl.HELLoRAPlugin under `plugins:`."
)


# The HELLoRAConfig knobs the plugin honours (Axolotl owns the training loop, so LoRI variants, dynamic rank and
# plots stay with HELLoRATrainer). Types, defaults, choices and help come from HELLoRAConfig: one option schema.
PLUGIN_FIELDS = (
    "hellora_k",
    "hellora_selection",
    "hellora_profile_mode",
    "hellora_warmup_fraction",
    "hellora_warmup_epochs",
    "hellora_components",
    "hellora_profile_path",
    "hellora_reselect",
    "hellora_seed",
    "hellora_mass",
    "hellora_min_k",
    "hellora_max_k",
    "hellora_profile_batch_size",
    "hellora_fuse_gate_up",
    "hellora_include_shared_experts",
)


def _plugin_field(field: dataclasses.Field, annotation: Any) -> tuple[Any, Any]:
    choices = field.metadata.get("choices")
    if choices:
        annotation = Literal[tuple(choices)]
    return annotation, Field(default=field.default, description=field.metadata.get("help"))


# Axolotl's `merge-lora` dispatches on cfg.merge_method: its default memory-efficient merge reads adapter tensors by
# stock PEFT names and silently skips HELLoRA's hot-expert factors (rc 0, "Applied LoRA to 10/69 tensors", the
# experts left as in the base); the legacy merge loads the adapter through this plugin (lora_model_dir ->
# load_hellora -> merge_and_unload) and is exact. With adapter: hellora the plugin makes legacy the default and
# refuses an explicit memory-efficient merge.
EXACT_MERGE_METHOD = "legacy"
MERGE_HINT = (
    "merge_method {method!r} drops HELLoRA's hot-expert updates (Axolotl's memory-efficient merge does not know the "
    "compact adapter layout). Merge with `axolotl merge-lora <config.yml> --merge-method legacy` (the plugin's "
    "default with adapter: hellora), or `hellora export --format merged --model_name_or_path <base> --adapter "
    "<output_dir> --output_dir <merged>`."
)


def exact_merge_method(cfg: Any) -> Any:
    """With ``adapter: hellora``: set ``merge_method`` to the exact (legacy) merge when it is unset, refuse a
    memory-efficient one (ValueError naming the commands that work). Mutates and returns ``cfg`` (a dict-like)."""
    if not isinstance(cfg, Mapping) or cfg.get("adapter") != ADAPTER:
        return cfg
    method = cfg.get("merge_method")
    normalized = str(method or "").strip().lower().replace("-", "_")
    if not normalized:
        cfg["merge_method"] = EXACT_MERGE_METHOD
    elif normalized not in ("legacy", "standard"):
        raise ValueError(MERGE_HINT.format(method=method))
    return cfg


class _HELLoRAArgsBase(BaseModel):
    @model_validator(mode="before")
    @classmethod
    def _exact_merge(cls, data: Any) -> Any:
        """In Axolotl's merged config schema this sees the whole config: make the default merge exact."""
        return exact_merge_method(dict(data)) if isinstance(data, Mapping) else data

    @model_validator(mode="after")
    def _check(self):
        validate_hellora_fields(SimpleNamespace(**{**hellora_defaults(), **self.model_dump()}))
        return self


def _derive_args() -> type[BaseModel]:
    hints = typing.get_type_hints(HELLoRAConfig)
    fields = {f.name: f for f in dataclasses.fields(HELLoRAConfig)}
    return create_model(
        "HELLoRAArgs",
        __base__=_HELLoRAArgsBase,
        __module__=__name__,
        __doc__="The plugin's flat YAML keys (merged into Axolotl's config schema, so typos and bad values fail "
        "early); derived from HELLoRAConfig's hellora_* fields.",
        **{name: _plugin_field(fields[name], hints[name]) for name in PLUGIN_FIELDS},
    )


HELLoRAArgs = _derive_args()


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


class HELLoRAPluginMixin:
    """The plugin's behaviour, independent of Axolotl's base class (which is mixed in lazily)."""

    def get_input_args(self) -> str:
        return ARGS_PATH

    def register(self, cfg: dict) -> None:
        if cfg.get("adapter") != ADAPTER:
            import warnings

            warnings.warn(f"HELLoRAPlugin is listed but adapter is {cfg.get('adapter')!r}; set `adapter: {ADAPTER}`.")
            return
        exact_merge_method(cfg)  # also on the raw config, before Axolotl validates it

    def get_adapter_capabilities(self) -> list:
        from axolotl.integrations.base import AdapterCapabilities

        return [AdapterCapabilities(name=ADAPTER, lora_like=True)]

    def get_trainer_cls(self, cfg: Any):
        """SFT: None (Axolotl's own trainer trains the PeftModel that :meth:`load_adapter` returned). ``rl: dpo``,
        ``ipo`` and ``grpo``: :class:`~hellora_trl.rl_trainers.HELLoRADPOTrainer` / ``HELLoRAGRPOTrainer`` fed
        from what the plugin kept (see :func:`rl_trainer_class`); other ``rl`` values are refused."""
        if _get(cfg, "adapter") != ADAPTER or not rl_kind(cfg):
            return None
        return rl_trainer_class(self, cfg)

    def post_model_load(self, cfg: Any, model) -> None:
        """On the RL path Axolotl instantiates a plugin's trainer class without the model (HFRLTrainerBuilder passes
        no positional arguments to it), so the first model loaded for training is kept here for that class."""
        if _get(cfg, "adapter") == ADAPTER and rl_kind(cfg) and getattr(self, "rl_model", None) is None:
            self.rl_model = model

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
        if rl_kind(cfg):
            # rl: grpo reaches this hook (dpo/ipo do not: Axolotl builds only a LoraConfig for them). The RL trainer
            # profiles the prompts and builds the adapter after construction, so the bare model goes on.
            return model, lora_config
        args = hellora_args(cfg)
        if _get(cfg, "gradient_checkpointing") and hasattr(model, "gradient_checkpointing_enable"):
            # Before profiling, so the LoRA warm-up runs with the memory profile of the real run.
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=_get(cfg, "gradient_checkpointing_kwargs"))
        started = time.perf_counter()
        profile, stored = self.routing_profile(model, cfg, args, lora_config)
        settings = SelectionSettings.from_args(args, seed=self._seed(cfg, args))
        hot, record = plan_hot_experts(profile, settings, stored, origin=str(args.hellora_profile_path))
        saved = self._save_profile(cfg, args, profile, hot, record)
        if is_main_process():
            sizes = sorted({len(ids) for ids in hot.values()})
            logger.info(
                "HELLoRA: hot experts chosen in %.1f s: %s per layer over %d MoE layers%s; attaching the adapter.",
                time.perf_counter() - started, "/".join(map(str, sizes)), len(hot),
                f" (profile and hot map saved to {', '.join(map(str, saved))})" if saved else "",
            )
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

    def routing_profile(
        self, model, cfg: Any, args: HELLoRAArgs, lora_config: LoraConfig
    ) -> tuple[ExpertProfile, dict[str, list[int]] | None]:
        """(profile, stored hot map): a saved profile (and the hot map stored with it) when ``hellora_profile_path``
        exists, else one taken now on the warm-up slice (and no stored map)."""
        main = is_main_process()
        if args.hellora_profile_path and Path(args.hellora_profile_path).is_file():
            profile, stored, _ = load_plan(args.hellora_profile_path)
            profile.check_matches(model)
            if main:
                logger.info("HELLoRA: using the routing profile in %s (no profiling).", args.hellora_profile_path)
            return profile, stored
        saved = Path(_get(cfg, "output_dir", ".")) / PROFILE_FILE
        if self.resuming(cfg):
            if saved.is_file():  # Axolotl's checkpoints hold no profile: the run's own file in output_dir does
                profile, stored, _ = load_plan(saved)
                profile.check_matches(model)
                if main:
                    logger.info("HELLoRA: resuming: reusing the routing profile and hot experts in %s (no profiling).",
                                saved)
                return profile, stored
            if main:
                logger.warning("HELLoRA: resuming, but %s is missing: profiling again (same seed and slice).", saved)
        dataset = self.training_dataset(cfg)
        seed = self._seed(cfg, args)
        # a max_steps run warms up on no more rows than it trains on
        rows_per_step = (int(_get(cfg, "micro_batch_size", 1)) * int(_get(cfg, "gradient_accumulation_steps", 1))
                         * int(os.environ.get("WORLD_SIZE", "1")))
        cap = warmup_row_cap(_get(cfg, "max_steps"), rows_per_step)
        rows = warmup_slice(dataset, args.hellora_warmup_fraction, seed, max_rows=cap)
        batch_size = args.hellora_profile_batch_size or int(_get(cfg, "micro_batch_size", 1))
        source = {
            "mode": args.hellora_profile_mode,
            "warmup_fraction": args.hellora_warmup_fraction,
            "warmup_rows": len(rows),
            "warmup_max_rows": cap,
            "train_rows": len(dataset),
            "seed": seed,
            "framework": "axolotl",
        }
        if main:
            logger.info(
                "HELLoRA: profiling routing (%s) on %d warm-up rows of %d (fraction %g, seed %d, batch size %d) before "
                "training; this can take a while on a large model.",
                args.hellora_profile_mode, len(rows), len(dataset), args.hellora_warmup_fraction, seed, batch_size,
            )
        if args.hellora_profile_mode == "forward":
            return profile_experts(model, rows, batch_size=batch_size, progress=main, source=source), None
        profile = lora_warmup_profile(
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
        return profile, None

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

    @staticmethod
    def resuming(cfg: Any) -> bool:
        """Whether Axolotl will resume this run: ``resume_from_checkpoint`` set, or ``auto_resume_from_checkpoints``
        with a ``checkpoint-N`` folder in ``output_dir``."""
        if _get(cfg, "resume_from_checkpoint"):
            return True
        if not _get(cfg, "auto_resume_from_checkpoints"):
            return False
        out = Path(_get(cfg, "output_dir", "."))
        return out.is_dir() and any(p.is_dir() and p.name.startswith("checkpoint-") for p in out.iterdir())

    def _save_profile(self, cfg: Any, args: HELLoRAArgs, profile: ExpertProfile, hot, record: dict) -> list[Path]:
        if not is_main_process():
            return []
        targets = [Path(_get(cfg, "output_dir", ".")) / PROFILE_FILE]
        if args.hellora_profile_path and not Path(args.hellora_profile_path).is_file():
            targets.append(Path(args.hellora_profile_path))
        save_plan(profile, hot, {**record, "framework": "axolotl"}, *targets)
        return targets


# ------------------------------------------------------------------------------------------------- rl: dpo / grpo
RL_KINDS = {"dpo": "dpo", "ipo": "dpo", "grpo": "grpo"}  # Axolotl's rl value -> the HELLoRA trainer that runs it


def rl_kind(cfg: Any) -> str | None:
    """``"dpo"`` / ``"grpo"`` for the ``rl`` values the plugin runs, None without ``rl``; ValueError for the others
    (KTO, ORPO, SimPO, GDPO), which Axolotl would otherwise train as plain LoRA under ``adapter: hellora``."""
    rl = _get(cfg, "rl")
    if not rl:
        return None
    name = str(getattr(rl, "value", rl)).lower()
    if name not in RL_KINDS:
        raise ValueError(
            f"adapter: hellora supports rl: {'/'.join(RL_KINDS)} (HELLoRADPOTrainer, HELLoRAGRPOTrainer); rl: {name} "
            "has no HELLoRA trainer, and Axolotl would train plain LoRA. Use adapter: lora for it."
        )
    return RL_KINDS[name]


def rl_trainer_class(plugin: Any, cfg: Any) -> type:
    """The trainer class handed to Axolotl's ``HFRLTrainerBuilder`` for ``rl: dpo|ipo|grpo``.

    What Axolotl's RL builder does with a plugin's class (``src/axolotl/core/builders/rl.py``, ``_get_trainer_cls``
    and ``build``): it calls it with no positional arguments and ``args=`` (Axolotl's DPO/GRPO config),
    ``train_dataset=``, ``callbacks=``, ``processing_class=`` (or ``tokenizer=``), ``eval_dataset=``, ``peft_config=``
    (DPO only) and the optimizer keys. So this class takes the model the plugin kept in ``post_model_load``, the
    LoRA shape from the config's ``lora_*`` keys (:func:`lora_config_from_cfg`, the SFT route's refusals), the
    ``hellora_*`` keys on top of Axolotl's arguments, and for GRPO the reward functions Axolotl's ``GRPOStrategy``
    resolves from ``trl.reward_funcs`` (which the builder skips for a plugin's class).
    """
    import inspect

    from ..config import convert_config
    from ..rl_trainers import HELLoRADPOConfig, HELLoRADPOTrainer, HELLoRAGRPOConfig, HELLoRAGRPOTrainer

    kind = rl_kind(cfg)
    base, config_class = (HELLoRADPOTrainer, HELLoRADPOConfig) if kind == "dpo" else (HELLoRAGRPOTrainer, HELLoRAGRPOConfig)
    accepted = set(inspect.signature(base.trl_trainer.__init__).parameters)

    def __init__(self, *args, **kwargs):
        model = getattr(plugin, "rl_model", None)
        if model is None:
            raise ValueError(
                "HELLoRAPlugin holds no model for the RL trainer: Axolotl did not call post_model_load before building "
                "the trainer (this Axolotl's RL path differs from the one the plugin was written against)."
            )
        if "tokenizer" in kwargs:
            kwargs.setdefault("processing_class", kwargs.pop("tokenizer"))
        settings = hellora_args(cfg).model_dump()
        kwargs["args"] = convert_config(kwargs["args"], config_class, **settings)
        kwargs["peft_config"] = lora_config_from_cfg(cfg)
        if kind == "grpo" and "reward_funcs" not in kwargs and not args:
            from axolotl.core.trainers.grpo import GRPOStrategy

            resolved = GRPOStrategy.set_trainer_args(cfg)
            if not resolved:
                raise ValueError("rl: grpo needs reward functions: set trl.reward_funcs in the Axolotl config.")
            args = tuple(resolved)
            kwargs.update(GRPOStrategy.set_trainer_kwargs(cfg))
        dropped = sorted(k for k in kwargs if k not in accepted)
        if dropped and is_main_process():
            logger.warning("HELLoRA: %s does not take %s; ignored.", base.__name__, ", ".join(dropped))
        base.__init__(self, model, *args, **{k: v for k, v in kwargs.items() if k in accepted})

    return type(f"Axolotl{base.__name__}", (base,), {"__init__": __init__, "__module__": __name__})


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
__all__ = ["ADAPTER", "EXACT_MERGE_METHOD", "HELLoRAArgs", "HELLoRAPluginMixin", "RL_KINDS", "exact_merge_method",
           "hellora_args", "lora_config_from_cfg", "rl_kind", "rl_trainer_class"]
