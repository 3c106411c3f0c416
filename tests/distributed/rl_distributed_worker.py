"""One rank of the 2-process DDP test of HELLoRADPOTrainer / HELLoRAGRPOTrainer (tests/test_rl_trainers.py).

Each rank writes its own file (``rank<i>.pt``: the adapter state, the profile counts, the hot map), so the test
reads files, never the interleaved stdout of the two ranks."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import torch
from datasets import Dataset


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kind", choices=["dpo", "grpo"], required=True)
    parser.add_argument("--out", required=True)
    opts = parser.parse_args()
    from hellora_trl import default_lora_config
    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.recipes.offline import build_tokenizer, tiny_moe_model
    from hellora_trl.rl_trainers import HELLoRADPOConfig, HELLoRADPOTrainer, HELLoRAGRPOConfig, HELLoRAGRPOTrainer

    common = dict(
        output_dir=opts.out, max_steps=2, per_device_train_batch_size=2, learning_rate=5e-3, save_strategy="no",
        report_to=[], use_cpu=True, seed=0, disable_tqdm=True, hellora_k=2, hellora_warmup_fraction=0.5,
        hellora_plots=False,
    )
    rows = synthetic_gsm8k(8, seed=0)
    tokenizer = build_tokenizer()
    model = tiny_moe_model("olmoe", seed=0)
    lora = default_lora_config(r=4, lora_alpha=8)
    if opts.kind == "dpo":
        pairs = Dataset.from_dict({"prompt": rows["prompt"], "chosen": rows["completion"],
                                   "rejected": [c + "0" for c in rows["completion"]]})
        trainer = HELLoRADPOTrainer(model=model, args=HELLoRADPOConfig(max_length=128, **common),
                                    train_dataset=pairs, processing_class=tokenizer, peft_config=lora)
    else:
        def length_reward(completions, **kwargs):
            return [float(len(c)) for c in completions]

        args = HELLoRAGRPOConfig(num_generations=2, max_completion_length=6, **common)
        trainer = HELLoRAGRPOTrainer(model=model, reward_funcs=length_reward, args=args,
                                     train_dataset=Dataset.from_dict({"prompt": rows["prompt"]}),
                                     processing_class=tokenizer, peft_config=lora)
    trainer.train()
    state = {n: p.detach().cpu().clone() for n, p in trainer.model.named_parameters() if "lora_" in n}
    rank = trainer.accelerator.process_index
    torch.save(
        {"adapter": state, "counts": trainer.hellora_profile.counts, "hot": trainer.hot_experts,
         "world": trainer.accelerator.num_processes},
        Path(opts.out) / f"rank{rank}.pt",
    )
    trainer.accelerator.wait_for_everyone()


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
