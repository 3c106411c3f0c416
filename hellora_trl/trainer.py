"""``HELLoRATrainer``: TRL's ``SFTTrainer`` with a profiling phase that decides where the adapters go.

``train()`` = profile routing on a seeded slice of the training set (a short LoRA warm-up on all experts, or
forward passes only) -> select hot experts -> attach LoRA to attention, routers and hot experts only (warm-up
adapters discarded) -> train on the full dataset with a fresh optimizer, scheduler and state.
"""

from __future__ import annotations

import copy
import gc
import hashlib
import json
import math
import os
import re
import shutil
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

from peft import LoraConfig, PeftConfig, PeftModel
from torch.utils.data import DataLoader
from transformers import TrainerCallback, TrainingArguments
from transformers.trainer_utils import IntervalStrategy, SaveStrategy
from transformers.utils import logging
from trl import SFTTrainer

from .adapter import apply_hellora, default_lora_config, hot_map_from_model
from .baselines import all_experts_hot
from .config import HELLoRAConfig
from .constants import (
    CONCENTRATION_FILE,
    HEATMAP_FILE,
    MASKS_FILE,
    OVERHEAD_FILE,
    PROFILE_FILE,
    RUN_MARKER_FILE,
    STAGING_DIR,
)
from .distributed import gathered_adapter_state, register_moe_leaf_modules, shard_bounds, zero3_forward_gathering
from .profile import ExpertProfile, HotMap
from .profiling import RoutingCounter, profile_experts, warmup_slice
from .registry import expose_num_experts, find_moe_layers
from .selection import SelectionSettings, load_plan, plan_hot_experts, save_plan, validate_hot_map
from .utils import atomic_write_text, publish_staged, unwrap_model
from .variants import copy_lora_A, load_masks, lori_s_from_lori_d

logger = logging.get_logger(__name__)

__all__ = [
    "HELLoRAFiguresCallback",
    "HELLoRATrainer",
    "PROFILE_FILE",
    "STAGING_DIR",
    "HEATMAP_FILE",
    "checkpoint_problem",
    "run_differences",
]

_CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
# hellora_* options that change neither the hot map nor the adapter's training: not part of a run's fingerprint.
_RUN_NEUTRAL = ("hellora_plots", "hellora_profile_batch_size")


def checkpoint_problem(path: str | os.PathLike) -> str | None:
    """Why ``path`` cannot be resumed from (missing, torn by a kill mid-save, not HELLoRA's), or None when it can.

    The Trainer writes ``trainer_state.json`` last, after the adapter (published from staging) and the optimizer,
    so a checkpoint without a readable one was interrupted while saving.
    """
    path = Path(path)
    if not path.is_dir():
        return f"{path} does not exist" if not path.exists() else f"{path} is not a directory"
    state = path / "trainer_state.json"
    if not state.is_file():
        return "incomplete: no trainer_state.json (the save was interrupted; the Trainer writes it last)"
    try:
        json.loads(state.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        return f"incomplete: trainer_state.json is unreadable ({err})"
    if not (path / "adapter_config.json").is_file():
        return "incomplete: no adapter_config.json"
    if not (path / PROFILE_FILE).is_file():
        return f"not written by HELLoRATrainer: no {PROFILE_FILE}, so its hot experts are unknown"
    return None


def run_differences(stored: dict[str, Any] | None, current: dict[str, Any]) -> list[str]:
    """The fingerprint entries (``section.key``) where a checkpoint's run and this run differ, as readable lines."""
    if not stored:
        return []
    lines = []
    for section in sorted(set(stored) | set(current)):
        old, new = stored.get(section) or {}, current.get(section) or {}
        if not isinstance(old, dict) or not isinstance(new, dict):
            if old != new:
                lines.append(f"{section}: {old!r} (checkpoint) != {new!r} (this run)")
            continue
        for key in sorted(set(old) | set(new)):
            if old.get(key) != new.get(key):
                lines.append(f"{section}.{key}: {old.get(key)!r} (checkpoint) != {new.get(key)!r} (this run)")
    return lines


class HELLoRAFiguresCallback(TrainerCallback):
    """Uploads HELLoRA's figures (heatmap, concentration, overhead) to the trackers in ``report_to`` that take images
    (TensorBoard, W&B); the PNG files themselves stay in ``output_dir``.

    Figures queued with :meth:`add` are sent at the next ``on_train_begin`` or ``on_log``, i.e. once the trackers
    exist. TensorBoard images go through the writer of transformers' ``TensorBoardCallback`` (``callbacks`` returns
    the trainer's callbacks), so they land in the same run directory as the scalars."""

    def __init__(self, callbacks: Callable[[], list] | None = None) -> None:
        self.pending: dict[str, Path] = {}
        self.sent: list[str] = []
        self._callbacks = callbacks or (lambda: [])

    def add(self, figures: dict[str, Path]) -> None:
        self.pending.update(figures)

    def on_train_begin(self, args, state, control, **kwargs):
        self._flush(args, state)

    def on_log(self, args, state, control, logs=None, **kwargs):
        self._flush(args, state)

    def _flush(self, args, state) -> None:
        if not self.pending or not state.is_world_process_zero:
            return
        figures, self.pending = self.pending, {}
        report_to = args.report_to or []
        if "wandb" in report_to:
            _send_wandb(figures)
        if "tensorboard" in report_to:
            _send_tensorboard(figures, self._callbacks(), args, state.global_step)
        self.sent += list(figures)


def _send_wandb(figures: dict[str, Path]) -> None:
    try:
        import wandb
    except ImportError:
        return
    if wandb.run is not None:
        wandb.log({name: wandb.Image(str(path)) for name, path in figures.items()})


def _send_tensorboard(figures: dict[str, Path], callbacks: list, args, step: int) -> None:
    try:
        import numpy as np
        from PIL import Image
    except ImportError:
        return
    images = {name: np.asarray(Image.open(path).convert("RGB")) for name, path in figures.items()}
    board = next((cb for cb in callbacks if getattr(cb, "tb_writer", None) is not None), None)
    if board is not None:  # transformers' TensorBoardCallback: its writer, its run directory
        for name, image in images.items():
            board.tb_writer.add_image(name, image, step, dataformats="HWC")
        board.tb_writer.flush()
        return
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        return
    # No live writer (the callback closed it at train end): the directory it uses, never a removed TrainingArguments
    # field (transformers 5 dropped ``logging_dir``).
    log_dir = os.environ.get("TENSORBOARD_LOGGING_DIR") or os.path.join(args.output_dir, "runs")
    with SummaryWriter(log_dir=os.path.expanduser(log_dir)) as writer:
        for name, image in images.items():
            writer.add_image(name, image, step, dataformats="HWC")


class HELLoRATrainer(SFTTrainer):
    """A drop-in ``SFTTrainer``: same constructor; ``peft_config`` (default: the paper's r=32, alpha=64 LoRA)
    says how adapters look, HELLoRA decides where they go.

    Pass the base model (or its id), not a ``PeftModel``: the adapter is built after profiling. A
    ``peft_config`` with ``target_parameters`` (PEFT's whole-stack expert LoRA) is refused; its
    ``target_modules`` only choose the attention projections, never experts.
    """

    def __init__(self, model, args: HELLoRAConfig | None = None, *pos, peft_config: PeftConfig | None = None, **kwargs):
        if args is None:
            args = HELLoRAConfig(output_dir="hellora-sft")
        if isinstance(args, TrainingArguments) and not isinstance(args, HELLoRAConfig):
            # As SFTTrainer does with a TrainingArguments: keep every value, add the hellora_* defaults.
            values = args.to_dict()
            # to_dict masks every *_token field (hub_token, and SFTConfig's eos_token/pad_token): the real values
            values.update({name: getattr(args, name) for name in values if name.endswith("_token")})
            logger.info("HELLoRA: converting %s to HELLoRAConfig (hellora_* fields at their defaults).", type(args).__name__)
            args = HELLoRAConfig(**values)
        if not isinstance(args, HELLoRAConfig):
            raise TypeError(
                f"HELLoRATrainer needs a HELLoRAConfig (an SFTConfig with hellora_* fields), got {type(args).__name__}."
            )
        if isinstance(model, PeftModel):
            raise ValueError(
                "HELLoRATrainer builds its adapter after profiling, so it needs the base model: pass the "
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
        if kwargs.get("optimizers", (None, None)) != (None, None):
            raise ValueError(
                "HELLoRATrainer creates the adapter (and so its parameters) after profiling, so a ready optimizer "
                "cannot point at them. Use optimizer_cls_and_kwargs or args.optim instead of optimizers=."
            )
        self.hellora_peft_config = peft_config
        self.hellora_profile: ExpertProfile | None = None
        self.hellora_hot_experts: HotMap | None = None
        self.hellora_selection_record: dict[str, Any] = {}
        self.hellora_timings: dict[str, float] = {}
        super().__init__(model, args, *pos, peft_config=None, **kwargs)
        self.hellora_figures = HELLoRAFiguresCallback(lambda: self.callback_handler.callbacks)
        self.add_callback(self.hellora_figures)
        if args.hellora_dynamic_rank:
            self.add_callback(self._dynamic_rank_callback(peft_config.r))
        # Fail before any work when the model is not a MoE model the registry knows.
        self._moe_layers = find_moe_layers(self.model)
        expose_num_experts(self.model)  # TRL's router aux loss reads config.num_experts (GraniteMoE, PhiMoE lack it)
        self._check_k_fits(self._moe_layers[0].num_experts)
        self._check_fsdp_sub_runs()

    def _check_k_fits(self, num_experts: int) -> None:
        """hellora_k / hellora_min_k / hellora_max_k against the model's experts, before any profiling work."""
        args: HELLoRAConfig = self.args
        for name in ("hellora_k", "hellora_min_k", "hellora_max_k"):
            value = getattr(args, name)
            if value is not None and value > num_experts:
                raise ValueError(
                    f"{name}={value} exceeds the {num_experts} experts per MoE layer of this model; use at most "
                    f"{num_experts}."
                )

    def _dynamic_rank_callback(self, r: int):
        from .experimental.dynamic_rank import DynamicRankCallback  # experimental: loaded only when asked for

        args: HELLoRAConfig = self.args
        r_init = args.hellora_dr_r_init or max(1, r // 4)
        r_budget = args.hellora_dr_r_budget or max(r_init, r // 2)
        if not 1 <= r_init <= r_budget <= r:
            raise ValueError(f"Dynamic rank needs 1 <= hellora_dr_r_init <= hellora_dr_r_budget <= r={r}.")
        return DynamicRankCallback(
            r_init,
            r_budget,
            interval=args.hellora_dr_interval,
            grow_step=args.hellora_dr_grow_step,
            grow_until=args.hellora_dr_grow_until,
            routing=args.hellora_dr_routing,
            profile=lambda: self.hellora_profile,
        )

    def _check_fsdp_sub_runs(self) -> None:
        """FSDP shards the modules of the model it trains in place, so the base model cannot go through a LoRA
        warm-up (or LoRI-D) sub-run and then be sharded again for the main run. Say so before any work."""
        if not self.is_fsdp_enabled:
            return
        args: HELLoRAConfig = self.args
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

    # ------------------------------------------------------------------------------------------- phases
    def train(self, resume_from_checkpoint: str | bool | None = None, trial=None, ignore_keys_for_eval=None, **kwargs):
        start = time.perf_counter()
        if isinstance(resume_from_checkpoint, bool):
            resume_from_checkpoint = self._last_checkpoint_of_this_run() if resume_from_checkpoint else None
        elif resume_from_checkpoint is not None:
            problem = checkpoint_problem(resume_from_checkpoint)
            if problem is not None:
                raise ValueError(f"Cannot resume from {resume_from_checkpoint}: {problem}.")
        if resume_from_checkpoint is None:
            self._warn_about_other_runs()
        self._mark_in_progress()
        if not isinstance(self.model, PeftModel):
            hot = self._hot_map(resume_from_checkpoint)
            self._install_adapter(hot, resume_from_checkpoint)
        self.hellora_timings.setdefault("profiling", 0.0)
        train_start = time.perf_counter()
        output = super().train(
            resume_from_checkpoint=resume_from_checkpoint, trial=trial, ignore_keys_for_eval=ignore_keys_for_eval, **kwargs
        )
        self.hellora_timings["training"] = time.perf_counter() - train_start
        self.hellora_timings["total"] = time.perf_counter() - start
        self._report_overhead(output)
        return output

    # ------------------------------------------------------------------------------------------ runs
    def run_fingerprint(self) -> dict[str, Any]:
        """What makes two trainings the same run: the model's MoE shape, the prepared training data and every
        setting that decides the hot map or the adapter. Saved in each profile record (``selection.run``); resuming
        from a checkpoint with another fingerprint is refused."""
        args: HELLoRAConfig = self.args
        config = getattr(unwrap_model(self.model), "config", None)
        layers = self._moe_layers
        model = {
            "model_type": getattr(config, "model_type", None),
            "moe_layers": len(layers),
            "num_experts": layers[0].num_experts,
            "hidden_size": getattr(config, "hidden_size", None),
            "vocab_size": getattr(config, "vocab_size", None),
        }
        hellora = {
            name: value
            for name, value in sorted(vars(args).items())
            if name.startswith("hellora_") and name not in _RUN_NEUTRAL
        }
        hellora["hellora_seed"] = self._seed
        lora = self.hellora_peft_config
        targets = lora.target_modules
        adapter = {
            "r": lora.r,
            "lora_alpha": lora.lora_alpha,
            "use_rslora": lora.use_rslora,
            "target_modules": sorted(targets) if isinstance(targets, (set, list, tuple)) else targets,
        }
        return {"model": model, "data": self._data_fingerprint(), "hellora": hellora, "adapter": adapter}

    def _data_fingerprint(self) -> dict[str, Any] | None:
        data = self.train_dataset
        if data is None or not hasattr(data, "__len__"):
            return None
        rows = len(data)
        digest = hashlib.sha256(str(rows).encode())
        for i in sorted({round(j * (rows - 1) / 15) for j in range(16)}) if rows else []:
            row = data[i]
            digest.update(json.dumps(row.get("input_ids", row), default=str, sort_keys=True).encode())
        return {"rows": rows, "sha256": digest.hexdigest()[:16]}

    def _checkpoints(self) -> list[Path]:
        """``checkpoint-N`` folders of output_dir, newest step first."""
        out = Path(self.args.output_dir)
        if not out.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in out.iterdir() if (m := _CHECKPOINT_RE.match(p.name)) and p.is_dir()]
        return [p for _, p in sorted(found, reverse=True)]

    def _checkpoint_run_differences(self, checkpoint: Path) -> list[str]:
        try:
            _, _, record = load_plan(checkpoint / PROFILE_FILE)
        except (OSError, ValueError) as err:
            return [f"unreadable {PROFILE_FILE} ({err})"]
        return run_differences(record.get("run"), self.run_fingerprint())

    def _last_checkpoint_of_this_run(self) -> str:
        """``resume_from_checkpoint=True``: the newest complete checkpoint of *this* run. Torn checkpoints (a kill
        mid-save) and other runs' checkpoints in a reused output_dir are skipped, each with the reason."""
        skipped = []
        for checkpoint in self._checkpoints():
            problem = checkpoint_problem(checkpoint)
            if problem is None:
                differences = self._checkpoint_run_differences(checkpoint)
                if differences:
                    problem = "from another run (" + "; ".join(differences[:4]) + ")"
            if problem is None:
                for name, why in skipped:
                    logger.warning("HELLoRA: not resuming from %s: %s.", name, why)
                return str(checkpoint)
            skipped.append((checkpoint.name, problem))
        if not skipped:
            raise ValueError(f"No checkpoint found in output_dir ({self.args.output_dir}) to resume from.")
        reasons = "; ".join(f"{name}: {why}" for name, why in skipped)
        raise ValueError(
            f"No checkpoint of this run in output_dir ({self.args.output_dir}) to resume from: {reasons}. Train "
            "without resume_from_checkpoint (or in another output_dir), or pass the checkpoint path and the settings "
            "it was trained with."
        )

    def _warn_about_other_runs(self) -> None:
        """A fresh run in an output_dir that holds another run's checkpoints: say so, since checkpoint rotation
        (save_total_limit) deletes them and ``resume_from_checkpoint=True`` will never pick them."""
        if not self.args.should_save:
            return
        others = [c.name for c in self._checkpoints() if checkpoint_problem(c) is None and self._checkpoint_run_differences(c)]
        if others:
            rotation = (
                f" save_total_limit={self.args.save_total_limit} will delete them as this run saves."
                if self.args.save_total_limit
                else ""
            )
            logger.warning(
                "HELLoRA: output_dir %s holds checkpoints of another run (%s).%s Use a fresh output_dir to keep runs "
                "apart.", self.args.output_dir, ", ".join(others[:5]), rotation,
            )

    def _mark_in_progress(self) -> None:
        """Mark output_dir as holding an unfinished run until its final adapter is saved there (save_model)."""
        if not self.args.should_save:
            return
        marker = {
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "note": "A HELLoRA training run is writing here; removed when its final adapter is saved. If the run "
            "was interrupted, the adapter in this folder is from an earlier run and the profile/figures may not be.",
            "run": self.run_fingerprint(),
        }
        atomic_write_text(Path(self.args.output_dir) / RUN_MARKER_FILE, json.dumps(marker, indent=1, default=str))

    def _hot_map(self, checkpoint: str | None) -> HotMap:
        """From a checkpoint (never re-profile on resume), a supplied profile, or a new profiling run."""
        args: HELLoRAConfig = self.args
        if checkpoint:
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
        stored = None
        if args.hellora_profile_path and Path(args.hellora_profile_path).is_file():
            self.hellora_profile, stored, _ = load_plan(args.hellora_profile_path)
            self.hellora_profile.check_matches(self.model)
            logger.info("HELLoRA: loaded routing profile %s, profiling skipped.", args.hellora_profile_path)
        else:
            started = time.perf_counter()
            self.hellora_profile = self.run_profiling()
            self.hellora_timings["profiling"] = time.perf_counter() - started
        settings = SelectionSettings.from_args(args, seed=self._seed)
        hot, self.hellora_selection_record = plan_hot_experts(
            self.hellora_profile, settings, stored, origin=str(args.hellora_profile_path)
        )
        self.hellora_selection_record["run"] = self.run_fingerprint()
        self.hellora_hot_experts = hot
        self._write_profile_outputs()
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

    def run_profiling(self) -> ExpertProfile:
        """Count routes on the warm-up slice; each rank sees its own shard and counts are summed across ranks."""
        args: HELLoRAConfig = self.args
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
        warmup = warmup_slice(self.train_dataset, args.hellora_warmup_fraction, self._seed)
        source = {
            "mode": args.hellora_profile_mode,
            "warmup_fraction": args.hellora_warmup_fraction,
            "warmup_rows": len(warmup),
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
        loader = DataLoader(warmup, batch_size=batch_size, collate_fn=self.data_collator)
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

    def _phase_args(self, subdir: str) -> HELLoRAConfig:
        """Arguments of a phase run inside ``train()`` (LoRA warm-up, LoRI-D stage): no saving, eval, hub or
        trackers, and none of the main run's evaluation-time or data-preparation switches."""
        phase = copy.deepcopy(self.args)
        phase.output_dir = os.path.join(self.args.output_dir, subdir)
        phase.save_strategy = SaveStrategy.NO
        phase.eval_strategy = IntervalStrategy.NO
        phase.eval_on_start = False
        phase.load_best_model_at_end = False
        phase.push_to_hub = False
        phase.report_to = []
        phase.dataset_kwargs = {**(self.args.dataset_kwargs or {}), "skip_prepare_dataset": True}
        phase.packing = False  # the data is already processed (and packed, if packing was on)
        # The phase reuses the main run's collator (padding-free included), which TRL refuses next to padding_free.
        phase.padding_free = False
        # DeepSpeed: accelerate allows one plugin per process; the phase's Accelerator reuses the main one.
        phase.deepspeed_plugin = None
        return phase

    @contextmanager
    def _run_phase(self, hot: HotMap, variant: str, subdir: str, train_dataset) -> Iterator[tuple[Any, SFTTrainer]]:
        """A sub-run on its own adapter (warm-up, LoRI-D stage): build the adapter, yield (model, trainer), then
        destroy the trainer's engine, unload the adapter and keep the trainer's base-model reference valid."""
        phase_model = self._build_adapter(hot, variant)
        register_moe_leaf_modules(phase_model)
        phase_args = self._phase_args(subdir)
        phase = SFTTrainer(
            model=phase_model,
            args=phase_args,
            train_dataset=train_dataset,
            processing_class=self.processing_class,
            data_collator=self.data_collator,
        )
        try:
            yield phase_model, phase
        finally:
            phase.accelerator.free_memory()  # DeepSpeed: destroy the phase's engine (and its ZeRO-3 hooks)
            del phase
            restored = phase_model.unload()  # drop the phase adapter, keep the base weights untouched
            gc.collect()
            if os.path.isdir(phase_args.output_dir) and not os.listdir(phase_args.output_dir):
                os.rmdir(phase_args.output_dir)
            if restored is not self.model:  # unload works in place; keep the trainer's reference valid regardless
                self.model = self.model_wrapped = restored

    def _profile_lora_warmup(self, warmup, source: dict[str, Any]) -> ExpertProfile:
        """The paper's warm-up: LoRA on attention, routers and every expert, trained on the slice while counting."""
        args: HELLoRAConfig = self.args
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

    def _build_adapter(self, hot: HotMap, variant: str, masks=None):
        args: HELLoRAConfig = self.args
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
        args: HELLoRAConfig = self.args
        masks, lori_d = None, None
        if args.hellora_variant == "lori_s":
            masks, lori_d = self._lori_s_masks(hot, checkpoint)
        peft_model = self._build_adapter(hot, args.hellora_variant, masks)
        if lori_d is not None:  # the masks rank B entries against the LoRI-D run's frozen A: keep that A
            copy_lora_A(peft_model, lori_d)
        if args.gradient_checkpointing:
            peft_model.enable_input_require_grads()
        register_moe_leaf_modules(peft_model)  # ZeRO-3 only: gather each MoE block whole, the same on every rank
        if checkpoint and args.hellora_dynamic_rank:
            from .experimental.dynamic_rank import restore_dynamic_rank

            restore_dynamic_rank(peft_model, checkpoint)  # the callback keeps restored ranks and grows from there
        self.model = self.model_wrapped = peft_model
        self.callback_handler.model = peft_model  # callbacks (dynamic rank) must see the adapted model
        self.optimizer, self.lr_scheduler = None, None  # built on the new adapter's parameters
        if self.is_local_process_zero():
            peft_model.print_trainable_parameters()

    def _lori_s_masks(self, hot: HotMap, checkpoint: str | None):
        """LoRI-S masks: from the checkpoint on resume, a given LoRI-D adapter, or a LoRI-D stage run here first."""
        args: HELLoRAConfig = self.args
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

    # ------------------------------------------------------------------------------------------ outputs
    def _plotting(self) -> bool:
        """``hellora_plots`` and matplotlib importable. A plain install has no matplotlib (the ``plots`` extra):
        the figures are then skipped with one warning instead of failing the run after profiling."""
        if not self.args.hellora_plots:
            return False
        if getattr(self, "_matplotlib_missing", None) is None:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                self._matplotlib_missing = True
                logger.warning(
                    "HELLoRA: matplotlib is not installed, so the heatmap and profile figures are skipped "
                    "(pip install 'hellora-trl[plots]', or set hellora_plots=False to silence this)."
                )
            else:
                self._matplotlib_missing = False
        return not self._matplotlib_missing

    def _write_profile_outputs(self) -> None:
        if not self.args.should_save:
            return
        targets = [Path(self.args.output_dir) / PROFILE_FILE]
        if self.args.hellora_profile_path and not Path(self.args.hellora_profile_path).is_file():
            targets.append(Path(self.args.hellora_profile_path))
        save_plan(self.hellora_profile, self.hellora_hot_experts, self.hellora_selection_record, *targets)
        if self._plotting():
            from .recipes.reporting import plot_concentration, plot_heatmap  # matplotlib: only when plotting

            k = self.args.hellora_k or self.hellora_profile.experts_per_token
            k = min(k, self.hellora_profile.num_experts)
            heatmap = plot_heatmap(self.hellora_profile, self.hellora_hot_experts, Path(self.args.output_dir) / HEATMAP_FILE)
            conc = plot_concentration({"profile": self.hellora_profile}, k, Path(self.args.output_dir) / CONCENTRATION_FILE)
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
            marker = target / RUN_MARKER_FILE
            if target.resolve() == Path(self.args.output_dir).resolve() and marker.exists():
                marker.unlink()  # this run's adapter is now the folder's: the run's outputs are complete
        self.accelerator.wait_for_everyone()

    def _report_overhead(self, output) -> None:
        profiling = self.hellora_timings.get("profiling", 0.0)
        training = self.hellora_timings.get("training", 0.0)
        share = profiling / (profiling + training) if profiling + training > 0 else 0.0
        metrics = {"hellora/profile_seconds": profiling, "hellora/profile_share": share}
        if self.hellora_profile is not None:
            conc = self.hellora_profile.concentration(min(self.hellora_profile.experts_per_token, self.hellora_profile.num_experts))
            metrics["hellora/concentration_mean"] = sum(conc) / len(conc)
        output.metrics.update(metrics)
        if self.args.should_save and profiling > 0 and self._plotting():
            from .recipes.reporting import plot_overhead  # matplotlib: only when plotting

            path = plot_overhead({"profiling": profiling, "training": training}, Path(self.args.output_dir) / OVERHEAD_FILE)
            self.hellora_figures.add({"hellora/overhead": path})
        self.log(metrics)  # also sends the queued figure (HELLoRAFiguresCallback.on_log)

    @property
    def hot_experts(self) -> HotMap | None:
        if isinstance(self.model, PeftModel):
            return hot_map_from_model(self.model)
        return self.hellora_hot_experts
