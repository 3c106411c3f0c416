"""``HELLoRATrainer``: TRL's ``SFTTrainer`` with a profiling phase that decides where the adapters go.

``train()`` = profile routing on a seeded slice of the training set (a short LoRA warm-up on all experts, or
forward passes only) -> select hot experts -> attach LoRA to attention, routers and hot experts only (warm-up
adapters discarded) -> train on the full dataset with a fresh optimizer, scheduler and state -> save.

The phase before training lives in :class:`HELLoRAMixin`, which works in front of any TRL trainer whose model is a
transformers MoE model: ``HELLoRATrainer = HELLoRAMixin + SFTTrainer``. What is specific to one trainer (its config
class, how a phase sub-run is configured and built, which batches forward profiling runs) sits in a few small
methods it overrides. Run identity and checkpoint discovery are in :mod:`hellora_trl.checkpoints`, the figures in
:mod:`hellora_trl.plots` and :mod:`hellora_trl.callbacks`.
"""

from __future__ import annotations

import copy
import gc
import inspect
import math
import os
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from peft import LoraConfig, PeftModel
from torch.utils.data import DataLoader
from transformers import TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging
from trl import SFTTrainer

from .adapter import apply_hellora, default_lora_config, hot_map_from_model
from .baselines import all_experts_hot
from .callbacks import HELLoRAFiguresCallback
from .checkpoints import (
    checkpoint_problem,
    clear_in_progress,
    data_fingerprint,
    foreign_checkpoints,
    hellora_settings,
    last_checkpoint_of_run,
    list_checkpoints,
    mark_in_progress,
    other_runs_checkpoints,
    model_files,
    refuse_model_folder,
    refuse_other_runs,
    rotate_own_checkpoints,
    run_differences,
    warn_about_other_runs,
)
from .config import CHECKPOINTING_FIELD, HELLoRAConfig, convert_config
from .constants import (
    CONCENTRATION_FILE,
    HEATMAP_FILE,
    MASKS_FILE,
    OVERHEAD_FILE,
    PROFILE_FILE,
    STAGING_DIR,
)
from .distributed import gathered_adapter_state, register_moe_leaf_modules, shard_bounds, zero3_forward_gathering
from .plots import matplotlib_available
from .profile import ExpertProfile, HotMap
from .profiling import RoutingCounter, profile_experts, warmup_row_cap, warmup_slice
from .registry import expose_num_experts, find_moe_layers
from .selection import SelectionSettings, load_plan, plan_hot_experts, save_plan, validate_hot_map
from .utils import publish_staged, unwrap_model
from .variants import copy_lora_A, load_masks, lori_s_from_lori_d

logger = logging.get_logger(__name__)

__all__ = [
    "HELLoRAFiguresCallback",
    "HELLoRAMixin",
    "HELLoRATrainer",
    "OVERHEAD_DEFINITION",
    "PROFILE_FILE",
    "STAGING_DIR",
    "HEATMAP_FILE",
    "checkpoint_problem",
    "run_differences",
]

# The one definition of the overhead numbers: `hellora/profile_seconds` (and so `profile_seconds` in
# hellora_summary.json), `hellora/profile_share` and the bars of hellora_overhead.png all come from
# HELLoRAMixin.overhead_seconds(), and the figure prints this text under its bars.
OVERHEAD_DEFINITION = (
    "profiling = wall seconds of routing profiling on the warm-up slice (forward passes, or the LoRA warm-up sub-run), "
    "0 when the profile comes from hellora_profile_path or a checkpoint; training = wall seconds of the main "
    "training loop. Same numbers as hellora/profile_seconds and profile_seconds in hellora_summary.json."
)


ADAPTER_NOT_BUILT = (
    "No HELLoRA adapter yet: HELLoRATrainer builds it in train(), after profiling picks the hot experts, so until "
    "then trainer.model is the base model (nothing frozen, nothing added). Call trainer.print_trainable_parameters() "
    "or trainer.model.print_trainable_parameters() after train()."
)


def print_adapter_not_built() -> None:
    print(ADAPTER_NOT_BUILT)


def explain_trainable_parameters(model: Any) -> None:
    """Give the base model PEFT's ``print_trainable_parameters`` name, printing :data:`ADAPTER_NOT_BUILT`, so the
    usual TRL/PEFT call before ``train()`` explains itself instead of raising AttributeError. The PeftModel that
    ``train()`` builds answers with its own method. (A module-level function: the model stays picklable.)"""
    if not hasattr(model, "print_trainable_parameters"):
        model.__dict__["print_trainable_parameters"] = print_adapter_not_built


class HELLoRAMixin:
    """The HELLoRA phase in front of a TRL trainer: profile on a slice -> select -> build the adapter -> fresh
    optimizer, scheduler and state -> fingerprint -> resume -> figures; then the trainer's own ``train()``.

    Put it first in the bases (``class T(HELLoRAMixin, SomeTRLTrainer)``). It takes the trainer's own constructor
    arguments, finds ``args`` by name or position in that trainer's signature, and passes ``peft_config=None`` on,
    since the adapter is built after profiling. To adapt it to another trainer, set :attr:`config_class` (its TRL
    config with :class:`~hellora_trl.config.HELLoRAArguments` mixed in) and override :meth:`hellora_phase_trainer`;
    :meth:`hellora_phase_args` and :meth:`hellora_profile_batches` when its data differs from SFT's.
    """

    config_class: type = HELLoRAConfig  # the args this trainer needs; other TrainingArguments are converted to it
    default_output_dir = "hellora-sft"

    def __init__(self, model, *pos, peft_config: LoraConfig | None = None, **kwargs):
        bound = inspect.signature(super().__init__).bind_partial(model, *pos, **kwargs)
        bound.arguments["args"] = self.hellora_config(bound.arguments.get("args"))
        if isinstance(model, PeftModel):
            raise ValueError(
                f"{type(self).__name__} builds its adapter after profiling, so it needs the base model: pass the "
                "transformers model (or its id) and a peft_config, not a PeftModel. To continue a HELLoRA run, use "
                "train(resume_from_checkpoint=...)."
            )
        peft_config = peft_config if peft_config is not None else default_lora_config()
        if not isinstance(peft_config, LoraConfig):
            raise TypeError(f"HELLoRA adapters are LoRA adapters: peft_config must be a LoraConfig, got {type(peft_config).__name__}.")
        if peft_config.target_parameters:
            raise ValueError(
                "peft_config.target_parameters adapts every expert's weights; HELLoRA places expert adapters "
                "itself. Remove target_parameters (target_modules selects the attention projections)."
            )
        if bound.arguments.get("optimizers", (None, None)) != (None, None):
            raise ValueError(
                f"{type(self).__name__} creates the adapter (and so its parameters) after profiling, so a ready "
                "optimizer cannot point at them. Use optimizer_cls_and_kwargs or args.optim instead of optimizers=."
            )
        self.hellora_peft_config = peft_config
        self.hellora_profile: ExpertProfile | None = None
        self.hellora_hot_experts: HotMap | None = None
        self.hellora_selection_record: dict[str, Any] = {}
        self.hellora_timings: dict[str, float] = {}
        super().__init__(*bound.args, peft_config=None, **bound.kwargs)
        self.hellora_figures = HELLoRAFiguresCallback(lambda: self.callback_handler.callbacks)
        self.add_callback(self.hellora_figures)
        explain_trainable_parameters(self.model)  # trainer.model is the bare base until train() builds the adapter
        # Fail before any work when the model is not a MoE model the registry knows.
        self._moe_layers = find_moe_layers(self.model)
        expose_num_experts(self.model)  # TRL's router aux loss reads config.num_experts (GraniteMoE, PhiMoE lack it)
        self._check_k_fits(self._moe_layers[0].num_experts)
        self._check_fsdp_sub_runs()

    # ------------------------------------------------------------------------------------------- hooks
    def hellora_config(self, args):
        """``args`` as :attr:`config_class`: None -> its defaults; another ``TrainingArguments`` (a plain
        ``SFTConfig``, a ``HELLoRAConfig`` for a subclass config) keeps every value and gains the missing
        ``hellora_*`` fields at their defaults, as ``SFTTrainer`` does with a ``TrainingArguments``."""
        config_class = self.config_class
        if args is None:
            return config_class(output_dir=self.default_output_dir)
        if isinstance(args, TrainingArguments) and not isinstance(args, config_class):
            logger.info("HELLoRA: converting %s to %s (missing hellora_* fields at their defaults).",
                        type(args).__name__, config_class.__name__)
            return convert_config(args, config_class)
        if not isinstance(args, config_class):
            raise TypeError(
                f"{type(self).__name__} needs a {config_class.__name__} (a TRL config with hellora_* fields), got "
                f"{type(args).__name__}."
            )
        return args

    def hellora_phase_args(self, subdir: str):
        """Arguments of a phase run inside ``train()`` (LoRA warm-up, LoRI-D stage): no saving, eval, hub or
        trackers, and none of the main run's evaluation-time switches."""
        phase = copy.deepcopy(self.args)
        phase.output_dir = os.path.join(self.args.output_dir, subdir)
        phase.save_strategy = SaveStrategy.NO
        phase.eval_strategy = IntervalStrategy.NO
        phase.eval_on_start = False
        phase.load_best_model_at_end = False
        phase.push_to_hub = False
        phase.report_to = []
        # DeepSpeed: accelerate allows one plugin per process; the phase's Accelerator reuses the main one.
        phase.deepspeed_plugin = None
        return phase

    def hellora_phase_trainer(self, model, args, train_dataset):
        """The trainer of a phase sub-run on ``model`` (already adapted) over ``train_dataset`` (already prepared)."""
        raise NotImplementedError(f"{type(self).__name__} must say how its phase sub-runs are trained.")

    def hellora_profile_batches(self, rows, batch_size: int):
        """Model-input batches of this rank's warm-up rows for 'forward' profiling: the trainer's own collator
        (SFT's batches are what the model sees in training; a preference trainer would yield its policy inputs)."""
        return DataLoader(rows, batch_size=batch_size, collate_fn=self.data_collator)

    def hellora_adapter_installed(self, peft_model: PeftModel, checkpoint: str | None) -> None:
        """Called once the main run's adapter is built (and before training starts): a subclass adds its state
        to the adapter here (resumed from ``checkpoint`` when given)."""

    # ------------------------------------------------------------------------------------------- checks
    def _check_k_fits(self, num_experts: int) -> None:
        """hellora_k / hellora_min_k / hellora_max_k against the model's experts, before any profiling work."""
        for name in ("hellora_k", "hellora_min_k", "hellora_max_k"):
            value = getattr(self.args, name)
            if value is not None and value > num_experts:
                raise ValueError(
                    f"{name}={value} exceeds the {num_experts} experts per MoE layer of this model; use at most "
                    f"{num_experts}."
                )

    def _check_fsdp_sub_runs(self) -> None:
        """FSDP shards the modules of the model it trains in place, so the base model cannot go through a LoRA
        warm-up (or LoRI-D) sub-run and then be sharded again for the main run. Say so before any work."""
        if not self.is_fsdp_enabled:
            return
        args = self.args
        has_profile = bool(args.hellora_profile_path and Path(args.hellora_profile_path).is_file())
        if args.hellora_profile_mode == "lora_warmup" and not has_profile:
            raise ValueError(
                "hellora_profile_mode='lora_warmup' trains a warm-up adapter in a sub-run, which FSDP cannot shard "
                "twice. Under FSDP use hellora_profile_mode='forward', or take the profile beforehand (a "
                "lora_warmup run under DDP/DeepSpeed, or `hellora profile`) and pass it as hellora_profile_path."
            )
        if args.hellora_variant == "lori_s" and not args.hellora_lori_d_adapter:
            raise ValueError(
                "hellora_variant='lori_s' runs a LoRI-D stage first, which FSDP cannot shard twice. Train LoRI-D "
                "separately and pass it as hellora_lori_d_adapter."
            )

    # ------------------------------------------------------------------------------------------- the method
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        start = time.perf_counter()
        if isinstance(resume_from_checkpoint, bool):
            resume_from_checkpoint = (
                last_checkpoint_of_run(self.args.output_dir, self.run_fingerprint()) if resume_from_checkpoint else None
            )
        elif resume_from_checkpoint is not None:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
        # Checkpoints this run did not write: a new run is refused unless told to overwrite, and rotation never
        # deletes them either way (on every rank, before any profiling or training work).
        self._hellora_foreign = set(foreign_checkpoints(self.args.output_dir, self.run_fingerprint()))
        if resume_from_checkpoint is None:
            others = sorted(self._hellora_foreign)
            if not getattr(self.args, "hellora_overwrite_output_dir", False):
                refuse_other_runs(others, self.args.output_dir, self.args.save_total_limit)
                refuse_model_folder(model_files(self.args.output_dir), self.args.output_dir)
            self._hellora_foreign |= {c.name for c in list_checkpoints(self.args.output_dir)}  # none are this run's
            if self.args.should_save:
                warn_about_other_runs(others, self.args.output_dir, self.args.save_total_limit)
        if self.args.should_save:
            mark_in_progress(self.args.output_dir, self.run_fingerprint())
        if not isinstance(self.model, PeftModel):
            hot = self._hot_map(resume_from_checkpoint)  # profile -> select (or the checkpoint's hot map)
            self._install_adapter(hot, resume_from_checkpoint)  # build; fresh optimizer, scheduler and state
        self.hellora_timings.setdefault("profiling", 0.0)
        train_start = time.perf_counter()
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )
        self.hellora_timings["training"] = time.perf_counter() - train_start
        self.hellora_timings["total"] = time.perf_counter() - start
        self._report_overhead(output)
        return output

    def _save_checkpoint(self, model, trial) -> None:
        """transformers' checkpoint save, with rotation (``save_total_limit``) limited to this run's checkpoints when
        output_dir holds others (kept whatever the limit; see ``hellora_overwrite_output_dir``)."""
        from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

        foreign = getattr(self, "_hellora_foreign", set())
        foreign.discard(f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")  # this run writes that one now
        limit = self.args.save_total_limit
        if not foreign or not limit:
            return super()._save_checkpoint(model, trial)
        self.args.save_total_limit = None  # transformers' rotation would count and delete the others' folders
        try:
            super()._save_checkpoint(model, trial)
        finally:
            self.args.save_total_limit = limit
        if self.args.should_save:
            rotate_own_checkpoints(self._get_output_dir(trial=trial), limit, keep=foreign,
                                   best=self.state.best_model_checkpoint)

    def run_fingerprint(self) -> dict[str, Any]:
        """What makes two trainings the same run: the model's MoE shape, the prepared training data (a hash of
        every row's token ids), every setting that decides the hot map or the adapter. Saved in each profile record
        (``selection.run``); resuming from a checkpoint with another fingerprint is refused."""
        config = getattr(unwrap_model(self.model), "config", None)
        layers = self._moe_layers
        model = {
            "model_type": getattr(config, "model_type", None),
            "moe_layers": len(layers),
            "num_experts": layers[0].num_experts,
            "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None),
        }
        lora = self.hellora_peft_config
        targets = lora.target_modules
        adapter = {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "use_rslora": lora.use_rslora,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        }
        return {"model": model, "data": self._data_fingerprint(), "hellora": hellora_settings(self.args, self._seed), "adapter": adapter}

    def _data_fingerprint(self) -> dict[str, Any] | None:
        """:func:`~hellora_trl.checkpoints.data_fingerprint` of the training set, hashed once per dataset object."""
        data = self.train_dataset
        cached = getattr(self, "_hellora_data_hash", None)
        if cached is None or cached[0] is not data:
            cached = self._hellora_data_hash = (data, data_fingerprint(data))
        return cached[1]

    def _hot_map(self, checkpoint: str | None) -> HotMap:
        """From a checkpoint (never re-profile on resume), a supplied profile, or a new profiling run."""
        args = self.args
        if checkpoint:
            return self._checkpoint_hot_map(checkpoint)
        stored = None
        if args.hellora_profile_path and Path(args.hellora_profile_path).is_file():
            self.hellora_profile, stored, _ = load_plan(args.hellora_profile_path)
            self.hellora_profile.check_matches(self.model)
            logger.info("HELLoRA: loaded routing profile %s, profiling skipped.", args.hellora_profile_path)
        else:
            started = time.perf_counter()
            self.hellora_profile = self.run_profiling()
            self.hellora_timings["profiling"] = time.perf_counter() - started  # see OVERHEAD_DEFINITION
        settings = SelectionSettings.from_args(args, seed=self._seed)
        hot, self.hellora_selection_record = plan_hot_experts(
            self.hellora_profile, settings, stored, origin=str(args.hellora_profile_path)
        )
        self.hellora_selection_record["run"] = self.run_fingerprint()
        self.hellora_hot_experts = hot
        self._write_profile_outputs()
        return hot

    def _checkpoint_hot_map(self, checkpoint: str) -> HotMap:
        path = Path(checkpoint) / PROFILE_FILE
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} missing: the checkpoint was not written by HELLoRATrainer, so its hot experts are unknown."
            )
        self.hellora_profile, hot, self.hellora_selection_record = load_plan(path)
        if hot is None:
            raise ValueError(f"{path} holds no hot_experts map, so the checkpoint's adapter cannot be rebuilt.")
        differences = run_differences(self.hellora_selection_record.get("run"), self.run_fingerprint())
        if differences:
            raise ValueError(
                f"{checkpoint} belongs to another run: " + "; ".join(differences) + ". Resume with the settings, "
                "model and data it was trained with, or train from scratch in a fresh output_dir."
            )
        if "run" not in self.hellora_selection_record:
            logger.warning("HELLoRA: %s records no run fingerprint (older version); not checked.", checkpoint)
        self.hellora_profile.check_matches(self.model)
        validate_hot_map(hot, self.hellora_profile.layer_names, self.hellora_profile.num_experts)
        self.hellora_hot_experts = hot
        return hot

    def select(self, profile: ExpertProfile) -> HotMap:
        """A fresh selection from ``profile`` with this run's settings (``hellora_k``, ``hellora_selection``...)."""
        settings = SelectionSettings.from_args(self.args, seed=self._seed)
        return plan_hot_experts(profile, settings)[0]

    @property
    def _zero3(self) -> bool:
        """ZeRO-3 needs one dtype for all parameters (no float32 adapters on a bf16 base)."""
        return bool(self.is_deepspeed_enabled and self.accelerator.state.deepspeed_plugin.zero_stage == 3)

    @property
    def _seed(self) -> int:
        return self.args.hellora_seed if self.args.hellora_seed is not None else self.args.seed

    # ------------------------------------------------------------------------------------------- profiling
    def run_profiling(self) -> ExpertProfile:
        """Count routes on the warm-up slice; each rank sees its own shard and counts are summed across ranks."""
        args = self.args
        if self.train_dataset is None or not hasattr(self.train_dataset, "__len__"):
            raise ValueError(
                "HELLoRA samples its warm-up slice from a map-style Dataset; for an IterableDataset pass "
                "hellora_profile_path with a profile taken beforehand (hellora profile ...)."
            )
        if len(self.train_dataset) == 0:
            raise ValueError(
                "The training set is empty after TRL's preparation: every row was dropped (rows whose completion is "
                f"cut off entirely by max_length={args.max_length} have no trainable token). Raise max_length or "
                "check the data."
            )
        # a short run (max_steps) warms up on no more rows than it trains on (issue 19 item 13)
        rows_per_step = args.per_device_train_batch_size * args.gradient_accumulation_steps * args.world_size
        cap = warmup_row_cap(args.max_steps, rows_per_step)
        warmup = warmup_slice(self.train_dataset, args.hellora_warmup_fraction, self._seed, max_rows=cap)
        source = {
            "mode": args.hellora_profile_mode,
            "warmup_fraction": args.hellora_warmup_fraction,
            "warmup_rows": len(warmup),
            "warmup_max_rows": cap,
            "train_rows": len(self.train_dataset),
            "seed": self._seed,
        }
        if args.hellora_profile_mode == "forward":
            return self._profile_forward(warmup, source)
        return self._profile_lora_warmup(warmup, source)

    def _profile_forward(self, warmup, source: dict[str, Any]) -> ExpertProfile:
        state = self.accelerator.state
        batch_size = self.args.hellora_profile_batch_size or self.args.per_device_train_batch_size
        pad_to = None
        if state.num_processes > 1:  # contiguous shards; a slice smaller than the world leaves some ranks empty
            start, end = shard_bounds(len(warmup), state.num_processes, state.process_index)
            pad_to = math.ceil(len(range(*shard_bounds(len(warmup), state.num_processes, 0))) / batch_size)
            warmup = warmup.select(list(range(start, end)))  # a list: datasets rejects an empty range at the end
        loader = self.hellora_profile_batches(warmup, batch_size)
        if self.is_deepspeed_enabled and not self._zero3:
            # The Trainer leaves a DeepSpeed model where it was loaded (CPU) for the engine to place; ZeRO-0/1/2 keep
            # full weights on every device anyway, so profile there instead of on the CPU.
            self.model.to(self.args.device)
        with zero3_forward_gathering(self.model):  # ZeRO-3: no engine yet, gather each module's weights in turn
            return profile_experts(
                self.model,
                loader,
                progress=not self.args.disable_tqdm and self.is_local_process_zero(),
                source=source,
                pad_batches_to=pad_to,  # equal forward counts on every rank (ZeRO-3 gathers are collective)
            )

    @contextmanager
    def _run_phase(self, hot: HotMap, variant: str, subdir: str, train_dataset) -> Iterator[tuple[Any, Any]]:
        """A sub-run on its own adapter (warm-up, LoRI-D stage): build the adapter, yield (model, trainer), then
        destroy the trainer's engine, unload the adapter and keep the trainer's base-model reference valid."""
        phase_model = self._build_adapter(hot, variant)
        register_moe_leaf_modules(phase_model)
        phase = self.hellora_phase_trainer(phase_model, self.hellora_phase_args(subdir), train_dataset)
        output_dir = phase.args.output_dir
        try:
            yield phase_model, phase
        finally:
            phase.accelerator.free_memory()  # DeepSpeed: destroy the phase's engine (and its ZeRO-3 hooks)
            del phase
            restored = phase_model.unload()  # drop the phase adapter, keep the base weights untouched
            gc.collect()
            if os.path.isdir(output_dir) and not os.listdir(output_dir):
                os.rmdir(output_dir)
            if restored is not self.model:  # unload works in place; keep the trainer's reference valid regardless
                self.model = self.model_wrapped = restored

    def _profile_lora_warmup(self, warmup, source: dict[str, Any]) -> ExpertProfile:
        """The paper's warm-up: LoRA on attention, routers and every expert, trained on the slice while counting."""
        args = self.args
        # plain LoRA on every expert, whatever the variant
        with self._run_phase(all_experts_hot(self.model), "lora", "hellora_warmup", warmup) as (warm_model, warm):
            warm.args.num_train_epochs = args.hellora_warmup_epochs
            warm.args.max_steps = -1
            counter = RoutingCounter(warm_model)
            with counter:
                warm.train()
            warm_loss = [log["loss"] for log in warm.state.log_history if "loss" in log]
        source.update({"warmup_epochs": args.hellora_warmup_epochs, "warmup_loss": warm_loss[-1] if warm_loss else None})
        return counter.to_profile(source)

    # ------------------------------------------------------------------------------------------- the adapter
    def _build_adapter(self, hot: HotMap, variant: str, masks=None):
        args = self.args
        return apply_hellora(
            self.model,
            hot,
            self.hellora_peft_config,
            components=args.hellora_components,
            fuse_gate_up=args.hellora_fuse_gate_up,
            include_shared_experts=args.hellora_include_shared_experts,
            autocast_adapter_dtype=not self._zero3,
            variant=variant,
            masks=masks,
            density=args.hellora_lori_density,
        )

    def _install_adapter(self, hot: HotMap, checkpoint: str | None = None) -> None:
        args = self.args
        masks, lori_d = None, None
        if args.hellora_variant == "lori_s":
            masks, lori_d = self._lori_s_masks(hot, checkpoint)
        peft_model = self._build_adapter(hot, args.hellora_variant, masks)
        if lori_d is not None:  # the masks rank B entries against the LoRI-D run's frozen A: keep that A
            copy_lora_A(peft_model, lori_d)
        if getattr(args, CHECKPOINTING_FIELD):
            peft_model.enable_input_require_grads()
        register_moe_leaf_modules(peft_model)  # ZeRO-3 only: gather each MoE block whole, the same on every rank
        self.hellora_adapter_installed(peft_model, checkpoint)
        self.model = self.model_wrapped = peft_model
        self.callback_handler.model = peft_model  # callbacks must see the adapted model
        self.optimizer, self.lr_scheduler = None, None  # built on the new adapter's parameters
        if self.is_local_process_zero():
            peft_model.print_trainable_parameters()

    def _lori_s_masks(self, hot: HotMap, checkpoint: str | None):
        """LoRI-S masks: from the checkpoint on resume, a given LoRI-D adapter, or a LoRI-D stage run here first."""
        args = self.args
        if checkpoint:
            return load_masks(Path(checkpoint) / MASKS_FILE), None
        source = args.hellora_lori_d_adapter or self._train_lori_d_stage(hot)
        masks = lori_s_from_lori_d(source, density=args.hellora_lori_density, scope=args.hellora_lori_scope)
        return masks, source

    def _train_lori_d_stage(self, hot: HotMap) -> str:
        """LoRI-S stage one: LoRI-D on the same hot experts, data and budget; its adapter is kept in output_dir."""
        with self._run_phase(hot, "lori_d", "lori_d", self.train_dataset) as (stage_model, stage):
            stage.train()
            if self.args.should_save:
                stage_model.save_pretrained(stage.args.output_dir)
            self.accelerator.wait_for_everyone()
            return stage.args.output_dir

    # ------------------------------------------------------------------------------------------- outputs
    def _plotting(self) -> bool:
        """``hellora_plots`` and matplotlib importable. A plain install has no matplotlib (the ``plots`` extra):
        the figures are then skipped with one warning instead of failing the run after profiling."""
        if not self.args.hellora_plots:
            return False
        if getattr(self, "_matplotlib_missing", None) is None:
            self._matplotlib_missing = not matplotlib_available()
            if self._matplotlib_missing:
                logger.warning(
                    "HELLoRA: matplotlib is not installed, so the heatmap and profile figures are skipped "
                    "(pip install 'hellora-trl[plots]', or set hellora_plots=False to silence this)."
                )
        return not self._matplotlib_missing

    def _write_profile_outputs(self) -> None:
        if not self.args.should_save:
            return
        targets = [Path(self.args.output_dir) / PROFILE_FILE]
        if self.args.hellora_profile_path and not Path(self.args.hellora_profile_path).is_file():
            targets.append(Path(self.args.hellora_profile_path))
        save_plan(self.hellora_profile, self.hellora_hot_experts, self.hellora_selection_record, *targets)
        if self._plotting():
            from .plots import plot_concentration, plot_heatmap

            out = Path(self.args.output_dir)
            k = min(self.args.hellora_k or self.hellora_profile.experts_per_token, self.hellora_profile.num_experts)
            heatmap = plot_heatmap(self.hellora_profile, self.hellora_hot_experts, out / HEATMAP_FILE)
            conc = plot_concentration({"profile": self.hellora_profile}, k, out / CONCENTRATION_FILE)
            self.hellora_figures.add({"hellora/expert_heatmap": heatmap, "hellora/concentration": conc})

    def save_model(self, output_dir: str | None = None, _internal_call: bool = False) -> None:
        """PEFT adapter as usual, plus the profile and hot map, so every checkpoint can be resumed or reloaded.

        Everything is first written to a hidden staging folder and then renamed into place file by file, the adapter
        config last and the old one removed first (:func:`~hellora_trl.utils.publish_staged`), so an interrupted save
        leaves a folder with no adapter config, never a new config beside old weights.
        """
        target = Path(output_dir or self.args.output_dir)
        staging = target / STAGING_DIR
        if self.args.should_save and staging.exists():
            shutil.rmtree(staging)  # left over from an interrupted save
        self.accelerator.wait_for_everyone()
        if self._zero3 and isinstance(self.model, PeftModel):
            # Gather the adapter only (frozen LoRI A included), not the 16-bit base weights, on every rank.
            self._save(str(staging), state_dict=gathered_adapter_state(self.model, strip_wrappers=False))
        else:
            super().save_model(str(staging), _internal_call=_internal_call)
        if self.args.should_save:
            if self.hellora_profile is not None:
                save_plan(self.hellora_profile, self.hellora_hot_experts, self.hellora_selection_record, staging / PROFILE_FILE)
            publish_staged(staging, target)
            if target.resolve() == Path(self.args.output_dir).resolve():
                clear_in_progress(target)  # this run's adapter is now the folder's: the run's outputs are complete
        self.accelerator.wait_for_everyone()

    def overhead_seconds(self) -> dict[str, float]:
        """``{"profiling": s, "training": s}`` as :data:`OVERHEAD_DEFINITION` defines them: the numbers behind the
        ``hellora/profile_*`` metrics, the run summary and ``hellora_overhead.png``."""
        return {
            "profiling": float(self.hellora_timings.get("profiling", 0.0)),
            "training": float(self.hellora_timings.get("training", 0.0)),
        }

    def _report_overhead(self, output) -> None:
        seconds = self.overhead_seconds()
        profiling, total = seconds["profiling"], sum(seconds.values())
        metrics = {"hellora/profile_seconds": profiling, "hellora/profile_share": profiling / total if total > 0 else 0.0}
        if self.hellora_profile is not None:
            conc = self.hellora_profile.concentration(min(self.hellora_profile.experts_per_token, self.hellora_profile.num_experts))
            metrics["hellora/concentration_mean"] = sum(conc) / len(conc)
        output.metrics.update(metrics)
        # Drawn even when profiling was skipped (0 s), so the folder never keeps an earlier run's overhead figure.
        if self.args.should_save and self._plotting():
            from .plots import plot_overhead

            path = plot_overhead(seconds, Path(self.args.output_dir) / OVERHEAD_FILE, note=OVERHEAD_DEFINITION)
            self.hellora_figures.add({"hellora/overhead": path})
        self.log(metrics)  # also sends the queued figure (HELLoRAFiguresCallback.on_log)

    def print_trainable_parameters(self) -> None:
        """PEFT's summary of the adapter once ``train()`` built it; before that, what to expect and when."""
        if isinstance(self.model, PeftModel):
            self.model.print_trainable_parameters()
        else:
            print(ADAPTER_NOT_BUILT)

    @property
    def hot_experts(self) -> HotMap | None:
        if isinstance(self.model, PeftModel):
            return hot_map_from_model(self.model)
        return self.hellora_hot_experts


class HELLoRATrainer(HELLoRAMixin, SFTTrainer):
    """A drop-in ``SFTTrainer``: same constructor; ``peft_config`` (default: the paper's r=32, alpha=64 LoRA)
    says how adapters look, HELLoRA decides where they go.

    Pass the base model (or its id), not a ``PeftModel``: the adapter is built after profiling. A
    ``peft_config`` with ``target_parameters`` (PEFT's whole-stack expert LoRA) is refused; its
    ``target_modules`` only choose the attention projections, never experts. An ``SFTConfig`` or
    ``TrainingArguments`` is converted to a :class:`~hellora_trl.config.HELLoRAConfig`.
    """

    _tag_names = ["trl", "sft", "hellora"]  # TRL's model card and model tags name HELLoRA too

    def hellora_phase_args(self, subdir: str):
        """SFT's data switches off for a phase: its rows are the main run's, already prepared (and packed)."""
        phase = super().hellora_phase_args(subdir)
        phase.dataset_kwargs = {**(self.args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        phase.packing = False  # the data is already processed (and packed, if packing was on)
        # The phase reuses the main run's collator (padding-free included), which TRL refuses next to padding_free.
        phase.padding_free = False
        return phase

    def hellora_phase_trainer(self, model, args, train_dataset):
        return SFTTrainer(
            model=model,
            args=args,
            train_dataset=train_dataset,
            processing_class=self.processing_class,
            data_collator=self.data_collator,
        )
