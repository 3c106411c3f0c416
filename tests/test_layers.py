"""The package's floor plan: every import points down, nothing crosses a module boundary by a private name.

Each module of ``hellora_trl`` sits on a floor (``FLOORS``, lowest first). A module may import modules of lower
floors only; modules of one package (``expert_lora.layer`` -> ``expert_lora.ops``) may import each other downwards
in file order. Imports inside functions must point down too; ``LAZY_UPWARD`` would list deliberate exceptions and
is empty.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[1] / "hellora_trl"

FLOORS = [
    ["constants", "utils"],
    ["registry"],
    ["profile"],
    ["distributed"],
    ["profiling", "selection", "expert_lora.ops"],
    ["expert_lora.layer"],
    ["expert_lora"],
    ["adapter_card"],
    ["adapter_state"],
    ["variants"],
    ["adapter"],
    ["baselines", "accounting", "export"],
    ["plots", "callbacks", "checkpoints"],
    ["experimental", "experimental.dynamic_rank"],
    ["config"],
    ["trainer"],
    ["rl_trainers"],  # HELLoRAMixin in front of TRL's DPOTrainer / GRPOTrainer
    ["experimental.dynamic_rank_trainer"],  # opt-in: a trainer subclass above the core, never imported by it
    # the application layer
    ["recipes", "recipes.offline"],
    ["recipes.models"],
    ["recipes.prepare"],
    ["recipes.data"],
    ["recipes.lab.corpus"],
    ["recipes.eval.humaneval_runner"],  # run as its own program by recipes.eval.humaneval; imports nothing here
    ["recipes.eval.generation", "recipes.eval.humaneval", "recipes.eval.results"],
    ["recipes.eval.gsm8k", "recipes.eval.safety"],
    ["recipes.eval.tasks"],
    ["recipes.eval", "recipes.reporting"],
    ["recipes.lab.model"],
    ["recipes.lab.quality"],
    ["recipes.lab"],  # the face the SFT recipe uses
    ["recipes.lab_corpus", "recipes.lab_quality"],  # moved paths (FutureWarning; removed in 0.3.0)
    ["recipes.sft"],
    ["recipes.rl"],  # the DPO/GRPO recipes (issue 21)
    ["recipes.ablation"],
    ["integrations", "integrations.warmup"],
    ["integrations.axolotl"],
    ["cli.arguments"],
    ["cli.loading"],
    ["cli.commands"],
    ["cli.main"],
    ["cli"],
    ["sft", "data", "offline", "eval", "ablation", "reporting", "dynamic_rank", "__init__"],  # aliases, public API
]
# (importer, imported): lazy imports that point up on purpose (none left: the figures moved down into the core and
# dynamic rank became a trainer subclass the user opts into from experimental/).
LAZY_UPWARD: set[tuple[str, str]] = set()
CORE_TOP = "rl_trainers"


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE).with_suffix("").parts)
    if parts[-1] == "__init__" and len(parts) > 1:
        parts = parts[:-1]
    return ".".join(parts)


def floor_of(name: str) -> int:
    """The floor of a module, or of its nearest listed parent (``cli.commands.train`` -> ``cli``)."""
    probe = name
    while probe:
        for i, floor in enumerate(FLOORS):
            if probe in floor:
                return i
        probe = probe.rpartition(".")[0]
    raise AssertionError(f"hellora_trl.{name} is on no floor of tests/test_layers.py: add it to FLOORS.")


def resolve(importer: str, node: ast.ImportFrom, is_package: bool) -> str | None:
    """The hellora_trl-relative module a ``from ... import`` names (None: outside the package)."""
    if node.level == 0:
        if node.module and (node.module == "hellora_trl" or node.module.startswith("hellora_trl.")):
            return node.module.removeprefix("hellora_trl").lstrip(".") or "__init__"
        return None
    base = importer.split(".") if is_package else importer.split(".")[:-1]
    if node.level > 1:
        base = base[: len(base) - (node.level - 1)]
    target = ".".join(base + ([node.module] if node.module else []))
    return target or "__init__"


def imports(path: Path):
    """(imported module, imported names, at module level?) for every in-package import of ``path``."""
    tree = ast.parse(path.read_text(), filename=str(path))
    importer = module_name(path)
    is_package = path.name == "__init__.py"
    top_level = {id(node) for node in tree.body}
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            target = resolve(importer, node, is_package)
            if target is None:
                continue
            names = [alias.name for alias in node.names]
            # `from . import x` / `from .recipes import eval`: the imported names are submodules
            submodules = [f"{target}.{n}" if target != "__init__" else n for n in names]
            if any((PACKAGE / Path(*m.split("."))).with_suffix(".py").exists() or (PACKAGE / Path(*m.split("."))).is_dir()
                   for m in submodules):
                for m in submodules:
                    yield m, [], id(node) in top_level
            else:
                yield target, names, id(node) in top_level or _in_type_checking(tree, node)


def _in_type_checking(tree: ast.Module, node: ast.AST) -> bool:
    for stmt in tree.body:
        if isinstance(stmt, ast.If) and "TYPE_CHECKING" in ast.unparse(stmt.test):
            if any(child is node for child in ast.walk(stmt)):
                return True
    return False


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_imports_point_down(path):
    importer = module_name(path)
    mine = floor_of(importer)
    for target, _, top_level in imports(path):
        if target == importer or target.startswith(importer + ".") or importer.startswith(target + "."):
            continue  # a package and its own submodules
        theirs = floor_of(target)
        if theirs < mine:
            continue
        if not top_level and (importer, target) in LAZY_UPWARD:
            continue
        if theirs == mine and importer.rpartition(".")[0] == target.rpartition(".")[0] != "":
            continue  # siblings on one floor of one package (none today; kept for clarity)
        pytest.fail(
            f"hellora_trl.{importer} (floor {mine}) imports hellora_trl.{target} (floor {theirs}): imports must "
            "point down (tests/test_layers.py FLOORS)."
        )


@pytest.mark.parametrize("path", MODULES, ids=lambda p: module_name(p))
def test_no_private_names_cross_modules(path):
    importer = module_name(path)
    for target, names, _ in imports(path):
        private = [n for n in names if n.startswith("_") and not n.endswith("__")]
        assert not private, f"hellora_trl.{importer} imports private {private} from hellora_trl.{target}."


def test_core_never_imports_application_or_experimental_at_module_level():
    core_top = floor_of(CORE_TOP)
    for path in MODULES:
        importer = module_name(path)
        if floor_of(importer) > core_top:
            continue
        for target, _, top_level in imports(path):
            lazy_ok = not top_level
            if target.split(".")[0] in ("recipes", "cli", "integrations") or target.startswith("experimental"):
                assert lazy_ok or importer.startswith("experimental"), (
                    f"core module hellora_trl.{importer} imports hellora_trl.{target} at module level."
                )


def test_floor_check_catches_an_upward_import(tmp_path):
    """The check itself can fail: an import from a higher floor is reported."""
    node = ast.parse("from .trainer import HELLoRATrainer").body[0]
    target = resolve("registry", node, is_package=False)
    assert target == "trainer" and floor_of(target) > floor_of("registry")


def test_constants_module_is_torch_free():
    tree = ast.parse((PACKAGE / "constants.py").read_text())
    imported = {alias.name.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    imported |= {node.module.split(".")[0] for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}
    assert imported <= {"__future__"}, imported


def test_strategy_choices_match_the_implementations():
    from hellora_trl.constants import STRATEGIES
    from hellora_trl.selection import SELECTORS

    assert tuple(SELECTORS) == STRATEGIES
