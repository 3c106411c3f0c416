"""The package's floor plan: every import points down, nothing crosses a module boundary by a private name.

Each module of ``hellora_trl`` sits on a floor (``FLOORS``, lowest first). A module may import modules of lower
floors only; modules of one package (``expert_lora.layer`` -> ``expert_lora.ops``) may import each other downwards
in file order. Imports inside functions must point down too; ``LAZY_UPWARD`` would list deliberate exceptions and
is empty. The measured graph has no cycle, no module is over ``MAX_MODULE_LINES`` lines, and every public name of
``hellora_trl`` imports.
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
    ["recipes.lab.corpus", "recipes.lab.cache"],
    ["recipes.lab.targets"],
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


# ------------------------------------------------------------------------------ the measured graph (issue 18)
MAX_MODULE_LINES = 700


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (at module level or inside functions)."""
    known = {module_name(path) for path in MODULES}
    graph: dict[str, set[str]] = {}
    for path in MODULES:
        importer = module_name(path)
        edges = graph.setdefault(importer, set())
        for target, _, _ in imports(path):
            probe = target
            while probe and probe not in known:
                probe = probe.rpartition(".")[0]
            if probe and probe != importer:
                edges.add(probe)
    return graph


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle of ``graph`` (its modules in order, the first repeated at the end), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph.get(node, ())):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_no_import_cycles():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(f"hellora_trl.{m}" for m in cycle)


def test_cycle_check_finds_a_cycle():
    """The check itself can fail."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set(), "c": {"a", "b"}}) is None


def test_no_module_is_over_the_size_limit():
    sizes = {module_name(path): len(path.read_text().splitlines()) for path in MODULES}
    big = {name: lines for name, lines in sizes.items() if lines > MAX_MODULE_LINES}
    assert not big, f"split these modules (over {MAX_MODULE_LINES} lines): {big}"


def test_every_public_name_imports():
    import hellora_trl

    assert hellora_trl.__all__, "hellora_trl exports nothing"
    missing = [name for name in hellora_trl.__all__ if getattr(hellora_trl, name, None) is None]
    assert not missing, f"hellora_trl.__all__ names that do not import: {missing}"
    namespace: dict = {}
    exec("from hellora_trl import *", namespace)  # noqa: S102
    assert set(hellora_trl.__all__) <= set(namespace)
    assert isinstance(hellora_trl.__version__, str)
