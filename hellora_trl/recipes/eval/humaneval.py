"""HumanEval: pass@k, and the harness that runs each completion against its tests in an isolated interpreter.

The program that interpreter runs is :mod:`.humaneval_runner`, whose source this module reads from its file
(``RUNNER_SOURCE``) and passes to ``python -I -B -c``. Standard library only (tqdm for the progress bar).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import math
import os
import signal
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["RUNNER_SOURCE", "evaluate_humaneval", "load_humaneval", "pass_at_k", "run_humaneval_sample"]


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k (Chen et al., 2021): 1 - C(n-c, k) / C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which avoids the huge binomials of the
    direct form. ``n`` samples, ``c`` of them correct, ``k`` draws.
    """
    for name, value in (("n", n), ("c", c), ("k", k)):
        if isinstance(value, bool) or not isinstance(value, int):
            raise TypeError(f"{name} must be an int, got {type(value).__name__}")
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if k > n:
        raise ValueError(f"k={k} is larger than the number of samples n={n}")
    if c > n:
        raise ValueError(f"c={c} correct samples is more than n={n} samples")
    if n - c < k:
        return 1.0
    product = 1.0
    for i in range(n - c + 1, n + 1):
        product *= 1.0 - k / i
    return 1.0 - product


# Trust design (docs/eval.md has the long version). Every sample runs in a fresh "runner" process, started
# by the evaluator in a new session with a minimal environment. The runner forks before it has read the
# unit tests:
#
# * the candidate process imports ``prompt + completion`` as a module and answers call requests for the
#   entry point over a pair of pipes. Before the completion runs it drops what it can (network and PID
#   namespaces, capabilities or the uid, rlimits, parent-death signal) and installs a PEP 578 audit hook
#   that cannot be removed. It never sees the test, the verdict pipe or any secret;
# * the checker (the runner itself) then reads the test, executes the dataset's prompt and test in its own
#   namespace and calls ``check(candidate)``, where ``candidate`` forwards each call to the candidate
#   process. Arguments and return values cross as plain data only (None, bool, int, float, complex, str,
#   bytes and lists / tuples / dicts / sets of those, checked with exact types), so an object whose
#   ``__eq__`` always succeeds cannot reach the test, and nothing the completion defines (decorators, a
#   ``check``, ``poly``, trace hooks) exists in the checker.
#
# The verdict is the checker's exit status plus one JSON line on a pipe that only the checker holds. The
# candidate process can make its own sample fail, never pass.
RUNNER_SOURCE = (Path(__file__).parent / "humaneval_runner.py").read_text(encoding="utf-8")
# The runner's own iterative tree removal, for the evaluator's last clean-up of a sample folder (defined from the
# same source the sandbox runs, without importing the package: the harness also loads standalone from its file).
_RUNNER_NAMES: dict[str, Any] = {"__name__": "hellora_humaneval_runner"}
exec(compile(RUNNER_SOURCE, str(Path(__file__).parent / "humaneval_runner.py"), "exec"), _RUNNER_NAMES)  # noqa: S102
remove_tree = _RUNNER_NAMES["remove_tree"]

_FSIZE_BYTES = 16 * 1024 * 1024
_TAIL_CHARS = 2000
_NOBODY = 65534
_USE_NAMESPACES = True  # tests turn it off to exercise the path taken where unshare(2) is not permitted
# Imported by the runner before the audit hook goes in (later imports compile from source, which is slower).
_PRELOAD = ("math", "random", "re", "string", "collections", "itertools", "functools", "heapq", "bisect", "hashlib",
            "typing", "statistics", "fractions", "decimal", "operator", "copy", "json", "types", "signal", "resource")


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the runner's whole process group (it is its own session leader)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _read_tail(path: Path) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - _TAIL_CHARS))
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""


_READ_ROOTS: tuple[str, ...] | None = None


def _read_roots() -> tuple[str, ...]:
    """Folders the completion may read and import from: the standard library and site-packages."""
    global _READ_ROOTS
    if _READ_ROOTS is None:
        import site
        import sysconfig

        found = []
        for path in [sysconfig.get_path(name) for name in ("stdlib", "platstdlib", "purelib", "platlib")] + list(
                site.getsitepackages()):
            for variant in (path, os.path.realpath(path)):
                if variant and os.path.isdir(variant) and variant not in found:
                    found.append(os.path.normpath(variant))
        _READ_ROOTS = tuple(found)
    return _READ_ROOTS


# Installed modules that act when imported (a browser, a window, a printout): never imported on a completion's behalf.
_NO_PRELOAD = frozenset({"antigravity", "this", "idlelib", "tkinter", "turtle", "turtledemo", "webbrowser", "pydoc",
                         "ensurepip", "venv", "pip", "setuptools", "distutils", "site", "test", "__main__", "__hello__",
                         "__phello__", "ctypes", "subprocess", "multiprocessing", "socket", "pty", "sqlite3"})


def _completion_imports(source: str) -> list[str]:
    """The modules ``source`` imports by absolute name (``import a.b`` / ``from a.b import c``), for the runner to
    import before it drops to uid nobody: an install that user cannot read still serves what the completion uses.
    Only names (imported from the installation, never from the completion); unparsable source gives none."""
    import ast

    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return []
    names: list[str] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            found = [node.module]
        else:
            continue
        for name in found:
            parts = name.split(".")
            if all(part.isidentifier() for part in parts) and parts[0] not in _NO_PRELOAD and name not in names:
                names.append(name)
    return names[:32]


def _world_readable(path: str) -> bool:
    """True when every folder on the way to ``path`` can be entered by other users (so uid nobody can import)."""
    current = Path(path)
    for folder in [current, *current.parents]:
        try:
            if not folder.stat().st_mode & 0o001:
                return False
        except OSError:
            return False
    return True


def _problem_parts(problem: Mapping[str, Any]) -> tuple[Any, str, str, str]:
    if not isinstance(problem, Mapping):
        raise TypeError(f"a HumanEval problem must be a mapping, got {type(problem).__name__}")
    parts = []
    for key in ("prompt", "test", "entry_point"):
        value = problem.get(key)
        if not isinstance(value, str):
            raise ValueError(f"HumanEval problem {problem.get('task_id')!r}: {key!r} must be a string, got "
                             f"{type(value).__name__}")
        parts.append(value)
    if not parts[2].isidentifier():
        raise ValueError(f"HumanEval problem {problem.get('task_id')!r}: entry_point {parts[2]!r} is not a name")
    return problem.get("task_id"), parts[0], parts[1], parts[2]


def _clean_text(text: str | None) -> str | None:
    """Text safe to write as UTF-8 (lone surrogates from a hostile completion become U+FFFD)."""
    if text is None:
        return None
    return text.encode("utf-8", "replace").decode("utf-8")[:_TAIL_CHARS]


def _write_private(path: Path, payload: Mapping[str, Any]) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as f:
        json.dump(payload, f, ensure_ascii=True)


def _read_verdict(fd: int) -> bytes:
    os.set_blocking(fd, False)
    chunks = []
    while sum(map(len, chunks)) < 65536:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            break
        if not chunk:
            break
        chunks.append(chunk)
    return b"".join(chunks)


def _remove_quietly(root: Path) -> None:
    """Remove a sample's temp folder without recursion; a tree that cannot be removed is reported, never raised."""
    try:
        gone = remove_tree(str(root))
    except Exception as err:  # noqa: BLE001 - nothing a completion left behind may stop the evaluation
        gone, why = False, f"{type(err).__name__}: {err}"
    else:
        why = "a file in it cannot be removed"
    if not gone:
        import warnings

        warnings.warn(f"HumanEval: could not remove the sample folder {root} ({why}); delete it by hand.", stacklevel=3)


def run_humaneval_sample(
    problem: Mapping[str, Any], completion: str, timeout: float = 5.0, memory_mb: int = 1024
) -> dict[str, Any]:
    """Run one HumanEval completion against its unit tests, isolated from the test and from this process.

    The completion runs as ``prompt + completion``, imported as a module in a *candidate* process; the
    dataset's prompt and test run in a separate *checker* process that calls ``check(candidate)``, each
    call of ``candidate`` being forwarded to the candidate process with plain-data arguments and
    results (None, bool, int, float, complex, str, bytes and lists / tuples / dicts / sets of them; a
    returned object of any other type, subclasses included, fails the sample). "passed" needs the
    checker to exit 0 *and* report "passed" on a pipe that only the checker holds, so nothing the
    completion does can turn a failure into a pass.

    Before the completion runs, the candidate process gets: a PEP 578 audit hook that blocks
    writes outside its work dir, reads outside the Python installation, ``os.open``,
    ``os.system``/``exec``/``fork``/``posix_spawn``, ``subprocess``, sockets, ``ctypes``, kill of any
    process, ``mmap``, code-object construction and interpreter shutdown without the hook; rlimits
    (``memory_mb`` of address space, 0 disables; CPU ``timeout`` + 1 s; 16 MiB per file; no new
    processes); a minimal environment; and, where the OS permits, private network and PID
    namespaces, uid nobody whenever the evaluator runs as root (no capabilities if the uid change fails)
    and a parent-death signal. Where that user cannot read the Python installation, the modules the
    completion imports by name are imported before the uid changes; any other import then fails the sample. The runner is a new session; its process group is SIGKILLed when the
    sample ends. ``docs/eval.md`` says plainly what is and is not isolated.

    Returns ``{"task_id", "verdict": "passed" | "failed" | "timed out", "passed", "error",
    "elapsed", "isolation"}``; ``error`` is None when passed; ``isolation`` lists the layers that
    were active.
    """
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not math.isfinite(timeout) or timeout <= 0:
        raise ValueError(f"timeout must be a finite number of seconds > 0, got {timeout!r}")
    if isinstance(memory_mb, bool) or not isinstance(memory_mb, int) or memory_mb < 0:
        raise ValueError(f"memory_mb must be an int >= 0 (0 disables the limit), got {memory_mb!r}")
    if not isinstance(completion, str):
        raise TypeError(f"completion must be a str, got {type(completion).__name__}")
    task_id, prompt, test, entry_point = _problem_parts(problem)
    reads = _read_roots()
    root_user = hasattr(os, "geteuid") and os.geteuid() == 0
    drop_uid = root_user  # always: uid 0 without capabilities can still write wherever root may (review NS1/NS2)
    readable = all(_world_readable(r) for r in reads)
    cpu_s = int(math.ceil(timeout)) + 1
    env = {
        "PATH": "/usr/bin:/bin",
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "OMP_NUM_THREADS": "1",
        "OPENBLAS_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "PYTHONDONTWRITEBYTECODE": "1",
    }
    root: Path | None = None
    timed_out = False
    start = time.monotonic()
    try:
        root = Path(tempfile.mkdtemp(prefix="hellora_humaneval_"))
        workdir = root / "work"
        workdir.mkdir(mode=0o700)
        env["HOME"] = env["TMPDIR"] = str(workdir)
        if drop_uid:
            os.chmod(root, 0o711)
            os.chown(workdir, _NOBODY, _NOBODY)
        _write_private(root / "candidate.json", {
            "source": prompt + completion + "\n", "entry_point": entry_point, "workdir": os.path.realpath(workdir),
            "cpu_s": cpu_s, "mem_bytes": memory_mb * 1024 * 1024, "fsize_bytes": _FSIZE_BYTES,
            "read_roots": list(reads), "devices": ["/dev/null", "/dev/urandom", "/dev/zero"],
            "preload": list(_PRELOAD) + ([] if readable else _completion_imports(prompt + completion)),
            "drop_uid": drop_uid, "namespaces": _USE_NAMESPACES,
        })
        _write_private(root / "check.json", {
            "prompt": prompt, "test": test, "entry_point": entry_point, "cpu_s": cpu_s,
            "mem_bytes": memory_mb * 1024 * 1024,
        })
        verdict_r, verdict_w = os.pipe()
        try:
            with open(root / "stdout", "wb") as out, open(root / "stderr", "wb") as err:
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-I", "-B", "-c", RUNNER_SOURCE, str(root), str(verdict_w)],
                        stdin=subprocess.DEVNULL, stdout=out, stderr=err, cwd=workdir, env=env,
                        start_new_session=True, close_fds=True, pass_fds=(verdict_w,),
                    )
                finally:
                    os.close(verdict_w)
                try:
                    proc.wait(timeout=timeout)
                except subprocess.TimeoutExpired:
                    timed_out = True
                finally:
                    _kill_group(proc)
                    proc.wait()
            raw = _read_verdict(verdict_r)
        finally:
            os.close(verdict_r)
        elapsed = time.monotonic() - start
        stderr = _read_tail(root / "stderr")
    finally:
        if root is not None:
            _remove_quietly(root)

    try:
        report = json.loads(raw.decode("ascii"))
        if not isinstance(report, dict) or raw.count(b"\n") != 1:
            report = None
    except (UnicodeDecodeError, ValueError):
        report = None
    isolation = [str(x) for x in report.get("isolation", [])] if report else []
    code = proc.returncode
    if timed_out:
        verdict, error = "timed out", f"timed out after {timeout:g} s"
    elif code == 0 and report is not None and report.get("verdict") == "passed":
        verdict, error = "passed", None
    elif report is not None and report.get("verdict") in ("failed", "timed out"):
        verdict, error = report["verdict"], str(report.get("error") or "failed")
    else:
        verdict = "failed"
        lines = [line for line in stderr.strip().splitlines() if line.strip()]
        if code is not None and code < 0:
            try:
                error = f"sandbox runner killed by {signal.Signals(-code).name}"
            except ValueError:
                error = f"sandbox runner killed by signal {-code}"
        else:
            error = f"sandbox runner failed (exit status {code})" + (f": {lines[-1]}" if lines else "")
    return {"task_id": task_id, "verdict": verdict, "passed": verdict == "passed", "error": _clean_text(error),
            "elapsed": round(elapsed, 4), "isolation": isolation}


def _problems_by_id(problems: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    if isinstance(problems, Mapping):
        return dict(problems)
    return {p["task_id"]: p for p in problems}


def _group_samples(samples: Mapping[str, Sequence[str]] | Iterable[Mapping[str, Any]]) -> dict[str, list[str]]:
    """Accept ``{task_id: [completion, ...]}`` or the upstream jsonl rows ``{"task_id", "completion"}``."""
    if isinstance(samples, Mapping):
        grouped = {}
        for task_id, completions in samples.items():
            if isinstance(completions, str):
                raise TypeError(f"samples[{task_id!r}] must be a list of completions, not a str")
            grouped[task_id] = list(completions)
        return grouped
    grouped: dict[str, list[str]] = {}
    for row in samples:
        grouped.setdefault(row["task_id"], []).append(row["completion"])
    return grouped


def _sample_key(task_id: str, index: int, completion: str) -> str:
    digest = hashlib.sha256(completion.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{task_id}\x00{index}\x00{digest}"


def _load_recorded(path: Path) -> dict[str, dict[str, Any]]:
    """Rows of a results JSONL from an earlier (possibly killed) run, by sample key; torn lines are skipped."""
    recorded: dict[str, dict[str, Any]] = {}
    if not path.exists():
        return recorded
    with open(path, encoding="utf-8", errors="replace") as f:
        for line in f:
            try:
                row = json.loads(line)
                recorded[row["key"]] = {k: v for k, v in row.items() if k != "key"}
            except (ValueError, KeyError, TypeError):
                continue
    return recorded


def evaluate_humaneval(
    problems: Iterable[Mapping[str, Any]] | Mapping[str, Mapping[str, Any]],
    samples: Mapping[str, Sequence[str]] | Iterable[Mapping[str, Any]],
    ks: Sequence[int] = (1, 5, 10),
    timeout: float = 5.0,
    workers: int = 2,
    memory_mb: int = 1024,
    progress: bool = False,
    results_path: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Execute every sample and report ``pass@k`` averaged over the tasks that have samples.

    A ``k`` is reported only when every task has at least ``k`` samples (as upstream does);
    pass@k is averaged over the tasks present in ``samples``, which may be a subset of
    ``problems`` (``n_tasks`` says how many). Samples run on a thread pool of ``workers``
    threads, each driving its own sandboxed runner process (see :func:`run_humaneval_sample`).

    ``results_path`` (a ``.jsonl`` file): each sample's result is appended there as soon as it is
    known, flushed and fsynced, so nothing already computed is lost if the evaluation is killed;
    a rerun with the same path reuses the rows whose task id, sample index and completion match
    and runs only the rest.
    """
    by_id = _problems_by_id(problems)
    grouped = _group_samples(samples)
    if not grouped:
        raise ValueError("no samples to evaluate")
    unknown = sorted(set(grouped) - set(by_id))
    if unknown:
        raise KeyError(f"samples for unknown task ids: {unknown[:5]}")
    empty = [t for t, c in grouped.items() if not c]
    if empty:
        raise ValueError(f"tasks with no samples: {empty[:5]}")
    for task_id in grouped:
        _problem_parts(by_id[task_id])  # a malformed problem fails here, before any sample runs
    jobs = [(task_id, i, completion) for task_id, completions in grouped.items() for i, completion in enumerate(completions)]
    bad = [(t, i) for t, i, c in jobs if not isinstance(c, str)]
    if bad:
        raise TypeError(f"completions must be strings; not for {bad[:5]}")

    sink_path = Path(results_path) if results_path is not None else None
    recorded = _load_recorded(sink_path) if sink_path is not None else {}
    sink = None
    if sink_path is not None:
        sink_path.parent.mkdir(parents=True, exist_ok=True)
        sink = open(sink_path, "a", encoding="utf-8")
    lock = threading.Lock()

    def run(job: tuple[str, int, str]) -> dict[str, Any]:
        task_id, index, completion = job
        key = _sample_key(task_id, index, completion)
        if key in recorded:
            return recorded[key]
        try:
            sample = run_humaneval_sample(by_id[task_id], completion, timeout=timeout, memory_mb=memory_mb)
        except Exception as err:  # noqa: BLE001 - one completion never stops the evaluation of the others
            sample = {"task_id": task_id, "verdict": "failed", "passed": False,
                      "error": _clean_text(f"harness error: {type(err).__name__}: {err}"[:2000]), "elapsed": None,
                      "isolation": []}
        result = {**sample, "sample_index": index}
        if sink is not None:
            line = json.dumps({"key": key, **result}, ensure_ascii=True) + "\n"
            with lock:
                sink.write(line)
                sink.flush()
                os.fsync(sink.fileno())
        return result

    from tqdm.auto import tqdm

    try:
        with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
            results = list(tqdm(pool.map(run, jobs), total=len(jobs), desc="humaneval", disable=not progress))
    finally:
        if sink is not None:
            sink.close()

    per_task = {task_id: {"n": len(c), "correct": 0} for task_id, c in grouped.items()}
    for result in results:
        per_task[result["task_id"]]["correct"] += int(result["passed"])
    smallest_n = min(t["n"] for t in per_task.values())
    metrics: dict[str, Any] = {}
    for k in ks:
        if k <= smallest_n:
            scores = [pass_at_k(t["n"], t["correct"], k) for t in per_task.values()]
            metrics[f"pass@{k}"] = sum(scores) / len(scores)
    isolation = sorted(set.intersection(*(set(r.get("isolation") or []) for r in results)))
    return {**metrics, "n_tasks": len(per_task), "n_samples": len(results), "per_task": per_task,
            "isolation": isolation, "results": results}


def load_humaneval(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Read HumanEval problems (or samples) from a ``.jsonl`` or gzip-compressed ``.jsonl.gz`` file."""
    path = Path(path)
    with open(path, "rb") as probe:
        gzipped = probe.read(2) == b"\x1f\x8b"
    opener = gzip.open if gzipped else open
    rows = []
    with opener(path, "rt", encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise ValueError(f"{path}:{number}: not valid JSON ({err})") from err
    return rows
