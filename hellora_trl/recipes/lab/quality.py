"""Measuring selection quality on the lab model: fine-tune one adapter configuration, score it, compare them.

Shared by ``bench/quality.py`` (the paper's Tables 2, 4 and 6 in miniature), the main job's summary and the slow
test. Every configuration of one seed starts from the same lab checkpoint, trains on the same rows in the same
order for the same steps, and HELLoRA rows select from one routing profile taken once per seed (the paper's LoRA
warm-up), so differences between rows are the adapter placement, not the data or the profile.

Metrics, on rows held out by content (:mod:`hellora_trl.recipes.lab.targets`):

- ``target_loss``: mean loss on the completion tokens (answer and end-of-sequence) of held-out target rows, and
  ``target_split``: the same loss split into result tokens and format/copy tokens;
- ``exact_match``: greedy generation, final answer equal to the gold one (GSM8K's ``#### n`` rule; arithmetic only);
- ``domain_loss``: held-out document loss per pretraining domain (forgetting: after fine-tuning minus before);
- ``domain_loss_v2`` (when in-vocabulary documents are passed): the same on
  :func:`~hellora_trl.recipes.lab.targets.forgetting_texts_v2`, documents inside the lab model's vocabulary (the
  first set is not; bench/evidence/PLAN.md Deviation 12).
"""

from __future__ import annotations

import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = [
    "FineTuneSettings",
    "QualityConfig",
    "attention_only",
    "attention_router_only",
    "completion_loss",
    "domain_losses",
    "domain_texts_v2",
    "epoch_curves",
    "exact_match",
    "finetune",
    "routing_profile",
    "score",
    "take_profile",
    "target_data",
]

TARGET_DOMAIN = "math"  # the pretraining domain nearest to the target task; the others measure forgetting


@dataclass
class FineTuneSettings:
    """One fine-tuning budget, the same for every configuration compared."""

    steps: int = 150
    batch_size: int = 8
    learning_rate: float = 3e-3
    lora_r: int = 8
    lora_alpha: int = 16
    warmup_steps: int = 5
    train_rows: int = 1200
    eval_rows: int = 128
    domain_rows: int = 64
    generate_rows: int = 64
    max_new_tokens: int = 24
    warmup_fraction: float = 0.1


@dataclass
class QualityConfig:
    """One row: ``kind`` = ``floor`` (attention + router), ``attention`` (attention only), ``peft_all`` (PEFT
    ``target_parameters`` on all experts) or ``hellora`` (our expert layer on a selected hot set; k = num_experts is
    our all-experts LoRA). ``lora``: ``LoraConfig`` fields over the settings' (e.g. a ``rank_pattern`` giving the
    experts another rank than attention and router)."""

    name: str
    kind: str = "hellora"
    k: int | None = None
    selection: str = "layer"
    variant: str = "lora"
    dynamic_rank: bool = False
    extra: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------------ data
def target_data(settings: FineTuneSettings, seed: int = 0, target: str = "arithmetic"):
    """(train ``Dataset`` in prompt-completion format, held-out rows) of a target held out by content
    (:func:`~hellora_trl.recipes.lab.targets.target_task`: ``arithmetic`` or ``facts``)."""
    from .targets import target_task, to_dataset

    train, held_out = target_task(target, settings.train_rows, settings.eval_rows, seed=seed)
    return to_dataset(train), held_out


def domain_texts(settings: FineTuneSettings, seed: int = 0, domains: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Forgetting documents per domain (math included) from templates pretraining never used."""
    from .corpus import DOMAINS
    from .targets import forgetting_texts

    return forgetting_texts(settings.domain_rows, seed=seed, domains=tuple(domains or DOMAINS))


def domain_texts_v2(settings: FineTuneSettings, seed: int = 0, domains: Sequence[str] | None = None) -> dict[str, list[str]]:
    """Forgetting documents per domain in structures pretraining never produces, from its own word lists (inside
    the lab model's vocabulary)."""
    from .corpus import DOMAINS
    from .targets import forgetting_texts_v2

    return forgetting_texts_v2(settings.domain_rows, seed=seed, domains=tuple(domains or DOMAINS))


# --------------------------------------------------------------------------------------------------- metrics
def completion_loss(model, tokenizer, rows: Sequence[dict], batch_size: int = 32) -> float:
    """Mean loss over the completion tokens (`` answer<eos>``) of GSM8K-format rows, prompt tokens unscored; rows
    of :mod:`~hellora_trl.recipes.lab.targets` (with ``result`` spans) are scored by their ``prompt``/``completion``."""
    from ..eval import gsm8k_prompt

    if rows and "result" in rows[0]:
        from .targets import split_losses

        return split_losses(model, tokenizer, rows, batch_size)["whole"]

    model.eval()
    total, count = 0.0, 0
    with torch.no_grad():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            seqs, labels = [], []
            for row in chunk:
                prompt = tokenizer(gsm8k_prompt(row["question"]), add_special_tokens=False)["input_ids"]
                answer = tokenizer(" " + row["answer"].strip(), add_special_tokens=False)["input_ids"]
                ids = [tokenizer.bos_token_id, *prompt, *answer, tokenizer.eos_token_id]
                seqs.append(ids)
                labels.append([-100] * (1 + len(prompt)) + [*answer, tokenizer.eos_token_id])
            width = max(len(s) for s in seqs)
            ids = torch.tensor([s + [tokenizer.pad_token_id] * (width - len(s)) for s in seqs])
            lab = torch.tensor([s + [-100] * (width - len(s)) for s in labels])
            mask = (torch.arange(width)[None, :] < torch.tensor([len(s) for s in seqs])[:, None]).long()
            logits = model(input_ids=ids, attention_mask=mask).logits[:, :-1].float()
            target = lab[:, 1:]
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1),
                                                     ignore_index=-100, reduction="sum")
            total += float(loss)
            count += int((target != -100).sum())
    return total / max(count, 1)


def domain_losses(model, tokenizer, texts: dict[str, list[str]], seq_len: int = 192) -> dict[str, float]:
    """Held-out document loss per domain (whole documents, bos/eos included)."""
    from .model import domain_loss

    was_training = model.training
    result = {d: domain_loss(model, tokenizer, t, seq_len) for d, t in texts.items()}
    model.train(was_training)
    return result


def exact_match(model, tokenizer, rows: Sequence[dict], max_new_tokens: int = 24) -> float:
    """Greedy exact-match accuracy of the final answer (GSM8K rule) on ``rows``."""
    from ..eval import evaluate_gsm8k

    return evaluate_gsm8k(model, tokenizer, list(rows), max_new_tokens=max_new_tokens, batch_size=32,
                          progress=False)["accuracy"]


def routing_profile(model, tokenizer, rows: Sequence[dict], batch_size: int = 32):
    """Forward-only routing counts over prompt + answer of GSM8K-format rows."""
    from datasets import Dataset

    from ..eval import gsm8k_prompt
    from ...profiling import profile_experts

    texts = [f"{tokenizer.bos_token}{gsm8k_prompt(r['question'])} {r['answer'].strip()}{tokenizer.eos_token}"
             for r in rows]
    ds = Dataset.from_dict({"input_ids": tokenizer(texts, add_special_tokens=False)["input_ids"]})
    return profile_experts(model, ds, batch_size=batch_size, progress=False, source={"rows": len(rows)})


def score(model, tokenizer, held_out: Sequence[dict], domains: dict[str, list[str]], settings: FineTuneSettings,
          domains_v2: dict[str, list[str]] | None = None) -> dict:
    """The metrics of the module docstring; ``domain_loss_v2`` only when ``domains_v2`` is given (computed after the
    others, so passing it changes none of them)."""
    em = None
    if settings.generate_rows and held_out and "question" in held_out[0]:
        em = exact_match(model, tokenizer, held_out[: settings.generate_rows], settings.max_new_tokens)
    split = None
    if held_out and "result" in held_out[0]:
        from .targets import split_losses

        split = split_losses(model, tokenizer, held_out)
    result = {
        "target_loss": split["whole"] if split else completion_loss(model, tokenizer, held_out),
        "target_split": split,
        "exact_match": em,
        "domain_loss": domain_losses(model, tokenizer, domains),
    }
    if domains_v2 is not None:
        result["domain_loss_v2"] = domain_losses(model, tokenizer, domains_v2)
    return result


def epoch_curves(tokenizer, train_rows: Sequence[dict], held_out: Sequence[dict], steps_per_epoch: int):
    """A ``TrainerCallback`` that scores the model being trained at the start and after every ``steps_per_epoch``
    optimizer steps (one epoch of the training rows): :func:`~hellora_trl.recipes.lab.targets.split_losses` on the
    training rows and on the held-out rows. Its ``points`` list holds ``{"epoch", "step", "trainer_epoch", "train",
    "held_out"}`` (the last two ``split_losses`` dicts); scoring runs in eval mode without gradients and restores
    the training mode, so the training itself is unchanged (a test compares a run with and without it)."""
    from transformers import TrainerCallback

    from .targets import split_losses

    if steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be >= 1, got {steps_per_epoch}.")

    class EpochCurves(TrainerCallback):
        def __init__(self) -> None:
            self.points: list[dict[str, Any]] = []

        def _score(self, state, model) -> None:
            self.points.append({"epoch": state.global_step / steps_per_epoch, "step": state.global_step,
                                "trainer_epoch": state.epoch,  # the Trainer's own count, to check the boundaries
                                "train": split_losses(model, tokenizer, train_rows),
                                "held_out": split_losses(model, tokenizer, held_out)})

        def on_train_begin(self, args, state, control, model=None, **kwargs):
            self._score(state, model)

        def on_step_end(self, args, state, control, model=None, **kwargs):
            if state.global_step % steps_per_epoch == 0:
                self._score(state, model)

    return EpochCurves()


# ------------------------------------------------------------------------------------------------- adapters
def attention_router_only(model, lora_config):
    """The floor: LoRA on attention and the routers, no expert adapters at all."""
    from ...baselines import apply_attention_router_only

    return apply_attention_router_only(model, lora_config)


def _args(out: Path, settings: FineTuneSettings, seed: int, **hellora):
    from ...config import CHECKPOINTING_FIELD, HELLoRAConfig

    return HELLoRAConfig(
        output_dir=str(out), max_steps=settings.steps, per_device_train_batch_size=settings.batch_size,
        learning_rate=settings.learning_rate, lr_scheduler_type="linear", warmup_steps=settings.warmup_steps,
        logging_steps=10, save_strategy="no", report_to="none", seed=seed, data_seed=seed, max_length=96,
        disable_tqdm=True, hellora_plots=False, bf16=False, hellora_warmup_fraction=settings.warmup_fraction,
        **{CHECKPOINTING_FIELD: False}, **hellora,
    )


def _lora(settings: FineTuneSettings, **overrides: Any):
    from peft import LoraConfig

    fields = dict(r=settings.lora_r, lora_alpha=settings.lora_alpha, lora_dropout=0.0, task_type="CAUSAL_LM")
    return LoraConfig(**{**fields, **overrides})


def attention_only(model, lora_config):
    """LoRA on the attention projections only (no router, no experts): the floor without the router."""
    import copy

    from peft import get_peft_model

    from ...registry import family_for

    config = copy.deepcopy(lora_config)
    config.target_modules = list(family_for(model).attention_targets)
    return get_peft_model(model, config)


def _load(model_path: str | Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    return model, AutoTokenizer.from_pretrained(model_path)


def take_profile(model_path: str | Path, train, settings: FineTuneSettings, seed: int, path: Path, mode: str = "lora_warmup"):
    """The routing profile of one seed (paper's LoRA warm-up on a seeded 10% slice, or forward-only), saved to
    ``path`` without a hot map so that every row selects from its counts with its own k and strategy."""
    from ...trainer import HELLoRATrainer

    model, tokenizer = _load(model_path)
    work = Path(tempfile.mkdtemp(prefix="hellora-lab-profile-"))
    try:
        trainer = HELLoRATrainer(model=model, args=_args(work, settings, seed, hellora_profile_mode=mode),
                                 train_dataset=train, processing_class=tokenizer, peft_config=_lora(settings))
        profile = trainer.run_profiling()
    finally:
        shutil.rmtree(work, ignore_errors=True)
    profile.save(path)
    return profile


def finetune(
    config: QualityConfig, model_path: str | Path, train, settings: FineTuneSettings, seed: int, profile_path: Path,
    held_out: Sequence[dict], domains: dict[str, list[str]], domains_v2: dict[str, list[str]] | None = None,
    callbacks: Sequence[Any] = (),
) -> dict[str, Any]:
    """Train one configuration from the lab checkpoint and score it; returns the row's metrics for this seed.
    ``domains_v2``: also score the in-vocabulary forgetting documents (``domain_loss_v2``); ``callbacks``: extra
    ``TrainerCallback`` objects (e.g. :func:`epoch_curves`). Neither changes the training or the other metrics."""
    from trl import SFTTrainer

    from ...accounting import trainable_parameter_report
    from ...trainer import HELLoRATrainer
    from ...baselines import apply_peft_all_experts

    torch.manual_seed(seed)
    model, tokenizer = _load(model_path)
    work = Path(tempfile.mkdtemp(prefix="hellora-lab-run-"))
    try:
        if config.kind == "hellora":
            options = dict(hellora_k=config.k, hellora_selection=config.selection, hellora_variant=config.variant,
                           hellora_profile_path=str(profile_path), hellora_reselect=True, **config.extra)
            if config.dynamic_rank:  # the opt-in experimental trainer, its hellora_dr_* settings at their defaults
                from ...experimental.dynamic_rank_trainer import DynamicRankTrainer
            trainer_class = DynamicRankTrainer if config.dynamic_rank else HELLoRATrainer
            trainer = trainer_class(model=model, args=_args(work, settings, seed, **options), train_dataset=train,
                                    processing_class=tokenizer, peft_config=_lora(settings, **config.lora))
        else:
            build = {"floor": attention_router_only, "attention": attention_only, "peft_all": apply_peft_all_experts}
            if config.kind not in build:
                raise ValueError(f"unknown kind {config.kind!r}; choose hellora or one of {sorted(build)}.")
            peft_model = build[config.kind](model, _lora(settings, **config.lora))
            trainer = SFTTrainer(model=peft_model, args=_args(work, settings, seed), train_dataset=train,
                                 processing_class=tokenizer)
        for callback in callbacks:
            trainer.add_callback(callback)
        started, cpu_started = time.perf_counter(), time.process_time()
        output = trainer.train()
        seconds, cpu_seconds = time.perf_counter() - started, time.process_time() - cpu_started
        trained = trainer.model
        report = trainable_parameter_report(trained)
        hot = getattr(trainer, "hellora_hot_experts", None)
        result = {
            "trainable_percent": report["trainable_percent"],
            "trainable": report.get("trainable"),
            "trainable_by_component": report.get("by_component"),
            "train_loss": output.metrics.get("train_loss"),
            "sec_per_step": output.metrics["train_runtime"] / max(trainer.state.global_step, 1),
            "seconds": seconds,
            # process CPU time per step (profiling included for HELLoRA rows' own selection, which is cheap here):
            # other jobs on a shared machine disturb it far less than wall time
            "cpu_sec_per_step": cpu_seconds / max(trainer.state.global_step, 1),
            "hot_experts": hot,
            **score(trained, tokenizer, held_out, domains, settings, domains_v2),
        }
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return result
