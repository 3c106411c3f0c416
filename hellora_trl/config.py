"""``HELLoRAConfig``: TRL's ``SFTConfig`` plus the knobs of the HELLoRA method, with the paper's defaults.

The knobs are :class:`HELLoRAArguments`, a dataclass mixed into a TRL config: ``HELLoRAConfig`` is
``HELLoRAArguments`` + ``SFTConfig``, and a config for another TRL trainer is the same two lines
(``@dataclass class C(HELLoRAArguments, DPOConfig): pass``).
"""

from __future__ import annotations

import dataclasses
import numbers
from dataclasses import dataclass, field

from transformers import TrainingArguments
from trl import SFTConfig

from .constants import COMPONENTS, PROFILE_MODES, SCOPES, STRATEGIES, VARIANTS

# transformers renamed TrainingArguments.gradient_checkpointing to activation_checkpointing (the old name warns with
# a FutureWarning); older releases in the supported range have only the old one. Code that reads or sets the switch
# uses this name.
CHECKPOINTING_FIELD = (
    "activation_checkpointing"
    if "activation_checkpointing" in {f.name for f in dataclasses.fields(TrainingArguments)}
    else "gradient_checkpointing"
)


@dataclass
class HELLoRAArguments:
    """The ``hellora_*`` fields (all readable from YAML and the command line) and their checks, for mixing in front
    of a TRL config class (not used alone). Its ``__post_init__`` also fixes two TRL defaults: ``bf16`` follows the
    hardware, and gradient checkpointing (on) is set under the name the installed transformers does not deprecate."""

    hellora_k: int | None = field(
        default=None,
        metadata={
            "help": "Hot experts per MoE layer. None = the family default: experts per token (8 OLMoE, 2 Mixtral), "
            "doubled for models with shared experts (DeepSeek-MoE)."
        },
    )
    hellora_selection: str = field(
        default="layer",
        metadata={
            "choices": list(STRATEGIES),
            "help": "How hot experts are chosen: 'layer' (per-layer top-k, the paper), 'model' (global top-k), "
            "'cold' (bottom-k ablation), 'random' (seeded ablation), 'mass' (adaptive k per layer), "
            "'random_weighted' (seeded draw weighted by routing counts, an ablation)."
        },
    )
    hellora_profile_mode: str = field(
        default="lora_warmup",
        metadata={
            "choices": list(PROFILE_MODES),
            "help": "'lora_warmup': short LoRA warm-up on all experts over the warm-up slice while counting routes "
            "(the paper); 'forward': forward passes only, no training (cheaper)."
        },
    )
    hellora_warmup_fraction: float = field(
        default=0.1,
        metadata={"help": "Share of the training set sampled (seeded, at random) for profiling; with max_steps, at "
                          "most the rows the run trains (max_steps x batch x accumulation x processes)."}
    )
    hellora_warmup_epochs: float = field(
        default=1.0, metadata={"help": "Epochs over the warm-up slice in 'lora_warmup' mode."}
    )
    hellora_components: str = field(
        default="all",
        metadata={
            "choices": list(COMPONENTS),
            "help": "Where adapters go: 'all' (attention + router + hot experts), 'router' (router + hot experts), "
            "'experts' (hot experts only)."
        },
    )
    hellora_profile_path: str | None = field(
        default=None,
        metadata={
            "help": "A saved routing profile (JSON): when it exists it is loaded and profiling is skipped; "
            "otherwise the new profile is written there (and always to output_dir/hellora_profile.json)."
        },
    )
    hellora_reselect: bool = field(
        default=False,
        metadata={
            "help": "When hellora_profile_path holds a hot map (from `hellora select` or an earlier run) it is used "
            "as is; True selects again from its counts with this run's hellora_k / hellora_selection."
        },
    )
    hellora_seed: int | None = field(
        default=None, metadata={"help": "Seed of the warm-up slice and random selection (default: `seed`)."}
    )
    hellora_mass: float = field(
        default=0.5, metadata={"help": "'mass' selection: share of routing each layer's hot set must cover."}
    )
    hellora_min_k: int = field(default=1, metadata={"help": "'mass' selection: smallest hot set per layer."})
    hellora_max_k: int | None = field(
        default=None, metadata={"help": "'mass' selection: largest hot set per layer (default: all experts)."}
    )
    hellora_profile_batch_size: int | None = field(
        default=None,
        metadata={"help": "Batch size of 'forward' profiling (default: per_device_train_batch_size)."},
    )
    hellora_fuse_gate_up: bool = field(
        default=False,
        metadata={"help": "One LoRA pair for the fused gate_up projection instead of separate gate and up pairs."},
    )
    hellora_include_shared_experts: bool = field(
        default=True,
        metadata={"help": "Adapt shared (always-routed) experts too, for families that have them."},
    )
    hellora_variant: str = field(
        default="lora",
        metadata={
            "choices": list(VARIANTS),
            "help": "'lora' (HELLoRA), 'lori_d' (HELLoRI-D: A frozen at random init, B dense) or 'lori_s' "
            "(HELLoRI-S: B trained only on the top hellora_lori_density entries of a LoRI-D run's B)."
        },
    )
    hellora_lori_density: float = field(
        default=0.1, metadata={"help": "'lori_s': share of B entries kept by magnitude (LoRI keeps 0.1)."}
    )
    hellora_lori_scope: str = field(
        default="global",
        metadata={
            "choices": list(SCOPES),
            "help": "'lori_s': one magnitude threshold over the whole model ('global'), per 'layer' or per 'module'.",
        },
    )
    hellora_lori_d_adapter: str | None = field(
        default=None,
        metadata={
            "help": "'lori_s': a finished LoRI-D adapter directory to take masks and A from. None = the trainer runs "
            "the LoRI-D stage itself first (same data and budget, saved to output_dir/lori_d)."
        },
    )
    if CHECKPOINTING_FIELD == "activation_checkpointing":
        # TRL sets the deprecated name to True by default, which made every config print transformers'
        # FutureWarning; unset here, and TRL's default (on) goes to the new name in __post_init__.
        gradient_checkpointing: bool | None = field(
            default=None,
            metadata={"help": "Deprecated spelling of activation_checkpointing (transformers warns when it is set)."},
        )
    hellora_overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Train a new run in an output_dir that holds another run's checkpoints or a model (config.json "
            "plus weights; refused otherwise). Same-numbered checkpoints are replaced; save_total_limit still never "
            "deletes a checkpoint this run did not write."
        },
    )
    hellora_plots: bool = field(
        default=True,
        metadata={
            "help": "Write the expert-activation heatmap and profile figures (skipped with a warning when matplotlib, "
            "the `plots` extra, is not installed)."
        },
    )

    def __post_init__(self) -> None:
        if self.bf16 is None and not self.fp16:
            # TRL turns bf16 on by default, which transformers refuses on a machine without a bf16 GPU unless
            # use_cpu is set: take bf16 where the hardware has it, float32 elsewhere (CPU boxes, older GPUs).
            from transformers.utils import is_torch_bf16_gpu_available

            self.bf16 = is_torch_bf16_gpu_available()
        if (
            CHECKPOINTING_FIELD == "activation_checkpointing"
            and self.activation_checkpointing is None
            and self.gradient_checkpointing is None
        ):
            self.activation_checkpointing = True  # TRL's default, under the name transformers does not warn about
        super().__post_init__()
        validate_hellora_fields(self)


@dataclass
class HELLoRAConfig(HELLoRAArguments, SFTConfig):
    """Everything ``SFTConfig`` takes, plus the ``hellora_*`` fields of :class:`HELLoRAArguments`."""


# (field, the field it is derived from) in a TRL config's __post_init__: GRPOConfig sets generation_batch_size from
# steps_per_generation and refuses a re-initialisation that passes both.
DERIVED_FIELDS = (("generation_batch_size", "steps_per_generation"),)


def convert_config(args: TrainingArguments, config_class: type, **overrides):
    """``args`` (a ``TrainingArguments``, ``SFTConfig``, ``HELLoRAConfig``...) as ``config_class``: every value kept,
    fields ``args`` lacks at ``config_class``'s defaults, ``overrides`` on top (what ``SFTTrainer`` does with a
    ``TrainingArguments``)."""
    values = args.to_dict()
    # to_dict masks every *_token field (hub_token, and SFTConfig's eos_token/pad_token): the real values
    values.update({name: getattr(args, name) for name in values if name.endswith("_token")})
    for derived, source in DERIVED_FIELDS:
        if values.get(source) is not None and derived not in overrides:
            values.pop(derived, None)  # __post_init__ derives it again from `source` (passing both is refused)
    known = {f.name for f in dataclasses.fields(config_class) if f.init}
    return config_class(**{k: v for k, v in {**values, **overrides}.items() if k in known})


def hellora_defaults() -> dict[str, object]:
    """Every ``hellora_*`` field of :class:`HELLoRAConfig` with its default (the one option schema)."""
    return {f.name: f.default for f in dataclasses.fields(HELLoRAConfig) if f.name.startswith("hellora_")}


def _whole(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def validate_hellora_fields(args) -> None:
    """The checks of the ``hellora_*`` knobs, for any object that has them (``HELLoRAConfig``, the Axolotl args)."""
    checks = [
        (args.hellora_selection in STRATEGIES, f"hellora_selection must be one of {STRATEGIES}"),
        (args.hellora_profile_mode in PROFILE_MODES, f"hellora_profile_mode must be one of {PROFILE_MODES}"),
        (args.hellora_components in COMPONENTS, f"hellora_components must be one of {COMPONENTS}"),
        (0.0 < args.hellora_warmup_fraction <= 1.0, "hellora_warmup_fraction must be in (0, 1]"),
        (args.hellora_warmup_epochs > 0, "hellora_warmup_epochs must be > 0"),
        (
            args.hellora_k is None or (_whole(args.hellora_k) and args.hellora_k >= 1),
            f"hellora_k must be a whole number >= 1 (or None for the default), got {args.hellora_k!r}",
        ),
        (0.0 < args.hellora_mass <= 1.0, "hellora_mass must be in (0, 1]"),
        (args.hellora_variant in VARIANTS, f"hellora_variant must be one of {VARIANTS}"),
        (args.hellora_lori_scope in SCOPES, f"hellora_lori_scope must be one of {SCOPES}"),
        (0.0 < args.hellora_lori_density <= 1.0, "hellora_lori_density must be in (0, 1]"),
        (_whole(args.hellora_min_k) and args.hellora_min_k >= 1, f"hellora_min_k must be a whole number >= 1, got {args.hellora_min_k!r}"),
        (
            args.hellora_max_k is None
            or (_whole(args.hellora_max_k) and _whole(args.hellora_min_k) and args.hellora_max_k >= args.hellora_min_k),
            f"hellora_max_k must be a whole number >= hellora_min_k, got {args.hellora_max_k!r}",
        ),
        (
            args.hellora_profile_batch_size is None or args.hellora_profile_batch_size >= 1,
            "hellora_profile_batch_size must be >= 1",
        ),
    ]
    for ok, message in checks:
        if not ok:
            raise ValueError(f"{message}.")
