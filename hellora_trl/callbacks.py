"""The trainer's callbacks: HELLoRA's figures sent to the trackers that take images (TensorBoard, W&B)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

from transformers import TrainerCallback

__all__ = ["HELLoRAFiguresCallback"]


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
