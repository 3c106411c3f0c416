"""Shared helpers of the benchmark scripts: machine description, timing, memory, markdown/JSON output.

Benchmarks on a shared machine are noisy, so every script builds all its configurations in one process and
alternates them step by step; ratios between configurations measured that way are what the tables report.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Optional, Sequence

import torch

RESULTS_DIR = Path(__file__).resolve().parent / "results"
REPO_ROOT = Path(__file__).resolve().parents[1]


def command_line(script: str, argv: Optional[Sequence[str]] = None) -> str:
    """The command as typed from the repository root (script path made relative), for the results file."""
    path = Path(script).resolve()
    try:
        script_text = str(path.relative_to(REPO_ROOT))
    except ValueError:
        script_text = str(script)
    return shlex.join(["python", script_text, *(sys.argv[1:] if argv is None else argv)])


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def _memory_gib() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return round(int(line.split()[1]) / 2**20, 1)
    except OSError:
        pass
    return None


def machine_info(device: str) -> dict[str, Any]:
    """What the numbers were measured on, including how busy the machine was when the run started."""
    import peft
    import transformers

    info: dict[str, Any] = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": _memory_gib(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "device": device,
    }
    if hasattr(os, "getloadavg"):
        info["load_avg_1m_at_start"] = round(os.getloadavg()[0], 2)
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def machine_line(info: dict[str, Any]) -> str:
    parts = [f"{info['cpu']} ({info['cores']} cores, {info['memory_gib']} GiB)", f"torch {info['torch']}"]
    parts.append(f"transformers {info['transformers']}, peft {info['peft']}")
    parts.append(f"{info['torch_threads']} torch threads")
    if "gpu" in info:
        parts.insert(0, info["gpu"])
    if "load_avg_1m_at_start" in info:
        parts.append(f"load average {info['load_avg_1m_at_start']} at start")
    return "; ".join(parts)


def median(values: Sequence[float]) -> float:
    return statistics.median(values) if values else float("nan")


def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timing:
    """Wall-clock and process CPU seconds of repeated runs of one configuration."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def measure(self, fn: Callable[[], Any], device: str) -> None:
        synchronize(device)
        wall, cpu = time.perf_counter(), time.process_time()
        fn()
        synchronize(device)
        self.wall.append(time.perf_counter() - wall)
        self.cpu.append(time.process_time() - cpu)


def alternate(runs: dict[str, Callable[[], Any]], rounds: int, device: str, label: str = "") -> dict[str, Timing]:
    """One call of every configuration per round, the starting configuration rotating between rounds, so slow
    phases of a shared machine hit every configuration alike. Progress goes to stderr when ``label`` is set."""
    names = list(runs)
    timings = {name: Timing() for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            timings[name].measure(runs[name], device)
        if label:
            print(f"[{label}] round {r + 1}/{rounds} done", file=sys.stderr, flush=True)
    return timings


def unique_bytes(tensors: Iterable[torch.Tensor]) -> int:
    """Bytes of distinct storages among ``tensors`` (shared storages counted once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if isinstance(t, torch.Tensor) and t.device.type != "meta":
            storage = t.untyped_storage()
            seen[storage.data_ptr()] = storage.nbytes()
    return sum(seen.values())


def transient_peak_bytes(fn: Callable[[], Any], device: str) -> int:
    """Peak bytes allocated by ``fn`` above what was live when it started.

    CUDA: the caching allocator's peak statistic. CPU has no such statistic, so the profiler's allocation events
    ([memory] records: +bytes on allocation, -bytes on free) are replayed in time order.
    """
    if device == "cuda":
        torch.cuda.synchronize()
        start = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"]
    live = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_results(name: str, markdown: str, data: dict[str, Any], out_dir: Path | None = None) -> tuple[Path, Path]:
    """``<out_dir>/<name>.md`` (what the README table is generated from) and ``<name>.json`` (raw numbers)."""
    out_dir = Path(out_dir or RESULTS_DIR)
    out_dir.mkdir(parents=True, exist_ok=True)
    md_path, json_path = out_dir / f"{name}.md", out_dir / f"{name}.json"
    md_path.write_text(markdown.rstrip() + "\n")
    json_path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")
    return md_path, json_path
