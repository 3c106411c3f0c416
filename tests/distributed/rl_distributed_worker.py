"""One rank of the 2-process DDP / ZeRO-3 tests of HELLoRADPOTrainer / HELLoRAGRPOTrainer (tests/test_rl_trainers.py).

Each rank writes its own file (``rank<i>.pt``: the gathered adapter state, this rank's own routing counts before the
all-reduce and the reduced ones after it, the hot map, the logits of a fixed batch), so the test reads files, never
the interleaved stdout of the two ranks. The final adapter is saved to ``--out/final`` (collective).

``--base DIR``: load the tiny OLMoE saved there with ``from_pretrained`` (under ZeRO-3's ``zero3_init_flag`` it is
then built partitioned, as a hub model would be); without it the model is built in memory.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from datasets import Dataset

torch.set_num_threads(1)


def fixed_batch(tokenizer) -> dict[str, torch.Tensor]:
    texts = ["Tom has 3 apples and buys 4 more. How many apples?", "What is 12 times 7?"]
    # right padding named here: GRPOTrainer leaves the tokenizer left-padding (it generates from the prompts)
    return dict(tokenizer(texts, return_tensors="pt", padding=True, padding_side="right"))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["dpo", "grpo"], required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--strategy", default="ddp", choices=["ddp", "zero3"])
    parser.add_argument("--base", default=None)
    parser.add_argument("--source", default=None, help="hellora_profile_source (GRPO default: rollouts under DDP, "
                        "prompts under ZeRO-3)")
    opts = parser.parse_args()
    import hellora_trl.profiling as profiling
    from distributed_harness import apply_cpu_switches
    from hellora_trl import default_lora_config
    from hellora_trl.distributed import end_distributed, gathered_adapter_state
    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.recipes.offline import build_tokenizer, tiny_moe_model
    from hellora_trl.rl_trainers import HELLoRADPOConfig, HELLoRADPOTrainer, HELLoRAGRPOConfig, HELLoRAGRPOTrainer
    from hellora_trl.utils import has_zero3_params

    # What the profile all-reduce receives (this rank's counts) and returns (the sum), recorded per rank.
    seen: dict[str, torch.Tensor] = {}
    reduce = profiling.all_reduce_sum

    def recording_reduce(tensor):
        seen["local"] = tensor.detach().clone()
        seen["reduced"] = reduce(tensor).detach().clone()
        return seen["reduced"]

    profiling.all_reduce_sum = recording_reduce

    common = dict(
        output_dir=opts.out, max_steps=2, logging_steps=1, per_device_train_batch_size=2, learning_rate=5e-3, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, hellora_k=2, hellora_warmup_fraction=0.5,
        hellora_plots=False,
    )
    rows = synthetic_gsm8k(8, seed=0)
    lora = default_lora_config(r=4, lora_alpha=8)
    if opts.kind == "dpo":
        args = HELLoRADPOConfig(max_length=128, **common)
    else:
        # rollouts before training need the unsharded model, refused under ZeRO-3 (tested); prompts work everywhere
        source = opts.source or ("prompts" if opts.strategy == "zero3" else "rollouts")
        args = HELLoRAGRPOConfig(num_generations=2, max_completion_length=6, hellora_profile_source=source, **common)
    apply_cpu_switches(opts.strategy)
    if opts.base:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model = AutoModelForCausalLM.from_pretrained(opts.base, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(opts.base)
    else:
        model, tokenizer = tiny_moe_model("olmoe", seed=0), build_tokenizer()
    built_partitioned = has_zero3_params(model)
    if opts.kind == "dpo":
        pairs = Dataset.from_dict({"prompt": rows["prompt"], "chosen": rows["completion"],
                                   "rejected": [c + "0" for c in rows["completion"]]})
        trainer = HELLoRADPOTrainer(model=model, args=args, train_dataset=pairs, processing_class=tokenizer,
                                    peft_config=lora)
    else:
        def length_reward(completions, **kwargs):
            return [float(len(c)) for c in completions]

        try:
            trainer = HELLoRAGRPOTrainer(model=model, reward_funcs=length_reward, args=args,
                                         train_dataset=Dataset.from_dict({"prompt": rows["prompt"]}),
                                         processing_class=tokenizer, peft_config=lora)
        except ValueError as error:  # a refusal: recorded in this rank's own file, the run ends cleanly
            rank = int(os.environ.get("RANK", "0"))
            Path(opts.out).mkdir(parents=True, exist_ok=True)
            (Path(opts.out) / f"error{rank}.txt").write_text(str(error))
            end_distributed()
            return
    trainer.train()
    trainer.save_model(os.path.join(opts.out, "final"))
    wrapped = trainer.model_wrapped
    wrapped.eval()
    with torch.no_grad():
        logits = wrapped(**fixed_batch(tokenizer)).logits.float().cpu()
    state = gathered_adapter_state(trainer.model)  # collective under ZeRO-3
    rank = trainer.accelerator.process_index
    torch.save(
        {"adapter": state, "counts": trainer.hellora_profile.counts, "hot": trainer.hot_experts,
         "world": trainer.accelerator.num_processes, "local": seen.get("local"), "reduced": seen.get("reduced"),
         "distributed_type": str(trainer.accelerator.distributed_type), "built_partitioned": built_partitioned,
         "logits": logits, "steps": trainer.state.global_step,
         "rewards": [log["reward"] for log in trainer.state.log_history if "reward" in log]},
        Path(opts.out) / f"rank{rank}.pt",
    )
    trainer.accelerator.wait_for_everyone()
    end_distributed()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
