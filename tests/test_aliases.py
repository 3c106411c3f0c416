"""The moved module paths: each still imports as the same module object, warns with the new path and the release
that removes it, and nothing in this repository imports through one any more."""

from __future__ import annotations

import ast
import importlib
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "hellora_trl"
REMOVED_IN = "0.3.0"
# old path (under hellora_trl) -> new path, and one public name that must be the very same object through both
MOVED = {
    "eval": ("recipes.eval", "evaluate_task"),
    "data": ("recipes.data", "synthetic_gsm8k"),
    "sft": ("recipes.sft", "main"),
    "offline": ("recipes.offline", "tiny_moe_model"),
    "ablation": ("recipes.ablation", "AblationArguments"),
    "reporting": ("recipes.reporting", "write_report"),
    "dynamic_rank": ("experimental.dynamic_rank", "save_dynamic_rank"),
    "recipes.lab_corpus": ("recipes.lab.corpus", "generated_corpus"),
    "recipes.lab_quality": ("recipes.lab.quality", "routing_profile"),
}
ALIAS_FILES = {PACKAGE / Path(*old.split(".")).with_suffix(".py") for old in MOVED}
# the files allowed to name an old path in an import: the aliases themselves and this test
ALLOWED = ALIAS_FILES | {Path(__file__).resolve()}


@pytest.mark.parametrize("old", sorted(MOVED))
def test_moved_path_warns_and_is_the_new_module(old, monkeypatch):
    new, name = MOVED[old]
    monkeypatch.delitem(sys.modules, f"hellora_trl.{old}", raising=False)  # import it afresh: the warning is at import
    pattern = (rf"^hellora_trl\.{re.escape(old)} moved to hellora_trl\.{re.escape(new)};"
               rf".*removed in hellora-trl {re.escape(REMOVED_IN)}")
    with pytest.warns(FutureWarning, match=pattern) as caught:
        moved = importlib.import_module(f"hellora_trl.{old}")
    assert len(caught) == 1
    current = importlib.import_module(f"hellora_trl.{new}")
    assert moved is current  # the same module object: monkeypatching one patches the other
    namespace: dict = {}
    exec(f"from hellora_trl.{old} import {name}", namespace)  # noqa: S102  (the old `from ... import` spelling)
    assert namespace[name] is getattr(current, name)


def test_every_alias_file_is_listed():
    """A new root-level forwarding module must be added to MOVED (and so warn, and be checked)."""
    for path in PACKAGE.rglob("*.py"):
        text = path.read_text()
        if "sys.modules[__name__] = " in text:
            assert path in ALIAS_FILES, f"{path.relative_to(REPO)} swaps itself for another module: list it in MOVED."


# ------------------------------------------------------------------------------------ nobody uses the old paths
OLD_DOTTED = {f"hellora_trl.{old}" for old in MOVED}
_TOP = "|".join(sorted(old for old in MOVED if "." not in old))
_IN_RECIPES = "|".join(sorted(old.removeprefix("recipes.") for old in MOVED if old.startswith("recipes.")))
_DOTTED = "|".join(re.escape(old) for old in sorted(MOVED))
# in text (docs, shell, YAML): an import, `-m`, or a use of a name through the old path (`hellora_trl.offline.x`)
TEXT_USE = re.compile(
    rf"(?:\bimport\s+|\bfrom\s+|-m\s+)hellora_trl\.(?:{_DOTTED})\b(?!\.)"
    rf"|\bhellora_trl\.(?:{_DOTTED})(?:\.[A-Za-z_]|:)"
    rf"|\bfrom\s+hellora_trl\s+import\s+[^\n]*\b(?:{_TOP})\b"
    rf"|\bfrom\s+hellora_trl\.recipes\s+import\s+[^\n]*\b(?:{_IN_RECIPES})\b"
)
SKIP_DIRS = {".git", "build", "dist", "__pycache__", "node_modules", "wheels"}
TEXT_SUFFIXES = {".md", ".sh", ".yaml", ".yml", ".toml", ".cfg", ".txt"}


def repo_files(suffixes: set[str], repo: Path = REPO):
    for root, dirs, files in os.walk(repo):
        dirs[:] = sorted(d for d in dirs if d not in SKIP_DIRS and "venv" not in d and not d.endswith(".egg-info"))
        for name in sorted(files):
            path = Path(root) / name
            if path.suffix in suffixes and path.resolve() not in ALLOWED:
                yield path


def old_path_uses(path: Path, repo: Path = REPO) -> list[str]:
    """The imports (and import strings such as ``monkeypatch.setattr("hellora_trl.sft.main", ...)``) of ``path``
    that go through an old path."""
    tree = ast.parse(path.read_text(), filename=str(path))
    parts = list(path.relative_to(repo).with_suffix("").parts)
    in_package = parts[0] == "hellora_trl"
    found = []
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level and in_package:  # relative import inside the package
                package = parts if path.name == "__init__.py" else parts[:-1]
                package = package[: len(package) - (node.level - 1)]
                base = ".".join(package + ([node.module] if node.module else []))
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        elif isinstance(node, ast.Constant) and isinstance(node.value, str) and node.value.startswith("hellora_trl."):
            targets = [re.split(r"[:\s]", node.value, maxsplit=1)[0]]
        for target in targets:
            if any(target == old or target.startswith(old + ".") for old in OLD_DOTTED):
                found.append(f"{path.relative_to(repo)}:{getattr(node, 'lineno', '?')}: {target}")
                break
    return found


def test_no_file_in_the_repository_imports_an_old_path():
    offenders = [use for path in repo_files({".py"}) for use in old_path_uses(path)]
    for path in repo_files(TEXT_SUFFIXES):
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1):
            if TEXT_USE.search(line):
                offenders.append(f"{path.relative_to(REPO)}:{number}: {line.strip()}")
    assert not offenders, "Use the new module paths (tests/test_aliases.py MOVED):\n" + "\n".join(offenders)


def test_the_scan_finds_old_path_imports(tmp_path):
    """The scan itself can fail: each spelling of an old-path import is reported."""
    assert TEXT_USE.search("from hellora_trl.sft import main")
    assert TEXT_USE.search("python -m hellora_trl.sft --help")
    assert TEXT_USE.search("model = hellora_trl.offline.tiny_moe_model()")
    assert TEXT_USE.search("from hellora_trl import eval, data")
    assert TEXT_USE.search("from hellora_trl.recipes import lab_corpus")
    assert not TEXT_USE.search("`hellora_trl.sft` still imports but warns")
    assert not TEXT_USE.search("from hellora_trl.recipes.sft import main")
    assert not TEXT_USE.search("from hellora_trl.recipes.lab import corpus")
    assert not TEXT_USE.search("from hellora_trl.recipes import eval, sft")
    assert TEXT_USE.search("from hellora_trl import dynamic_rank")
    bad = tmp_path / "hellora_trl" / "recipes" / "x.py"
    bad.parent.mkdir(parents=True)
    bad.write_text(
        "import hellora_trl.eval as ev\n"
        "from .. import offline\n"
        "from hellora_trl.recipes import lab_quality\n"
        "def f(monkeypatch):\n"
        "    monkeypatch.setattr('hellora_trl.sft.main', None)\n"
        "from hellora_trl.recipes import eval\n"
    )
    found = old_path_uses(bad, repo=tmp_path)
    assert [use.split(": ")[1] for use in found] == [
        "hellora_trl.eval",
        "hellora_trl.offline",
        "hellora_trl.recipes.lab_quality",
        "hellora_trl.sft.main",
    ], found


def test_the_package_imports_no_old_path():
    """Importing every module of the package and every public name raises none of the moved-path warnings (a fresh
    interpreter, so nothing is imported already)."""
    aliases = sorted(f"hellora_trl.{old}" for old in MOVED)
    script = f"""
import importlib, pkgutil, warnings
warnings.filterwarnings("error", message=r"hellora_trl\\..* moved to ", category=FutureWarning)
import hellora_trl
for name in hellora_trl.__all__:
    getattr(hellora_trl, name)
aliases = set({aliases!r})
skip = ("hellora_trl.integrations.axolotl", "hellora_trl.cli.__main__")
for info in pkgutil.walk_packages(hellora_trl.__path__, "hellora_trl."):
    if info.name not in aliases and not info.name.startswith(skip):
        importlib.import_module(info.name)
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, cwd=REPO)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]
