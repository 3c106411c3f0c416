"""HELLoRA beyond SFT: ``HELLoRADPOTrainer`` and ``HELLoRAGRPOTrainer`` (issue 21).

Each is :class:`~hellora_trl.trainer.HELLoRAMixin` in front of the TRL trainer, with a config that is the TRL config
plus the ``hellora_*`` fields (:class:`HELLoRADPOConfig`, :class:`HELLoRAGRPOConfig`). The profiling phase, the
selection, the adapter, checkpoints and figures are the mixin's; what differs per trainer is only what is profiled:

* DPO profiles **prompt + chosen completion** (``hellora_profile_source='chosen'``, the default): the tokens the
  policy is taught to produce, the same sequences an SFT run on the chosen answers trains on (so the hot map agrees
  with one taken for SFT on the same task). The rejected completion is left out by default: it is what the policy
  is pushed away from, usually close in domain to the chosen one, and counting it doubles the weight of completions
  against prompts. ``'chosen_rejected'`` counts both.
* GRPO profiles **prompts + rollouts of the base policy** (``hellora_profile_source='rollouts'``, the default: one
  sampled completion per prompt, ``max_completion_length`` tokens at the config's ``temperature``), since GRPO
  trains on the policy's own tokens, or **the prompts** only (``'prompts'``; required under ZeRO-3/FSDP).
  ``bench/rl_rollout_jaccard.py`` measures how far the two hot sets differ on the lab model; docs/rl.md gives the
  numbers behind the default.

Profiling is forward-only (``hellora_profile_mode='forward'``, the default of these configs): the LoRA warm-up mode
is a sub-run of the SFT objective and is refused here with one line.

``hellora_init_adapter=<dir of a HELLoRATrainer adapter>`` continues from an SFT run: its hot map and profile are
used (profiling skipped) and its LoRA factors are the starting point that training keeps updating. The DPO reference
model, with ``ref_model=None``, is the adapter-disabled base model (as in PEFT-based TRL runs); no copy of the model
is loaded.
"""

from __future__ import annotations

import contextlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils import load_peft_weights, set_peft_model_state_dict
from transformers.utils import logging
from trl import DPOConfig, DPOTrainer, GRPOConfig, GRPOTrainer
from trl.data_utils import is_conversational, maybe_apply_chat_template

from .adapter_card import read_lora_config
from .config import HELLoRAArguments
from .constants import PROFILE_FILE
from .registry import find_moe_layers
from .selection import load_plan, validate_hot_map
from .trainer import HELLoRAMixin
from .utils import unwrap_model

logger = logging.get_logger(__name__)

__all__ = [
    "DPO_PROFILE_SOURCES",
    "GRPO_PROFILE_SOURCES",
    "HELLoRADPOConfig",
    "HELLoRADPOTrainer",
    "HELLoRAGRPOConfig",
    "HELLoRAGRPOTrainer",
]

DPO_PROFILE_SOURCES = ("chosen", "chosen_rejected")
GRPO_PROFILE_SOURCES = ("prompts", "rollouts")

_FORWARD_HELP = (
    "How routing is profiled: 'forward' (forward passes over the profiled sequences, no training). 'lora_warmup' "
    "is the SFT trainer's warm-up sub-run and is refused by the preference/RL trainers."
)
_INIT_HELP = (
    "A HELLoRATrainer adapter directory (with its hellora_profile.json) to start from: its hot map and profile are "
    "used (profiling skipped) and its LoRA factors keep training. Its adapter_config.json gives the LoRA shape "
    "unless peft_config is passed."
)


@dataclass
class HELLoRARLArguments(HELLoRAArguments):
    """The ``hellora_*`` fields as the preference/RL trainers use them: forward profiling by default, and
    ``hellora_init_adapter`` to continue from an SFT adapter."""

    hellora_profile_mode: str = field(default="forward", metadata={"help": _FORWARD_HELP})
    hellora_init_adapter: str | None = field(default=None, metadata={"help": _INIT_HELP})


@dataclass
class HELLoRADPOConfig(HELLoRARLArguments, DPOConfig):
    """Everything ``DPOConfig`` takes, plus the ``hellora_*`` fields."""

    hellora_profile_source: str = field(
        default="chosen",
        metadata={
            "choices": list(DPO_PROFILE_SOURCES),
            "help": "What DPO profiling counts: 'chosen' (prompt + chosen completion) or 'chosen_rejected' (the "
            "rejected completion too).",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_source(self.hellora_profile_source, DPO_PROFILE_SOURCES)


@dataclass
class HELLoRAGRPOConfig(HELLoRARLArguments, GRPOConfig):
    """Everything ``GRPOConfig`` takes, plus the ``hellora_*`` fields."""

    hellora_profile_source: str = field(
        default="rollouts",  # measured: bench/rl_rollout_jaccard.py, docs/rl.md
        metadata={
            "choices": list(GRPO_PROFILE_SOURCES),
            "help": "What GRPO profiling counts: 'prompts' (the prompts only) or 'rollouts' (prompts + one "
            "completion per prompt sampled from the base policy).",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        check_source(self.hellora_profile_source, GRPO_PROFILE_SOURCES)


def check_source(value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"hellora_profile_source must be one of {choices}, got {value!r}.")


@contextlib.contextmanager
def base_model_as_reference(trl_module, model_given_as_id: bool):
    """While a TRL trainer is built on a bare model, make its "load a reference copy" call a no-op (``None``).

    With a PEFT model, DPO (and GRPO with ``beta > 0``) use the adapter-disabled model as the reference and load
    nothing; HELLoRA builds the adapter only in ``train()``, so at construction time TRL would load a second copy of
    the base from its hub id. The reference it would load is exactly the adapter-disabled base, so nothing is lost.
    ``model_given_as_id``: the first call loads the policy itself and goes through.
    """
    original = trl_module.create_model_from_path
    calls = {"n": 0}

    def no_reference(*args, **kwargs):
        calls["n"] += 1
        if model_given_as_id and calls["n"] == 1:
            return original(*args, **kwargs)
        return None

    trl_module.create_model_from_path = no_reference
    try:
        yield
    finally:
        trl_module.create_model_from_path = original


def init_adapter_problem(directory: str) -> str | None:
    """Why ``directory`` cannot seed a run (None when it can)."""
    path = Path(directory)
    if not path.is_dir():
        return f"{path} is not a directory"
    if not (path / "adapter_config.json").is_file():
        return f"{path} holds no adapter_config.json (not a saved adapter)"
    if not (path / PROFILE_FILE).is_file():
        return (
            f"{path} holds no {PROFILE_FILE}, so its hot experts and profile are unknown (a HELLoRATrainer output "
            "directory has one; a merged checkpoint is a base model: pass it as the model and profiling runs anew)"
        )
    return None


class HELLoRARLMixin(HELLoRAMixin):
    """What the preference/RL trainers share on top of :class:`HELLoRAMixin`: refusing the LoRA warm-up, seeding
    from an SFT adapter, no reference copy, a dataset-format check. Subclasses set ``trl_module``,
    ``required_columns`` and :meth:`hellora_profile_batches`."""

    trl_trainer: type = object  # the TRL trainer class this mixin sits in front of
    trl_module: Any = None
    required_columns: tuple[tuple[str, ...], ...] = ()  # accepted column sets (any one of them)
    trl_name = ""

    def __init__(self, model, *pos, **kwargs):
        bound = inspect.signature(self.trl_trainer.__init__).bind_partial(self, model, *pos, **kwargs)
        self.check_dataset_format(bound.arguments.get("train_dataset"))
        with base_model_as_reference(self.trl_module, isinstance(model, str)):
            super().__init__(model, *pos, **kwargs)
        self._check_init_adapter_fits()

    # ------------------------------------------------------------------------------------------- checks
    def check_dataset_format(self, dataset) -> None:
        columns = set(getattr(dataset, "column_names", None) or [])
        if dataset is None or not columns:
            return  # TRL reports a missing dataset itself
        if not any(set(option) <= columns for option in self.required_columns):
            wanted = " or ".join("/".join(option) for option in self.required_columns)
            raise ValueError(
                f"{type(self).__name__} needs a {self.trl_name} dataset with columns {wanted}; got "
                f"{sorted(columns)}. See TRL's dataset formats (https://huggingface.co/docs/trl/dataset_formats)."
            )

    def hellora_config(self, args):
        args = super().hellora_config(args)
        if args.hellora_init_adapter:
            problem = init_adapter_problem(args.hellora_init_adapter)
            if problem:
                raise ValueError(f"hellora_init_adapter: {problem}.")
            stored = str(Path(args.hellora_init_adapter) / PROFILE_FILE)
            if args.hellora_profile_path and Path(args.hellora_profile_path).resolve() != Path(stored).resolve():
                raise ValueError(
                    "hellora_init_adapter brings its own profile and hot map; drop hellora_profile_path "
                    f"({args.hellora_profile_path}) or hellora_init_adapter."
                )
            if args.hellora_reselect:
                raise ValueError("hellora_init_adapter keeps the adapter's hot map; hellora_reselect=True cannot apply.")
            args.hellora_profile_path = stored  # an existing file: loaded, never written over
        has_profile = bool(args.hellora_profile_path and Path(args.hellora_profile_path).is_file())
        if args.hellora_profile_mode == "lora_warmup" and not has_profile:
            raise ValueError(
                f"{type(self).__name__} profiles with forward passes only: set hellora_profile_mode='forward' (the "
                "LoRA warm-up is a sub-run of the SFT objective), or pass hellora_profile_path / hellora_init_adapter."
            )
        if args.hellora_variant == "lori_s" and not args.hellora_lori_d_adapter:
            raise ValueError(
                f"hellora_variant='lori_s' runs a LoRI-D stage sub-run, which {type(self).__name__} does not do: pass "
                "hellora_lori_d_adapter (a finished LoRI-D adapter)."
            )
        return args

    def _check_init_adapter_fits(self) -> None:
        path = self.args.hellora_init_adapter
        if not path:
            return
        profile, hot, _ = load_plan(Path(path) / PROFILE_FILE)
        layers = find_moe_layers(self.model)
        if hot is None:
            raise ValueError(f"hellora_init_adapter: {Path(path) / PROFILE_FILE} holds no hot_experts map.")
        try:
            profile.check_matches(self.model)
            validate_hot_map(hot, [layer.name for layer in layers], layers[0].num_experts)
        except ValueError as error:
            raise ValueError(f"hellora_init_adapter {path} does not fit this model: {error}") from None
        # the adapter's LoRA shape, unless the caller gave one
        if self._hellora_peft_config_default:
            self.hellora_peft_config = read_lora_config(path)
            self.hellora_peft_config.inference_mode = False

    def hellora_phase_trainer(self, model, args, train_dataset):
        raise ValueError(f"{type(self).__name__} runs no sub-runs; use hellora_profile_mode='forward'.")

    def hellora_adapter_installed(self, peft_model, checkpoint: str | None) -> None:
        """Seed the fresh adapter with the SFT adapter's factors (not on resume: the checkpoint's weights win)."""
        path = self.args.hellora_init_adapter
        if not path or checkpoint:
            return
        weights = load_peft_weights(str(path), device="cpu")
        result = set_peft_model_state_dict(peft_model, weights)
        missing = [k for k in result.missing_keys if "lora_" in k]
        if missing or result.unexpected_keys:
            raise ValueError(
                f"hellora_init_adapter {path} does not fit the adapter this run builds (missing {missing[:3]}, "
                f"unexpected {list(result.unexpected_keys)[:3]}): use the SFT run's hellora_components, "
                "hellora_fuse_gate_up and LoRA target modules."
            )
        if self.is_local_process_zero():
            logger.info("HELLoRA: adapter initialised from %s (%d tensors).", path, len(weights))


class HELLoRADPOTrainer(HELLoRARLMixin, DPOTrainer):
    """A drop-in ``DPOTrainer`` whose LoRA goes to attention, routers and the hot experts (see the module doc).

    ``ref_model=None`` (the default): the reference log-probs are the adapter-disabled base model's.
    """

    config_class = HELLoRADPOConfig
    default_output_dir = "hellora-dpo"
    trl_trainer = DPOTrainer
    trl_module = inspect.getmodule(DPOTrainer)
    required_columns = (("prompt", "chosen", "rejected"), ("chosen", "rejected"))
    trl_name = "preference (DPO)"
    _tag_names = ["trl", "dpo", "hellora"]

    def __init__(self, model, *pos, peft_config=None, **kwargs):
        self._hellora_peft_config_default = peft_config is None
        super().__init__(model, *pos, peft_config=peft_config, **kwargs)

    def hellora_profile_batches(self, rows, batch_size: int):
        """Prompt + chosen (and rejected, with ``'chosen_rejected'``) sequences, padded as DPO pads them."""
        with_rejected = self.args.hellora_profile_source == "chosen_rejected"
        batches = []
        for start in range(0, len(rows), batch_size):
            batch = self.data_collator([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
            n = batch["input_ids"].shape[0] // 2  # DPO's collator stacks [chosen..., rejected...]
            keep = slice(None) if with_rejected else slice(0, n)
            batches.append({"input_ids": batch["input_ids"][keep], "attention_mask": batch["attention_mask"][keep]})
        return batches


class HELLoRAGRPOTrainer(HELLoRARLMixin, GRPOTrainer):
    """A drop-in ``GRPOTrainer`` whose LoRA goes to attention, routers and the hot experts (see the module doc).

    Reward functions are called once on the first rows (with empty completions) before profiling, so one that
    raises fails in seconds, with its name, instead of after profiling and the first generation.
    """

    config_class = HELLoRAGRPOConfig
    default_output_dir = "hellora-grpo"
    trl_trainer = GRPOTrainer
    trl_module = inspect.getmodule(GRPOTrainer)
    required_columns = (("prompt",),)
    trl_name = "prompt-only (GRPO)"
    _tag_names = ["trl", "grpo", "hellora"]

    def __init__(self, model, *pos, peft_config=None, **kwargs):
        self._hellora_peft_config_default = peft_config is None
        super().__init__(model, *pos, peft_config=peft_config, **kwargs)
        self.probe_reward_funcs()
        has_profile = bool(self.args.hellora_profile_path and Path(self.args.hellora_profile_path).is_file())
        if self.args.hellora_profile_source == "rollouts" and not has_profile and (self.is_fsdp_enabled or self._zero3):
            raise ValueError(
                "hellora_profile_source='rollouts' generates with the unsharded base model before training, which "
                "ZeRO-3/FSDP do not allow: set hellora_profile_source='prompts', or pass hellora_profile_path."
            )

    def probe_reward_funcs(self, rows: int = 2) -> None:
        data = self.train_dataset
        if data is None or not hasattr(data, "__len__") or len(data) == 0:
            return
        sample = [data[i] for i in range(min(rows, len(data)))]
        prompts = [row["prompt"] for row in sample]
        if is_conversational(sample[0]):
            completions = [[{"role": "assistant", "content": ""}] for _ in sample]
        else:
            completions = ["" for _ in sample]
        extra = {key: [row[key] for row in sample] for key in sample[0] if key not in ("prompt", "completion")}
        for func, name in zip(self.reward_funcs, self.reward_func_names):
            if isinstance(func, torch.nn.Module):
                continue  # a reward model: TRL loads and runs it; nothing user-written to probe
            try:
                rewards = func(
                    prompts=prompts, completions=completions, completion_ids=[[] for _ in sample],
                    trainer_state=self.state, **extra,
                )
            except Exception as error:  # noqa: BLE001 - reported with the function's name, then stop
                raise ValueError(
                    f"Reward function {name!r} raised {type(error).__name__}: {error} when called on the first "
                    f"{len(sample)} prompts with empty completions (before profiling). A reward function takes "
                    "prompts=, completions= and the dataset's other columns as keyword lists and returns one float "
                    "(or None) per completion."
                ) from None
            if rewards is None or len(rewards) != len(sample):
                raise ValueError(
                    f"Reward function {name!r} returned {type(rewards).__name__} of length "
                    f"{len(rewards) if rewards is not None else 0} for {len(sample)} completions; it must return one "
                    "float (or None) per completion."
                )

    def prompt_texts(self, rows) -> list[str]:
        return [maybe_apply_chat_template({"prompt": row["prompt"]}, self.processing_class)["prompt"] for row in rows]

    def hellora_profile_batches(self, rows, batch_size: int):
        """Tokenized prompts (left-padded, as GRPO generates from them), plus the base policy's rollouts when
        ``hellora_profile_source='rollouts'``. A list, made before counting starts: generating is not profiled."""
        tokenizer = getattr(self.processing_class, "tokenizer", self.processing_class)
        rollouts = self.args.hellora_profile_source == "rollouts"
        side = tokenizer.padding_side
        tokenizer.padding_side = "left"
        batches = []
        try:
            for start in range(0, len(rows), batch_size):
                texts = self.prompt_texts([rows[i] for i in range(start, min(start + batch_size, len(rows)))])
                batch = tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False)
                if rollouts:
                    batch = self.base_rollouts(batch, tokenizer)
                batches.append({"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]})
        finally:
            tokenizer.padding_side = side
        return batches

    @torch.no_grad()
    def base_rollouts(self, batch, tokenizer) -> dict[str, torch.Tensor]:
        """One sampled completion per prompt from the base policy; tokens after the first EOS are masked out."""
        model = unwrap_model(self.model)
        device = next(model.parameters()).device
        batch = {k: v.to(device) for k, v in batch.items()}
        was_training = model.training
        model.eval()
        try:
            out = model.generate(
                **batch,
                max_new_tokens=self.args.max_completion_length,
                do_sample=True,
                temperature=self.args.temperature,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
            )
        finally:
            model.train(was_training)
        completion = out[:, batch["input_ids"].shape[1]:]
        is_eos = completion == tokenizer.eos_token_id
        after_eos = (is_eos.cumsum(dim=1) - is_eos.long()) > 0  # strictly after the first EOS
        completion_mask = (~after_eos).long()
        return {"input_ids": out, "attention_mask": torch.cat([batch["attention_mask"], completion_mask], dim=1)}
