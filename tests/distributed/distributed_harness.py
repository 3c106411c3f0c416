"""Run the shipped accelerate configs on 2 CPU processes (gloo) for the slow distributed tests.

The files in configs/accelerate/ are for GPU users and stay untouched; everything that makes them run on a
CPU-only box lives here:

* ``launch``: ``accelerate launch --config_file configs/accelerate/<name>.yaml --num_processes 2
  --mixed_precision no`` (no bf16 on CPU), ``DS_ACCELERATOR=cpu`` and one thread per process;
* ``apply_cpu_switches`` (called by the worker after its training arguments exist): the measured workarounds
  for CPU runs, which a GPU run never needs: FSDP is only picked by accelerate for multi-device runs, so the
  state is told it is one; ZeRO-3 builds the model partitioned, so DeepSpeed's communication layer must be
  set up (on gloo) before the model is built. The worker also passes ``use_cpu=True`` in its training
  arguments (DeepSpeed otherwise computes its batch size for a GPU count of 0).
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs" / "accelerate"
STRATEGY_CONFIGS = {
    "ddp": "ddp.yaml",
    "fsdp2": "fsdp2.yaml",
    "zero2": "deepspeed_zero2.yaml",
    "zero3": "deepspeed_zero3.yaml",
}


def free_port() -> int:
    """A free loopback TCP port for the rendezvous (tests may run next to other engineers' runs)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_env() -> dict[str, str]:
    """Environment for CPU-only multi-process runs: DeepSpeed's CPU accelerator, 1 thread per rank, offline."""
    env = dict(os.environ)
    env.update(
        DS_ACCELERATOR="cpu",
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        PYTHONPATH=os.pathsep.join(
            [str(ROOT), str(ROOT / "tests" / "fixtures"), str(ROOT / "tests" / "distributed"),
             env.get("PYTHONPATH", "")]
        ),
    )
    return env


def launch_command(config: str, script: str | Path, script_args: list[str], num_processes: int = 2,
                   extra: list[str] | None = None, port: int | None = None) -> list[str]:
    """``accelerate launch`` with a shipped config plus the CPU overrides (process count, no mixed precision)."""
    return [
        sys.executable, "-m", "accelerate.commands.launch",
        "--config_file", str(CONFIGS / config),
        "--num_processes", str(num_processes),
        "--mixed_precision", "no",
        "--main_process_ip", "127.0.0.1",
        "--main_process_port", str(port or free_port()),
        *(extra or []),
        str(script), *script_args,
    ]  # fmt: skip


def run(cmd: list[str], timeout: float = 420, cwd: Path = ROOT) -> tuple[str, float]:
    """Run a launch command; on failure raise with the tail of its output. Returns (output, seconds)."""
    start = time.perf_counter()
    proc = subprocess.run(cmd, cwd=cwd, env=cpu_env(), capture_output=True, text=True, timeout=timeout)
    seconds = time.perf_counter() - start
    output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode} after {seconds:.0f}s:\n{output[-6000:]}")
    return output, seconds


def apply_cpu_switches(strategy: str) -> None:
    """CPU-only workarounds, applied inside each rank once the training arguments have built accelerate's state."""
    if strategy == "fsdp2":
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        # accelerate only turns ACCELERATE_USE_FSDP into FSDP for multi-device runs; CPU ranks are MULTI_CPU.
        PartialState().distributed_type = DistributedType.MULTI_GPU
    if strategy == "zero3":
        import deepspeed

        # zero.Init needs DeepSpeed's comm layer; on GPUs accelerate sets it up with nccl, on CPU we do (gloo).
        deepspeed.init_distributed(dist_backend="gloo")
