"""HELLoRA under DDP, FSDP2 and DeepSpeed ZeRO-2/3: 2 CPU processes (gloo), the shipped accelerate configs.

Each strategy runs tests/distributed/distributed_worker.py twice through ``accelerate launch --config_file
configs/accelerate/<name>.yaml`` (train 3 steps with a checkpoint at step 2, then resume from it); the worker
writes what each rank used and produced, and these tests compare it across ranks, against a single-process
profile of the same warm-up data, against the saved adapter reloaded in one process, and across strategies.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import distributed_worker as worker
from distributed_harness import CONFIGS, ROOT, STRATEGY_CONFIGS, cpu_env, free_port, launch_command, run

slow = pytest.mark.slow

STRATEGIES = list(STRATEGY_CONFIGS)
EXPECTED_TYPE = {
    "ddp": "DistributedType.MULTI_CPU",
    "fsdp2": "DistributedType.FSDP",
    "zero2": "DistributedType.DEEPSPEED",
    "zero3": "DistributedType.DEEPSPEED",
}


@dataclass
class Run:
    out: Path
    ranks: list[dict]
    seconds: float

    def tensors(self, rank: int) -> dict[str, torch.Tensor]:
        return load_file(self.out / f"rank{rank}.safetensors")


@pytest.fixture(scope="session")
def base_dir(tmp_path_factory) -> Path:
    """The tiny OLMoE and tokenizer saved like a hub checkpoint (the workers load it with from_pretrained)."""
    from hellora_trl.recipes.offline import build_tokenizer, tiny_moe_model

    path = tmp_path_factory.mktemp("dist") / "base"
    tiny_moe_model("olmoe", seed=0).save_pretrained(path)
    build_tokenizer().save_pretrained(path)
    return path


_RUNS: dict[tuple, Run] = {}


def launch(strategy: str, base: Path, name: str, *extra: str, launcher: tuple[str, ...] = ()) -> Run:
    """One 2-process run of the worker under ``strategy`` (cached: each test reads the same run).

    ``extra`` goes to the worker, ``launcher`` to ``accelerate launch`` (config overrides)."""
    key = (strategy, name, extra, launcher)
    if key not in _RUNS:
        out = base.parent / f"{strategy}_{name}"
        shutil.rmtree(out, ignore_errors=True)
        args = ["--strategy", strategy, "--base", str(base), "--out", str(out), *extra]
        script = ROOT / "tests" / "distributed" / "distributed_worker.py"
        _, seconds = run(launch_command(STRATEGY_CONFIGS[strategy], script, args, extra=list(launcher)))
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]
        _RUNS[key] = Run(out, ranks, seconds)
    return _RUNS[key]


def trained(strategy: str, base: Path) -> Run:
    return launch(strategy, base, "train")


def resumed(strategy: str, base: Path) -> Run:
    first = trained(strategy, base)
    return launch(strategy, base, "resume", "--resume", str(first.out / "checkpoint-2"))


def single_process_profile(base: Path, tmp_path: Path, mode: str = "forward"):
    """The profile and hot map one process computes on the whole warm-up slice (the union of the ranks' shards)."""
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.trainer import HELLoRATrainer

    trainer = HELLoRATrainer(
        model=AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
        args=worker.training_args(str(tmp_path / "single"), "none", mode, 3),
        train_dataset=synthetic_gsm8k(worker.ROWS, seed=0),
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=LoraConfig(**worker.LORA),
    )
    return trainer, trainer.run_profiling()


def without_adapter_name(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace(".default", ""): v for k, v in state.items()}


# ------------------------------------------------------------------------------- fast: partitioned-parameter logic
def _partition_like_zero3(module) -> None:
    """What zero.Init leaves on a parameter: an empty placeholder, the real shape in ds_shape, a ds_id."""
    for i, param in enumerate(module.parameters()):
        shape = param.shape
        param.data = torch.empty(0, dtype=param.dtype)
        param.ds_shape, param.ds_id = shape, i


def test_moe_layers_and_factor_shapes_are_read_from_ds_shape():
    from hellora_trl.expert_lora import RouterLoraLayer, expert_factor_shapes
    from hellora_trl.recipes.offline import tiny_moe_model
    from hellora_trl.registry import find_moe_layers

    model = tiny_moe_model("olmoe", seed=0)
    layers = find_moe_layers(model)
    shapes = expert_factor_shapes(layers[0].experts)
    router_shape = tuple(layers[0].router.weight.shape)
    _partition_like_zero3(model)
    partitioned = find_moe_layers(model)
    assert [l.name for l in partitioned] == [l.name for l in layers]
    assert [l.num_experts for l in partitioned] == [l.num_experts for l in layers]
    assert expert_factor_shapes(partitioned[0].experts) == shapes
    router = RouterLoraLayer(partitioned[0].router, "default", r=2, lora_alpha=4)
    assert tuple(router.lora_A["default"].weight.shape) == (2, router_shape[1])
    assert tuple(router.lora_B["default"].weight.shape) == (router_shape[0], 2)


@pytest.mark.parametrize("n", [0, 1, 2, 5, 8])
def test_shard_bounds_split_like_datasets_and_allow_empty_shards(n):
    from hellora_trl.distributed import shard_bounds

    bounds = [shard_bounds(n, 2, rank) for rank in range(2)]
    assert bounds[0][0] == 0 and bounds[0][1] == bounds[1][0] and bounds[1][1] == n
    assert bounds[0][1] - bounds[0][0] >= bounds[1][1] - bounds[1][0] >= bounds[0][1] - bounds[0][0] - 1


def test_profile_pads_an_empty_shard_with_uncounted_forwards():
    """A rank whose warm-up shard is empty still runs the busiest rank's number of forwards, counting nothing."""
    from hellora_trl.recipes.offline import tiny_moe_model
    from hellora_trl.profiling import profile_experts

    model = tiny_moe_model("olmoe", seed=0)
    calls = []
    model.register_forward_hook(lambda *_: calls.append(1))
    profile = profile_experts(model, [], progress=False, pad_batches_to=3)
    assert len(calls) == 3 and int(profile.counts.sum()) == 0
    with pytest.raises(ValueError, match="empty"):
        profile_experts(model, [], progress=False)


# ------------------------------------------------------------------------------------------------ per strategy
@slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_every_rank_uses_the_hot_map_of_the_summed_profile(strategy, base_dir, tmp_path):
    result = trained(strategy, base_dir)
    r0, r1 = result.ranks
    assert [r["world_size"] for r in result.ranks] == [2, 2]
    assert r0["distributed_type"] == r1["distributed_type"] == EXPECTED_TYPE[strategy]
    # every rank selected from the same (summed) counts, and the model carries that map
    assert r0["hot_experts"] == r1["hot_experts"] == r0["model_hot_experts"] == r1["model_hot_experts"]
    assert r0["counts"] == r1["counts"]
    # ... which are exactly the counts of one process profiling the union of the two shards
    trainer, profile = single_process_profile(base_dir, tmp_path)
    assert r0["counts"] == profile.counts.tolist()
    assert r0["tokens_seen"] == profile.tokens_seen
    assert r0["hot_experts"] == trainer.select(profile)
    # written once, by the main process, equal to what the ranks used
    saved = json.loads((result.out / "hellora_profile.json").read_text())
    assert saved["hot_experts"] == r0["hot_experts"] and saved["counts"] == r0["counts"]
    assert not list(result.out.glob(".hellora_profile.json.*"))


@slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_adapter_is_identical_on_every_rank_and_in_the_saved_file(strategy, base_dir):
    result = trained(strategy, base_dir)
    a, b = result.tensors(0), result.tensors(1)
    assert a.keys() == b.keys() and any(".experts.lora_" in k for k in a)
    for key in a:
        assert torch.equal(a[key], b[key]), key
    # training moved the hot-expert factors (B starts at zero)
    assert any(a[k].abs().sum() > 0 for k in a if ".experts.lora_down_B" in k)
    # the saved adapter holds the full (gathered) factors: k hot experts each, equal to the ranks' values
    saved = load_file(result.out / "final" / "adapter_model.safetensors")
    full = without_adapter_name(a)
    assert saved.keys() == full.keys()
    for key, value in saved.items():
        assert torch.equal(value, full[key]), key
    shapes = result.ranks[0]["expert_factor_local_shapes"]
    if strategy == "fsdp2":  # factors sharded on the hot-expert dim: each rank holds 1 of the k=2 slots
        assert all(shape[0] == 1 for shape in shapes.values()), shapes
        assert "FSDPOlmoeDecoderLayer" in result.ranks[0]["fsdp_units"]
    if strategy == "zero3":  # model built partitioned, factors partitioned, MoE blocks gathered as leaves
        assert all(r["built_partitioned"] for r in result.ranks)
        assert all(shape == [0] for shape in shapes.values()), shapes
        assert result.ranks[0]["zero3_leaf_blocks"] == [
            f"base_model.model.model.layers.{i}.mlp" for i in range(len(result.ranks[0]["hot_experts"]))
        ]


@slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_saved_adapter_reloads_in_one_process_with_the_same_logits(strategy, base_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hellora_trl import load_hellora

    result = trained(strategy, base_dir)
    model = load_hellora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), result.out / "final")
    with torch.no_grad():
        logits = model(**worker.fixed_batch(AutoTokenizer.from_pretrained(base_dir))).logits
    for rank in result.ranks:
        torch.testing.assert_close(logits, torch.tensor(rank["logits"]), rtol=1e-5, atol=1e-5)
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    with torch.no_grad():
        assert not torch.allclose(base(**worker.fixed_batch(AutoTokenizer.from_pretrained(base_dir))).logits, logits)


@slow
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_resume_keeps_the_hot_map_and_continues_the_loss_curve(strategy, base_dir):
    first, second = trained(strategy, base_dir), resumed(strategy, base_dir)
    for rank in second.ranks:
        assert rank["hot_experts"] == first.ranks[0]["hot_experts"]
        assert rank["steps_run_here"] == 1  # steps 1-2 came from checkpoint-2, only step 3 ran
        assert rank["losses"]["3"] == pytest.approx(first.ranks[0]["losses"]["3"], rel=1e-5)
    before, after = first.tensors(0), second.tensors(0)
    for key in before:
        torch.testing.assert_close(after[key], before[key], rtol=1e-5, atol=1e-6)


@slow
@pytest.mark.parametrize("strategy", [s for s in STRATEGIES if s != "ddp"])
def test_sharded_strategies_match_ddp(strategy, base_dir):
    """Same data, gradient accumulation (2) and updates: the loss curve and adapter equal DDP's."""
    ddp, other = trained("ddp", base_dir), trained(strategy, base_dir)
    assert other.ranks[0]["losses"].keys() == ddp.ranks[0]["losses"].keys() == {"1", "2", "3"}
    for step, loss in ddp.ranks[0]["losses"].items():
        assert other.ranks[0]["losses"][step] == pytest.approx(loss, rel=1e-5), step
    # Reduce-scatter vs all-reduce sums in another order; Adam turns that into <= ~lr-sized differences on
    # entries whose gradient is near zero, so the factors agree to 1e-4, not bit for bit.
    ref = ddp.tensors(0)
    for key, value in other.tensors(0).items():
        torch.testing.assert_close(value, ref[key], rtol=1e-3, atol=1e-4)


@slow
@pytest.mark.parametrize(
    "strategy,adapter_dtype",
    [("ddp", "torch.float32"), ("fsdp2", "torch.float32"), ("zero3", "torch.bfloat16")],
)
def test_bf16_base_with_mixed_precision_trains_like_float32(strategy, adapter_dtype, base_dir):
    """As the GPU recipes run: a bf16 base, --bf16 and gradient checkpointing. DDP and FSDP2 keep float32 adapters
    (PEFT's autocast, as under plain TRL; FSDP2 shards the mixed-dtype layer), ZeRO-3 needs one dtype so adapters
    are bf16. Same hot map, losses within bf16 rounding of the float32 run."""
    ref = trained("ddp", base_dir).ranks[0]
    result = launch(strategy, base_dir, "bf16", "--bf16", "--base_dtype", "bfloat16", "--gradient_checkpointing")
    for rank in result.ranks:
        assert rank["adapter_dtypes"] == [adapter_dtype]
        assert rank["hot_experts"] == ref["hot_experts"]
        for step, loss in ref["losses"].items():
            assert rank["losses"][step] == pytest.approx(loss, abs=2e-2), step
    assert result.ranks[0]["losses"] == result.ranks[1]["losses"]


@slow
def test_zero3_saves_the_whole_adapter_without_consolidating_the_model(base_dir):
    """LoRI-D (frozen A) under ZeRO-3 with zero3_save_16bit_model off: the Trainer alone would write empty
    placeholders (no consolidated weights) or, consolidating, drop the frozen A; HELLoRA gathers the adapter."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from hellora_trl import load_hellora

    result = launch("zero3", base_dir, "lori_d", "--variant", "lori_d", launcher=("--zero3_save_16bit_model", "false"))
    a, b = result.tensors(0), result.tensors(1)
    saved = load_file(result.out / "final" / "adapter_model.safetensors")
    full = without_adapter_name(a)
    assert saved.keys() == full.keys() and any(".experts.lora_down_A" in k for k in saved)
    for key, value in saved.items():
        assert torch.equal(value, full[key]), key
    for key in a:
        assert torch.equal(a[key], b[key]), key
    model = load_hellora(AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32), result.out / "final")
    with torch.no_grad():
        logits = model(**worker.fixed_batch(AutoTokenizer.from_pretrained(base_dir))).logits
    torch.testing.assert_close(logits, torch.tensor(result.ranks[0]["logits"]), rtol=1e-5, atol=1e-5)


# ------------------------------------------------------------------------------------------ LoRA warm-up mode
@slow
@pytest.mark.parametrize("strategy", ["ddp", "zero3"])
def test_lora_warmup_counts_each_rank_shard_once_and_sums_them(strategy, base_dir, tmp_path):
    """The warm-up sub-trainer shards the slice across ranks; the summed counts cover every slice token once."""
    result = launch(strategy, base_dir, "warmup", "--profile_mode", "lora_warmup", "--max_steps", "1")
    r0, r1 = result.ranks
    assert r0["hot_experts"] == r1["hot_experts"] and r0["counts"] == r1["counts"]
    assert r0["profile_source"]["mode"] == "lora_warmup"
    trainer, _ = single_process_profile(base_dir, tmp_path)
    from hellora_trl.profiling import warmup_slice as sample_warmup_slice

    warm = sample_warmup_slice(trainer.train_dataset, worker.WARMUP_FRACTION, 0)
    tokens = sum(len(ids) for ids in warm["input_ids"])
    top_k = trainer.model.config.num_experts_per_tok
    assert r0["tokens_seen"] == tokens
    assert all(sum(layer) == top_k * tokens for layer in r0["counts"])
    assert r0["hot_experts"] == trainer.select(_profile_from(r0, trainer))


@pytest.mark.parametrize(
    "overrides,message",
    [
        (dict(hellora_profile_mode="lora_warmup"), "Under FSDP use hellora_profile_mode='forward'"),
        (dict(hellora_profile_mode="forward", hellora_variant="lori_s"), "Train LoRI-D separately"),
    ],
)
def test_fsdp_refuses_sub_runs_it_cannot_shard_twice(overrides, message, tmp_path):
    """FSDP shards the trained model in place, so a warm-up (or LoRI-D) sub-run cannot come first: a clear error
    from the trainer's constructor check, before any work; forward profiling or a given profile pass."""
    from types import SimpleNamespace

    from hellora_trl.trainer import HELLoRATrainer

    args = worker.training_args(str(tmp_path), "fsdp2", "forward", 3)
    for key, value in overrides.items():
        setattr(args, key, value)
    with pytest.raises(ValueError, match=message):
        HELLoRATrainer._check_fsdp_sub_runs(SimpleNamespace(is_fsdp_enabled=True, args=args))
    HELLoRATrainer._check_fsdp_sub_runs(SimpleNamespace(is_fsdp_enabled=False, args=args))
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    args.hellora_profile_path, args.hellora_lori_d_adapter = str(profile), str(tmp_path)
    HELLoRATrainer._check_fsdp_sub_runs(SimpleNamespace(is_fsdp_enabled=True, args=args))


def _profile_from(rank: dict, trainer):
    from hellora_trl.profile import ExpertProfile

    layers = list(rank["hot_experts"])
    return ExpertProfile(
        counts=torch.tensor(rank["counts"]),
        layer_names=layers,
        num_experts=trainer.model.config.num_experts,
        experts_per_token=trainer.model.config.num_experts_per_tok,
    )


@slow
def test_zero3_profiles_a_modulelist_moe_whose_ranks_run_different_experts(tmp_path_factory, tmp_path):
    """Per-expert nn.Linear experts run only when routed to, so ranks run different experts: ZeRO-3 profiling
    must gather each MoE block whole (per-expert gathers mismatch across ranks: crash or silently wrong weights).
    The summed counts must equal one process's counts on the whole slice."""
    from peft import LoraConfig
    from transformers import AutoTokenizer

    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.trainer import HELLoRATrainer
    from modulelist_model import LegacyMoEForCausalLM

    base = tmp_path_factory.mktemp("modulelist") / "base"
    worker.save_modulelist_base(base)
    out = base.parent / "zero3_profile"
    args = ["--strategy", "zero3", "--base", str(base), "--out", str(out), "--model", "modulelist", "--profile_only"]
    run(launch_command("deepspeed_zero3.yaml", ROOT / "tests" / "distributed" / "distributed_worker.py", args))
    r0, r1 = (json.loads((out / f"rank{r}.json").read_text()) for r in range(2))
    assert r0 == r1
    trainer = HELLoRATrainer(
        model=LegacyMoEForCausalLM.from_pretrained(base, dtype=torch.float32),
        args=worker.training_args(str(tmp_path / "single"), "none", "forward", 3),
        train_dataset=synthetic_gsm8k(worker.ROWS, seed=0),
        processing_class=AutoTokenizer.from_pretrained(base),
        peft_config=LoraConfig(**worker.LORA),
    )
    profile = trainer.run_profiling()
    assert r0["counts"] == profile.counts.tolist() and r0["tokens_seen"] == profile.tokens_seen
    assert 0 in profile.counts  # some experts idle: the case that needs whole-block gathering
    assert r0["hot_experts"] == trainer.select(profile)


@slow
@pytest.mark.parametrize("strategy", list(STRATEGY_CONFIGS))
def test_evaluation_after_training_runs_on_every_rank_and_ends(strategy, base_dir):
    """Every shipped config evaluates after training without hanging: prompts are sharded over the ranks (5 over 2:
    one rank pads its share), ZeRO-3/FSDP generate with synced_gpus, and every rank ends with all results."""
    run_ = launch(strategy, base_dir, "eval", "--max_steps", "2", "--eval_limit", "5")
    evals = [rank["eval"] for rank in run_.ranks]
    assert [e["total"] for e in evals] == [5, 5]
    assert evals[0] == evals[1]  # every rank holds the same, complete results
    assert all(isinstance(c, str) for c in evals[0]["completions"])


# ---------------------------------------------------------------------------- the example script and templates
@slow
def test_example_script_runs_under_the_ddp_config(tmp_path):
    out = tmp_path / "example"
    args = [
        "--use_cpu", "true", "--output_dir", str(out), "--train_limit", "16", "--max_steps", "2",
        "--per_device_train_batch_size", "2", "--eval_limit", "0", "--hellora_profile_mode", "forward",
        "--hellora_plots", "false", "--report_to", "none", "--disable_tqdm", "true",
    ]  # fmt: skip
    output, _ = run(launch_command("ddp.yaml", ROOT / "examples" / "sft_gsm8k.py", args))
    assert (out / "adapter_model.safetensors").is_file() and (out / "hellora_profile.json").is_file()
    assert "HELLoRA run summary" in output


@slow
def test_multi_node_template_runs_as_two_machines_on_loopback(tmp_path):
    """configs/accelerate/multi_node.yaml as two 'machines' (one process each) meeting at 127.0.0.1."""
    port = free_port()
    outs = []
    procs = []
    for machine_rank in (0, 1):
        out = tmp_path / f"node{machine_rank}"
        outs.append(out)
        cmd = launch_command(
            "multi_node.yaml",
            ROOT / "examples" / "sft_gsm8k.py",
            ["--use_cpu", "true", "--output_dir", str(tmp_path / "shared_out"), "--train_limit", "8",
             "--max_steps", "1", "--per_device_train_batch_size", "2", "--eval_limit", "0",
             "--hellora_profile_mode", "forward", "--hellora_plots", "false", "--report_to", "none",
             "--disable_tqdm", "true"],
            num_processes=2,
            port=port,
            extra=["--num_machines", "2", "--machine_rank", str(machine_rank)],
        )  # fmt: skip
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env=cpu_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    logs = [p.communicate(timeout=420)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], "\n".join(log[-3000:] for log in logs)
    assert (tmp_path / "shared_out" / "hellora_profile.json").is_file()
    assert CONFIGS.joinpath("multi_node.yaml").read_text().count("--machine_rank") >= 1
