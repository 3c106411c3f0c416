"""Issue 19 item 0: every shipped accelerate config starts from an EMPTY lab cache and builds the lab model once.

The distributed tests (tests/distributed/test_distributed.py) run on a cache built beforehand; here each config launches the
main job (examples/sft_gsm8k.py, tiny lab recipe) on 2 CPU processes with a fresh cache folder. Under ZeRO-3 the
old code pretrained inside ``zero.Init`` and every rank died with ``'weight' must be 2-D``; under DDP both ranks
pretrained at once. Builds are counted in a file (tests/distributed/lab_build_counter.py), never in the ranks' interleaved
output.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from distributed_harness import CONFIGS, ROOT, STRATEGY_CONFIGS, cpu_env, free_port, launch_command, run

COUNTER = Path(__file__).resolve().parent / "lab_build_counter.py"
EXAMPLE = ROOT / "examples" / "sft_gsm8k.py"


def job_args(out: Path) -> list[str]:
    return [
        "--use_cpu", "true", "--output_dir", str(out), "--train_limit", "8", "--max_steps", "1",
        "--per_device_train_batch_size", "2", "--eval_limit", "0", "--hellora_profile_mode", "forward",
        "--hellora_plots", "false", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip


def env_with_cache(cache: Path) -> dict[str, str]:
    env = cpu_env()
    env.update(HELLORA_LAB_CACHE=str(cache), HELLORA_LAB_RECIPE="tiny")
    return env


def builds(record: Path) -> list[str]:
    return record.read_text().splitlines() if record.exists() else []


def assert_one_published_entry(cache: Path) -> None:
    from hellora_trl.recipes.lab import model as lab

    entries = [p for p in cache.iterdir() if p.is_dir()]
    assert [p.name for p in entries] == [lab.LAB_RECIPES["tiny"].key()], sorted(p.name for p in cache.iterdir())
    lab.verify_entry(entries[0])


@pytest.mark.slow
@pytest.mark.parametrize("config", sorted(STRATEGY_CONFIGS.values()))
def test_an_empty_lab_cache_is_built_once_under_each_shipped_config(config, tmp_path, monkeypatch):
    cache, record, out = tmp_path / "cache", tmp_path / "builds.txt", tmp_path / "out"
    cmd = launch_command(config, COUNTER, [str(record), str(EXAMPLE), *job_args(out)])
    monkeypatch.setenv("HELLORA_LAB_CACHE", str(cache))  # run() takes the environment from os.environ
    monkeypatch.setenv("HELLORA_LAB_RECIPE", "tiny")
    run(cmd, timeout=600)
    assert len(builds(record)) == 1, builds(record)
    assert builds(record)[0].startswith("rank 0 local 0 ")
    assert_one_published_entry(cache)
    assert (out / "adapter_model.safetensors").is_file() and (out / "hellora_summary.json").is_file()


@pytest.mark.slow
def test_an_empty_lab_cache_is_built_once_by_two_machines_sharing_it(tmp_path):
    """configs/accelerate/multi_node.yaml as two 'machines' (each its own first process) sharing one cache: the
    file lock lets one build and the other reuse the published entry."""
    cache, record, out = tmp_path / "cache", tmp_path / "builds.txt", tmp_path / "out"
    port = free_port()
    procs = []
    for machine_rank in (0, 1):
        cmd = launch_command(
            "multi_node.yaml", COUNTER, [str(record), str(EXAMPLE), *job_args(out)], num_processes=2, port=port,
            extra=["--num_machines", "2", "--machine_rank", str(machine_rank)],
        )
        log = open(tmp_path / f"machine{machine_rank}.log", "w")
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env_with_cache(cache), stdout=log, stderr=subprocess.STDOUT))
    codes = [p.wait(timeout=600) for p in procs]
    assert codes == [0, 0], "\n".join((tmp_path / f"machine{i}.log").read_text()[-3000:] for i in (0, 1))
    assert len(builds(record)) == 1, builds(record)
    assert_one_published_entry(cache)
    assert (out / "adapter_model.safetensors").is_file()
    assert CONFIGS.joinpath("multi_node.yaml").is_file()
