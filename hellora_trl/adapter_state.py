"""Adapter state beyond PEFT's state dict (LoRI masks, dynamic ranks): one table, one saver, one accounting hook.

PEFT saves and loads every tensor of an adapter; what it cannot know is which entries of a factor may change
(LoRI-S masks, inactive dynamic-rank components). Each such feature keeps one state object per adapter in the table
on the transformers model (:func:`set_extra`). A state object implements:

* ``save(directory)``: write its side files next to PEFT's (atomically);
* ``changeable_entries()``: ``{id(param): entries that can change}``, what trainable-parameter accounting counts.

:func:`install_saver` makes ``save_pretrained`` (what Trainer checkpoints call) write every state's side files
after PEFT's own, and removes stale side files of features an adapter does not use. :data:`RESTORERS` maps each
side file to the function that rebuilds its state after ``load_hellora`` loaded the weights; they are imported only
when their file is present, so the core never imports :mod:`hellora_trl.experimental` unless an adapter needs it.
"""

from __future__ import annotations

import importlib
import os
import time
import types
from pathlib import Path
from typing import Any, Callable, Protocol

from peft import PeftModel
from torch import nn

from .constants import MASKS_FILE, RANKS_FILE, VARIANT_FILE
from .utils import apply_default_mode, unwrap_model

_TABLE_ATTR = "_hellora_adapter_state"

# kind -> the side files its state writes (removed when an adapter saved without that state).
# "card" (hellora_trl.adapter_card.AdapterCard) writes no side file: it adds the hellora block to PEFT's
# adapter_config.json and tags README.md, so it runs after PEFT's own save and has nothing stale to remove.
SIDE_FILES: dict[str, tuple[str, ...]] = {
    "variant": (VARIANT_FILE, MASKS_FILE), "dynamic_rank": (RANKS_FILE,), "card": (),
}
# side file -> "module:function(model, directory, adapter_name)" that restores its state, in restore order.
RESTORERS: dict[str, str] = {
    VARIANT_FILE: "hellora_trl.variants:restore_variant",
    RANKS_FILE: "hellora_trl.experimental.dynamic_rank:restore_dynamic_rank",
}


class AdapterExtra(Protocol):
    def save(self, directory: Path) -> None: ...

    def changeable_entries(self) -> dict[int, Callable[[int], int]]: ...


def table(model: nn.Module) -> dict[tuple[str, str], AdapterExtra]:
    """The (adapter, kind) -> state table of ``model`` (empty when it has none)."""
    return unwrap_model(model).__dict__.get(_TABLE_ATTR, {})


def get_extra(model: nn.Module, adapter_name: str, kind: str) -> Any:
    return table(model).get((adapter_name, kind))


def set_extra(model: nn.Module, adapter_name: str, kind: str, state: AdapterExtra | None) -> None:
    """Record (or, with ``None``, drop) ``kind``'s state for ``adapter_name``, and make saves write it."""
    if kind not in SIDE_FILES:
        raise ValueError(f"Unknown adapter-state kind {kind!r}; known: {sorted(SIDE_FILES)}.")
    entries = unwrap_model(model).__dict__.setdefault(_TABLE_ATTR, {})
    if state is None:
        entries.pop((adapter_name, kind), None)
    else:
        entries[(adapter_name, kind)] = state
    install_saver(model)


def changeable_entries(model: nn.Module) -> dict[int, Callable[[int], int]]:
    """The accounting hook: ``{id(param): numel -> entries that can change}`` over every state of every adapter.
    Where two states restrict the same factor, the smaller count holds."""
    merged: dict[int, Callable[[int], int]] = {}
    for state in table(model).values():
        for key, count in state.changeable_entries().items():
            previous = merged.get(key)
            merged[key] = count if previous is None else (lambda n, a=previous, b=count: min(a(n), b(n)))
    return merged


def save_extras(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Write every state of ``adapter_name`` next to its saved adapter; drop stale side files of other kinds."""
    directory = Path(directory)
    for kind, files in SIDE_FILES.items():
        state = get_extra(model, adapter_name, kind)
        if state is not None:
            directory.mkdir(parents=True, exist_ok=True)
            state.save(directory)
        else:
            for name in files:
                if (directory / name).exists():
                    (directory / name).unlink()  # a stale side file must not describe this adapter


def restore_extras(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> None:
    """Rebuild the states recorded in an adapter directory (after its weights were loaded)."""
    for filename, target in RESTORERS.items():
        if (Path(directory) / filename).is_file():
            module, function = target.split(":")
            getattr(importlib.import_module(module), function)(model, directory, adapter_name=adapter_name)


def _save_pretrained_with_extras(self: PeftModel, save_directory, *args, **kwargs):
    """PEFT's ``save_pretrained``, then each saved adapter's side files in PEFT's directory layout; the files it
    wrote get the package's one permission policy (:func:`~hellora_trl.utils.default_mode`: safetensors writes
    0600)."""
    start = time.time() - 1.0  # file systems with coarse timestamps
    result = type(self).save_pretrained(self, save_directory, *args, **kwargs)
    if kwargs.get("is_main_process", True):
        for adapter in kwargs.get("selected_adapters") or list(self.peft_config):
            out = Path(save_directory) if adapter == "default" else Path(save_directory) / adapter
            save_extras(self, out, adapter)
            for entry in out.iterdir() if out.is_dir() else ():
                if entry.is_file():
                    apply_default_mode(entry, since=start)
    return result


def install_saver(model: nn.Module) -> None:
    """Make ``model.save_pretrained`` write the side files too (the one place that wraps it).

    A bound method on the instance: ``copy.deepcopy`` re-binds it to the copy."""
    if isinstance(model, PeftModel) and "save_pretrained" not in model.__dict__:
        model.save_pretrained = types.MethodType(_save_pretrained_with_extras, model)
