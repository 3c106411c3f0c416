"""tools/reliability_probes.py (the issue-19 probe rerun): its verdicts on canned outputs, its file checks, and two
cheap real probes (one forked CLI child, one ``bench/gpu/run.sh`` refusal) classified end to end. The full run is a
tool (``python tools/reliability_probes.py``), not a test."""

import importlib.util
import sys
from pathlib import Path

import pytest

TOOL = Path(__file__).resolve().parents[1] / "tools" / "reliability_probes.py"


@pytest.fixture(scope="module")
def rp():
    spec = importlib.util.spec_from_file_location("reliability_probes", TOOL)
    module = importlib.util.module_from_spec(spec)
    sys.modules["reliability_probes"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop("reliability_probes", None)


TRACEBACK = """Traceback (most recent call last):
  File "x.py", line 3, in <module>
IndexError: list index out of range
"""


def test_classify_cli_on_canned_outputs(rp):
    c = rp.classify_cli
    one_line = "hellora pretrain: error: --steps must be a whole number >= 1, got 0.\n"
    assert c(rp.Result(1, "", "progress 10%\n" + one_line))[0] == rp.CLEAR
    assert c(rp.Result(1, "", TRACEBACK))[0] == rp.TRACEBACK
    assert c(rp.Result(0, TRACEBACK, ""))[0] == rp.TRACEBACK  # a traceback is never ok, whatever rc says
    assert c(rp.Result(1, "", ""))[0] == rp.TRACEBACK  # a refusal with no message
    # NP19 of the review: a shutil.Error list printed one character at a time
    garbled = "hellora pretrain: error: ['<', 'D', 'i', 'r', 'E', 'n', 't', 'r', 'y', ...]\n"
    assert c(rp.Result(1, "", garbled))[0] == rp.TRACEBACK
    # a refusal that does not say what the probe needs is misleading (NT2's "cut off by max_length")
    verdict, note = c(rp.Result(1, "", "hellora train: error: cut off by max_length=1024\n"), must_say=["messages"])
    assert verdict == rp.TRACEBACK and "misleading" in note
    assert c(rp.Result(1, "", one_line), must_say=["steps"])[0] == rp.CLEAR
    # a protected file that changed outranks everything, a clean rc 0 included (NP17: rc 0, model overwritten)
    assert c(rp.Result(0, "", ""), lost=["victim/config.json"])[0] == rp.LOST
    assert c(rp.Result(1, "", one_line), lost=["victim/config.json"])[0] == rp.LOST
    assert c(rp.Result(0, "", ""), ok_problem="entry does not verify")[0] == rp.SILENT
    assert c(rp.Result(0, "", ""))[0] == rp.OK
    assert c(rp.Result(None, "", "", 300.0))[0] == rp.HANG
    # the right message after 30 s of work (the review's NP14: --steps 0 refused after the corpus was built)
    assert c(rp.Result(1, "", one_line, 30.0))[0] == rp.LATE
    assert c(rp.Result(1, "", one_line, 1.0))[0] == rp.CLEAR


def test_classify_sandbox_on_canned_results(rp):
    s = rp.classify_sandbox
    failed = {"verdict": "failed", "passed": False, "error": "AssertionError"}
    passed = {"verdict": "passed", "passed": True, "error": None}
    assert s(failed)[0] == rp.OK
    assert s(passed)[0] == rp.CHEAT
    assert s(passed, should_pass=True)[0] == rp.OK
    assert s(failed, should_pass=True)[0] == rp.SILENT  # the control must pass
    assert s(failed, escaped=["/x/fifo_s1"])[0] == rp.ESCAPE  # a failed verdict does not excuse a file outside
    assert s(failed, leaked="['/usr/bin/python3']")[0] == rp.ESCAPE
    assert s(None, crashed="RecursionError: maximum recursion depth exceeded")[0] == rp.LOST  # NS22
    assert s(failed, lost=["/x/victim.txt"])[0] == rp.LOST


def test_changed_files_sees_edits_and_deletions(rp, tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "config.json").write_text('{"hidden_size": 64}')
    (tmp_path / "a" / "w.bin").write_bytes(b"\0" * 10)
    before = {str(tmp_path / "a"): rp.tree_digest(tmp_path / "a")}
    assert rp.changed_files(before) == []
    (tmp_path / "a" / "new.txt").write_text("added files are not losses")
    assert rp.changed_files(before) == []
    (tmp_path / "a" / "config.json").write_text('{"hidden_size": 128}')
    (tmp_path / "a" / "w.bin").unlink()
    assert sorted(rp.changed_files(before)) == [f"{tmp_path}/a/config.json", f"{tmp_path}/a/w.bin"]


def test_forked_cli_probe_and_run_sh_refusal_classify_as_clear_errors(rp, tmp_path):
    runner = rp.Runner(tmp_path, {"HF_HUB_OFFLINE": "1", "HELLORA_LAB_CACHE": str(tmp_path / "cache")})
    res = runner.cli("NP16", ["pretrain", "--recipe", "nope"], timeout=60)
    assert rp.classify_cli(res, must_say=["nope"])[0] == rp.CLEAR, (res.rc, res.stderr[-500:])
    # an exception escaping main (HELLORA_TRACEBACK=1 re-raises) is printed with its traceback, rc 1, as the
    # console script would: the probe calls it a traceback, not a clear error
    res = runner.cli("raw", ["pretrain", "--recipe", "nope"], env={"HELLORA_TRACEBACK": "1"}, timeout=60)
    assert res.rc == 1 and rp.classify_cli(res)[0] == rp.TRACEBACK, res.stderr[-500:]
    out_file = tmp_path / "out_file"
    out_file.write_text("keep")
    before = {str(out_file): rp.tree_digest(out_file)}
    res = rp.run_process(["bash", "bench/gpu/run.sh"], {"HELLORA_GPU_DRY_RUN": "1", "OUT": str(out_file)}, rp.REPO, 60)
    assert rp.classify_cli(res, lost=rp.changed_files(before), must_say=["OUT"])[0] == rp.CLEAR, res.stderr


def test_entry_problem_checks_the_cache_entry_itself(rp, tmp_path):
    """The probes judge a lab-cache entry by its files, not by the cache's own verifier (which is under test)."""
    import torch
    from safetensors.torch import save_file

    entry = tmp_path / "9bf9dc3a58f6"
    entry.mkdir()
    for name in ("lab_card.json", "README.md", "tokenizer.json"):
        (entry / name).write_text("{}")
    (entry / "config.json").write_text('{"model_type": "olmoe"}')
    save_file({"w": torch.zeros(64, 64)}, str(entry / "model.safetensors"))
    assert rp.entry_problem(entry) is None
    weights = entry / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # the review's NP3: cut in half
    assert "does not load" in rp.entry_problem(entry)
    (entry / "README.md").unlink()  # NP6
    assert "lacks ['README.md']" in rp.entry_problem(entry)


def test_render_shows_the_baseline_column(rp, tmp_path):
    probes = [rp.Probe("NP3", "cut weights", "silent wrong", (rp.CLEAR, rp.OK), rp.CLEAR, "rc 1: rebuild"),
              rp.Probe("NS1", "mkfifo", "sandbox escape", (rp.OK,), rp.ESCAPE, "made outside")]
    base = tmp_path / "before.json"
    base.write_text('{"meta": {"commit": "(not a git checkout)"}, "probes": [{"id": "NP3", "outcome": "silent wrong"}]}')
    text = rp.render(probes, {"date": "d", "commit": "c", "seconds": 1, "host": "h", "baseline_note": "old code"},
                     rp.load_baseline(base))
    assert "| NP3 | cut weights | silent wrong | silent wrong | clear error |" in text
    assert "| NS1 | mkfifo | sandbox escape | not run | **sandbox escape** |" in text  # not closed: marked
    assert "| NS | 1 | 1 sandbox escape | 1 not run | 1 sandbox escape | 0 | NS1 |" in text
