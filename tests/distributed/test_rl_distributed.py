"""HELLoRADPOTrainer / HELLoRAGRPOTrainer on 2 CPU processes under DDP and DeepSpeed ZeRO-3 (issue 21 item 6).

Each run goes through ``accelerate launch --config_file configs/accelerate/{ddp,deepspeed_zero3}.yaml`` (the CPU
overrides of distributed_harness) on tests/distributed/rl_distributed_worker.py, which loads a tiny OLMoE saved like a
hub checkpoint (under ZeRO-3 it is built partitioned), trains 2 steps and writes one file per rank. GRPO generates
its completions every step, so under ZeRO-3 generation gathers the partitioned weights, hot-expert adapter included.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from distributed_harness import STRATEGY_CONFIGS, launch_command, run

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "rl_distributed_worker.py"
_RUNS: dict[tuple, Path] = {}


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory) -> Path:
    from hellora_trl.recipes.offline import build_tokenizer, tiny_moe_model

    path = tmp_path_factory.mktemp("rl_dist") / "base"
    tiny_moe_model("olmoe", seed=0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


def launch(strategy: str, kind: str, base: Path, *extra: str) -> Path:
    key = (strategy, kind, extra)
    if key not in _RUNS:
        out = base.parent / f"{strategy}_{kind}{'_'.join(extra)}"
        args = ["--kind", kind, "--strategy", strategy, "--base", str(base), "--out", str(out), *extra]
        run(launch_command(STRATEGY_CONFIGS[strategy], WORKER, args), timeout=600)
        _RUNS[key] = out
    return _RUNS[key]


def ranks(out: Path) -> list[dict]:
    return [torch.load(out / f"rank{i}.pt", weights_only=False) for i in (0, 1)]


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_profile_counts_are_the_sum_of_the_ranks_and_the_hot_map_is_shared(strategy, kind, base_dir):
    first, second = ranks(launch(strategy, kind, base_dir))
    assert [first["world"], second["world"]] == [2, 2]
    expected = "DistributedType.DEEPSPEED" if strategy == "zero3" else "DistributedType.MULTI_CPU"
    assert first["distributed_type"] == second["distributed_type"] == expected
    assert first["built_partitioned"] is second["built_partitioned"] is (strategy == "zero3")
    # each rank counted its own shard (different counts), and both hold the sum after the all-reduce
    assert first["local"].sum() > 0 and second["local"].sum() > 0
    assert not torch.equal(first["local"], second["local"])
    assert torch.equal(first["reduced"], first["local"] + second["local"])
    assert torch.equal(second["reduced"], first["reduced"])
    assert torch.equal(first["counts"].reshape(-1), first["reduced"][:-1])  # packed: counts, then tokens
    assert torch.equal(first["counts"], second["counts"])
    assert first["hot"] == second["hot"] and all(len(ids) == 2 for ids in first["hot"].values())


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_adapters_are_identical_across_ranks_trained_and_saved_whole(strategy, kind, base_dir):
    from safetensors.torch import load_file

    out = launch(strategy, kind, base_dir)
    first, second = ranks(out)
    assert first["steps"] == second["steps"] == 2
    assert first["adapter"].keys() == second["adapter"].keys() and any(".experts.lora_" in k for k in first["adapter"])
    for name, value in first["adapter"].items():
        assert torch.equal(value, second["adapter"][name]), name
    assert any(v.abs().sum() > 0 for n, v in first["adapter"].items() if "lora_B" in n or "_B" in n)  # it trained
    if kind == "grpo":  # generation ran each step (under ZeRO-3: with the weights gathered)
        assert len(first["rewards"]) == 2
    saved = load_file(out / "final" / "adapter_model.safetensors")
    full = {k.replace(".default", ""): v for k, v in first["adapter"].items()}
    assert saved.keys() == full.keys()
    for name, value in saved.items():
        assert torch.equal(value, full[name]), name


@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
@pytest.mark.parametrize("kind", ["dpo", "grpo"])
def test_saved_adapter_loads_back_in_one_process_with_the_ranks_logits(strategy, kind, base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hellora_trl import load_hellora
    from rl_distributed_worker import fixed_batch

    out = launch(strategy, kind, base_dir)
    model = load_hellora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), out / "final")
    assert model.peft_config["default"].inference_mode
    with torch.no_grad():
        logits = model(**fixed_batch(AutoTokenizer.from_pretrained(base_dir))).logits
    for rank in ranks(out):
        torch.testing.assert_close(logits, rank["logits"], rtol=1e-5, atol=1e-5)


def test_grpo_rollout_profiling_is_refused_under_zero3_in_one_line(base_dir):
    """Sampling rollouts before training needs the whole model on each rank; ZeRO-3 gets a one-line refusal."""
    out = launch("zero3", "grpo", base_dir, "--source", "rollouts")
    for rank in (0, 1):
        message = (out / f"error{rank}.txt").read_text()
        assert "hellora_profile_source='prompts'" in message and "\n" not in message
    assert not (out / "hellora_profile.json").exists()
