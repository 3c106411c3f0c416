"""Helpers of ``bench/gpu/run.sh``: the installed stack (``stack``) and the run's summary (``summary``).

    python bench/gpu/kit.py stack WORK/stack.json          # versions + requirements of the pinned packages not met
    python bench/gpu/kit.py summary WORK OUT                # OUT/summary.{json,md} from WORK's step records

Standard library only (``packaging`` where present), so it runs before and whatever the install did.
"""

from __future__ import annotations

import json
import platform
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

PINNED = ("torch", "transformers", "trl", "peft", "accelerate", "datasets")
CHECKED = PINNED + ("huggingface-hub", "tokenizers", "safetensors", "pyarrow", "fsspec", "dill", "multiprocess")


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def unmet_requirements(names=PINNED) -> list[str]:
    """Requirements (no extras) of ``names`` that the importable distributions do not satisfy."""
    try:
        from packaging.requirements import Requirement
    except ImportError:  # pragma: no cover - packaging ships with pip's environments
        return ["packaging not importable: requirements not checked"]
    problems = []
    for name in names:
        try:
            requires = metadata.requires(name) or []
        except metadata.PackageNotFoundError:
            problems.append(f"{name}: not installed")
            continue
        for text in requires:
            req = Requirement(text)
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            have = _version(req.name)
            if have is None:
                problems.append(f"{name} needs {req}: missing")
            elif req.specifier and not req.specifier.contains(have, prereleases=True):
                problems.append(f"{name} needs {req}: have {have}")
    return problems


def stack(path: str) -> dict:
    info = {
        "python": platform.python_version(),
        "versions": {n: _version(n) for n in CHECKED},
        "unmet": unmet_requirements(),
    }
    try:
        import torch

        info["cuda"] = torch.version.cuda
        info["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        info["torch_error"] = repr(exc)
    Path(path).write_text(json.dumps(info, indent=2))
    print(json.dumps(info, indent=2))
    return info


def _pytest(xml_path: Path) -> dict | None:
    if not xml_path.is_file():
        return None
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError:
        return None
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    counts["passed"] = counts["tests"] - counts["failures"] - counts["errors"] - counts["skipped"]
    failed = []
    for case in suite.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    skips = sorted({(s.get("message") or "")[:160] for s in suite.iter("skipped")})
    return {**counts, "failed": failed[:50], "skip_reasons": skips[:5]}


def _steps(work: Path) -> list[dict]:
    rows = []
    path = work / "steps.tsv"
    if path.is_file():
        for line in path.read_text().splitlines():
            name, status, rc, seconds, limit = line.split("\t")
            rows.append({"step": name, "status": status, "rc": int(rc), "seconds": int(seconds), "limit_s": int(limit)})
    return rows


def _sweep_row(row: dict) -> dict:
    if "configs" not in row:
        return {"label": row.get("label"), "skipped": row.get("skipped")}
    c = row["configs"]
    return {"label": row["label"], "experts": row["experts"], "peft_x": c["peft-all"]["time_x"],
            "ours_all_x": c["ours-all"]["time_x"], "hellora_x": c["hellora-k"]["time_x"],
            "hellora_mem_x": c["hellora-k"]["mem_x"], "peft_over_hellora": row["peft_over_hellora"]}


def summary(work: str, out: str) -> dict:
    work_dir, out_dir = Path(work), Path(out)
    data: dict = {"dry_run": (work_dir / "DRY_RUN").exists(), "steps": _steps(work_dir)}
    if (work_dir / "stack.json").is_file():
        data["stack"] = json.loads((work_dir / "stack.json").read_text())
    data["pytest"] = _pytest(work_dir / "pytest.xml")
    bench, tables = {}, []
    for path in sorted((work_dir / "bench").glob("*.json")):
        result = json.loads(path.read_text())
        if "sweep" in result:  # bench/scaling_sweep.py: one row per expert count / layer shape
            bench[path.stem] = {"sweep": [_sweep_row(r) for r in result.get("rows", [])], "machine": result.get("machine")}
            md = path.with_suffix(".md")
            if md.is_file():
                tables.append(md.read_text().strip())
            continue
        keep = ("config", "router", "step_s", "time_x", "cpu_x", "tokens_per_s", "peak_mib", "mem_x", "trainable")
        bench[path.stem] = {
            "rows": [{k: r[k] for k in keep if k in r} for r in result.get("rows", [])],
            "targets": result.get("targets"),
            "machine": result.get("machine"),
            "autocast": result.get("routing", {}).get("autocast"),
        }
        md = path.with_suffix(".md")
        if md.is_file():
            tables.append(md.read_text().strip())
    data["bench"] = bench
    main_summary = work_dir / "main" / "hellora_summary.json"
    data["main_job"] = json.loads(main_summary.read_text()) if main_summary.is_file() else None
    failed = [s["step"] for s in data["steps"] if s["status"] not in ("ok", "skipped")]
    data["ok"] = bool(data["steps"]) and not failed
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "summary.json").write_text(json.dumps(data, indent=2, default=str))
    lines = ["# HELLoRA GPU check" + (" (CPU dry run)" if data["dry_run"] else ""), ""]
    lines += ["| step | status | rc | seconds | limit (s) |", "|---|---|---|---|---|"]
    lines += [f"| {s['step']} | {s['status']} | {s['rc']} | {s['seconds']} | {s['limit_s']} |" for s in data["steps"]]
    stack_info = data.get("stack") or {}
    if stack_info:
        versions = ", ".join(f"{k} {v}" for k, v in stack_info.get("versions", {}).items() if v)
        lines += ["", f"Stack: Python {stack_info.get('python')}; {versions}; GPU: {stack_info.get('gpu')}."]
        if stack_info.get("unmet"):
            lines += ["", "Unmet requirements: " + "; ".join(stack_info["unmet"])]
    if data["pytest"]:
        p = data["pytest"]
        lines += ["", f"pytest -m gpu: {p['passed']} passed, {p['failures']} failed, {p['errors']} errors, "
                      f"{p['skipped']} skipped."]
        lines += [f"- FAILED {name}" for name in p["failed"]]
        lines += [f"- skip reason: {reason}" for reason in p["skip_reasons"]]
    if data["main_job"]:
        lines += ["", "Main job: " + ", ".join(f"{k}={v}" for k, v in data["main_job"].items())]
    lines += ["", *tables] if tables else []
    (out_dir / "summary.md").write_text("\n".join(lines) + "\n")
    return data


if __name__ == "__main__":
    command, *rest = sys.argv[1:]
    {"stack": stack, "summary": summary}[command](*rest)
