"""Leaf helpers the whole package shares: atomic file output, wrapper unwrapping, real parameter shapes, tables.

Nothing here imports another hellora_trl module, so every module may import it.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn


# ------------------------------------------------------------------------------------------------ atomic output
def default_mode(directory: bool = False) -> int:
    """What ``open(path, "w")`` (0666) or ``mkdir`` (0777) would give under the process umask.

    The one permission policy for everything HELLoRA writes: temp files from ``mkstemp``/``mkdtemp`` start private
    (0600/0700) and safetensors' ``save_file`` always creates 0600 files, but a profile, adapter, merged checkpoint
    or report is an ordinary output that other users (a serving account, a shared team folder) may need to read.
    :func:`atomic_write`, :func:`atomic_dir`, :func:`publish_staged` and :func:`apply_default_mode` apply it.
    """
    umask = os.umask(0)
    os.umask(umask)
    return (0o777 if directory else 0o666) & ~umask


def apply_default_mode(path: str | os.PathLike, since: float | None = None) -> None:
    """Give ``path`` (a file, or a folder and everything below it) the :func:`default_mode` permissions.

    ``since``: only entries modified at or after this ``time.time()`` value (what a save just wrote into a folder
    that holds older files). Symlinks are left alone.
    """
    path = Path(path)
    file_mode, dir_mode = default_mode(), default_mode(directory=True)
    entries = [path] + (sorted(path.rglob("*")) if path.is_dir() and not path.is_symlink() else [])
    for entry in entries:
        if entry.is_symlink() or not entry.exists():
            continue
        if since is not None and entry.stat().st_mtime < since:
            continue
        entry.chmod(dir_mode if entry.is_dir() else file_mode)


def atomic_write(path: str | os.PathLike, write: Callable[[str], Any]) -> Path:
    """Let ``write(tmp_path)`` fill a temp file in the same folder, then rename it over ``path``.

    An interrupted save never leaves a torn file, and readers see the old file or the new one. The temp file keeps
    ``path``'s suffix (matplotlib and safetensors pick the format from it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=f".tmp{path.suffix}", dir=path.parent)
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, default_mode())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """:func:`atomic_write` for a text file (UTF-8)."""
    if not isinstance(text, str):
        raise TypeError(f"atomic_write_text needs a str, got {type(text).__name__}.")
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def check_output_apart(out_dir: str | os.PathLike, inputs: Iterable[Any] = ()) -> None:
    """Refuse an output folder that is, contains or lies inside one of ``inputs`` (local paths; other values such
    as hub ids or model objects are ignored): replacing it would delete what is being read."""
    out = Path(out_dir).expanduser().resolve()
    for item in inputs:
        if not isinstance(item, (str, os.PathLike)) or not os.path.exists(item):
            continue
        source = Path(item).expanduser().resolve()
        if out == source or out in source.parents or source in out.parents:
            relation = "is" if out == source else ("contains" if out in source.parents else "lies inside")
            raise ValueError(
                f"Output folder {out_dir} {relation} the input {item}; writing there would delete the input. "
                "Choose an output folder outside the inputs."
            )


def _dangling(path: Path) -> bool:
    return path.is_symlink() and not path.exists()


def check_output_dir(
    out_dir: str | os.PathLike, *, overwrite: bool = False, inputs: Iterable[Any] = (), flag: str = "--overwrite"
) -> Path:
    """Refuse, before any work, an output folder that a later atomic publish (:func:`atomic_dir`) could not
    replace or would replace wrongly; returns it as a Path.

    One-line ValueErrors for: a dangling symlink, a file (or a link to one) where the folder goes, a parent that is
    a file, the current folder or one of its parents (a folder in use cannot be renamed away), a mount point, an
    output that is, contains or lies inside one of ``inputs``, and a non-empty folder without ``overwrite``
    (``flag`` names the option that allows it).
    """
    out = Path(out_dir).expanduser()
    if _dangling(out):
        raise ValueError(f"Output folder {out_dir} is a symlink to {os.readlink(out)}, which does not exist; "
                         "remove the link or choose another --output_dir.")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"Output folder {out_dir} exists and is not a directory; choose another path.")
    for parent in out.absolute().parents:
        if parent.exists() or _dangling(parent):
            if not parent.is_dir():
                raise ValueError(f"Output folder {out_dir} lies under {parent}, which is not a directory.")
            break
    resolved, cwd = out.resolve(), Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise ValueError(f"Output folder {out_dir} is the current directory or one of its parents; it is written "
                         "elsewhere and renamed into place, which a folder in use cannot be. Name a new subfolder.")
    if out.is_dir() and os.path.ismount(resolved):
        raise ValueError(f"Output folder {out_dir} is a mount point and cannot be replaced; name a folder inside it.")
    check_output_apart(out, inputs)
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"Output folder {out_dir} is not empty; pass {flag} to replace it, or choose a fresh "
                         "--output_dir.")
    return out


def check_output_file(path: str | os.PathLike) -> Path:
    """Refuse, before any work, a path where a file cannot be written: a directory, a dangling symlink, a parent
    that is a file, or a read-only parent folder. Returns it as a Path."""
    out = Path(path).expanduser()
    if out.is_dir():
        raise ValueError(f"{path} is a directory; give a file path (e.g. {Path(path) / 'out.json'}).")
    if _dangling(out):
        raise ValueError(f"{path} is a symlink to {os.readlink(out)}, which does not exist; remove the link or "
                         "choose another path.")
    for parent in out.absolute().parents:
        if parent.exists():
            if not parent.is_dir():
                raise ValueError(f"{path} lies under {parent}, which is not a directory.")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ValueError(f"Cannot write {path}: {parent} is not writable (read-only or no permission).")
            break
    return out


@contextlib.contextmanager
def atomic_dir(out_dir: str | os.PathLike, overwrite: bool, inputs: Iterable[Any] = ()) -> Iterator[Path]:
    """Write into a hidden sibling directory, then rename it into place: readers never see half a folder.

    ``out_dir`` is checked first (:func:`check_output_dir`): ``inputs`` (paths the caller reads from) may not be,
    contain or lie inside it, ``overwrite`` or not. A failed swap leaves neither temp nor ``.old-`` folders behind.
    """
    out = check_output_dir(out_dir, overwrite=overwrite, inputs=inputs, flag="overwrite=True")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        yield tmp
        apply_default_mode(tmp)  # the folder and every file in it (save_pretrained's safetensors come out 0600)
        old = None
        if out.exists() or out.is_symlink():
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
            try:
                os.replace(out, old / out.name)
            except OSError:
                old.rmdir()  # nothing was moved: leave no empty .old- folder behind
                raise
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


COMMIT_FILES = ("adapter_config.json", "config.json")  # what makes a folder loadable: published last


def publish_staged(staging: Path, target: Path, commit_files: Sequence[str] = COMMIT_FILES) -> None:
    """Move every entry of ``staging`` into ``target`` with atomic renames (same filesystem), then drop it.

    The renames are one at a time, so the loadable marker goes last: ``target``'s old ``commit_files`` (the adapter
    or model config) are removed first and the new ones renamed in after everything else. A save killed half-way
    leaves a folder with no config (loading it fails with "not found"), never a new config beside old weights or an
    old config beside new ones. Entries get the :func:`default_mode` permissions.
    """
    target.mkdir(parents=True, exist_ok=True)
    apply_default_mode(staging)
    entries = sorted(staging.iterdir(), key=lambda e: (e.name in commit_files, e.name))
    for entry in entries:
        if entry.name in commit_files and (target / entry.name).is_file():
            (target / entry.name).unlink()
    for entry in entries:
        destination = target / entry.name
        if entry.is_dir() and destination.exists():
            shutil.rmtree(destination)
        os.replace(entry, destination)
    staging.rmdir()


# ------------------------------------------------------------------------------------------------ loading
def load_causal_lm(name_or_path: str | os.PathLike, **kwargs: Any) -> nn.Module:
    """A causal LM checkpoint (local directory or hub id) in its saved dtype unless ``dtype`` says otherwise: the
    package's one ``from_pretrained`` for models (the recipes' loader and the exports both call it)."""
    from transformers import AutoModelForCausalLM

    kwargs.setdefault("dtype", "auto")
    return AutoModelForCausalLM.from_pretrained(str(name_or_path), **kwargs)


# ------------------------------------------------------------------------------------------------ wrappers
def unwrap_model(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT/accelerate wrappers (DDP, DeepSpeed engines, PeftModel)."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


def unwrap_layer(module: nn.Module) -> nn.Module:
    """The original module inside a PEFT tuner layer (or the module itself)."""
    get_base = getattr(module, "get_base_layer", None)
    return get_base() if callable(get_base) else module


def clean_param_name(name: str) -> str:
    """Drop wrapper prefixes (DDP ``module.``, FSDP/compile wrappers) so names compare across strategies."""
    for prefix in ("module.", "_orig_mod.", "_fsdp_wrapped_module."):
        name = name.replace(prefix, "")
    return name


# ------------------------------------------------------------------------------------------------ shapes
def full_shape(tensor: torch.Tensor) -> tuple[int, ...]:
    """The real shape of a (possibly ZeRO-3 partitioned) parameter: ``ds_shape`` when DeepSpeed set one."""
    shape = getattr(tensor, "ds_shape", None)
    return tuple(shape) if shape is not None else tuple(tensor.shape)


def is_zero3_param(tensor: torch.Tensor) -> bool:
    """Whether DeepSpeed ZeRO-3 manages (partitions) this parameter."""
    return hasattr(tensor, "ds_id")


def has_zero3_params(module: nn.Module) -> bool:
    """Whether any parameter of ``module`` is ZeRO-3 partitioned (the model was built under ``zero.Init``)."""
    return any(is_zero3_param(p) for p in module.parameters())


# ------------------------------------------------------------------------------------------------ tables
def markdown_table(
    header: Sequence[str], rows: Iterable[Sequence[Any]], *, empty: str = "-", float_format: str = "{:.4g}"
) -> list[str]:
    """A GitHub markdown table as lines: ``None`` becomes ``empty``, floats use ``float_format``, pipes and
    newlines inside cells are escaped so a value never breaks the table."""

    def cell(value: Any) -> str:
        if value is None:
            return empty
        if isinstance(value, float):
            return float_format.format(value)
        return str(value).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return lines
