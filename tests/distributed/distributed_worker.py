"""One rank of a distributed HELLoRA run (launched by tests/distributed/test_distributed.py through distributed_harness).

Trains a tiny OLMoE saved in ``--base`` on generated GSM8K-style rows with HELLoRATrainer under whatever strategy
``accelerate launch --config_file configs/accelerate/<name>.yaml`` set up, then records, per rank, what the
test compares: the hot map and routing counts this rank used, the logged losses, the full (gathered) adapter
tensors and the logits of a fixed batch, to ``--out/rank{N}.json`` and ``--out/rank{N}.safetensors``.

``--resume CHECKPOINT`` rebuilds everything and continues from that checkpoint instead.
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch
from transformers import TrainerCallback

torch.set_num_threads(1)

# Small enough for 2 CPU processes in seconds; the numbers below are shared with test_distributed.py.
ROWS = 32
WARMUP_FRACTION = 0.25
LORA = dict(r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM")


def training_args(
    out: str, strategy: str, profile_mode: str, max_steps: int, bf16: bool = False, variant: str = "lora",
    gradient_checkpointing: bool = False,
):
    """The run's HELLoRAConfig: 2 rows/rank x 2 accumulation steps, a checkpoint at step 2."""
    from hellora_trl.config import HELLoRAConfig

    return HELLoRAConfig(
        output_dir=out,
        use_cpu=True,  # CPU switch (DeepSpeed sizes its batch by device count otherwise)
        max_steps=max_steps,
        per_device_train_batch_size=2,
        gradient_accumulation_steps=2,
        learning_rate=5e-3,
        logging_steps=1,
        save_strategy="steps",
        save_steps=2,
        report_to=[],
        max_length=64,
        seed=0,
        disable_tqdm=True,
        gradient_checkpointing=gradient_checkpointing,
        hellora_k=2,
        hellora_profile_mode=profile_mode,
        hellora_warmup_fraction=WARMUP_FRACTION,
        hellora_plots=False,
        bf16=bf16,
        hellora_variant=variant,
    )


def build_model(opts):
    """The saved tiny model from ``--base`` (built partitioned under ZeRO-3's zero.Init)."""
    from transformers import AutoModelForCausalLM

    if opts.model == "olmoe":
        return AutoModelForCausalLM.from_pretrained(opts.base, dtype=getattr(torch, opts.base_dtype))
    from modulelist_model import LegacyMoEForCausalLM

    return LegacyMoEForCausalLM.from_pretrained(opts.base, dtype=getattr(torch, opts.base_dtype))


def save_modulelist_base(path) -> None:
    """A tiny per-expert ModuleList MoE (experts run only when routed to) plus the offline tokenizer."""
    from modulelist_model import LegacyMoEConfig, LegacyMoEForCausalLM

    from hellora_trl.recipes.offline import build_tokenizer

    torch.manual_seed(0)
    config = LegacyMoEConfig(vocab_size=512, hidden_size=32, intermediate_size=16, num_local_experts=32, num_experts_per_tok=1)
    LegacyMoEForCausalLM(config).save_pretrained(path)
    build_tokenizer().save_pretrained(path)


def fixed_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["Tom has 3 apples and buys 4 more. How many apples?", "What is 12 times 7?"]
    return dict(tokenizer(texts, return_tensors="pt", padding=True))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--strategy", required=True)
    parser.add_argument("--base", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--profile_mode", default="forward")
    parser.add_argument("--max_steps", type=int, default=3)
    parser.add_argument("--resume", default=None)
    parser.add_argument("--bf16", action="store_true", help="mixed precision (bf16 autocast; DeepSpeed: bf16 weights)")
    parser.add_argument("--model", default="olmoe", choices=["olmoe", "modulelist"],
                        help="modulelist: tests/fixtures/modulelist_model.py (per-expert nn.Linear, experts run only when routed to)")
    parser.add_argument("--gradient_checkpointing", action="store_true")
    parser.add_argument("--variant", default="lora", help="hellora_variant (lori_d: frozen A factors)")
    parser.add_argument("--profile_only", action="store_true", help="profile + select, record, no training")
    parser.add_argument("--base_dtype", default="float32", help="dtype the base model is loaded in (GPU recipes: bfloat16)")
    parser.add_argument("--eval_limit", type=int, default=0,
                        help="after training, evaluate GSM8K on this many held-out problems on every rank (the recipe's path)")
    opts = parser.parse_args()

    from peft import LoraConfig
    from transformers import AutoTokenizer

    from distributed_harness import apply_cpu_switches
    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.distributed import end_distributed
    from hellora_trl.utils import has_zero3_params
    from hellora_trl.trainer import HELLoRATrainer

    args = training_args(
        opts.out, opts.strategy, opts.profile_mode, opts.max_steps, opts.bf16, opts.variant, opts.gradient_checkpointing
    )
    apply_cpu_switches(opts.strategy)
    model = build_model(opts)
    built_partitioned = has_zero3_params(model)  # ZeRO-3: built under zero.Init, weights already sharded
    tokenizer = AutoTokenizer.from_pretrained(opts.base)
    trainer = HELLoRATrainer(
        model=model,
        args=args,
        train_dataset=synthetic_gsm8k(ROWS, seed=0),
        processing_class=tokenizer,
        peft_config=LoraConfig(**LORA),
    )
    if opts.profile_only:  # e.g. the ModuleList model, which TRL's fused LM head cannot train
        record_profile(trainer, Path(opts.out))
    else:
        steps = StepCounter()
        trainer.add_callback(steps)
        trainer.train(resume_from_checkpoint=opts.resume)
        trainer.save_model(os.path.join(opts.out, "final"))
        extra = {"built_partitioned": built_partitioned, "steps_run_here": steps.steps}
        if opts.eval_limit:
            extra["eval"] = evaluate_held_out(trainer, tokenizer, opts.eval_limit)
        record(trainer, tokenizer, Path(opts.out), extra)
    end_distributed()


def evaluate_held_out(trainer, tokenizer, limit: int) -> dict:
    """The recipe's own post-training step (``recipes.sft.evaluate_and_write``, what ``run()`` and the example
    call) on generated held-out GSM8K problems; every rank calls it, as they do."""
    from hellora_trl.recipes.offline import generate_math_problems
    from hellora_trl.recipes.sft import HELLoRAScriptArguments, evaluate_and_write

    script_args = HELLoRAScriptArguments(task="gsm8k", eval_limit=limit, eval_max_new_tokens=6)
    rows = generate_math_problems(limit, seed=10_000)
    summary = evaluate_and_write(trainer, tokenizer, script_args, rows, {})
    result = summary["arithmetic"]  # no dataset: the lab's arithmetic task
    return {"accuracy": result["accuracy"], "total": result["total"], "completions": [r["completion"] for r in result["records"]]}


def record_profile(trainer, out: Path) -> None:
    """Profile and select only; write this rank's counts and hot map."""
    profile = trainer.run_profiling()
    info = {"counts": profile.counts.tolist(), "tokens_seen": profile.tokens_seen, "hot_experts": trainer.select(profile)}
    out.mkdir(parents=True, exist_ok=True)
    (out / f"rank{trainer.accelerator.process_index}.json").write_text(json.dumps(info))


class StepCounter(TrainerCallback):
    """Optimizer steps taken in this process (a resumed run must not redo the checkpoint's steps)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_step_end(self, args, state, control, **kwargs):
        self.steps += 1


def record(trainer, tokenizer, out: Path, extra: dict) -> None:
    """What this rank used and produced (collective: every rank runs it)."""
    from safetensors.torch import save_file

    from hellora_trl.distributed import gathered_adapter_state

    rank = trainer.accelerator.process_index
    model = trainer.model_wrapped
    model.eval()
    with torch.no_grad():
        logits = model(**fixed_batch(tokenizer)).logits.float().cpu()
    state = gathered_adapter_state(trainer.model)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out / f"rank{rank}.safetensors"))
    profile = trainer.hellora_profile
    info = {
        "rank": rank,
        "world_size": trainer.accelerator.num_processes,
        "distributed_type": str(trainer.accelerator.distributed_type),
        "hot_experts": trainer.hellora_hot_experts,
        "model_hot_experts": trainer.hot_experts,
        "counts": profile.counts.tolist(),
        "tokens_seen": profile.tokens_seen,
        "profile_source": profile.source,
        "adapter_dtypes": sorted({str(p.dtype) for n, p in trainer.model.named_parameters() if "lora_" in n}),
        "losses": {int(log["step"]): log["loss"] for log in trainer.state.log_history if "loss" in log},
        "logits": logits.tolist(),
        "fsdp_units": _fsdp_units(trainer.model),
        "zero3_leaf_blocks": _zero3_leaves(trainer.model),
        "expert_factor_local_shapes": _expert_factor_local_shapes(trainer.model),
        **extra,
    }
    (out / f"rank{rank}.json").write_text(json.dumps(info))


def _fsdp_units(model) -> list[str]:
    """Class names of the modules FSDP2 wrapped (fully_shard turns them into FSDPModule subclasses)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover
        return []
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, FSDPModule)})


def _expert_factor_local_shapes(model) -> dict[str, list[int]]:
    """Shape of each rank's own piece of the expert-LoRA factors (FSDP2 shards dim 0, ZeRO-3 flattens)."""
    shapes = {}
    for name, param in model.named_parameters():
        if ".experts.lora_" in name:
            local = param.to_local() if hasattr(param, "to_local") else param.data
            shapes[name] = list(local.shape)
    return shapes


def _zero3_leaves(model) -> list[str]:
    return [name for name, m in model.named_modules() if getattr(m, "_z3_leaf", False)]


if __name__ == "__main__":
    main()
