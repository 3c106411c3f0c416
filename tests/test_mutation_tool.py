"""tools/mutation.py (the mutation-score measurement) on a toy package: the mutants it plants, the in-memory
patching that keeps names imported elsewhere in step, and the killed / survived / equivalent verdicts."""

import importlib.util
import json
import sys
import textwrap
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "mutation.py"

TOY = textwrap.dedent('''
    """A toy module."""
    from dataclasses import dataclass

    LIMIT = 10


    def clamp_add(a, b):
        total = a + b
        if total > LIMIT:
            return LIMIT
        return total


    @dataclass(frozen=True)
    class Box:
        size: int = 2

        def doubled(self):
            return self.size * 2
''')

STRONG = textwrap.dedent('''
    import dataclasses

    import pytest

    from toypkg.calc import Box, clamp_add


    def test_clamp_add():
        assert clamp_add(2, 3) == 5
        assert clamp_add(9, 9) == 10


    def test_box():
        assert Box().size == 2 and Box(5).doubled() == 10
        with pytest.raises(dataclasses.FrozenInstanceError):
            Box().size = 3
''')

WEAK = textwrap.dedent('''
    from toypkg.calc import Box, clamp_add


    def test_runs():
        clamp_add(1, 1)
        Box()
''')


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("hellora_mutation_tool", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def make_toy(root: Path) -> Path:
    (root / "toypkg").mkdir()
    (root / "toypkg" / "__init__.py").write_text("")
    (root / "toypkg" / "calc.py").write_text(TOY)
    (root / "tests").mkdir()
    (root / "tests" / "test_strong.py").write_text(STRONG)
    (root / "tests" / "test_weak.py").write_text(WEAK)
    return root


def test_mutants_planted(tool):
    found = {(m.func, m.description) for m in tool.enumerate_mutants(TOY)}
    assert {
        ("<module>", "`10` -> `11`"),
        ("clamp_add", "`+` -> `-`"),
        ("clamp_add", "`>` -> `>=`"),
        ("clamp_add", "`>` -> `<`"),
        ("clamp_add", "negate the condition"),
        ("clamp_add", "return value -> `None`"),
        ("Box", "`True` -> `False`"),
        ("Box", "`2` -> `3`"),
        ("Box.doubled", "`*` -> `/`"),
    } <= found
    assert not any("docstring" in m.code or m.code.startswith('"""') for m in tool.enumerate_mutants(TOY))
    sample = tool.select(tool.enumerate_mutants(TOY), 4, seed=1)
    assert len(sample) == 4 and sample == tool.select(tool.enumerate_mutants(TOY), 4, seed=1)


def test_verdicts_equivalents_and_report(tool, tmp_path):
    root = make_toy(tmp_path)
    # at the boundary (total == LIMIT) both branches return 10: `>` -> `>=` changes nothing observable
    equivalent = {("clamp_add", "if total > LIMIT:", "`>` -> `>=`"): "total == LIMIT returns LIMIT either way"}
    strong = tool.run_target("toy", "toypkg/calc.py", ["tests/test_strong.py"], root=root, equivalent=equivalent,
                             log=lambda line: None)
    statuses = {(m.func, m.description): m.status for m in strong.mutants}
    assert statuses[("clamp_add", "`>` -> `>=`")] == "equivalent"
    assert statuses[("<module>", "`10` -> `11`")] == "killed"  # a module constant, read through the globals
    assert statuses[("Box", "`True` -> `False`")] == "killed"  # frozen=False: the class lost its __setattr__
    assert statuses[("Box", "`2` -> `3`")] == "killed"  # a dataclass default
    assert strong.count("survived") == 0 and strong.score == 100.0
    # an earlier run's kills are reused (--survivors-of): only the other mutants run again
    earlier = [m for m in tool.enumerate_mutants(TOY) if m.func == "clamp_add"][:2]
    previous = {m.index: {"status": "killed", "code": m.code, "description": m.description} for m in earlier}
    weak = tool.run_target("toy", "toypkg/calc.py", ["tests/test_weak.py"], root=root, funcs=["clamp_add"],
                           previous=previous, log=lambda line: None)
    assert weak.total == len(weak.mutants) == 6
    assert [m.status for m in weak.mutants] == ["killed"] * 2 + ["survived"] * 4 and weak.score == pytest.approx(100 / 3)
    assert (root / "toypkg" / "calc.py").read_text() == TOY  # nothing on disk was mutated
    report = tool.render([strong, weak], "python tools/mutation.py toy", 1)
    assert "| `toypkg/calc.py` | 15 / 15 |" in report and "**100.0%**" in report and "**33.3%**" in report
    assert "total == LIMIT returns LIMIT either way" in report and "surviving mutants (4)" in report


def test_equivalent_list_needs_reasons(tool, tmp_path):
    path = tmp_path / "eq.json"
    path.write_text(json.dumps({"toy": [{"func": "f", "code": "x", "mutation": "m", "reason": ""}]}))
    with pytest.raises(ValueError, match="needs a reason"):
        tool.load_equivalent(path, "toy")
    path.write_text(json.dumps({"toy": [{"func": "f", "code": "x", "mutation": "m", "reason": "why"}]}))
    assert tool.load_equivalent(path, "toy") == {("f", "x", "m"): "why"}
    assert tool.load_equivalent(tmp_path / "missing.json", "toy") == {}
