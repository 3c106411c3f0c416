"""The HumanEval sandbox: known cheats never pass, escapes are blocked, the evaluator survives and keeps results.

Every test here fails on the sandbox before issue 13 (a token printed by the same interpreter that ran the
test and the completion, and a deny-list of patched os functions).
"""

from __future__ import annotations

import dis
import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from hellora_trl.recipes.eval import evaluate_humaneval, humaneval_runner, load_humaneval, run_humaneval_sample
from hellora_trl.recipes.eval import humaneval as ev

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "fixtures"))
from humaneval_cheats import CHEATS, EVALUATOR_KILLERS  # noqa: E402

SHARED_DATASETS = Path(__file__).resolve().parents[3] / "shared" / "datasets"
SECRET = "hellora-evaluator-secret-4242"

PROBLEMS = {
    "double": {
        "task_id": "unit/double",
        "prompt": 'def double(x):\n    """Return twice x."""\n',
        "test": "def check(candidate):\n    assert candidate(2) == 4\n    assert candidate(-3) == -6\n",
        "entry_point": "double",
    },
    "abs_double": {
        "task_id": "unit/abs_double",
        "prompt": 'def double(x):\n    """Return twice x."""\n',
        "test": "def check(candidate):\n    assert abs(candidate(1.5) - 3.0) < 1e-6\n",
        "entry_point": "double",
    },
    "helper": {
        "task_id": "unit/helper",
        "prompt": 'def _scale():\n    return 2\n\n\ndef double(x):\n    """Return x * _scale()."""\n',
        "test": "def check(candidate):\n    assert candidate(3) == 3 * _scale()\n",
        "entry_point": "double",
    },
}


def _problem(key: str, name: str) -> dict:
    return {**PROBLEMS[key], "task_id": name}


@pytest.fixture(scope="module")
def cheat_run(tmp_path_factory):
    """Every cheat in one evaluate_humaneval call (2 workers), with the things they attack set up around it."""
    outside = tmp_path_factory.mktemp("outside")
    victim = outside / "victim.txt"
    victim.write_text("important")
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.setblocking(False)
    os.environ["HELLORA_FAKE_SECRET"] = SECRET
    fields = {"outside": str(outside), "victim": str(victim), "port": server.getsockname()[1]}
    problems, samples = {}, {}
    for name, (key, template) in CHEATS.items():
        problems[name] = _problem(key, name)
        samples[name] = [template.format(**fields)]
    try:
        start = time.monotonic()
        result = evaluate_humaneval(problems, samples, ks=(1,), timeout=3.0, workers=2, memory_mb=512)
        elapsed = time.monotonic() - start
        try:
            server.accept()
            connected = True
        except BlockingIOError:
            connected = False
    finally:
        server.close()
        os.environ.pop("HELLORA_FAKE_SECRET", None)
    by_name = {r["task_id"]: r for r in result["results"]}
    return {"by_name": by_name, "outside": outside, "victim": victim, "connected": connected, "elapsed": elapsed,
            "result": result}


@pytest.mark.parametrize("name", sorted(CHEATS))
def test_cheat_is_never_graded_passed(cheat_run, name):
    result = cheat_run["by_name"][name]
    assert result["verdict"] != "passed", (name, result)
    assert result["error"]


def test_cheats_leave_no_trace_outside(cheat_run):
    assert cheat_run["victim"].read_text() == "important"
    assert sorted(p.name for p in cheat_run["outside"].iterdir()) == ["victim.txt"]
    assert not cheat_run["connected"]
    assert cheat_run["result"]["pass@1"] == 0.0


def test_errors_carry_no_secrets(cheat_run):
    text = json.dumps(cheat_run["result"]["results"])
    assert SECRET not in text
    assert "root:x:0" not in text
    assert "assert candidate" not in text  # the test source stays in the checker


def test_hook_blocks_escapes_with_a_clear_message(cheat_run):
    by_name = cheat_run["by_name"]
    for name in ("write_outside", "truncate_victim", "fresh_posix_system", "subprocess_run", "ctypes_reimport",
                 "fresh_posix_fork", "symlink_out", "kill_parent", "marshal_loads", "code_object_surgery",
                 "load_testcapi", "load_extension_from_workdir", "read_etc_passwd", "directory_fd_out"):
        assert "disabled in the HumanEval sandbox" in by_name[name]["error"], (name, by_name[name])


def test_correct_completions_still_pass_with_files_in_the_work_dir():
    problem = _problem("double", "unit/ok")
    uses_files = (
        "    import pathlib, os, random, hashlib, math\n"
        "    pathlib.Path('scratch.txt').write_text(str(x))\n"
        "    os.mkdir('sub')\n    open('sub/a', 'w').write('1')\n    os.remove('sub/a')\n    os.rmdir('sub')\n"
        "    return 2 * int(open('scratch.txt').read())\n"
    )
    for completion in ("    return 2 * x\n", uses_files, "    import numpy\n    return 2 * x\n" if _has_numpy() else
                       "    return x + x\n"):
        result = run_humaneval_sample(problem, completion)
        assert result["verdict"] == "passed", result
    assert "audit-hook" in result["isolation"] and "new-session" in result["isolation"]


def _has_numpy() -> bool:
    import importlib.util

    return importlib.util.find_spec("numpy") is not None


def test_plain_data_types_cross_the_boundary():
    problem = {
        "task_id": "unit/types",
        "prompt": "def f(x):\n    pass\n",
        "test": textwrap.dedent("""\
            def check(candidate):
                value = (1, [2.5, float('inf')], {'a': {3, 4}}, frozenset({b'x'}), None, True, 'é\\ud800', 1j, -(10 ** 5000))
                got = candidate(value)
                assert got == value and type(got) is tuple and type(got[1]) is list and got[5] is True
                assert candidate(value, k=[1])[0] == value
                assert candidate('nan') != candidate('nan')
                try:
                    candidate('boom')
                except ValueError as err:
                    assert 'boom' in str(err)
                else:
                    raise AssertionError('no error')
            """),
        "entry_point": "f",
    }
    completion = ("    if x == 'nan':\n        return float('nan')\n    if x == 'boom':\n        raise ValueError('boom')\n"
                  "    return x\n\ndef f(x, k=None):\n    if x == 'nan':\n        return float('nan')\n"
                  "    if x == 'boom':\n        raise ValueError('boom')\n    return x if k is None else (x, k)\n")
    result = run_humaneval_sample(problem, completion)
    assert result["verdict"] == "passed", result


def test_the_isolated_interpreter_runs_the_runner_module():
    """The sandbox program is a real module, and its file is exactly what the evaluator hands to ``python -c``."""
    assert ev.RUNNER_SOURCE == inspect.getsource(humaneval_runner)
    assert 'if __name__ == "__main__":\n    _runner()' in ev.RUNNER_SOURCE  # importing it runs nothing


def test_audit_hook_reads_no_global_or_closure_names():
    """The hook must not depend on anything the completion can rebind (module globals, builtins, os.path)."""
    for name in ("_hook", "_norm", "_under"):
        function = getattr(humaneval_runner, name)
        assert function.__closure__ is None and function.__kwdefaults__ is None
        ops = {ins.opname for ins in dis.get_instructions(function)}
        assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLOSURE", "STORE_GLOBAL", "MAKE_FUNCTION"}, name
        assert "__class__" not in function.__code__.co_names


def test_hostile_process_does_not_outlive_the_sample(monkeypatch):
    """Leaving the process group (fresh posix setsid) and sleeping must not keep a process alive (review 6.39)."""
    roots = []
    real = ev.tempfile.mkdtemp

    def recording(*args, **kwargs):
        roots.append(real(*args, **kwargs))
        return roots[-1]

    monkeypatch.setattr(ev.tempfile, "mkdtemp", recording)
    completion = (
        "    import importlib.util, importlib.machinery, time, signal\n"
        "    try:\n"  # a fresh posix module is refused since issue 19; the sleep must still be cut short
        "        P = importlib.util.module_from_spec(importlib.machinery.BuiltinImporter.find_spec('posix'))\n"
        "        P.setsid()\n    except (OSError, ImportError):\n        pass\n"
        "    signal.signal(signal.SIGTERM, signal.SIG_IGN)\n    time.sleep(60)\n"
    )
    result = run_humaneval_sample(_problem("double", "unit/sleeper"), completion, timeout=1.5)
    assert result["verdict"] == "timed out"
    time.sleep(0.5)
    survivors = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
            except OSError:
                continue
            if roots[0].encode() in cmdline:
                survivors.append(pid)
    assert not survivors


# A throw-away evaluator process. It loads the harness module from its file (it imports nothing of hellora_trl, whose
# __init__ pulls in torch, seconds per start on a shared CPU box).
DISPOSABLE = textwrap.dedent("""\
    import importlib.util, json, sys
    name, path = sys.argv[1], sys.argv[2]
    spec = importlib.util.spec_from_file_location(name, path)
    ev = importlib.util.module_from_spec(spec)
    sys.modules[name] = ev
    spec.loader.exec_module(ev)
    problems, samples, results = json.loads(sys.stdin.read())
    result = ev.evaluate_humaneval(problems, samples, ks=(1,), workers=1, results_path=results)
    print(json.dumps(result["per_task"]))
    """)


def _disposable(**kwargs):
    return subprocess.Popen([sys.executable, "-c", DISPOSABLE, ev.__name__, ev.__file__], stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_evaluator_survives_attempts_to_kill_it(tmp_path):
    """Review 6.40: a completion killed the evaluator with SIGKILL and every result was lost."""
    problem = _problem("double", "unit/double")
    good = "    return 2 * x\n"
    path = tmp_path / "results.jsonl"
    proc = _disposable()
    pid = proc.pid
    killers = [EVALUATOR_KILLERS[name].format(evaluator_pid=pid) for name in sorted(EVALUATOR_KILLERS)]
    out, err = proc.communicate(json.dumps([{"unit/double": problem}, {"unit/double": [good, *killers, good]},
                                            str(path)]), timeout=120)
    isolation = ev.run_humaneval_sample(problem, good)["isolation"]
    if proc.returncode != 0 and "pid-namespace" not in isolation:
        pytest.skip("no PID namespace here, so a re-created posix/_signal module can still pidfd-kill the "
                    f"evaluator (documented residual risk); isolation={isolation}")
    assert proc.returncode == 0, err[-2000:]
    assert json.loads(out) == {"unit/double": {"n": 2 + len(killers), "correct": 2}}
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 2 + len(killers)


def test_results_are_written_incrementally_and_reused(tmp_path, monkeypatch):
    problem = _problem("double", "unit/double")
    path = tmp_path / "out" / "samples.jsonl"
    samples = {"unit/double": ["    return 2 * x\n", "    return x\n", "    return x + x\n"]}
    first = evaluate_humaneval({"unit/double": problem}, samples, ks=(1,), results_path=path)
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(rows) == 3 and sorted(r["sample_index"] for r in rows) == [0, 1, 2]
    with open(path, "a") as f:
        f.write('{"key": "torn')  # a line cut by a kill is ignored
    monkeypatch.setattr(ev, "run_humaneval_sample", lambda *a, **k: pytest.fail("recorded samples re-ran"))
    again = evaluate_humaneval({"unit/double": problem}, samples, ks=(1,), results_path=path)
    assert again["per_task"] == first["per_task"] == {"unit/double": {"n": 3, "correct": 2}}


def test_killed_evaluator_loses_nothing_already_computed(tmp_path):
    problem = _problem("double", "unit/double")
    path = tmp_path / "samples.jsonl"
    samples = {"unit/double": ["    return 2 * x\n", "    return x\n", "    import time\n    time.sleep(60)\n"]}
    proc = _disposable()
    proc.stdin.write(json.dumps([{"unit/double": problem}, samples, str(path)]))
    proc.stdin.close()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and (not path.exists() or path.read_text().count("\n") < 2):
        time.sleep(0.1)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert [r["passed"] for r in sorted(rows, key=lambda r: r["sample_index"])] == [True, False]


@pytest.mark.parametrize("kwargs, match", [
    ({"timeout": float("nan")}, "timeout"), ({"timeout": float("inf")}, "timeout"), ({"timeout": 0}, "timeout"),
    ({"memory_mb": -5}, "memory_mb"),
])
def test_bad_arguments_are_rejected_before_anything_runs(kwargs, match, monkeypatch):
    monkeypatch.setattr(ev.tempfile, "mkdtemp", lambda *a, **k: pytest.fail("temp dir created"))
    with pytest.raises(ValueError, match=match):
        run_humaneval_sample(PROBLEMS["double"], "    return 2 * x\n", **kwargs)


@pytest.mark.parametrize("problem", [{"task_id": "x", "prompt": "def f():\n", "entry_point": "f"},
                                     {"task_id": "x", "prompt": None, "test": "", "entry_point": "f"}])
def test_malformed_problem_is_a_clear_error(problem, monkeypatch):
    monkeypatch.setattr(ev.tempfile, "mkdtemp", lambda *a, **k: pytest.fail("temp dir created"))
    with pytest.raises(ValueError, match="must be a string"):
        run_humaneval_sample(problem, "    return 1\n")


def test_lone_surrogate_fails_only_its_sample():
    """Review 6.42: one completion with '\\ud800' raised UnicodeEncodeError and lost every result."""
    samples = {"unit/double": ["    return 2 * x\n", "    return '\ud800'\n", "    return x + x  # \ud800\n"]}
    result = evaluate_humaneval({"unit/double": PROBLEMS["double"]}, samples, ks=(1,))
    assert [r["passed"] for r in result["results"]] == [True, False, False]  # a surrogate cannot be compiled
    assert all(r["error"] for r in result["results"][1:])
    json.dumps(result, ensure_ascii=False).encode("utf-8")


# ---------------------------------------------------------------- the real HumanEval file


def _humaneval() -> dict[str, dict]:
    path = SHARED_DATASETS / "humaneval" / "HumanEval.jsonl.gz"
    if not path.exists():
        pytest.skip(f"{path} not present (../shared/datasets is only available beside the checkout)")
    return {p["task_id"]: p for p in load_humaneval(path)}


STEAL = ("    return None\nimport sys\n_f = sys._getframe(1).f_locals\n"
         "_f['write'](_f['out_fd'], ('\\n' + _f['token'] + '\\n').encode())\n_f['exit_now'](0)\n")


@pytest.mark.data
def test_review_cheats_on_real_problems():
    """The review's exact reproductions (6.31-6.35), plus helper redefinitions on the problems whose tests call
    prompt helpers, and the four canonical solutions that failed before (HumanEval/32, 38, 50, 53)."""
    problems = _humaneval()
    always = "    class _Any:\n        def __eq__(self, o): return True\n        def __ne__(self, o): return False\n    return _Any()\n"
    arith = CHEATS["always_equal_arithmetic"][1]
    cheats = {
        "HumanEval/0": [always, CHEATS["settrace_swaps_candidate"][1], STEAL],
        "HumanEval/2": [arith],
        "HumanEval/64": ["    return None\n\n@(lambda f: (lambda candidate: None))"],
        "HumanEval/32": ["    return 0\n\n\ndef poly(xs, x):\n    return 0\n"],
        "HumanEval/38": ["    return s\n\n\ndef encode_cyclic(s):\n    return s\n"],
    }
    result = evaluate_humaneval(problems, cheats, ks=(1,))
    assert [r for r in result["results"] if r["passed"]] == []
    fixed = {t: [problems[t]["canonical_solution"]] for t in ("HumanEval/32", "HumanEval/38", "HumanEval/50", "HumanEval/53")}
    assert evaluate_humaneval(problems, fixed, ks=(1,))["pass@1"] == 1.0


@pytest.mark.slow
@pytest.mark.data
def test_all_canonical_solutions_pass_and_wrong_bodies_fail_everywhere():
    problems = _humaneval()
    assert len(problems) == 164
    canonical = evaluate_humaneval(problems, {t: [p["canonical_solution"]] for t, p in problems.items()}, ks=(1,))
    failed = {r["task_id"]: r["error"] for r in canonical["results"] if not r["passed"]}
    assert failed == {} and canonical["pass@1"] == 1.0
    wrong = ["    return None\n", "    raise NotImplementedError\n", STEAL]
    result = evaluate_humaneval(problems, {t: list(wrong) for t in problems}, ks=(1,))
    assert [(r["task_id"], r["sample_index"]) for r in result["results"] if r["passed"]] == []
    assert result["pass@1"] == 0.0


def test_without_namespaces_the_hook_still_holds(monkeypatch, tmp_path):
    """The path taken where unshare(2) is refused (non-root CI, locked-down containers)."""
    monkeypatch.setattr(ev, "_USE_NAMESPACES", False)
    victim = tmp_path / "victim.txt"
    victim.write_text("important")
    names = ["always_equal", "steal_token_from_parent_frame", "truncate_victim", "fresh_posix_system",
             "kill_parent", "finalizer_after_hooks_cleared", "socket_through_subclasses", "fresh_posix_fork"]
    fields = {"outside": str(tmp_path), "victim": str(victim), "port": 9}
    problems = {name: _problem(CHEATS[name][0], name) for name in names}
    samples = {name: [CHEATS[name][1].format(**fields)] for name in names}
    problems["ok"], samples["ok"] = _problem("double", "ok"), ["    return 2 * x\n"]
    result = evaluate_humaneval(problems, samples, ks=(1,), workers=2)
    verdicts = {r["task_id"]: r["verdict"] for r in result["results"]}
    assert verdicts.pop("ok") == "passed" and set(verdicts.values()) == {"failed"}
    assert "pid-namespace" not in result["isolation"] and "audit-hook" in result["isolation"]
    assert victim.read_text() == "important" and sorted(p.name for p in tmp_path.iterdir()) == ["victim.txt"]


# ---------------------------------------------------------------------------- issue 19 item 3: clean-up cannot crash
DEEP_CHAIN = "    return 2 * x\nimport os\np = 'a'\nfor _ in range(1500):\n    os.mkdir(p)\n    p += '/a'\n"


def test_a_deep_folder_chain_cannot_crash_the_harness_cleanup(monkeypatch):
    """Review NS22: a 1,500-deep chain made the harness's own shutil.rmtree raise RecursionError."""
    roots = []
    real = ev.tempfile.mkdtemp

    def recording(*args, **kwargs):
        roots.append(real(*args, **kwargs))
        return roots[-1]

    monkeypatch.setattr(ev.tempfile, "mkdtemp", recording)
    result = run_humaneval_sample(_problem("double", "unit/deep"), DEEP_CHAIN, timeout=20)
    assert result["verdict"] == "passed", result  # the chain is only litter: the function itself is right
    assert not os.path.exists(roots[0])  # removed, by the checker and the harness, without recursion


def test_remove_tree_handles_deep_locked_and_symlinked_trees(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (outside / "keep").write_text("x")
    top = tmp_path / "tree"
    deep = top
    for _ in range(2500):  # deeper than PATH_MAX allows as one path
        deep = deep / "a"
    os.makedirs(top)
    fd = os.open(top, os.O_RDONLY)
    try:
        for _ in range(2500):
            os.mkdir("a", dir_fd=fd)
            inner = os.open("a", os.O_RDONLY, dir_fd=fd)
            os.close(fd)
            fd = inner
        os.symlink(str(outside), "link", dir_fd=fd)
    finally:
        os.close(fd)
    locked = top / "locked"
    locked.mkdir()
    (locked / "f").write_text("y")
    locked.chmod(0)
    assert ev.remove_tree(str(top)) and not top.exists()
    assert (outside / "keep").read_text() == "x"  # a symlink is removed, never followed


def test_one_sample_that_breaks_the_harness_does_not_stop_the_others(monkeypatch):
    real = ev.run_humaneval_sample

    def flaky(problem, completion, **kwargs):
        if "BOOM" in completion:
            raise RecursionError("maximum recursion depth exceeded")
        return real(problem, completion, **kwargs)

    monkeypatch.setattr(ev, "run_humaneval_sample", flaky)
    problem = _problem("double", "unit/double")
    out = evaluate_humaneval({"unit/double": problem}, {"unit/double": ["    return 2 * x\n", "    # BOOM\n    return 0\n"]},
                             ks=(1,), workers=1)
    assert out["per_task"] == {"unit/double": {"n": 2, "correct": 1}}
    assert "harness error: RecursionError" in out["results"][1]["error"]


# ---------------------------------------------------------------------------- issue 19 item 4: the sandbox fails closed
def _escape(tmp_path, body: str) -> dict:
    """Run ``body`` (function-body lines) as the completion of the double problem; it returns 2 * x at the end."""
    return run_humaneval_sample(_problem("double", "unit/escape"), body + "    return 2 * x\n", timeout=10)


def test_mkfifo_outside_the_work_dir_is_refused(tmp_path):
    """Review NS1: os.mkfifo raises no audit event and made a FIFO outside the work dir."""
    target = tmp_path / "fifo_s1"
    result = _escape(tmp_path, f"    import os\n    os.mkfifo({str(target)!r})\n")
    assert not os.path.lexists(target)  # the old code: the FIFO exists
    assert result["verdict"] == "failed" and "mkfifo outside the work dir is disabled" in result["error"]
    inside = _escape(tmp_path, "    import os, stat\n    if not os.path.exists('pipe'):\n        os.mkfifo('pipe')\n    assert stat.S_ISFIFO(os.stat('pipe').st_mode)\n")
    assert inside["verdict"] == "passed", inside  # in the work dir it is allowed


@pytest.mark.parametrize("how", [
    "importlib.util.module_from_spec(importlib.machinery.BuiltinImporter.find_spec('posix'))",
    "importlib.machinery.BuiltinImporter.create_module(importlib.machinery.BuiltinImporter.find_spec('posix'))",
    "_imp.create_builtin(importlib.machinery.BuiltinImporter.find_spec('posix'))",
    "_imp.create_builtin(types.SimpleNamespace(name='posix', origin='built-in'))",
])
def test_a_fresh_posix_module_cannot_be_made(tmp_path, how):
    """Review NS2: mknod was deleted from os/posix, but a fresh posix instance had it and made a file outside."""
    target = tmp_path / "mknod_s2"
    body = (
        "    import importlib.util, importlib.machinery, _imp, stat, types\n"
        f"    P = {how}\n"
        f"    P.mknod({str(target)!r}, stat.S_IFREG | 0o644)\n"
    )
    result = _escape(tmp_path, body)
    assert not os.path.lexists(target)  # the old code: an empty regular file
    assert result["verdict"] == "failed" and "fresh instance of module posix is disabled" in result["error"], result


@pytest.mark.parametrize("probe", [
    "os.readlink('/proc/self/exe')", "os.readlink('/proc/self/cwd')", "os.stat({home!r}).st_mode",
    "os.lstat('/etc/passwd').st_size", "os.access('/etc/shadow', os.F_OK)", "os.stat('/etc', dir_fd=None).st_mode",
    "os.stat('passwd', dir_fd=os.open('/etc', os.O_RDONLY))",
])
def test_metadata_outside_the_allowed_folders_does_not_leak(tmp_path, probe):
    """Review NS6: stat / readlink / exists raise no audit event and leaked paths, modes and existence."""
    home = str(Path.home())
    body = f"    import os\n    raise RuntimeError('LEAK ' + repr({probe.format(home=home)}))\n"
    result = _escape(tmp_path, body)
    assert result["verdict"] == "failed" and "LEAK" not in (result["error"] or ""), result
    assert "disabled in the HumanEval sandbox" in result["error"]


def test_exists_is_false_outside_and_true_inside(tmp_path):
    marker = tmp_path / "secret"
    marker.write_text("x")
    body = (
        "    import os, os.path, pathlib, json\n"
        f"    assert not os.path.exists({str(marker)!r}) and not os.path.exists('/etc/shadow')\n"
        f"    try:\n        pathlib.Path({str(marker)!r}).exists()\n        raise AssertionError('allowed')\n"
        "    except PermissionError:\n        pass\n"  # refused alike whether it exists or not
        "    assert os.path.exists(os.getcwd()) and not os.path.exists('nothing_here')\n"
        "    open('mine', 'w').write('1')\n    assert os.path.getsize('mine') == 1\n"
    )
    result = _escape(tmp_path, body)
    assert result["verdict"] == "passed", result


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0, reason="the uid drop applies to root only")
def test_root_always_drops_to_nobody_and_named_imports_still_work():
    """Review: with the Python install under a non-world-readable /root the candidate stayed uid 0 (no capabilities),
    which let mkfifo / mknod create files where root may. Now it is uid nobody whatever the install's mode."""
    body = "    import os, textwrap\n    assert textwrap.dedent(' a') == 'a'\n    raise RuntimeError(f'uid={os.getuid()},{os.geteuid()}')\n"
    result = run_humaneval_sample(_problem("double", "unit/uid"), body)
    assert "uid-nobody" in result["isolation"] and "uid=65534,65534" in result["error"], result


def test_completion_imports_are_named_modules_only():
    source = ("import os, numpy.linalg as la\nfrom collections import deque\nfrom . import sibling\n"
              "import antigravity\nimport subprocess\n")
    assert ev._completion_imports(source) == ["os", "numpy.linalg", "collections"]
    assert ev._completion_imports("def f(:\n") == []


def test_guarded_stand_ins_read_no_global_name():
    """The os / _imp stand-ins and the call trampoline look up nothing the completion could rebind."""
    for function in (humaneval_runner._guard, humaneval_runner._call_real):
        assert function.__closure__ is None
        ops = {ins.opname for ins in dis.get_instructions(function)}
        assert not ops & {"LOAD_GLOBAL", "LOAD_NAME", "LOAD_DEREF", "LOAD_CLOSURE", "STORE_GLOBAL"}, function.__name__
