"""Mutation testing of the core modules: plant one small bug at a time and check that a fast test subset fails.

Usage (from the repository root; a measurement, not part of CI)::

    OMP_NUM_THREADS=1 python tools/mutation.py selection profile accounting profiling ops
    python tools/mutation.py profile --list               # the mutants, without running anything
    python tools/mutation.py selection --out /tmp/m.md    # write the table elsewhere

Each mutant changes one AST node of the module (a comparison, an arithmetic or boolean operator, a constant, a
unary ``not``/``-``, an ``if`` condition, a ``return`` value, a ``raise``, ``min``/``max``, a slice bound, or a
call statement). Docstrings, f-strings, the arguments of ``raise`` and of logger/warnings calls (messages),
annotations and ``__all__`` are not mutated. Files are never modified: the module's tests are collected once
(one pytest session per module, in a forked child), and each mutant runs in a forked child of that session which
patches the imported module in memory (:func:`patch_module`) and runs the collected tests in order until the first
failure, under a timeout (3x the unmutated run + 10 s). A mutant is *killed* when a test fails (or the mutant
cannot even be loaded) or it times out, *equivalent* when ``tools/mutation_equivalent.json`` lists it with a reason (a change no caller can
observe), and *survived* otherwise. Score = (killed + equivalent) / mutants.

Modules with more mutants than their cap are sampled with a fixed seed (``--seed``), so reruns see the same
mutants. The markdown table (``bench/results/mutation.md`` by default) is rewritten after each module.
"""

from __future__ import annotations

import argparse
import ast
import copy
import datetime as _dt
import json
import os
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
EQUIVALENT_FILE = Path(__file__).resolve().parent / "mutation_equivalent.json"
DEFAULT_SEED = 20261206

# name -> module path, the fast test subset run against each mutant, a cap (sampled above it) and optionally the
# functions to mutate (``ops``: the pure-math helpers; kernel availability depends on CUDA and the torch version).
TARGETS: dict[str, dict] = {
    "selection": {
        "path": "hellora_trl/selection.py",
        "tests": ["tests/test_core_checks.py", "tests/test_selection.py"],
        "cap": 400,
    },
    "profile": {
        "path": "hellora_trl/profile.py",
        "tests": ["tests/test_core_checks.py", "tests/test_selection.py", "tests/test_profiling.py"],
        "cap": 400,
    },
    "accounting": {
        "path": "hellora_trl/accounting.py",
        "tests": ["tests/test_core_checks.py", "tests/test_accounting.py"],
        "cap": 400,
    },
    "profiling": {
        "path": "hellora_trl/profiling.py",
        "tests": ["tests/test_core_checks.py", "tests/test_profiling.py"],
        "cap": 200,
    },
    "ops": {
        "path": "hellora_trl/expert_lora/ops.py",
        "tests": ["tests/test_ops_math.py"],
        "cap": 400,
        "funcs": [
            "project", "lora_compute_dtype", "grouped_mm", "grouped_mm_loop", "grouped_outer", "LoraRows",
            "_stacked_a", "_columns", "row_scale", "AddRows", "take_rows", "add_rows",
        ],
    },
}
PRELOAD = [
    "numpy", "torch", "transformers", "peft", "datasets", "trl", "pytest",
    # the tiny test models' modeling code (transformers imports it lazily, in each child otherwise)
    "transformers.models.olmoe.modeling_olmoe", "transformers.models.qwen2_moe.modeling_qwen2_moe",
    "transformers.models.deepseek_v2.modeling_deepseek_v2", "transformers.models.mixtral.modeling_mixtral",
]

_CMP = {
    ast.Eq: [ast.NotEq], ast.NotEq: [ast.Eq], ast.Lt: [ast.LtE, ast.Gt], ast.LtE: [ast.Lt, ast.GtE],
    ast.Gt: [ast.GtE, ast.Lt], ast.GtE: [ast.Gt, ast.LtE], ast.In: [ast.NotIn], ast.NotIn: [ast.In],
    ast.Is: [ast.IsNot], ast.IsNot: [ast.Is],
}
_BIN = {
    ast.Add: [ast.Sub], ast.Sub: [ast.Add], ast.Mult: [ast.Div], ast.Div: [ast.Mult], ast.FloorDiv: [ast.Mult],
    ast.Mod: [ast.Mult], ast.MatMult: [ast.Mult], ast.Pow: [ast.Mult],
}
_SYMBOL = {
    ast.Eq: "==", ast.NotEq: "!=", ast.Lt: "<", ast.LtE: "<=", ast.Gt: ">", ast.GtE: ">=", ast.In: "in",
    ast.NotIn: "not in", ast.Is: "is", ast.IsNot: "is not", ast.Add: "+", ast.Sub: "-", ast.Mult: "*",
    ast.Div: "/", ast.FloorDiv: "//", ast.Mod: "%", ast.MatMult: "@", ast.Pow: "**", ast.And: "and", ast.Or: "or",
}
_QUIET_CALLERS = ("logger", "logging", "warnings")


@dataclass
class Mutant:
    index: int  # position in the module's full candidate list (stable for a given source)
    node: int  # position of the node in the unskipped walk
    kind: str
    arg: object
    description: str
    line: int
    func: str
    code: str  # the stripped source line, for the equivalence list and the report
    status: str = "pending"
    reason: str = ""
    seconds: float = 0.0

    def key(self) -> tuple[str, str, str]:
        return (self.func, self.code, self.description)


@dataclass
class Result:
    name: str
    path: str
    tests: list[str]
    total: int
    mutants: list[Mutant] = field(default_factory=list)
    baseline_seconds: float = 0.0

    def count(self, status: str) -> int:
        return sum(m.status == status for m in self.mutants)

    @property
    def score(self) -> float:
        n = len(self.mutants)
        return 100.0 * (self.count("killed") + self.count("timeout") + self.count("equivalent")) / n if n else 100.0


# ----------------------------------------------------------------------------------------------- mutants
def _skipped(tree: ast.AST) -> set[int]:
    skip: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant) and isinstance(first.value.value, str):
                skip.add(id(first))
        if isinstance(node, ast.JoinedStr):
            skip.add(id(node))
        if isinstance(node, ast.Raise) and node.exc is not None:
            skip.add(id(node.exc))
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and owner.id in _QUIET_CALLERS:
                skip.add(id(node))
        if isinstance(node, ast.Assign) and any(isinstance(t, ast.Name) and t.id == "__all__" for t in node.targets):
            skip.add(id(node))
        if isinstance(node, ast.AnnAssign):
            skip.add(id(node.annotation))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            if node.returns is not None:
                skip.add(id(node.returns))
            arguments = node.args
            for a in arguments.posonlyargs + arguments.args + arguments.kwonlyargs + [arguments.vararg, arguments.kwarg]:
                if a is not None and a.annotation is not None:
                    skip.add(id(a.annotation))
    return skip


def _walk(tree: ast.AST) -> list[tuple[ast.AST, str]]:
    skip = _skipped(tree)
    nodes: list[tuple[ast.AST, str]] = []

    def visit(node: ast.AST, func: str) -> None:
        if id(node) in skip:
            return
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            func = node.name if not func else f"{func}.{node.name}"
        nodes.append((node, func))
        for child in ast.iter_child_nodes(node):
            visit(child, func)

    visit(tree, "")
    return nodes


def _is_docstring_free_return(node: ast.Return) -> bool:
    return node.value is not None and not (isinstance(node.value, ast.Constant) and node.value.value is None)


def enumerate_mutants(source: str) -> list[Mutant]:
    """Every mutation point of ``source``, in a stable order."""
    tree = ast.parse(source)
    lines = source.splitlines()
    found: list[Mutant] = []

    def add(node_index, kind, arg, description, node, func):
        line = getattr(node, "lineno", 0)
        code = lines[line - 1].strip() if 0 < line <= len(lines) else ""
        found.append(Mutant(len(found), node_index, kind, arg, description, line, func or "<module>", code))

    for i, (node, func) in enumerate(_walk(tree)):
        if isinstance(node, ast.Compare):
            for j, op in enumerate(node.ops):
                for new in _CMP.get(type(op), []):
                    add(i, "cmp", (j, new.__name__), f"`{_SYMBOL[type(op)]}` -> `{_SYMBOL[new]}`", node, func)
        elif isinstance(node, (ast.BinOp, ast.AugAssign)) and type(node.op) in _BIN:
            eq = "=" if isinstance(node, ast.AugAssign) else ""
            for new in _BIN[type(node.op)]:
                add(i, "op", new.__name__, f"`{_SYMBOL[type(node.op)]}{eq}` -> `{_SYMBOL[new]}{eq}`", node, func)
        elif isinstance(node, ast.BoolOp):
            new = "Or" if isinstance(node.op, ast.And) else "And"
            add(i, "op", new, f"`{_SYMBOL[type(node.op)]}` -> `{new.lower()}`", node, func)
        elif isinstance(node, ast.Constant) and type(node.value) is bool:
            add(i, "bool", None, f"`{node.value}` -> `{not node.value}`", node, func)
        elif isinstance(node, ast.Constant) and type(node.value) is int:
            for delta in (1, -1):
                add(i, "int", delta, f"`{node.value}` -> `{node.value + delta}`", node, func)
        elif isinstance(node, ast.Constant) and type(node.value) is float:
            add(i, "float", None, f"`{node.value!r}` -> `{_float_mutant(node.value)!r}`", node, func)
        elif isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.Not, ast.USub)):
            add(i, "unary", None, f"drop unary `{'not' if isinstance(node.op, ast.Not) else '-'}`", node, func)
        elif isinstance(node, (ast.If, ast.While, ast.IfExp)):
            add(i, "negate", None, "negate the condition", node, func)
        elif isinstance(node, ast.Return) and _is_docstring_free_return(node):
            add(i, "return", None, "return value -> `None`", node, func)
        elif isinstance(node, ast.Raise):
            add(i, "delete", None, "delete `raise`", node, func)
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id in ("min", "max"):
            new = "max" if node.func.id == "min" else "min"
            add(i, "minmax", new, f"`{node.func.id}(` -> `{new}(`", node, func)
        elif isinstance(node, ast.Slice):
            for bound in ("lower", "upper"):
                if getattr(node, bound) is not None:
                    add(i, "slice", bound, f"drop the slice's {bound} bound", node, func)
        elif isinstance(node, ast.Expr) and isinstance(node.value, ast.Call):
            add(i, "delete", None, "delete the call statement", node, func)
    return found


def _float_mutant(value: float) -> float:
    return 1.0 if value == 0 else value * 2


def _replace(tree: ast.AST, old: ast.AST, new: ast.AST) -> None:
    for parent in ast.walk(tree):
        for name, value in ast.iter_fields(parent):
            if value is old:
                setattr(parent, name, new)
                return
            if isinstance(value, list) and any(v is old for v in value):
                value[[i for i, v in enumerate(value) if v is old][0]] = new
                return
    raise RuntimeError("mutation point not found")


def mutate(source: str, mutant: Mutant) -> str:
    """``source`` with ``mutant`` applied (unparsed from the AST, so comments and layout are gone)."""
    tree = ast.parse(source)
    node = _walk(tree)[mutant.node][0]
    kind, arg = mutant.kind, mutant.arg
    if kind == "cmp":
        node.ops[arg[0]] = getattr(ast, arg[1])()
    elif kind == "op":
        node.op = getattr(ast, arg)()
    elif kind == "bool":
        node.value = not node.value
    elif kind == "int":
        node.value += arg
    elif kind == "float":
        node.value = _float_mutant(node.value)
    elif kind == "unary":
        _replace(tree, node, node.operand)
    elif kind == "negate":
        node.test = ast.UnaryOp(op=ast.Not(), operand=node.test)
    elif kind == "return":
        node.value = ast.Constant(value=None)
    elif kind == "delete":
        _replace(tree, node, ast.Pass())
    elif kind == "minmax":
        node.func.id = arg
    elif kind == "slice":
        setattr(node, arg, None)
    else:  # pragma: no cover - every kind above is produced by enumerate_mutants
        raise ValueError(kind)
    ast.fix_missing_locations(tree)
    return ast.unparse(tree)


def select(mutants: list[Mutant], cap: int, seed: int, funcs: list[str] | None = None) -> list[Mutant]:
    """Mutants inside ``funcs`` (all when None), a seeded sample of ``cap`` when there are more."""
    if funcs:
        mutants = [m for m in mutants if any(m.func == f or m.func.startswith(f + ".") for f in funcs)]
    if len(mutants) > cap:
        mutants = sorted(random.Random(seed).sample(mutants, cap), key=lambda m: m.index)
    return mutants


def load_equivalent(path: Path, module: str) -> dict[tuple[str, str, str], str]:
    """``{(func, code, mutation): reason}`` for ``module`` from the equivalence list (a JSON object of lists)."""
    if not path.is_file():
        return {}
    data = json.loads(path.read_text(encoding="utf-8"))
    listed = {}
    for entry in data.get(module, []):
        if not entry.get("reason"):
            raise ValueError(f"{path}: every equivalent mutant needs a reason ({entry}).")
        listed[(entry["func"], entry["code"], entry["mutation"])] = entry["reason"]
    return listed


# ----------------------------------------------------------------------------------------------- running
# The tests are collected once (one pytest session per module); each mutant then runs in a forked child that
# patches the already-imported module in memory and runs the collected tests until the first failure. Nothing
# on disk changes, and the cost per mutant is the tests it runs, not a new interpreter and collection.
_SIMPLE = (int, float, str, bytes, bool, tuple, frozenset, type(None))


def patch_module(module, mutated_source: str) -> None:
    """Give ``module`` (already imported, referenced from everywhere) the behaviour of ``mutated_source``.

    The source runs in a copy of the module's namespace. Module-level functions keep their identity (so names
    imported elsewhere with ``from m import f`` see the change): their code, defaults and, for
    ``contextmanager``-style wrappers, the wrapped function's code are swapped. Classes keep their identity too
    (``isinstance`` keeps working): every attribute of the new class body replaces the old one, and attributes the
    new class no longer has (e.g. the ``__setattr__`` of a frozen dataclass) are removed. Changed module-level
    values replace the old ones in the module (a copy imported by value elsewhere keeps the old value).
    """
    old = module.__dict__
    namespace = dict(old)
    exec(compile(mutated_source, module.__file__ or "<mutant>", "exec"), namespace)
    replacements = {}
    for name, new in namespace.items():
        current = old.get(name)
        if current is new or name.startswith("__") and name.endswith("__"):
            continue
        if isinstance(current, type) and isinstance(new, type):
            _patch_class(current, new)
            replacements[name] = current
        elif callable(current) and hasattr(current, "__code__") and hasattr(new, "__code__"):
            if _swap_function(current, new):
                replacements[name] = current
            else:
                old[name] = new
        elif isinstance(new, _SIMPLE) or isinstance(current, _SIMPLE) or isinstance(new, (dict, list, set)):
            try:
                same = type(current) is type(new) and bool(current == new)
            except Exception:  # noqa: BLE001 - values without a plain truth value: assume changed
                same = False
            if not same:
                old[name] = new
    namespace.update(replacements)  # new methods see the (patched) original classes and functions


def _swap_function(old, new) -> bool:
    target, source = old, new
    if hasattr(old, "__wrapped__") and hasattr(new, "__wrapped__"):  # functools.wraps (contextmanager...)
        target, source = old.__wrapped__, new.__wrapped__
    try:
        target.__code__ = source.__code__
    except ValueError:  # another number of closure cells: replace the object instead
        return False
    target.__defaults__, target.__kwdefaults__ = source.__defaults__, source.__kwdefaults__
    return True


def _patch_class(old: type, new: type) -> None:
    keep = {"__dict__", "__weakref__", "__module__", "__qualname__", "__doc__"}
    for name in list(vars(old)):
        if name not in vars(new) and name not in keep:
            try:
                delattr(old, name)
            except (AttributeError, TypeError):
                pass
    for name, value in vars(new).items():
        if name in keep:
            continue
        try:
            setattr(old, name, value)
        except (AttributeError, TypeError):
            pass


class _Session:
    """A pytest plugin: after collection, run the baseline and every mutant in forked children."""

    def __init__(self, result: Result, module_name: str, source: str, equivalent: dict, previous: dict, log):
        self.result, self.module_name, self.source = result, module_name, source
        self.equivalent, self.previous, self.log = equivalent, previous, log
        self.error: str | None = None

    def pytest_runtestloop(self, session):
        import pytest  # noqa: F401 - only inside a pytest session

        items = list(session.items)
        result = self.result
        if self.module_name not in sys.modules:
            self.error = f"the tests never import {self.module_name}"
            return True
        # the baseline goes through the same in-memory patching, with the unmutated source
        status, seconds = self._child(items, ast.unparse(ast.parse(self.source)), timeout=900)
        if status != "survived":
            self.error = f"the tests fail on the unmutated module, patched in memory ({status}); fix them first"
            return True
        result.baseline_seconds = seconds
        timeout = max(3 * seconds + 10, 20)
        self.log(f"{result.name}: {len(result.mutants)} of {result.total} mutants, {len(items)} tests, "
                 f"baseline {seconds:.1f}s, timeout {timeout:.0f}s")
        for n, mutant in enumerate(result.mutants, 1):
            earlier = self.previous.get(mutant.index)
            if earlier and earlier.get("status") in ("killed", "timeout") and earlier.get("code") == mutant.code \
                    and earlier.get("description") == mutant.description:
                mutant.status, mutant.reason = earlier["status"], "killed in the earlier run"
                continue
            status, mutant.seconds = self._child(items, mutate(self.source, mutant), timeout)
            if status == "survived" and mutant.key() in self.equivalent:
                status, mutant.reason = "equivalent", self.equivalent[mutant.key()]
            mutant.status = status
            self.log(f"  [{n}/{len(result.mutants)}] {result.path}:{mutant.line} {mutant.func} "
                     f"{mutant.description}: {status} ({mutant.seconds:.1f}s)")
        return True

    def _child(self, items, mutated: str | None, timeout: float) -> tuple[str, float]:
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 3
            try:
                devnull = os.open(os.devnull, os.O_WRONLY)
                os.dup2(devnull, 1)
                os.dup2(devnull, 2)
                if mutated is not None:
                    try:
                        patch_module(sys.modules[self.module_name], mutated)
                    except Exception:  # noqa: BLE001 - the mutant does not even load: it is killed
                        os._exit(1)
                code = 1 if _run_items(items) else 0
            except BaseException:  # noqa: BLE001
                code = 1
            finally:
                os._exit(code)
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                code = os.waitstatus_to_exitcode(status)
                break
            if time.monotonic() - start > timeout:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return "timeout", time.monotonic() - start
            time.sleep(0.01)
        return ("survived" if code == 0 else "killed"), time.monotonic() - start


def _run_items(items) -> bool:
    """Run collected tests in order; True at the first failure (setup, call or teardown)."""
    from _pytest.runner import runtestprotocol

    for i, item in enumerate(items):
        nextitem = items[i + 1] if i + 1 < len(items) else None
        reports = runtestprotocol(item, nextitem=nextitem, log=False)
        if any(r.failed for r in reports):
            return True
    return False


def run_target(
    name: str,
    path: str,
    tests: list[str],
    *,
    root: Path = ROOT,
    cap: int = 400,
    seed: int = DEFAULT_SEED,
    funcs: list[str] | None = None,
    equivalent: dict | None = None,
    previous: dict | None = None,
    log=print,
) -> Result:
    """Run every (sampled) mutant of ``root/path`` against ``tests`` (paths relative to ``root``).

    The collection runs in a forked child of this process, so this process's imports stay as they were."""
    source = (root / path).read_text(encoding="utf-8")
    everything = enumerate_mutants(source)
    chosen = select(everything, cap, seed, funcs)
    result = Result(name, path, tests, total=len(select(everything, 10**9, seed, funcs)), mutants=chosen)
    module_name = ".".join(Path(path).with_suffix("").parts)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the session child: collect once, fork per mutant, send the outcomes back as JSON
        os.close(read)
        code = 0
        try:
            os.chdir(root)
            sys.path.insert(0, str(root))
            import pytest

            plugin = _Session(result, module_name, source, equivalent or {}, previous or {}, log)
            rc = pytest.main(["-q", "-p", "no:cacheprovider", "--rootdir", str(root), *tests], plugins=[plugin])
            if plugin.error is None and rc not in (0, 5):
                plugin.error = f"pytest could not collect the tests (exit code {rc})"
            payload = {"error": plugin.error, "baseline": result.baseline_seconds,
                       "mutants": [[m.status, m.reason, m.seconds] for m in result.mutants]}
            with os.fdopen(write, "w") as out:
                json.dump(payload, out)
        except BaseException as err:  # noqa: BLE001
            code = 1
            try:
                os.write(write, json.dumps({"error": repr(err)}).encode())
            except OSError:
                pass
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        text = pipe.read()
    os.waitpid(pid, 0)
    payload = json.loads(text or '{"error": "the session ended without a result"}')
    if payload.get("error"):
        raise SystemExit(f"{name}: {payload['error']}")
    result.baseline_seconds = payload["baseline"]
    for mutant, (status, reason, seconds) in zip(result.mutants, payload["mutants"]):
        mutant.status, mutant.reason, mutant.seconds = status, reason, seconds
    return result


# ----------------------------------------------------------------------------------------------- report
def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def render(results: list[Result], command: str, seed: int) -> str:
    today = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    out = [
        "# Mutation score of the core modules",
        "",
        f"Measured {today} by `tools/mutation.py` (Python {sys.version.split()[0]}, CPU). Rerun with:",
        "",
        "```bash",
        command,
        "```",
        "",
        "Score = (killed + equivalent) / mutants. A mutant is killed when its test subset fails or times out;",
        "equivalent mutants are listed in `tools/mutation_equivalent.json`, each with its reason (below).",
        f"Sampling seed {seed}.",
        "",
        "| module | mutants (run / all) | killed | equivalent | survived | score | tests run per mutant |",
        "|---|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        tests = ", ".join(f"`{Path(t).name}`" for t in r.tests)
        out.append(
            f"| `{r.path}` | {len(r.mutants)} / {r.total} | {r.count('killed') + r.count('timeout')} | "
            f"{r.count('equivalent')} | {r.count('survived')} | **{r.score:.1f}%** | {tests} |"
        )
    for r in results:
        survivors = [m for m in r.mutants if m.status == "survived"]
        out += ["", f"## `{r.path}`: surviving mutants ({len(survivors)})", ""]
        if survivors:
            out += ["| line | function | mutation | code |", "|---:|---|---|---|"]
            out += [f"| {m.line} | `{m.func}` | {_cell(m.description)} | `{_cell(m.code)}` |" for m in survivors]
        else:
            out.append("None.")
        listed = [m for m in r.mutants if m.status == "equivalent"]
        if listed:
            out += ["", f"Equivalent ({len(listed)}):", "", "| line | function | mutation | reason |",
                    "|---:|---|---|---|"]
            out += [f"| {m.line} | `{m.func}` | {_cell(m.description)} | {_cell(m.reason)} |" for m in listed]
    return "\n".join(out) + "\n"


def _write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _terminate(signum, frame):
    raise SystemExit(f"stopped by signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", choices=sorted(TARGETS), help="modules to mutate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mutation.md")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed for modules above their cap")
    parser.add_argument("--cap", type=int, default=None, help="override every module's sample cap")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", type=Path, default=None, help="also write every mutant's outcome as JSON")
    parser.add_argument(
        "--survivors-of", type=Path, default=None,
        help="a --json file of an earlier run: mutants it killed are not run again (valid while tests were only "
        "added and the module is unchanged); the rest run as usual",
    )
    args = parser.parse_args(argv)
    if args.list:
        for name in args.modules:
            spec = TARGETS[name]
            source = (ROOT / spec["path"]).read_text(encoding="utf-8")
            chosen = select(enumerate_mutants(source), args.cap or spec["cap"], args.seed, spec.get("funcs"))
            for m in chosen:
                print(f"{spec['path']}:{m.line}\t{m.func}\t{m.description}\t{m.code}")
        return 0
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    signal.signal(signal.SIGTERM, _terminate)  # so the scratch copy is removed when the run is stopped
    for module in PRELOAD:  # imported once here; every forked child reuses them
        try:
            __import__(module)
        except ImportError:
            pass
    command = "OMP_NUM_THREADS=1 python tools/mutation.py " + " ".join(args.modules)
    if args.cap is not None:
        command += f" --cap {args.cap}"
    if args.seed != DEFAULT_SEED:
        command += f" --seed {args.seed}"
    earlier = json.loads(args.survivors_of.read_text(encoding="utf-8")) if args.survivors_of else {}
    if args.survivors_of:
        command += " --survivors-of <the earlier run's --json>"
    results = []
    for name in args.modules:
        spec = TARGETS[name]
        results.append(run_target(
            name, spec["path"], spec["tests"], cap=args.cap or spec["cap"], seed=args.seed, funcs=spec.get("funcs"),
            log=lambda line: print(line, flush=True),
            equivalent=load_equivalent(EQUIVALENT_FILE, name),
            previous={m["index"]: m for m in earlier.get(name, [])},
        ))
        _write(args.out, render(results, command, args.seed))
        if args.json:
            data = {r.name: [m.__dict__ | {"arg": repr(m.arg)} for m in r.mutants] for r in results}
            _write(args.json, json.dumps(data))
    for r in results:
        print(f"{r.path}: {len(r.mutants)} mutants, score {r.score:.1f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
