"""The lab model cache's trust and coordination: a manifest of every file (sizes and sha256) written at publish and
checked before use, clean-up of temp folders left by killed builds, the build lock, and the wait of the processes
that do not build (see :mod:`hellora_trl.recipes.lab.model` and ``docs/lab.md``). Standard library only."""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import time
from pathlib import Path

__all__ = [
    "CARD_NAME",
    "LabCacheError",
    "MANIFEST_NAME",
    "build_lock",
    "clean_stale",
    "failure_note",
    "file_sha256",
    "host_tag",
    "job_id",
    "owner_gone",
    "verify_entry",
    "wait_for_entry",
    "write_manifest",
]

CARD_NAME = "lab_card.json"
MANIFEST_NAME = "lab_manifest.json"
# A temp folder of a build whose process cannot be checked (another machine) is stale after this long.
STALE_SECONDS = 24 * 3600
# How long a non-first process waits for the first one to publish the entry (HELLORA_LAB_WAIT_SECONDS).
WAIT_SECONDS = 6 * 3600


class LabCacheError(ValueError):
    """A lab cache entry that is missing files, damaged, or was never published (one-line message)."""


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 of one file, read in 1 MiB blocks (manifests and the card's weights hash)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def write_manifest(entry: str | os.PathLike) -> Path:
    """Record the size and sha256 of every file of a lab checkpoint folder in ``lab_manifest.json``."""
    entry = Path(entry)
    files = {
        f.relative_to(entry).as_posix(): {"size": f.stat().st_size, "sha256": file_sha256(f)}
        for f in sorted(entry.rglob("*")) if f.is_file() and f.name != MANIFEST_NAME
    }
    path = entry / MANIFEST_NAME
    path.write_text(json.dumps({"format": 1, "files": files}, indent=1, sort_keys=True))
    return path



def verify_entry(entry: str | os.PathLike, fix: str = "hellora pretrain --rebuild") -> None:
    """Check every file of a lab cache entry against its manifest; :class:`LabCacheError` (one line, naming
    ``fix``) when the manifest is missing or unreadable, or a file is missing, of another size or content."""
    entry = Path(entry)
    manifest = entry / MANIFEST_NAME
    try:
        files = json.loads(manifest.read_text())["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except FileNotFoundError:
        problem = f"it has no {MANIFEST_NAME} (a partial entry, or one written by hellora-trl before 0.2)"
    except (OSError, ValueError, KeyError, TypeError) as err:
        problem = f"its {MANIFEST_NAME} is unreadable ({err})"
    else:
        problem = None
        for name, want in sorted(files.items()):
            path = entry / name
            if not path.is_file():
                problem = f"{name} is missing"
            elif path.stat().st_size != want.get("size"):
                problem = f"{name} has {path.stat().st_size} bytes, {want.get('size')} were published"
            elif file_sha256(path) != want.get("sha256"):
                problem = f"{name} does not match the sha256 recorded at publish"
            if problem:
                break
        if problem is None:
            needed = [n for n in ("config.json", "model.safetensors", CARD_NAME) if n not in files]
            if needed:
                problem = f"its manifest does not list {', '.join(needed)}"
    if problem:
        raise LabCacheError(f"The lab model cache entry {entry} is corrupt or incomplete: {problem}. Rebuild it: {fix}")


def owner_gone(name: str) -> bool:
    """Whether the build that named a temp folder ``.<key>.tmp-<host>-<pid>-<random>`` (or ``.old-``) ran on this
    machine and its process is gone."""
    tag = name.split(".tmp-", 1)[-1] if ".tmp-" in name else name.split(".old-", 1)[-1]
    parts = tag.split("-")
    if len(parts) != 3 or parts[0] != host_tag() or not parts[1].isdigit():
        return False
    try:
        os.kill(int(parts[1]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # alive, owned by another user
        return False
    return False


def host_tag() -> str:
    return "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"


def clean_stale(root: str | os.PathLike, max_age: float = STALE_SECONDS) -> list[Path]:
    """Remove the temp folders that killed builds left in a cache root (``.<key>.tmp-*`` / ``.<key>.old-*``): those
    whose process on this machine is gone, and any older than ``max_age`` seconds. Returns what was removed."""
    root = Path(root)
    removed = []
    if not root.is_dir():
        return removed
    now = time.time()
    for path in root.iterdir():
        if not path.name.startswith(".") or not (".tmp-" in path.name or ".old-" in path.name) or not path.is_dir():
            continue
        try:
            old = now - path.stat().st_mtime > max_age
        except OSError:
            continue
        if old or owner_gone(path.name):
            shutil.rmtree(path, ignore_errors=True)
            if not path.exists():
                removed.append(path)
    return removed


@contextlib.contextmanager
def build_lock(root: Path, key: str):
    """An exclusive lock on ``<root>/.<key>.lock`` (blocking): one build of an entry at a time on this filesystem."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX: no inter-process lock
        yield
        return
    with open(root / f".{key}.lock", "a+") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def job_id() -> str:
    """What the processes of one launched job share (rendezvous address and run id)."""
    return ":".join(os.environ.get(k, "") for k in ("MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID"))


def failure_note(root: Path, key: str) -> Path:
    return root / f".{key}.failed.json"



def wait_for_entry(root: Path, final: Path, key: str, fix: str, since: float) -> Path:
    """A non-first process: wait until the first process of this machine published a verified entry (newer than
    ``since`` when rebuilding); stop with one line when it reports a failure or the wait runs out."""
    limit = float(os.environ.get("HELLORA_LAB_WAIT_SECONDS", WAIT_SECONDS))
    deadline = time.monotonic() + limit
    note = failure_note(root, key)
    job = job_id()
    while True:
        manifest = final / MANIFEST_NAME
        if manifest.is_file() and manifest.stat().st_mtime >= since:
            verify_entry(final, fix)
            return final
        try:
            failure = json.loads(note.read_text())
        except (OSError, ValueError):
            failure = None
        if isinstance(failure, dict) and failure.get("job") == job and failure.get("time", 0) >= since - 3600:
            raise LabCacheError(
                f"The main process failed to build the lab model {key} ({failure.get('error', 'no message')}); "
                f"see its log above, fix the cause and run again (or build it first: {fix.replace(' --rebuild', '')})."
            )
        if time.monotonic() > deadline:
            raise LabCacheError(
                f"Waited {limit:.0f} s for the main process to publish the lab model {final} (HELLORA_LAB_WAIT_SECONDS); "
                f"build it first with: {fix.replace(' --rebuild', '')}"
            )
        time.sleep(0.5)
