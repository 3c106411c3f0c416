"""Rerun the adversarial probe families of the 2026-12-05 reliability review against the current code.

The review (``../shared/design/reliability-review-2026-12-05.md``) describes each probe in a table row but did not
ship its scripts. This tool rebuilds the families that issue 19 ("Hardening II") must close: NP (``hellora pretrain``
and the lab cache), NT (``--task sft`` with malformed TRL rows), NE (``export`` / ``merge`` path tricks), NG
(``bench/gpu/run.sh`` with bad wheels / output folders), NS (HumanEval sandbox escapes and cheats) and rows 5.8 / 5.10
(a new run in a reused ``output_dir``). Each probe has an id, what it does, the outcome the review saw and the
outcome classes that count as closed; the tool classifies what happens today with checks written here:

- ``clear error``: rc != 0, no ``Traceback`` in the output, the last line of stderr is one message (the words the
  probe asks for, when it asks), and every file that must survive still hashes the same;
- ``ok``: rc 0 and the probe's own check of the result passes;
- ``unclear traceback`` (a raw traceback, or a garbled / misleading message), ``silent wrong`` (rc 0, wrong result),
  ``data lost`` (a protected file changed or vanished, or litter left behind), ``sandbox escape``, ``CHEAT PASSES``
  and ``hang`` otherwise.

How it runs (like the review): everything in a scratch temp dir, ``HELLORA_LAB_RECIPE=tiny`` with a scratch
``HELLORA_LAB_CACHE`` built once, ``HF_HUB_OFFLINE=1``. CLI probes are child processes: the tool imports the CLI once
and forks one child per probe, which calls ``hellora_trl.cli.main.main(argv)`` (the function behind the ``hellora``
console script) with its stdout/stderr in a log; an exception escaping ``main`` prints its traceback and gives rc 1,
as the console script would. ``bench/gpu/run.sh`` runs as a real ``bash`` process, the sandbox probes call
``run_humaneval_sample`` in this process (each sample starts its own checker and candidate processes).

    PYTHONPATH=$PWD python tools/reliability_probes.py            # all families, about 90 s on the shared 2-core box
    PYTHONPATH=$PWD python tools/reliability_probes.py --families NP,NS --keep
    HELLORA_DATASETS=/path/to/datasets ...   # where HumanEval lives when not at ../shared/datasets

Writes ``bench/results/reliability-probes.md`` (one table per family: id, probe, the review's outcome, today's) and
``bench/results/reliability-probes.json``; exits 1 when a probe is outside its accepted outcomes. The classifier
functions (``classify_cli``, ``classify_sandbox``, ``tree_digest``, ``changed_files``) are tested on canned outputs
in ``tests/test_reliability_probes.py``; the full run is a tool, not a test.
"""

from __future__ import annotations

import argparse
import fnmatch
import gzip
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

REPO = Path(__file__).resolve().parents[1]
DATASETS = Path(os.environ.get("HELLORA_DATASETS", REPO.parent / "shared" / "datasets"))  # HumanEval for NS
REVIEW = "../shared/design/reliability-review-2026-12-05.md"

CLEAR = "clear error"
LATE = "clear error (late)"
LATE_S = 15.0  # a refusal slower than this came after profiling / training / merging (see classify_cli)
OK = "ok"
TRACEBACK = "unclear traceback"
SILENT = "silent wrong"
LOST = "data lost"
ESCAPE = "sandbox escape"
CHEAT = "CHEAT PASSES"
HANG = "hang"
FAILED_TO_RUN = "probe failed"  # the probe's own setup broke: not a verdict on the project
GOOD = (CLEAR, OK)

# ------------------------------------------------------------------------------------------------ classifiers


@dataclass
class Result:
    """What one command did: exit status (None: killed at the timeout), its output, wall seconds."""

    rc: int | None
    stdout: str = ""
    stderr: str = ""
    seconds: float = 0.0


def tree_digest(path: str | os.PathLike) -> dict[str, str]:
    """sha256 of every regular file under ``path`` (or of ``path`` itself), keyed by relative path."""
    root = Path(path)
    if root.is_file():
        return {".": hashlib.sha256(root.read_bytes()).hexdigest()}
    out = {}
    for p in sorted(root.rglob("*")):
        if p.is_file() and not p.is_symlink():
            out[str(p.relative_to(root))] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def changed_files(before: Mapping[str, Mapping[str, str]]) -> list[str]:
    """Files (``{root: tree_digest(root)}`` taken before) that are now missing or different."""
    lost = []
    for root, files in before.items():
        now = tree_digest(root) if Path(root).exists() else {}
        lost += [f"{root}/{name}" for name, digest in files.items() if now.get(name) != digest]
    return lost


GARBLED = re.compile(r"\[('.{1,2}', ){4,}")  # a string printed as a list of characters


def last_line(text: str) -> str:
    lines = [line for line in text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else ""


def classify_cli(
    res: Result,
    *,
    lost: Sequence[str] = (),
    must_say: Sequence[str] = (),
    ok_problem: str | None = None,
    late_s: float = LATE_S,
) -> tuple[str, str]:
    """Verdict and evidence for one command. ``lost``: protected files changed (from :func:`changed_files`);
    ``must_say``: regexes a refusal has to match to count as clear (else it is misleading); ``ok_problem``: what is
    wrong with the result of an rc-0 run (None: nothing); a refusal after more than ``late_s`` seconds came after
    work was done (every refusal here needs under 2 s)."""
    if res.rc is None:
        return HANG, f"no exit after {res.seconds:.0f} s"
    if lost:
        return LOST, f"rc {res.rc}; changed or missing: {', '.join(lost[:4])}"
    text = res.stdout + "\n" + res.stderr
    message = last_line(res.stderr) or last_line(res.stdout)
    if "Traceback (most recent call last)" in text:
        return TRACEBACK, f"rc {res.rc}: traceback ending {message[:160]!r}"
    if res.rc != 0:
        if not message:
            return TRACEBACK, f"rc {res.rc} with no message"
        if GARBLED.search(message):
            return TRACEBACK, f"garbled: {message[:160]!r}"
        missing = [pat for pat in must_say if not re.search(pat, message, re.I)]
        if missing:
            return TRACEBACK, f"misleading (does not say {missing}): {message[:200]!r}"
        return (LATE if res.seconds > late_s else CLEAR), f"rc {res.rc}, {res.seconds:.1f} s: {message[:200]!r}"
    if ok_problem:
        return SILENT, f"rc 0 but {ok_problem}"
    return OK, f"rc 0, {res.seconds:.1f} s"


def classify_sandbox(
    result: Mapping[str, Any] | None,
    *,
    should_pass: bool = False,
    escaped: Sequence[str] = (),
    leaked: str | None = None,
    lost: Sequence[str] = (),
    crashed: str | None = None,
) -> tuple[str, str]:
    """Verdict for one HumanEval sample: ``escaped`` lists files the completion made outside its work dir,
    ``leaked`` names information that crossed out, ``crashed`` is the exception ``run_humaneval_sample`` raised."""
    if crashed:
        return LOST, f"the harness raised {crashed}"
    if lost:
        return LOST, f"changed or missing: {', '.join(lost[:4])}"
    if escaped:
        return ESCAPE, f"made outside the work dir: {', '.join(escaped[:4])}"
    if leaked:
        return ESCAPE, f"leaked: {leaked[:200]}"
    assert result is not None
    verdict = result.get("verdict")
    if should_pass:
        if verdict != "passed":
            return SILENT, f"control not passed: {verdict}, {str(result.get('error'))[:160]}"
        return OK, "passed"
    if verdict == "passed" or result.get("passed"):
        return CHEAT, "graded passed"
    return OK, f"{verdict}: {str(result.get('error'))[:160]}"


# -------------------------------------------------------------------------------------------- running things


class Runner:
    """Runs CLI probes as forked children of one process that imported the CLI once (the review's forkrun.py)."""

    def __init__(self, scratch: Path, base_env: Mapping[str, str]):
        self.scratch = scratch
        self.base_env = dict(base_env)
        self.logs = scratch / "log"
        self.logs.mkdir(parents=True, exist_ok=True)
        import torch

        torch.set_num_threads(1)
        import importlib

        import hellora_trl.cli.main  # noqa: F401  (the CLI and everything a command imports, once)

        for name in ("cli.commands.export", "cli.commands.merge", "cli.commands.train", "recipes.lab.model",
                     "recipes.sft"):
            try:
                importlib.import_module(f"hellora_trl.{name}")
            except ImportError:  # another layout (an older checkout): the child imports what it needs
                pass

    def start(self, name: str, argv: Sequence[str], env: Mapping[str, str | None] = (), cwd: Path | None = None) -> int:
        """Fork a child that runs ``hellora ARGV``; returns its pid (see :meth:`wait`)."""
        out, err = self.logs / f"{name}.out", self.logs / f"{name}.err"
        sys.stdout.flush()
        sys.stderr.flush()
        pid = os.fork()
        if pid == 0:  # the child: never returns
            rc = 1
            try:
                os.setpgrp()
                for key, value in {**self.base_env, **dict(env)}.items():
                    if value is None:
                        os.environ.pop(key, None)
                    else:
                        os.environ[key] = value
                os.chdir(cwd or self.scratch)
                for fd, path in ((1, out), (2, err)):
                    f = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
                    os.dup2(f, fd)
                    os.close(f)
                # the parent's sys.stdout/stderr may not be fds 1/2 (pytest's capture): write to the logs
                sys.stdout = open(1, "w", buffering=1, closefd=False)
                sys.stderr = open(2, "w", buffering=1, closefd=False)
                from hellora_trl.cli.main import main

                rc = main(list(argv))
            except SystemExit as exc:
                code = exc.code
                rc = code if isinstance(code, int) else (0 if code is None else 1)
                if not isinstance(code, int) and code is not None:
                    print(code, file=sys.stderr)
            except BaseException:
                traceback.print_exc()
                rc = 1
            finally:
                try:
                    sys.stdout.flush()
                    sys.stderr.flush()
                finally:
                    os._exit(rc if isinstance(rc, int) else 1)
        return pid

    def wait(self, name: str, pid: int, timeout: float, t0: float) -> Result:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                rc = os.waitstatus_to_exitcode(status)
                break
            if time.time() - t0 > timeout:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                rc = None
                break
            time.sleep(0.05)
        read = lambda suffix: (self.logs / f"{name}.{suffix}").read_text(errors="replace")  # noqa: E731
        return Result(rc, read("out"), read("err"), time.time() - t0)

    def cli(self, name: str, argv: Sequence[str], env: Mapping[str, str | None] = (), cwd: Path | None = None,
            timeout: float = 240) -> Result:
        t0 = time.time()
        return self.wait(name, self.start(name, argv, env, cwd), timeout, t0)


def run_process(argv: Sequence[str], env: Mapping[str, str], cwd: Path, timeout: float) -> Result:
    t0 = time.time()
    try:
        p = subprocess.run(list(argv), env={**os.environ, **env}, cwd=cwd, capture_output=True, text=True,
                           timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        return Result(None, str(exc.stdout or ""), str(exc.stderr or ""), time.time() - t0)
    return Result(p.returncode, p.stdout, p.stderr, time.time() - t0)


@dataclass
class Probe:
    id: str
    what: str
    review: str  # the review's outcome (2026-12-05)
    accept: tuple[str, ...]  # outcomes that count as closed
    outcome: str = ""
    evidence: str = ""
    seconds: float = 0.0


@dataclass
class Ctx:
    scratch: Path
    runner: Runner
    lab_key: str = ""
    fixtures: dict[str, Path] = field(default_factory=dict)
    probes: list[Probe] = field(default_factory=list)

    def record(self, family: str, probe: Probe, fn: Callable[[], tuple[str, str]]) -> None:
        t0 = time.time()
        try:
            probe.outcome, probe.evidence = fn()
        except Exception as exc:  # the probe's own machinery broke: say so, never hide it as a verdict
            probe.outcome, probe.evidence = FAILED_TO_RUN, f"{type(exc).__name__}: {exc}"[:300]
        probe.seconds = time.time() - t0
        for name in ("evidence", "what"):
            text = getattr(probe, name).replace(str(self.scratch), "<scratch>")
            setattr(probe, name, text.replace(str(REPO), "<repo>"))
        self.probes.append(probe)
        mark = "  " if probe.outcome in probe.accept else "!!"
        print(f"{mark} {family} {probe.id:5s} {probe.outcome:18s} {probe.seconds:5.1f}s  {probe.evidence[:110]}",
              flush=True)

    def path(self, *parts: str) -> Path:
        return self.scratch.joinpath(*parts)


def copy_cache(ctx: Ctx, name: str) -> Path:
    """A private copy of the prebuilt lab cache (``cache/c1``) for one probe."""
    dst = ctx.path("cache", name)
    shutil.copytree(ctx.path("cache", "c1"), dst)
    return dst


ENTRY_FILES = ("config.json", "model.safetensors", "lab_card.json", "README.md", "tokenizer.json")


def entry_problem(entry: Path) -> str | None:
    """What is wrong with a lab-cache entry (None: complete and its weights load), checked here rather than by
    the cache's own verifier, which is what is under test."""
    missing = [name for name in ENTRY_FILES if not (entry / name).is_file()]
    if missing:
        return f"entry {entry.name} lacks {missing}"
    try:
        from safetensors.torch import load_file

        load_file(entry / "model.safetensors")
        json.loads((entry / "config.json").read_text())["model_type"]
    except Exception as exc:
        return f"entry {entry.name} does not load: {type(exc).__name__}: {str(exc)[:100]}"
    return None


def litter(root: Path, pattern: str) -> list[str]:
    """Names in ``root`` matching ``pattern`` (``fnmatch``; dot names included)."""
    return sorted(n for n in os.listdir(root) if fnmatch.fnmatch(n, pattern)) if root.is_dir() else []


IMMUTABLE: list[Path] = []  # folders a probe made immutable: cleared at the end whatever happens


def chattr(path: Path, flag: str) -> bool:
    if flag == "+i":
        IMMUTABLE.append(path)
    return shutil.which("chattr") is not None and subprocess.run(
        ["chattr", flag, str(path)], capture_output=True).returncode == 0


# ------------------------------------------------------------------------------------------------- fixtures

TRAIN_T = ["--train_limit", "16", "--eval_limit", "0", "--max_steps", "2", "--per_device_train_batch_size", "4",
           "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none", "--disable_tqdm", "true",
           "--no_hellora_plots", "--hellora_profile_mode", "forward"]
LAB_TRAIN = ["--train_limit", "8", "--eval_limit", "0", "--max_steps", "1", "--report_to", "none",
             "--no_hellora_plots", "--save_strategy", "no", "--disable_tqdm", "true"]


def build_fixtures(ctx: Ctx) -> None:
    """The lab cache ``cache/c1`` (this is probe NP1 too), the tiny OLMoE + its profile, and an adapter on it."""
    s = ctx.path("s")
    s.mkdir(parents=True, exist_ok=True)
    res = ctx.runner.cli("fix_profile", ["profile", "--tiny", "olmoe", "--limit", "16", "--output", str(s / "p.json"),
                                         "--save_model_to", str(s / "tiny_olmoe")])
    if res.rc != 0:
        raise RuntimeError(f"fixture tiny_olmoe failed: {last_line(res.stderr)}")
    ctx.fixtures["tiny_olmoe"] = s / "tiny_olmoe"
    res = ctx.runner.cli("fix_adapter", ["train", "--model_name_or_path", str(s / "tiny_olmoe"), *TRAIN_T,
                                         "--save_strategy", "no", "--output_dir", str(s / "ad_e1")])
    if res.rc != 0:
        raise RuntimeError(f"fixture adapter failed: {last_line(res.stderr)}")
    ctx.fixtures["adapter"] = s / "ad_e1"
    (s / "sbx").mkdir(exist_ok=True)


# ------------------------------------------------------------------------------------ NP: pretrain, lab cache


def family_np(ctx: Ctx) -> None:
    r, F = ctx.runner, "NP"
    c1 = ctx.path("cache", "c1")

    def pretrain(name, cache, *args, env=(), timeout=240):
        return r.cli(name, ["pretrain", "--recipe", "tiny", *args],
                     {"HELLORA_LAB_CACHE": str(cache), **dict(env)}, timeout=timeout)

    def np1():
        res = pretrain("NP1", c1)
        entries = [p for p in c1.iterdir() if p.is_dir() and not p.name.startswith(".")]
        ctx.lab_key = entries[0].name if len(entries) == 1 else ""
        problem = None if ctx.lab_key else f"cache holds {len(entries)} entries"
        return classify_cli(res, ok_problem=problem or entry_problem(c1 / ctx.lab_key))

    ctx.record(F, Probe("NP1", "fresh `hellora pretrain --recipe tiny` into an empty cache", "ok", (OK,)), np1)

    def np2():
        before = {str(c1): tree_digest(c1)}
        res = pretrain("NP2", c1)
        return classify_cli(res, lost=changed_files(before),
                            ok_problem=None if res.seconds < 30 else f"cache hit took {res.seconds:.0f} s")

    ctx.record(F, Probe("NP2", "same again (cache hit)", "ok", (OK,)), np2)
    key = ctx.lab_key

    def broken(name, damage, command):
        cache = copy_cache(ctx, name)
        damage(cache / key)

        def run():
            if command == "pretrain":
                res = pretrain(name, cache)
            else:
                res = r.cli(name, ["train", *LAB_TRAIN, "--output_dir", str(ctx.path("w", name))],
                            {"HELLORA_LAB_CACHE": str(cache)})
            # closed when refused naming --rebuild, or when the entry was rebuilt and now verifies
            return classify_cli(res, must_say=[r"rebuild"], ok_problem=entry_problem(cache / key))
        return run

    def halve(entry):
        f = entry / "model.safetensors"
        os.truncate(f, f.stat().st_size // 2)

    ctx.record(F, Probe("NP3", "cache entry with model.safetensors cut in half: `hellora pretrain`", "silent wrong",
                        GOOD), broken("NP3", halve, "pretrain"))
    ctx.record(F, Probe("NP4", "same corrupt entry: `hellora train` on the lab model", "unclear traceback", GOOD),
               broken("NP4", halve, "train"))
    ctx.record(F, Probe("NP5", "entry without lab_card.json: `hellora pretrain`", "ok", GOOD),
               broken("NP5", lambda e: (e / "lab_card.json").unlink(), "pretrain"))
    ctx.record(F, Probe("NP6", "entry without README.md: `hellora pretrain`", "unclear traceback", GOOD),
               broken("NP6", lambda e: (e / "README.md").unlink(), "pretrain"))
    ctx.record(F, Probe("NP7", "entry without config.json: `hellora train` on the lab model", "unclear traceback",
                        GOOD),
               broken("NP7", lambda e: (e / "config.json").unlink(), "train"))

    def np8():
        cache = ctx.path("cache", "c8")
        cache.mkdir(parents=True)
        t0 = time.time()
        pid = r.start("NP8a", ["pretrain", "--recipe", "tiny"], {"HELLORA_LAB_CACHE": str(cache)})
        log = ctx.runner.logs / "NP8a.err"
        while time.time() - t0 < 120 and not (litter(cache, f".{key}.tmp-*") and "lab pretraining:" in
                                              log.read_text(errors="replace")):
            time.sleep(0.02)
        os.killpg(pid, signal.SIGKILL)  # during the pretraining loop
        os.waitpid(pid, 0)
        left = litter(cache, f".{key}.tmp-*")
        if not left or (cache / key).exists():
            return FAILED_TO_RUN, "not killed mid-build (no temp folder, or the entry was already published)"
        res = pretrain("NP8b", cache)
        stale = litter(cache, f".{key}.tmp-*")
        problem = entry_problem(cache / key) or (f"killed build's {stale} still in the cache" if stale else None)
        verdict, note = classify_cli(res, ok_problem=problem)
        return verdict, f"{note}; killed with {left} in the cache, none left after the rerun" if verdict == OK else note

    ctx.record(F, Probe("NP8", "SIGKILL `hellora pretrain` mid-build, then rerun (temp folder cleaned?)",
                        "ok (temp folder left)", (OK,)), np8)

    def np9():
        cache = ctx.path("cache", "c9")
        cache.mkdir(parents=True)
        t0 = time.time()
        pids = [r.start(f"NP9{c}", ["pretrain", "--recipe", "tiny"], {"HELLORA_LAB_CACHE": str(cache)}) for c in "ab"]
        results = [r.wait(f"NP9{c}", pid, 300, t0) for c, pid in zip("ab", pids)]
        entries = sorted(p.name for p in cache.iterdir() if p.name != f".{key}.lock")  # the lock file stays
        built = sum("lab pretraining:" in x.stderr for x in results)
        worst = [classify_cli(x) for x in results]
        if any(v != OK for v, _ in worst):
            return next((v, e) for v, e in worst if v != OK)
        problem = entry_problem(cache / key) or (None if entries == [key] else f"cache holds {entries}")
        verdict, note = classify_cli(Result(0, seconds=time.time() - t0), ok_problem=problem)
        return verdict, f"{note}; entries {entries}; {built} process(es) printed pretraining progress"

    ctx.record(F, Probe("NP9", "two `hellora pretrain` at once on one empty cache", "ok (built twice)", (OK,)), np9)

    def np10():
        cache = ctx.path("cache", "c10")
        cache.mkdir(parents=True)
        if not chattr(cache, "+i"):
            return FAILED_TO_RUN, "chattr +i not available here"
        try:
            return classify_cli(pretrain("NP10", cache))
        finally:
            chattr(cache, "-i")

    ctx.record(F, Probe("NP10", "immutable (chattr +i) empty cache root", "clear error", (CLEAR,)), np10)

    def np11():
        cache = copy_cache(ctx, "c11")
        before = {str(cache): tree_digest(cache)}
        if not chattr(cache, "+i"):
            return FAILED_TO_RUN, "chattr +i not available here"
        try:
            res = pretrain("NP11", cache)
        finally:
            chattr(cache, "-i")
        return classify_cli(res, lost=changed_files(before))

    ctx.record(F, Probe("NP11", "immutable cache root that already holds the entry", "ok", (OK,)), np11)

    def np12():
        f = ctx.path("w", "afile")
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text("x")
        return classify_cli(pretrain("NP12", f), lost=changed_files({str(f): tree_digest(f)}))

    ctx.record(F, Probe("NP12", "HELLORA_LAB_CACHE=<an existing file>", "clear error", (CLEAR,)), np12)

    def np13():
        xdg = ctx.path("cache", "xdg")
        shutil.copytree(c1, xdg / "hellora" / "lab")
        res = r.cli("NP13", ["pretrain", "--recipe", "tiny"], {"HELLORA_LAB_CACHE": None, "XDG_CACHE_HOME": str(xdg)})
        where = str(xdg / "hellora" / "lab" / key)
        return classify_cli(res, ok_problem=None if where in res.stdout else f"{where} not the printed path")

    ctx.record(F, Probe("NP13", "only XDG_CACHE_HOME set", "ok", (OK,)), np13)

    for pid_, args, review in (("NP14", ["--steps", "0"], "unclear traceback"),
                               ("NP15", ["--steps", "-5"], "unclear traceback"),
                               ("NP20", ["--threads", "-1"], "unclear traceback"),
                               ("NP21", ["--data_dir", str(ctx.path("missing"))], "clear error")):
        def bad_number(pid_=pid_, args=args):
            cache = ctx.path("cache", f"c{pid_}")
            return classify_cli(pretrain(pid_, cache, *args), late_s=10.0)  # the review's came after ~30 s
        ctx.record(F, Probe(pid_, f"`hellora pretrain --recipe tiny {' '.join(args)}`", review, (CLEAR,)), bad_number)

    def np16():
        return classify_cli(r.cli("NP16", ["pretrain", "--recipe", "nope"], {"HELLORA_LAB_CACHE": str(c1)}),
                            must_say=["nope"])

    ctx.record(F, Probe("NP16", "`--recipe nope`", "clear error", (CLEAR,)), np16)

    def np17():
        victim = ctx.path("w", "victim_model")
        shutil.copytree(ctx.fixtures["tiny_olmoe"], victim)
        before = {str(victim): tree_digest(victim)}
        res = pretrain("NP17", c1, "--output_dir", str(victim))
        return classify_cli(res, lost=changed_files(before), must_say=["overwrite"])

    ctx.record(F, Probe("NP17", "`--output_dir <an existing model folder>`", "data lost", (CLEAR,)), np17)

    def np18():
        out = ctx.path("w", "notes_dir")
        out.mkdir(parents=True)
        (out / "notes.txt").write_text("mine")
        before = {str(out): tree_digest(out)}
        res = pretrain("NP18", c1, "--output_dir", str(out))
        problem = None if (out / "config.json").is_file() else "no lab model copied"
        return classify_cli(res, lost=changed_files(before), ok_problem=problem)

    ctx.record(F, Probe("NP18", "`--output_dir <folder holding notes.txt>`", "ok", GOOD), np18)

    def np19():
        before = {str(c1 / key): tree_digest(c1 / key)}
        return classify_cli(pretrain("NP19", c1, "--output_dir", str(c1 / key)), lost=changed_files(before))

    ctx.record(F, Probe("NP19", "`--output_dir <the cache entry itself>`", "unclear traceback", (CLEAR,)), np19)

    def np22():
        res = r.cli("NP22", ["train", *LAB_TRAIN, "--output_dir", str(ctx.path("w", "np22"))],
                    {"HELLORA_LAB_CACHE": str(c1), "HELLORA_LAB_RECIPE": "nope"})
        return classify_cli(res, must_say=["nope"])

    ctx.record(F, Probe("NP22", "`HELLORA_LAB_RECIPE=nope hellora train` (lab model)", "clear error", (CLEAR,)), np22)

    def np23():
        cache = ctx.path("cache", "c23")
        cache.mkdir(parents=True)
        if not chattr(cache, "+i"):
            return FAILED_TO_RUN, "chattr +i not available here"
        try:
            res = r.cli("NP23", ["train", *LAB_TRAIN, "--output_dir", str(ctx.path("w", "np23"))],
                        {"HELLORA_LAB_CACHE": str(cache)})
        finally:
            chattr(cache, "-i")
        return classify_cli(res)

    ctx.record(F, Probe("NP23", "`hellora train` (lab model) with an empty immutable cache", "clear error", (CLEAR,)),
               np23)

    def np24():
        cache = copy_cache(ctx, "c24")
        out = ctx.path("w", "np24_out")
        res = pretrain("NP24", cache, "--rebuild", "--steps", "2", "--output_dir", str(out))
        new = [p for p in cache.iterdir() if p.is_dir() and not p.name.startswith(".") and p.name != key]
        problem = (None if len(new) == 1 and (out / "config.json").is_file() else f"new entries {new}, out copied: "
                   f"{(out / 'config.json').is_file()}")
        return classify_cli(res, ok_problem=problem or (entry_problem(new[0]) if new else None))

    ctx.record(F, Probe("NP24", "`--rebuild --steps 2 --output_dir <new>`", "ok", (OK,)), np24)


# ------------------------------------------------------------------------------------- NT: --task sft rows

# id, what, the review's verdict, accepted outcomes, a row maker (None: no dataset), what a refusal must name
NT_ROWS: list[tuple[str, str, str, tuple[str, ...], Callable[[int], Any] | None, str]] = [
    ("NT1", "prompt-only rows (`prompt`)", "unclear traceback", GOOD, lambda i: {"prompt": f"Say {i}."}, "prompt"),
    ("NT2", "`messages` is a list of strings", "unclear traceback", (CLEAR,), lambda i: {"messages": ["hi", "there"]},
     "messages"),
    ("NT3", "roles `human`/`bot`", "unclear traceback", (CLEAR,),
     lambda i: {"messages": [{"role": "human", "content": "hi"}, {"role": "bot", "content": f"n{i}"}]}, "role"),
    ("NT4", "messages without `role`", "unclear traceback", (CLEAR,),
     lambda i: {"messages": [{"content": "hi"}, {"content": f"n{i}"}]}, "role"),
    ("NT5", "`text` is an int", "unclear traceback", (CLEAR,), lambda i: {"text": i}, "text"),
    ("NT6", "`text` empty strings", "ok", GOOD, lambda i: {"text": ""}, "text"),
    ("NT7", "`completion: null`", "unclear traceback", (CLEAR,), lambda i: {"prompt": f"Say {i}.", "completion": None},
     "completion"),
    ("NT8", "rows mixing `text` and `messages`", "ok", GOOD,
     lambda i: {"text": f"plain row {i}"} if i % 2 else
     {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": f"n{i}"}]}, ""),
    ("NT9", "no TRL column (`foo`)", "clear error", (CLEAR,), lambda i: {"foo": "bar"}, "columns"),
    ("NT10", "`--task sft` without `--dataset_name`", "clear error", (CLEAR,), None, "dataset_name"),
    ("NT11", "`messages: []`", "unclear traceback", (CLEAR,), lambda i: {"messages": []}, "messages"),
    ("NT12", "system message only", "ok", GOOD, lambda i: {"messages": [{"role": "system", "content": f"be {i}"}]},
     "messages|system|assistant"),
    ("NT13", "last turn is the user", "ok", GOOD,
     lambda i: {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"},
                             {"role": "user", "content": f"again {i}"}]}, "messages|user|assistant"),
    ("NT14", "conversational prompt + string completion", "unclear traceback", (CLEAR,),
     lambda i: {"prompt": [{"role": "user", "content": f"Say {i}."}], "completion": f"{i}"}, "prompt|completion"),
    ("NT15", "well-formed `messages` (control)", "ok", (OK,),
     lambda i: {"messages": [{"role": "user", "content": f"What is {i}+1?"},
                             {"role": "assistant", "content": f"{i + 1}"}]}, ""),
]


def family_nt(ctx: Ctx) -> None:
    data = ctx.path("s", "sft")
    data.mkdir(parents=True, exist_ok=True)
    for pid_, what, review, accept, row, names in NT_ROWS:
        def run(pid_=pid_, row=row, names=names):
            args = ["train", "--model_name_or_path", str(ctx.fixtures["tiny_olmoe"]), *TRAIN_T, "--task", "sft",
                    "--save_strategy", "no", "--output_dir", str(ctx.path("w", pid_.lower()))]
            if row is not None:
                f = data / f"{pid_}.jsonl"
                f.write_text("".join(json.dumps(row(i)) + "\n" for i in range(16)))
                args += ["--dataset_name", str(f)]
            res = ctx.runner.cli(pid_, args)
            saved = (ctx.path("w", pid_.lower()) / "adapter_model.safetensors").is_file()
            # a refusal must name what is wrong with the rows (the review's NT2/NT4 blamed max_length)
            return classify_cli(res, must_say=[names] if names else [],
                                ok_problem=None if saved else "no adapter saved")
        ctx.record("NT", Probe(pid_, what, review, accept), run)


# ---------------------------------------------------------------------------------- NE: export/merge symlinks


def family_ne(ctx: Ctx) -> None:
    r, w = ctx.runner, ctx.path("w", "ne")
    w.mkdir(parents=True)
    ad, base = ctx.fixtures["adapter"], ctx.fixtures["tiny_olmoe"]

    def fresh_adapter(name: str) -> Path:
        dst = w / name
        shutil.copytree(ad, dst)
        return dst

    def check(name, command, argv_of, accept_ok=False, cwd=None, extra_litter=()):
        """Run ``hellora COMMAND`` with the argv ``argv_of`` builds; inputs (adapter, base) must survive."""
        def run():
            adapter = fresh_adapter(f"ad_{name}")
            base_copy = w / f"base_{name}"
            shutil.copytree(base, base_copy)
            argv, protect = argv_of(adapter, base_copy)
            before = {str(p): tree_digest(p) for p in (adapter, base_copy, *protect)}
            res = r.cli(name, [command, "--adapter", str(adapter), "--model_name_or_path", str(base_copy), *argv],
                        cwd=cwd)
            left = [x for pattern in (".*.tmp-*", ".*old-*", *extra_litter) for x in litter(cwd or w, pattern)]
            lost = changed_files(before) + [f"litter {x}" for x in left]
            return classify_cli(res, lost=lost)
        return run

    def link(target: Path, name: str) -> Path:
        lk = w / name
        lk.symlink_to(target)
        return lk

    probes = [
        ("NE1", "merge --output_dir <symlink to the adapter> --overwrite", "clear error", "merge",
         lambda a, b: (["--output_dir", str(link(a, "link_e1")), "--overwrite"], [])),
        ("NE2", "merge --output_dir <symlink to the base model> --overwrite", "clear error", "merge",
         lambda a, b: (["--output_dir", str(link(b, "link_e2")), "--overwrite"], [])),
        ("NE3", "merge --output_dir <adapter>/merged --overwrite", "clear error", "merge",
         lambda a, b: (["--output_dir", str(a / "merged"), "--overwrite"], [])),
        ("NE4", "merge --adapter par/ad --output_dir par --overwrite", "clear error", "merge",
         lambda a, b: (["--output_dir", str(a.parent), "--overwrite"], [])),
        ("NE5", "export --adapter <symlink> --output_dir <its target> --overwrite", "clear error", "export", None),
        ("NE6", "--output_dir <symlink to a file>", "clear error", "merge", None),
        ("NE7", "--output_dir <dangling symlink>", "unclear traceback", "merge", None),
        ("NE8", "--output_dir ad/../ad/. --overwrite", "clear error", "merge",
         lambda a, b: (["--output_dir", f"{a}/../{a.name}/.", "--overwrite"], [])),
        ("NE9", "cd dotdir && merge --output_dir . --overwrite", "unclear traceback", "merge", None),
        ("NE10", "export --output_dir <symlink>/.. --overwrite (parent of the adapter)", "clear error", "export", None),
    ]
    for pid_, what, review, command, argv_of in probes:
        if pid_ == "NE5":
            def run():
                adapter = fresh_adapter("ad_NE5")
                lk = link(adapter, "link_e5")
                before = {str(adapter): tree_digest(adapter)}
                res = r.cli("NE5", ["export", "--adapter", str(lk), "--model_name_or_path", str(base),
                                    "--output_dir", str(adapter), "--overwrite"])
                return classify_cli(res, lost=changed_files(before))
        elif pid_ == "NE6":
            def run():
                f = w / "a_file_e6"
                f.write_text("keep")
                lk = link(f, "link_e6")
                return check("NE6", "merge", lambda a, b: (["--output_dir", str(lk), "--overwrite"], [f]))()
        elif pid_ == "NE7":
            def run():
                lk = link(w / "nowhere_e7", "link_e7")
                adapter = fresh_adapter("ad_NE7")
                before = {str(adapter): tree_digest(adapter)}
                res = r.cli("NE7", ["merge", "--adapter", str(adapter), "--model_name_or_path", str(base),
                                    "--output_dir", str(lk), "--overwrite"])
                left = litter(w, ".link_e7*") + litter(w, ".nowhere_e7*")
                lost = changed_files(before) + [f"litter {x}" for x in left]
                merged = (lk / "config.json").is_file() or (w / "nowhere_e7" / "config.json").is_file()
                # a refusal must say it is the link (the review's: "[Errno 20] Not a directory" after the merge)
                return classify_cli(res, lost=lost, must_say=["symlink"],
                                    ok_problem=None if merged else "no merged model written")
            ctx.record("NE", Probe(pid_, what, review, GOOD), run)
            continue
        elif pid_ == "NE9":
            def run():
                dot = w / "dotdir"
                dot.mkdir()
                (dot / "keep.txt").write_text("keep")
                before = {str(dot): tree_digest(dot)}
                adapter = fresh_adapter("ad_NE9")
                res = r.cli("NE9", ["merge", "--adapter", str(adapter), "--model_name_or_path", str(base),
                                    "--output_dir", ".", "--overwrite"], cwd=dot)
                left = litter(dot, ".*old-*") + litter(dot, "..*") + litter(w, ".dotdir*")
                lost = changed_files(before) + [f"litter {x}" for x in left]
                verdict, note = classify_cli(res, lost=lost)
                return verdict, note
        elif pid_ == "NE10":
            def run():
                adapter = fresh_adapter("ad_NE10")
                lk = link(adapter, "link_e10")
                before = {str(adapter): tree_digest(adapter)}
                res = r.cli("NE10", ["export", "--adapter", str(adapter), "--model_name_or_path", str(base),
                                     "--output_dir", f"{lk}/..", "--overwrite"])
                return classify_cli(res, lost=changed_files(before))
        else:
            run = check(pid_, command, argv_of)
        ctx.record("NE", Probe(pid_, what, review, (CLEAR,)), run)


# ------------------------------------------------------------------------------------ NG: bench/gpu/run.sh


def family_ng(ctx: Ctx) -> None:
    g = ctx.path("gpu")
    g.mkdir()
    sbx = ctx.path("s", "sbx")

    def run_sh(name: str, env: Mapping[str, str]) -> Result:
        # a 20 s budget runs the install step and skips the rest (each step needs 15 s of budget left)
        base = {"PYTHON": sys.executable, "HELLORA_GPU_DRY_RUN": "1", "HELLORA_GPU_BUDGET_S": "20",
                "OUT": str(g / name), "TMPDIR": str(g)}
        return run_process(["bash", "bench/gpu/run.sh"], {**base, **env}, REPO, timeout=120)

    def install_status(name: str) -> str:
        try:
            steps = json.loads((g / name / "summary.json").read_text())["steps"]
        except (OSError, ValueError, KeyError):
            return "no summary.json"
        return next((str(s.get("status")) for s in steps if s.get("step") == "install"), "no install row")

    def judged(name: str, res: Result, want: Sequence[str], extra: str | None = None) -> tuple[str, str]:
        status = install_status(name)
        log = (g / name / "install.log").read_text(errors="replace") if (g / name / "install.log").exists() else ""
        if "Traceback (most recent call last)" in res.stdout + res.stderr + log:
            return TRACEBACK, f"traceback; install {status}"
        if "syntax error" in log:
            return TRACEBACK, f"shell syntax error in install.log; install {status}"
        if extra:
            return SILENT, extra
        if status not in want:
            return SILENT, f"install {status}, expected {list(want)}"
        return OK, f"install {status}; run.sh rc {res.rc} (later steps skipped by the 20 s budget), {res.seconds:.0f} s"

    def ng1():
        return judged("NG1", run_sh("NG1", {"HELLORA_WHEELS": str(g / "missing")}), ["skipped"])

    def ng2():
        wheels = g / "garbage"
        wheels.mkdir()
        (wheels / "bad-1.0-py3-none-any.whl").write_bytes(b"not a zip")
        return judged("NG2", run_sh("NG2", {"HELLORA_WHEELS": str(wheels)}), ["failed"])

    def ng3():
        wheels = g / "it's wheels"
        wheels.mkdir()
        tiny_wheel(wheels)
        return judged("NG3", run_sh("NG3", {"HELLORA_WHEELS": str(wheels)}), ["ok"])

    def ng4():
        target = sbx / "injected_g3"
        res = run_sh("NG4", {"HELLORA_WHEELS": f"{g}/x'; touch {target}; echo '"})
        return judged("NG4", res, ["skipped"], extra=f"{target} created: the value ran as code" if target.exists()
                      else None)

    def ng5():
        f = g / "wheels_file"
        f.write_text("x")
        return judged("NG5", run_sh("NG5", {"HELLORA_WHEELS": str(f)}), ["skipped"])

    def ng6():
        f = g / "out_file"
        f.write_text("keep")
        before = {str(f): tree_digest(f)}
        res = run_sh("NG6", {"OUT": str(f)})
        return classify_cli(res, lost=changed_files(before), must_say=["OUT"])

    for pid_, what, review, accept, fn in (
        ("NG1", "`HELLORA_WHEELS=<missing folder>`", "ok", (OK,), ng1),
        ("NG2", "wheels folder with a garbage `bad-1.0-py3-none-any.whl`", "ok", (OK,), ng2),
        ("NG3", "wheels folder path containing a single quote (one valid wheel in it)", "unclear traceback", (OK,),
         ng3),
        ("NG4", "`HELLORA_WHEELS=\"<x>'; touch <sbx>/injected_g3; echo '\"`", "silent wrong", (OK,), ng4),
        ("NG5", "`HELLORA_WHEELS` = a regular file", "ok", (OK,), ng5),
        ("NG6", "`OUT=<a regular file>`", "unclear traceback", (CLEAR,), ng6),
    ):
        ctx.record("NG", Probe(pid_, what, review, accept), fn)


def tiny_wheel(folder: Path) -> Path:
    """A valid pure-Python wheel (one module) that pip installs offline: the quoted-path probe reaches pip."""
    import base64
    import zipfile

    files = {"hellora_probe_pkg.py": b"X = 1\n",
             "hellora_probe_pkg-1.0.dist-info/METADATA": b"Metadata-Version: 2.1\nName: hellora-probe-pkg\n"
                                                        b"Version: 1.0\n",
             "hellora_probe_pkg-1.0.dist-info/WHEEL": b"Wheel-Version: 1.0\nGenerator: probes\n"
                                                     b"Root-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{name},sha256={base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b'=').decode()}"
                     f",{len(data)}\n" for name, data in files.items())
    files["hellora_probe_pkg-1.0.dist-info/RECORD"] = (record + "hellora_probe_pkg-1.0.dist-info/RECORD,,\n").encode()
    path = folder / "hellora_probe_pkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


# --------------------------------------------------------------------------------------- NS: the sandbox

RET_NONE = "    return None\n"


def family_ns(ctx: Ctx) -> None:
    from hellora_trl.recipes.eval import evaluate_humaneval, run_humaneval_sample

    path = DATASETS / "humaneval" / "HumanEval.jsonl.gz"
    with gzip.open(path, "rt") as fh:
        P = {p["task_id"]: p for p in map(json.loads, fh)}
    sbx = ctx.path("s", "sbx")
    (sbx / "secret.txt").write_text("secret")
    (sbx / "victim.txt").write_text("victim")
    S = str(sbx)
    late_checks: list[tuple[Probe, Path]] = []

    def sample(completion: str, task: str = "HumanEval/0", timeout: float = 5.0):
        try:
            return run_humaneval_sample(P[task], completion, timeout=timeout), None
        except BaseException as exc:  # the harness must never raise for a completion
            return None, f"{type(exc).__name__}: {str(exc)[:120]}"

    def not_made(paths: Iterable[Path]) -> list[str]:
        return [str(p) for p in paths if os.path.lexists(p)]

    def one(pid_, what, review, completion, task="HumanEval/0", made=(), should_pass=False, timeout=5.0,
            leak=None, protect=()):
        def run():
            before = {str(p): tree_digest(p) for p in protect}
            result, crashed = sample(completion, task, timeout)
            leaked = leak(result) if (leak and result) else None
            return classify_sandbox(result, should_pass=should_pass, escaped=not_made(made), leaked=leaked,
                                    lost=changed_files(before), crashed=crashed)
        ctx.record("NS", Probe(pid_, what, review, (OK,)), run)

    def many(pid_, what, review, completions, task="HumanEval/0", made=(), timeout=5.0):
        def run():
            notes = []
            for c in completions:
                result, crashed = sample(c, task, timeout)
                verdict, note = classify_sandbox(result, escaped=not_made(made), crashed=crashed)
                if verdict != OK:
                    return verdict, note
                notes.append(note[:50])
            return OK, " | ".join(notes)
        ctx.record("NS", Probe(pid_, what, review, (OK,)), run)

    def leak_items(result) -> str | None:
        """The completion raises ``LEAK:<a>|<b>|...``: each item is BLOCKED or what it learned."""
        m = re.search(r"LEAK:([^\n]*)", str(result.get("error")))
        if not m:
            return None
        items = m.group(1).split("|")
        seen = [x for x in items if x not in ("BLOCKED", "False")]
        return f"{seen}" if seen else None

    def probe_calls(calls: str) -> str:
        return ("    import os\n    out = []\n    for f, a in (" + calls + "):\n        try:\n"
                "            out.append(repr(f(a)).replace('|', '/'))\n"
                "        except BaseException:\n            out.append('BLOCKED')\n"
                "    raise RuntimeError('LEAK:' + '|'.join(out))\n")

    one("NS1", "`os.mkfifo` outside the work dir at import", "sandbox escape",
        RET_NONE + f"import os; os.mkfifo({S + '/fifo_s1'!r})\n", made=[sbx / "fifo_s1"])
    one("NS2", "fresh posix module `.mknod(<outside>, S_IFREG)`", "sandbox escape",
        RET_NONE + "import importlib.util, importlib.machinery, stat\n"
        "_P = importlib.util.module_from_spec(importlib.machinery.BuiltinImporter.find_spec('posix'))\n"
        f"_P.mknod({S + '/mknod_s2'!r}, stat.S_IFREG | 0o644)\n", made=[sbx / "mknod_s2"])

    def ns3():
        result, crashed = sample(RET_NONE + "import os, threading, time\ntry:\n    os.setpgrp()\n"
                                 "except BaseException:\n"
                                 "    pass\ndef _late():\n    time.sleep(8)\n"
                                 f"    os.mkfifo({S + '/late_s3'!r})\n"
                                 "threading.Thread(target=_late, daemon=False).start()\n")
        verdict, note = classify_sandbox(result, crashed=crashed)
        return verdict, note + " (the late file is checked at the end of the family, >= 9 s later)"

    p3 = Probe("NS3", "`os.setpgrp()` + a thread that sleeps 8 s then mkfifo outside", "ok", (OK,))
    ctx.record("NS", p3, ns3)
    late_checks.append((p3, sbx / "late_s3"))
    t_ns3 = time.time()

    many("NS4", "kill the parent: `os.kill(getppid(), 9)`, fresh posix `kill`, `signal.pthread_kill`", "ok", [
        "    import os\n    os.kill(os.getppid(), 9)\n",
        "    import importlib.util, importlib.machinery\n"
        "    _P = importlib.util.module_from_spec(importlib.machinery.BuiltinImporter.find_spec('posix'))\n"
        "    _P.kill(_P.getppid(), 9)\n",
        "    import signal, threading\n    signal.pthread_kill(threading.main_thread().ident, 9)\n"])
    one("NS5", "read the test via `/proc/<ppid>/cmdline`", "ok",
        "    import os\n    raise RuntimeError('LEAK:' + open(f'/proc/{os.getppid()}/cmdline').read())\n",
        leak=lambda res: "the parent's command line" if "LEAK:" in str(res.get("error")) and
        "disabled" not in str(res.get("error")) else None)
    one("NS6", "`os.readlink('/proc/self/exe')`, `os.stat`/`os.lstat` outside, `os.path.exists(<outside file>)`",
        "sandbox escape",
        probe_calls(f"(os.readlink, '/proc/self/exe'), (os.stat, {S!r}), (os.lstat, {S + '/secret.txt'!r}), "
                    f"(os.path.exists, {S + '/secret.txt'!r}), (os.readlink, '/proc/self/cwd')"), leak=leak_items)
    one("NS7", "`os.listdir('/proc')`, `os.listdir('..')`, `open('../check.json')`", "ok",
        probe_calls("(os.listdir, '/proc'), (os.listdir, '..'), (lambda p: open(p).read(), '../check.json')"),
        leak=leak_items)
    shm = Path("/dev/shm") / f"hellora_probe_{os.getpid()}"
    one("NS8", "write `/dev/shm/<name>`", "ok", f"    open({str(shm)!r}, 'w').write('x')\n", made=[shm])
    one("NS9", "exhaust the checker's pipe: a header announcing 4 GiB + 64 KiB garbage on fds 3..9", "ok",
        "    import os, struct\n    for fd in range(3, 10):\n        try:\n"
        "            os.write(fd, struct.pack('>I', 2**32 - 1) + b'x' * 65536)\n"
        "        except BaseException:\n            pass\n    return True\n")
    one("NS10", "forged protocol frames (`[\"ok\", true]`, 50 pre-sent replies)", "ok",
        "    import os, json, struct\n    for fd in range(3, 10):\n        for _ in range(50):\n            try:\n"
        "                b = json.dumps(['ok', True]).encode()\n"
        "                os.write(fd, struct.pack('>I', len(b)) + b)\n"
        "            except BaseException:\n                break\n    return None\n")
    one("NS11", "fake verdict JSON lines on stdout and stderr, then `os._exit(0)`", "ok",
        RET_NONE + "import os, sys\nprint('{\"verdict\": \"passed\", \"passed\": true}', flush=True)\n"
        "sys.stderr.write('{\"verdict\": \"passed\", \"passed\": true}\\n'); sys.stderr.flush()\nos._exit(0)\n")
    one("NS12", "`sys.modules['json']` replaced in the candidate", "ok",
        RET_NONE + "import sys, types\n_m = types.ModuleType('json')\n_m.dumps = lambda *a, **k: '[\"ok\", true]'\n"
        "_m.loads = lambda *a, **k: ['ok', True]\nsys.modules['json'] = _m\n")
    one("NS13", "monkeypatch `builtins.abs/len/isinstance/AssertionError`", "ok",
        RET_NONE + "import builtins\nbuiltins.abs = lambda x: 0\nbuiltins.len = lambda x: 0\n"
        "builtins.isinstance = lambda *a: True\nbuiltins.AssertionError = type('X', (Exception,), {})\n")
    one("NS14", "`os._exit(0)` at import, before any test", "ok", RET_NONE + "import os\nos._exit(0)\n")
    many("NS15", "`SystemExit(0)` / `KeyboardInterrupt` / `StopIteration` / `os._exit(0)` inside the function", "ok",
         ["    raise SystemExit(0)\n", "    raise KeyboardInterrupt\n", "    raise StopIteration\n",
          "    import os\n    os._exit(0)\n"])
    many("NS16", "return objects with `__eq__`/`__bool__`; float / list subclasses with `__eq__`", "ok", [
        "    class B:\n        def __eq__(self, o):\n            return True\n        def __bool__(self):\n"
        "            return True\n    return B()\n",
        "    class F(float):\n        def __eq__(self, o):\n            return True\n    return F(0)\n",
        "    class L(list):\n        def __eq__(self, o):\n            return True\n    return L()\n"])
    many("NS17", "return NaN (HumanEval/2); return 10^6 Nones", "ok",
         ["    return float('nan')\n", "    return [None] * 10 ** 6\n"], task="HumanEval/2")
    one("NS18", "a thread that writes forged frames while the main thread answers", "ok",
        "    import os, json, struct, threading, time\n    def spam():\n        t = time.time()\n"
        "        while time.time() - t < 1:\n            for fd in range(3, 10):\n                try:\n"
        "                    b = json.dumps(['ok', True]).encode()\n"
        "                    os.write(fd, struct.pack('>I', len(b)) + b)\n"
        "                except BaseException:\n                    pass\n"
        "    threading.Thread(target=spam).start()\n    time.sleep(0.2)\n    return None\n")

    def ns19():
        t0 = time.time()
        for c in ("    import signal\n    for s in (signal.SIGXCPU, signal.SIGTERM):\n"
                  "        signal.signal(s, signal.SIG_IGN)\n    while True:\n        pass\n",
                  "    import signal\n    signal.signal(signal.SIGALRM, lambda *a: None)\n"
                  "    signal.setitimer(signal.ITIMER_REAL, 0.1, 0.1)\n    while True:\n        pass\n"):
            result, crashed = sample(c, timeout=3.0)
            verdict, note = classify_sandbox(result, crashed=crashed)
            if verdict != OK:
                return verdict, note
            if result["verdict"] != "timed out":
                return SILENT, f"verdict {result['verdict']}, expected timed out"
        return OK, f"both timed out (3 s limit), {time.time() - t0:.1f} s for the two"

    ctx.record("NS", Probe("NS19", "ignore SIGXCPU/SIGTERM + busy loop; `setitimer` + SIGALRM handler (3 s limit)",
                           "ok", (OK,)), ns19)
    one("NS20", "take the audit hook's frame from a PermissionError traceback, reset its functions' defaults, "
        "then write outside", "ok",
        "    import sys\n    target = " + repr(S + "/ns20.txt") + "\n    try:\n        open(target, 'w')\n"
        "    except BaseException as e:\n        tb = e.__traceback__\n        while tb is not None:\n"
        "            fr = tb.tb_frame\n            for v in list(fr.f_locals.values()) + list(fr.f_globals.values()):\n"
        "                try:\n                    if callable(v) and getattr(v, '__defaults__', None):\n"
        "                        v.__defaults__ = tuple('/' for _ in v.__defaults__)\n"
        "                except BaseException:\n                    pass\n            tb = tb.tb_next\n"
        "    open(target, 'w').write('x')\n", made=[sbx / "ns20.txt"])
    one("NS21", "`os.unlink('victim.txt', dir_fd=<fd of an outside folder>)`", "ok",
        f"    import os\n    fd = os.open({S!r}, os.O_RDONLY)\n    os.unlink('victim.txt', dir_fd=fd)\n",
        protect=[sbx / "victim.txt"])

    def ns22():
        import tempfile as tf

        tmp = ctx.path("tmp_ns22")
        tmp.mkdir()
        old = tf.tempdir
        tf.tempdir = str(tmp)
        try:
            bomb = RET_NONE + "import os\np = 'a'\nfor i in range(1500):\n    os.mkdir(p)\n    p += '/a'\n"
            result, crashed = sample(bomb, timeout=20)
            after, crashed2 = sample(P["HumanEval/2"]["canonical_solution"], "HumanEval/2")
        finally:
            tf.tempdir = old
        left = [p.name for p in tmp.iterdir()]
        verdict, note = classify_sandbox(result, crashed=crashed or crashed2, lost=[f"left {x}" for x in left])
        if verdict == OK and (after or {}).get("verdict") != "passed":
            return SILENT, f"the next sample did not pass: {after}"
        return verdict, (note + "; next sample passed, temp dir empty") if verdict == OK else note

    ctx.record("NS", Probe("NS22", "1500-deep directory chain in the work dir (rmtree bomb), then a good sample",
                           "data lost", (OK,)), ns22)

    def ns22b():
        import tempfile as tf

        tmp = ctx.path("tmp_ns22b")
        tmp.mkdir()
        sink = ctx.path("w", "ns22b.jsonl")
        bomb = RET_NONE + "import os\np = 'a'\nfor i in range(1500):\n    os.mkdir(p)\n    p += '/a'\n"
        samples = {"HumanEval/0": [bomb], "HumanEval/2": [P["HumanEval/2"]["canonical_solution"]]}
        old = tf.tempdir
        tf.tempdir = str(tmp)
        try:
            report = evaluate_humaneval(P, samples, ks=(1,), timeout=20, workers=2, results_path=sink)
        except BaseException as exc:
            return LOST, f"evaluate_humaneval raised {type(exc).__name__}: {str(exc)[:120]}"
        finally:
            tf.tempdir = old
        rows = [json.loads(line) for line in sink.read_text().splitlines()]
        left = [p.name for p in tmp.iterdir()]
        if len(rows) != 2 or left:
            return LOST, f"{len(rows)} of 2 rows in results_path; left in the temp dir: {left}"
        passed = {r["task_id"]: r["passed"] for r in rows}
        if passed != {"HumanEval/0": False, "HumanEval/2": True}:
            return SILENT, f"verdicts {passed}"
        return OK, f"2 of 2 rows recorded (bomb failed, control passed), pass@1 {report.get('pass@1')}, temp dir empty"

    ctx.record("NS", Probe("NS22b", "the rmtree bomb inside `evaluate_humaneval` (results_path, 2 workers) beside a "
                           "good sample", "data lost", (OK,)), ns22b)
    one("NS23", "8 files x 15 MiB in the work dir (the review wrote 40; fewer to keep the run short)", "ok",
        RET_NONE + "for i in range(8):\n    open(f'big{i}', 'wb').write(b'x' * (15 << 20))\n")
    one("NS24", "write `evil.py` to the work dir and import it", "ok",
        RET_NONE + "open('evil_s24.py', 'w').write('X = 1')\nimport evil_s24\n")
    many("NS25", "`code.replace(...)`; `gc.get_objects()`", "ok", [
        "    def f():\n        return True\n    g = f.__code__.replace(co_consts=(None, True))\n    return True\n",
        "    import gc\n    return len(gc.get_objects()) > 0\n"])
    one("NS26", "exception text with newline + fake `{\"verdict\": \"passed\"}` + ANSI clear-screen + lone surrogate",
        "ok", "    raise RuntimeError('x\\n{\"verdict\": \"passed\", \"passed\": true}\\n\\x1b[2J\\ud800')\n")
    many("NS27", "17 MiB return; infinite recursion; 150-deep nested list", "ok", [
        "    return 'x' * (17 << 20)\n", "    def r(n):\n        return r(n + 1)\n    return r(0)\n",
        "    x = []\n    for _ in range(150):\n        x = [x]\n    return x\n"])
    one("NS28", "`os.readlink('/proc/<n>/cwd')` for n < 40000: how many processes are visible", "ok",
        "    import os\n    seen = []\n    for n in range(1, 40000):\n        try:\n"
        "            seen.append((n, os.readlink(f'/proc/{n}/cwd')))\n        except BaseException:\n            pass\n"
        "    raise RuntimeError('SEEN:' + str(len(seen)))\n",
        leak=lambda res: (lambda m: f"{m.group(1)} processes' cwd" if m and int(m.group(1)) > 1 else None)(
            re.search(r"SEEN:(\d+)", str(res.get("error")))))
    one("NS29", "fresh posix `mknod` of a character device outside", "ok",
        RET_NONE + "import importlib.util, importlib.machinery, stat, os\n"
        "_P = importlib.util.module_from_spec(importlib.machinery.BuiltinImporter.find_spec('posix'))\n"
        f"_P.mknod({S + '/chr_s29'!r}, stat.S_IFCHR | 0o600, os.makedev(1, 3))\n", made=[sbx / "chr_s29"])
    one("NS30", "start a thread in the candidate that writes outside", "ok",
        "    import threading\n    def w():\n        try:\n"
        f"            open({S + '/thread_s30'!r}, 'w').write('x')\n        except BaseException:\n            pass\n"
        "    t = threading.Thread(target=w)\n    t.start()\n    t.join()\n    return None\n", made=[sbx / "thread_s30"])
    one("NS31", "`os.mkdir(<outside>)`", "ok", RET_NONE + f"import os\nos.mkdir({S + '/newdir_s31'!r})\n",
        made=[sbx / "newdir_s31"])
    def ns32():
        result, crashed = sample(P["HumanEval/2"]["canonical_solution"], "HumanEval/2")
        verdict, note = classify_sandbox(result, should_pass=True, crashed=crashed)
        return verdict, f"{note}; isolation: {', '.join((result or {}).get('isolation') or [])}"

    ctx.record("NS", Probe("NS32", "control: canonical HumanEval/2", "ok", (OK,)), ns32)

    # Beyond the review: the other calls that make, move, change or describe files outside the work dir.
    def each_blocked(pid_, what, bodies, made=(), protect=()):
        def run():
            before = {str(p): tree_digest(p) for p in protect}
            notes = []
            for body in bodies:
                result, crashed = sample(RET_NONE + body + "\n")
                leaked = leak_items(result) if result else None
                verdict, note = classify_sandbox(result, escaped=not_made(made), leaked=leaked,
                                                 lost=changed_files(before), crashed=crashed)
                if verdict != OK:
                    call = re.split(r"[;\n]", body)[-1].strip()[:70]
                    return verdict, f"{call}: {note}"
                notes.append(note.split(": ")[-1][:40])
            return OK, f"{len(bodies)} calls refused: " + " | ".join(notes[:3]) + " ..."
        ctx.record("NS", Probe(pid_, what, "(new)", (OK,)), run)

    victim = sbx / "victim.txt"
    each_blocked("NSx1", "`os.link` / `os.symlink` / `os.rename` to outside the work dir", [
        f"import os; os.link({str(victim)!r}, {S + '/hard_x1'!r})",
        f"import os; os.symlink('/etc/passwd', {S + '/sym_x1'!r})",
        f"import os; open('w.txt', 'w').write('x'); os.rename('w.txt', {S + '/moved_x1'!r})"],
        made=[sbx / "hard_x1", sbx / "sym_x1", sbx / "moved_x1"])
    each_blocked("NSx2", "`utime` / `chmod` / `chown` / `truncate` / `setxattr` / `unlink` / `rmdir` outside", [
        f"import os; os.utime({str(victim)!r}, (0, 0))", f"import os; os.chmod({str(victim)!r}, 0o777)",
        f"import os; os.chown({str(victim)!r}, 1, 1)", f"import os; os.truncate({str(victim)!r}, 0)",
        f"import os; os.setxattr({str(victim)!r}, 'user.x', b'1')", f"import os; os.unlink({str(victim)!r})",
        f"import os; os.rmdir({S!r})"], protect=[victim])
    each_blocked("NSx3", "metadata outside: `os.access`, `os.statvfs`, `os.scandir('/')`, `os.path.isdir`, `glob`", [
        "import os\nraise RuntimeError('LEAK:' + str(os.access('/etc/passwd', os.F_OK)))",
        "import os\nraise RuntimeError('LEAK:' + repr(os.statvfs('/')))",
        "import os\nraise RuntimeError('LEAK:' + repr([e.name for e in os.scandir('/')]))",
        "import os\nraise RuntimeError('LEAK:' + str(os.path.isdir('/root')))",
        "import glob\nraise RuntimeError('LEAK:' + ('/'.join(glob.glob('/etc/*')) or 'False'))"])
    each_blocked("NSx4", "`os.chdir(<outside>)` then a relative write; `tempfile.mkstemp(dir=<outside>)`; "
                 "`zipfile` / `logging` files outside", [
                     f"import os; os.chdir({S!r}); open('via_chdir_x4', 'w').write('x')",
                     f"import tempfile; tempfile.mkstemp(dir={S!r})",
                     f"import zipfile; zipfile.ZipFile({S + '/z_x4.zip'!r}, 'w').writestr('a', 'b')",
                     f"import logging; logging.basicConfig(filename={S + '/log_x4.txt'!r}); logging.error('x')"],
                 made=[sbx / "via_chdir_x4", sbx / "z_x4.zip", sbx / "log_x4.txt"])

    time.sleep(max(0.0, 9.5 - (time.time() - t_ns3)))
    for probe, late in late_checks:
        if os.path.lexists(late) and probe.outcome == OK:
            probe.outcome, probe.evidence = ESCAPE, f"{late} made after the sample ended"
    for left in (shm,):
        if os.path.lexists(left):
            os.unlink(left)


# ------------------------------------------------------------------------------- 5.8 / 5.10: reused output_dir


def family_s5(ctx: Ctx) -> None:
    r = ctx.runner
    R = ["--model_name_or_path", str(ctx.fixtures["tiny_olmoe"]), "--train_limit", "64", "--eval_limit", "0",
         "--per_device_train_batch_size", "4", "--lora_r", "4", "--lora_alpha", "8", "--report_to", "none",
         "--disable_tqdm", "true", "--no_hellora_plots", "--hellora_profile_mode", "forward", "--save_steps", "5",
         "--logging_steps", "1"]
    ref = ctx.path("w", "r_ref")

    def run_a():
        res = r.cli("S5_runA", ["train", *R, "--max_steps", "20", "--seed", "42", "--output_dir", str(ref)])
        if res.rc != 0 or not (ref / "checkpoint-20").is_dir():
            raise RuntimeError(f"run A failed: {last_line(res.stderr)}")

    run_a()

    def reuse(pid_, args):
        def run():
            out = ctx.path("w", f"shared_{pid_}")
            shutil.copytree(ref, out)
            before = {str(out / f"checkpoint-{n}"): tree_digest(out / f"checkpoint-{n}") for n in (5, 10, 15, 20)}
            res = r.cli(pid_, ["train", *R, *args, "--output_dir", str(out)])
            return classify_cli(res, lost=changed_files(before), must_say=[r"overwrite"])
        return run

    def overwrite_flag():
        out = ctx.path("w", "shared_5.10b")
        shutil.copytree(ref, out)
        before = {str(out / "checkpoint-20"): tree_digest(out / "checkpoint-20")}
        res = r.cli("5.10b", ["train", *R, "--max_steps", "15", "--seed", "7", "--save_total_limit", "2",
                              "--hellora_overwrite_output_dir", "true", "--output_dir", str(out)])
        mine = (out / "checkpoint-15" / "trainer_state.json")
        problem = None if mine.is_file() and json.loads(mine.read_text()).get("global_step") == 15 else \
            "this run's checkpoint-15 missing"
        kept = sorted(p.name for p in out.glob("checkpoint-*"))
        verdict, note = classify_cli(res, lost=changed_files(before), ok_problem=problem)
        return verdict, f"{note}; the other run's checkpoint-20 kept; checkpoints now {kept}" if verdict == OK else note

    ctx.record("5", Probe("5.8", "copy of a finished run (checkpoints 5..20) as output_dir; new run `--hellora_k 4 "
                          "--seed 7 --max_steps 12`", "data lost", (CLEAR,)),
               reuse("5.8", ["--max_steps", "12", "--seed", "7", "--hellora_k", "4"]))
    ctx.record("5", Probe("5.10", "`--save_total_limit 2` in a folder with another run's checkpoints", "data lost",
                          (CLEAR,)),
               reuse("5.10", ["--max_steps", "10", "--seed", "7", "--save_total_limit", "2"]))
    def model_folder():
        victim = ctx.path("w", "victim_5.8m")
        shutil.copytree(ctx.fixtures["tiny_olmoe"], victim)
        before = {str(victim): tree_digest(victim)}
        res = r.cli("5.8m", ["train", *R, "--max_steps", "2", "--save_strategy", "no", "--output_dir", str(victim)])
        return classify_cli(res, lost=changed_files(before), must_say=[r"overwrite"])

    ctx.record("5", Probe("5.8m", "`hellora train --output_dir <an existing model folder>` (the principle of issue 19: "
                          "a folder holding a model is refused without the overwrite flag)", "(new)", (CLEAR,)),
               model_folder)
    ctx.record("5", Probe("5.10b", "`--hellora_overwrite_output_dir true --save_total_limit 2 --max_steps 15` there: "
                          "the other run's checkpoint-20 must survive the rotation", "(new)", (OK,)), overwrite_flag)


# ------------------------------------------------------------------------------------------------- report

FAMILIES = {
    "NP": ("`hellora pretrain` and the lab model cache", family_np),
    "NT": ("`--task sft` with malformed TRL datasets", family_nt),
    "NE": ("`hellora export` / `merge` path tricks with symlinks", family_ne),
    "NG": ("`bench/gpu/run.sh` dry run with bad wheels / output folders", family_ng),
    "NS": ("HumanEval sandbox: new cheats and escapes", family_ns),
    "5": ("Saves in a reused output_dir (rows 5.8 and 5.10)", family_s5),
}


def family_of(probe_id: str) -> str:
    return "5" if probe_id[0].isdigit() else probe_id[:2]


def load_baseline(path: str | os.PathLike) -> tuple[str, dict[str, str]]:
    """(its commit, {probe id: outcome}) of an earlier run's JSON, e.g. this tool run on a checkout from before
    the fixes."""
    data = json.loads(Path(path).read_text())
    commit = data["meta"]["commit"]
    return ("" if commit.startswith("(") else commit), {p["id"]: p["outcome"] for p in data["probes"]}


def render(probes: Sequence[Probe], meta: Mapping[str, Any],
           baseline: tuple[str, Mapping[str, str]] | None = None) -> str:
    base_name, base = (f"before ({baseline[0] or 'baseline'})", baseline[1]) if baseline else ("", {})
    col = f" {base_name} |" if baseline else ""
    sep = "---|" if baseline else ""
    lines = ["# Reliability probes rerun (issue 19)", "",
             f"Generated by `tools/reliability_probes.py` on {meta['date']} at `{meta['commit']}` "
             f"({meta['seconds']:.0f} s wall on {meta['host']}); do not edit by hand. The probes are rebuilt from the "
             f"rows of `{REVIEW}` (its scripts were not shipped); the review's column is its verdict for the row.",
             "", "Outcome classes: *clear error* (rc != 0, one line, no traceback, nothing lost), *ok* (the right "
             f"result), *clear error (late)* (after more than {LATE_S:.0f} s of work), *unclear traceback*, "
             "*silent wrong*, *data lost*, *sandbox escape*, *CHEAT PASSES*, *hang*; "
             "*probe failed* means the probe's own setup broke. A probe is closed when today's outcome is one of its "
             "accepted ones.", ""]
    if baseline:
        lines += [f"The *{base_name}* column is this same tool run on {meta.get('baseline_note', '')}: it shows "
                  "whether the probes find the defects the review reported.", ""]
    lines += [f"| family | probes | review 2026-12-05 |{col} today | closed today | not closed |",
              f"|---|---|---|{sep}---|---|---|"]

    def counts(values: Iterable[str]) -> str:
        tally: dict[str, int] = {}
        for v in values:
            tally[v] = tally.get(v, 0) + 1
        return ", ".join(f"{n} {v}" for v, n in sorted(tally.items(), key=lambda kv: (-kv[1], kv[0])))

    for fam in FAMILIES:
        rows = [p for p in probes if family_of(p.id) == fam]
        if not rows:
            continue
        closed = sum(p.outcome in p.accept for p in rows)
        open_ = [p.id for p in rows if p.outcome not in p.accept]
        before = f" {counts(base.get(p.id, 'not run') for p in rows)} |" if baseline else ""
        lines.append(f"| {fam} | {len(rows)} | {counts(p.review.split(' (')[0] for p in rows)} |{before} "
                     f"{counts(p.outcome for p in rows)} | {closed} | {', '.join(open_) or '-'} |")
    for fam, (title, _) in FAMILIES.items():
        rows = [p for p in probes if family_of(p.id) == fam]
        if not rows:
            continue
        lines += ["", f"## {fam}: {title}", "",
                  f"| id | probe | review 2026-12-05 |{col} today | accepted | evidence |",
                  f"|---|---|---|{sep}---|---|---|"]
        for p in rows:
            today = p.outcome if p.outcome in p.accept else f"**{p.outcome}**"
            ev = p.evidence.replace("|", "/").replace("\n", " ")[:220]
            before = f" {base.get(p.id, 'not run')} |" if baseline else ""
            lines.append(f"| {p.id} | {p.what.replace('|', '/')} | {p.review} |{before} {today} | "
                         f"{' / '.join(p.accept)} | {ev} |")
    lines += ["", "## How it was run", "", "`PYTHONPATH=$PWD python tools/reliability_probes.py` (see its docstring). "
              "Differences from the review: NS19 uses a 3 s limit instead of 5 s and NS23 writes 8 files of 15 MiB "
              "instead of 40 (both only to keep the run short; the checks are the same). 5.8 is not killed at step "
              "8: a run that is refused up front has nothing to kill, and one that is not refused runs to its end, "
              "which can only lose more. Run A has 20 steps (checkpoints 5..20) instead of 30. Added beyond the "
              "review: NS22b (the rmtree bomb inside `evaluate_humaneval`, as the review also ran it), 5.8m "
              "(`hellora train --output_dir <a model folder>`) and 5.10b (the explicit overwrite flag: rotation "
              "must still spare checkpoints this run did not write), NSx1-NSx4 (other file calls outside the work "
              "dir). Stricter than the review: NP8 counts a killed build's temp folder left in the cache as silent "
              "wrong (issue 19 asks for it to be cleaned; the review said ok); refusals of NT rows and NE7 must name "
              "what is wrong. NP3 halves the weights file (the review cut it to 400,000 bytes). The sandbox's "
              "isolation layers on the machine that ran this are in NS32's evidence: where they include "
              "`uid-nobody`, the root-without-capabilities candidate the review had (which made NS1/NS2 effective) "
              "is not exercised, and the audit hook is what NS1/NS2/NS6 test.", ""]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--families", default=",".join(FAMILIES), help="comma list of " + ", ".join(FAMILIES))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "reliability-probes"),
                    help="results path without suffix (.md and .json are written)")
    ap.add_argument("--keep", action="store_true", help="keep the scratch folder (its path is printed)")
    ap.add_argument("--baseline", help="an earlier run's JSON (e.g. this tool run on a checkout from before the "
                    "fixes: copy the tool into it and set HELLORA_DATASETS); shown as a 'before' column")
    ap.add_argument("--baseline_note", default="a checkout of the code before the issue-19 fixes",
                    help="what the baseline commit is, for the results file")
    args = ap.parse_args(argv)
    wanted = [f.strip() for f in args.families.split(",") if f.strip()]
    unknown = [f for f in wanted if f not in FAMILIES]
    if unknown:
        ap.error(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    t0 = time.time()
    scratch = Path(tempfile.mkdtemp(prefix="hellora-probes-"))
    print(f"scratch: {scratch}", flush=True)
    env = {"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false",
           "OMP_NUM_THREADS": "1", "HELLORA_LAB_RECIPE": "tiny", "HELLORA_LAB_CACHE": str(scratch / "cache" / "c1"),
           "MPLBACKEND": "Agg", "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    ctx = Ctx(scratch, Runner(scratch, env))
    try:
        build_fixtures(ctx)
        if "NP" not in wanted:  # the other families need the prebuilt cache that NP1 makes
            ctx.runner.cli("fix_cache", ["pretrain", "--recipe", "tiny"])
            ctx.lab_key = next(p.name for p in (scratch / "cache" / "c1").iterdir() if not p.name.startswith("."))
        for fam in FAMILIES:
            if fam in wanted:
                try:
                    FAMILIES[fam][1](ctx)
                except Exception as exc:  # the family's setup broke: say so in the results, run the others
                    ctx.record(fam, Probe(f"{fam}-setup", "the family's own setup", "-", ()),
                               lambda exc=exc: (FAILED_TO_RUN, f"{type(exc).__name__}: {exc}"))
    finally:
        for p in IMMUTABLE:  # never leave an immutable folder behind
            chattr(p, "-i")
        if not args.keep:  # rm, not shutil.rmtree: a sandbox probe on old code can leave a 1500-deep tree
            subprocess.run(["rm", "-rf", "--one-file-system", "--", str(scratch)], check=False)
    git = lambda *a: subprocess.run(["git", *a], cwd=REPO, capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD") or "(not a git checkout)"
    if git("status", "--porcelain", "--", "hellora_trl", "bench/gpu", "tools"):
        commit += " + uncommitted changes"
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "commit": commit,
            "seconds": time.time() - t0, "host": f"{os.cpu_count()} CPUs", "families": wanted}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    baseline = None
    if args.baseline:
        baseline = load_baseline(args.baseline)
        meta["baseline"] = {"commit": baseline[0], "note": args.baseline_note, "outcomes": baseline[1]}
        meta["baseline_note"] = args.baseline_note
    out.with_suffix(".md").write_text(render(ctx.probes, meta, baseline))
    out.with_suffix(".json").write_text(json.dumps(
        {"meta": meta, "probes": [p.__dict__ for p in ctx.probes]}, indent=1) + "\n")
    not_closed = [p.id for p in ctx.probes if p.outcome not in p.accept]
    print(f"{len(ctx.probes)} probes, {len(ctx.probes) - len(not_closed)} closed; not closed: {not_closed or 'none'}; "
          f"{time.time() - t0:.0f} s; wrote {out.with_suffix('.md')}")
    return 1 if not_closed else 0


if __name__ == "__main__":
    sys.exit(main())
