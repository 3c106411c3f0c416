"""Mutation testing of the core modules: plant one small bug at a time and check that a fast test subset fails.

Usage (from the repository root; a measurement, not part of CI)::

    OMP_NUM_THREADS=1 python tools/mutation.py selection profile accounting profiling ops
    python tools/mutation.py profile --list               # the mutants, without running anything
    python tools/mutation.py selection --out /tmp/m.md    # write the table elsewhere

Each mutant changes one AST node of the module (a comparison, an arithmetic or boolean operator, a constant, a
unary ``not``/``-``, an ``if`` condition, a ``return`` value, a ``raise``, ``min``/``max``, a slice bound, or a
call statement). Docstrings, f-strings, the arguments of ``raise`` and of logger/warnings calls (messages),
annotations and ``__all__`` are not mutated. The repository (``hellora_trl``, ``tests``, ``pyproject.toml``) is
copied to a temporary folder and only that copy is mutated, so a checkout is never left modified. The heavy
imports (torch, transformers...) happen once; each mutant then runs in a forked child
(``pytest -x -q -p no:cacheprovider <its tests>``) under a timeout. A mutant is *killed* when the tests fail or
time out, *equivalent* when ``tools/mutation_equivalent.json`` lists it with a reason (a change no caller can
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
import shutil
import signal
import sys
import tempfile
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
        "tests": ["tests/test_selection.py", "tests/test_core_checks.py"],
        "cap": 400,
    },
    "profile": {
        "path": "hellora_trl/profile.py",
        "tests": ["tests/test_selection.py", "tests/test_core_checks.py", "tests/test_profiling.py"],
        "cap": 400,
    },
    "accounting": {
        "path": "hellora_trl/accounting.py",
        "tests": ["tests/test_accounting.py", "tests/test_core_checks.py"],
        "cap": 400,
    },
    "profiling": {
        "path": "hellora_trl/profiling.py",
        "tests": ["tests/test_profiling.py", "tests/test_core_checks.py"],
        "cap": 120,
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
PRELOAD = ["numpy", "torch", "transformers", "peft", "datasets", "trl", "pytest"]

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
def _run_forked(workdir: Path, tests: list[str], timeout: float) -> tuple[str, float]:
    start = time.monotonic()
    pid = os.fork()
    if pid == 0:  # child: fresh imports of the project from the mutated copy
        code = 99
        try:
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, 1)
            os.dup2(devnull, 2)
            os.chdir(workdir)
            sys.path.insert(0, str(workdir))
            import pytest

            code = int(pytest.main(["-x", "-q", "-p", "no:cacheprovider", "--rootdir", str(workdir), *tests]))
        except BaseException:  # noqa: BLE001 - any failure in the child is reported through its exit code
            pass
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
        time.sleep(0.02)
    seconds = time.monotonic() - start
    if code == 0:
        return "survived", seconds
    if code == 1 or code < 0:  # tests failed, or the child died from a signal
        return "killed", seconds
    return f"error(rc={code})", seconds  # 2-5: collection/usage errors; counted as killed only when mutated


def _copy_workspace(root: Path, package: str, dest: Path) -> Path:
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", ".pytest_cache")
    for name in (package, "tests"):
        if (root / name).is_dir():
            shutil.copytree(root / name, dest / name, ignore=ignore)
    for name in ("pyproject.toml", "setup.cfg", "pytest.ini", "conftest.py"):
        if (root / name).is_file():
            shutil.copy2(root / name, dest / name)
    return dest


def _scrub_modules(package: str) -> None:
    for name in list(sys.modules):
        if name == package or name.startswith(package + "."):
            del sys.modules[name]


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
    log=print,
) -> Result:
    """Run every (sampled) mutant of ``root/path`` against ``tests`` in a scratch copy of ``root``."""
    package = Path(path).parts[0]
    source = (root / path).read_text(encoding="utf-8")
    everything = enumerate_mutants(source)
    chosen = select(everything, cap, seed, funcs)
    result = Result(name, path, tests, total=len(select(everything, 10**9, seed, funcs)), mutants=chosen)
    equivalent = equivalent or {}
    sys.dont_write_bytecode = True
    os.environ["PYTHONDONTWRITEBYTECODE"] = "1"
    with tempfile.TemporaryDirectory(prefix="hellora-mutation-") as tmp:
        work = _copy_workspace(root, package, Path(tmp))
        target = work / path
        _scrub_modules(package)
        target.write_text(ast.unparse(ast.parse(source)), encoding="utf-8")  # same layout as the mutants
        status, seconds = _run_forked(work, tests, timeout=900)
        if status != "survived":
            raise SystemExit(f"{name}: the tests fail on the unmutated module ({status}); fix them first.")
        result.baseline_seconds = seconds
        timeout = max(3 * seconds + 10, 20)
        log(f"{name}: {len(chosen)} of {result.total} mutants, baseline {seconds:.1f}s, timeout {timeout:.0f}s")
        for n, mutant in enumerate(chosen, 1):
            target.write_text(mutate(source, mutant), encoding="utf-8")
            status, mutant.seconds = _run_forked(work, tests, timeout)
            if status.startswith("error"):
                status = "killed"  # the mutant broke collection (e.g. an import-time failure): a test noticed
            if status == "survived" and mutant.key() in equivalent:
                status, mutant.reason = "equivalent", equivalent[mutant.key()]
            mutant.status = status
            log(f"  [{n}/{len(chosen)}] {path}:{mutant.line} {mutant.func} {mutant.description}: {status}"
                f" ({mutant.seconds:.1f}s)")
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("modules", nargs="+", choices=sorted(TARGETS), help="modules to mutate")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "mutation.md")
    parser.add_argument("--seed", type=int, default=DEFAULT_SEED, help="sampling seed for modules above their cap")
    parser.add_argument("--cap", type=int, default=None, help="override every module's sample cap")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--json", type=Path, default=None, help="also write every mutant's outcome as JSON")
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
    results = []
    for name in args.modules:
        spec = TARGETS[name]
        results.append(run_target(
            name, spec["path"], spec["tests"], cap=args.cap or spec["cap"], seed=args.seed, funcs=spec.get("funcs"),
            equivalent=load_equivalent(EQUIVALENT_FILE, name),
        ))
        _write(args.out, render(results, command, args.seed))
        if args.json:
            data = {r.name: [m.__dict__ | {"arg": repr(m.arg)} for m in r.mutants] for r in results}
            _write(args.json, json.dumps(data, indent=1))
    for r in results:
        print(f"{r.path}: {len(r.mutants)} mutants, score {r.score:.1f}%")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
