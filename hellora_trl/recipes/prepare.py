"""Training rows as the trainer sees them: TRL's own dataset preparation, without building a trainer.

``SFTTrainer`` prepares its training dataset once, in ``__init__``: chat template or EOS appended to the text or
completion, tokenization, labels (completion-only or assistant-only masks), truncation to ``max_length``, and rows
left with no target dropped. HELLoRA's warm-up slice is taken from that prepared dataset
(:func:`hellora_trl.profiling.warmup_slice`). ``hellora profile`` and ``hellora report`` must route exactly those
tokens, so they call the same preparation (TRL's ``SFTTrainer._prepare_dataset``) instead of rendering text by
hand. That method reads three things the trainer decides in ``__init__`` (the tokenizer, the training chat
template and whether the loss is completion-only); :func:`prepare_dataset` decides them by the trainer's rules.
A test compares the token ids of ``hellora profile``'s slice with the trainer's warm-up slice.
"""

from __future__ import annotations

from typing import Any

__all__ = ["prepare_dataset", "sft_arguments", "warmup_rows"]


def sft_arguments(**overrides: Any):
    """The trainer's field defaults (:class:`~hellora_trl.config.HELLoRAConfig`, an ``SFTConfig``) with
    ``overrides`` on top, as a plain namespace for :func:`prepare_dataset`: the preparation options without
    ``TrainingArguments``' device and precision checks. A real ``SFTConfig`` / ``HELLoRAConfig`` works too."""
    import dataclasses
    from types import SimpleNamespace

    from ..config import HELLoRAConfig

    values: dict[str, Any] = {}
    for f in dataclasses.fields(HELLoRAConfig):
        if f.default is not dataclasses.MISSING:
            values[f.name] = f.default
        elif f.default_factory is not dataclasses.MISSING:
            values[f.name] = f.default_factory()
    unknown = set(overrides) - set(values)
    if unknown:
        raise ValueError(f"Not HELLoRAConfig / SFTConfig fields: {sorted(unknown)}.")
    return SimpleNamespace(**{**values, **overrides})


def prepare_dataset(dataset, processing_class, args):
    """``dataset`` (TRL format: prompt-completion, messages or text; or already tokenized) prepared exactly as
    ``SFTTrainer(args=args, train_dataset=dataset, processing_class=processing_class)`` prepares it.

    Refuses what the trainer would need the model for (``chat_template_path`` edits the embeddings) and what it
    does not prepare ahead (vision datasets, ``skip_prepare_dataset``), with one line saying so."""
    from trl import SFTTrainer

    if getattr(args, "chat_template_path", None):
        raise ValueError(
            "chat_template_path changes the model's embeddings as well as the tokenizer; prepare rows with a "
            "tokenizer that already carries the template instead."
        )
    if (args.dataset_kwargs or {}).get("skip_prepare_dataset"):
        raise ValueError("dataset_kwargs.skip_prepare_dataset is set: the trainer would use the rows as they are.")
    if not hasattr(SFTTrainer, "_prepare_dataset"):  # pragma: no cover - guarded by pyproject's TRL range
        raise RuntimeError("This TRL has no SFTTrainer._prepare_dataset; install a trl within pyproject's range.")
    sample = next(iter(dataset), None)
    if sample is None:
        raise ValueError("The dataset is empty; there are no rows to prepare.")
    if any(key in sample for key in ("image", "images")):
        raise ValueError("Vision datasets are prepared on the fly by the trainer, not ahead; profile text rows.")
    preparer = _Preparation(processing_class, args, sample)
    return preparer._prepare_dataset(dataset, processing_class, args, args.packing, None, "train")


def warmup_rows(dataset, processing_class, args, fraction: float, seed: int):
    """The trainer's warm-up slice: ``dataset`` prepared as above, then the seeded ``fraction`` of its rows."""
    from ..profiling import warmup_slice

    return warmup_slice(prepare_dataset(dataset, processing_class, args), fraction, seed)


class _Preparation:
    """What ``SFTTrainer._prepare_dataset`` reads from the trainer, decided by the trainer's ``__init__`` rules."""

    def __init__(self, processing_class, args, sample) -> None:
        from transformers import PreTrainedTokenizerBase, ProcessorMixin
        from trl.data_utils import is_conversational

        if isinstance(processing_class, ProcessorMixin):
            self._tokenizer = processing_class.tokenizer
        elif isinstance(processing_class, PreTrainedTokenizerBase):
            self._tokenizer = processing_class
        else:
            raise TypeError("processing_class must be a tokenizer or a processor.")
        if args.eos_token is not None:  # the trainer sets it on the tokenizer the same way
            if args.eos_token not in self._tokenizer.get_vocab():
                raise ValueError(f"eos_token {args.eos_token!r} is not in the tokenizer's vocabulary.")
            self._tokenizer.eos_token = args.eos_token
        self.chat_template = None
        if args.assistant_only_loss:
            if not is_conversational(sample):
                raise ValueError("assistant_only_loss=True needs a conversational dataset (messages).")
            from trl.chat_template_utils import get_training_chat_template, has_generation_markers

            if not has_generation_markers(processing_class.chat_template):
                self.chat_template = get_training_chat_template(processing_class)
        if args.completion_only_loss is None:
            self.completion_only_loss = "prompt" in sample and "completion" in sample
        else:
            self.completion_only_loss = args.completion_only_loss

    def _prepare_dataset(self, *a):
        from trl import SFTTrainer

        return SFTTrainer._prepare_dataset(self, *a)
