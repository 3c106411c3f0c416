"""How much do GRPO's hot sets depend on profiling the base policy's rollouts rather than the prompts alone?

On the lab model (or the tiny random OLMoE with --tiny) and the lab's arithmetic prompts, HELLoRAGRPOTrainer
profiles the same warm-up rows twice: ``hellora_profile_source='prompts'`` and ``'rollouts'`` (prompt + one sampled
completion of the base policy each). The per-layer Jaccard of the two top-k hot sets is reported, next to the
Jaccard of two rollout profiles with different sampling seeds (the noise floor of rollout profiling). docs/rl.md
records the numbers and the default chosen from them.

    python bench/rl_rollout_jaccard.py [--rows 64] [--k 4] [--max_completion_length 48] [--out bench/results/rl]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch


def profiles(model, tokenizer, prompts, *, k: int, max_completion_length: int, out: Path, seeds) -> dict:
    from hellora_trl.rl_trainers import HELLoRAGRPOConfig, HELLoRAGRPOTrainer

    def zero(completions, **kwargs):
        return [0.0] * len(completions)

    def profile(source: str, seed: int):
        args = HELLoRAGRPOConfig(
            output_dir=str(out / "run"), use_cpu=True, report_to=[], disable_tqdm=True, hellora_plots=False,
            hellora_k=k, hellora_warmup_fraction=1.0, hellora_profile_source=source, seed=seed,
            per_device_train_batch_size=8, num_generations=8, max_completion_length=max_completion_length,
            temperature=1.0,
        )
        trainer = HELLoRAGRPOTrainer(model=model, reward_funcs=zero, args=args, train_dataset=prompts,
                                     processing_class=tokenizer)
        torch.manual_seed(seed)
        return trainer.run_profiling()

    prompt_profile = profile("prompts", seeds[0])
    rollout_profiles = [profile("rollouts", s) for s in seeds]
    return {"prompts": prompt_profile, "rollouts": rollout_profiles}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=64)
    parser.add_argument("--k", type=int, default=None, help="hot experts per layer (default: experts per token)")
    parser.add_argument("--max_completion_length", type=int, default=48)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--tiny", action="store_true", help="the tiny random OLMoE instead of the lab model")
    parser.add_argument("--out", default="bench/results/rl")
    a = parser.parse_args(argv)
    from hellora_trl.recipes.lab.corpus import arithmetic_splits
    from hellora_trl.recipes.rl import grpo_rows

    start = time.perf_counter()
    if a.tiny:
        from hellora_trl.recipes.offline import build_tokenizer, tiny_moe_model

        model, tokenizer = tiny_moe_model("olmoe", seed=0), build_tokenizer()
    else:
        from hellora_trl.recipes.lab import load_lab_model

        model, tokenizer = load_lab_model("default")
    k = a.k or model.config.num_experts_per_tok
    _, held = arithmetic_splits(8, a.rows, seed=0)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    found = profiles(model, tokenizer, grpo_rows(held), k=k, max_completion_length=a.max_completion_length,
                     out=out, seeds=a.seeds)
    prompts, rollouts = found["prompts"], found["rollouts"]
    result = {
        "model": "tiny" if a.tiny else "lab:default",
        "rows": a.rows,
        "k": k,
        "num_experts": prompts.num_experts,
        "max_completion_length": a.max_completion_length,
        "seeds": a.seeds,
        "tokens": {"prompts": prompts.tokens_seen, "rollouts": rollouts[0].tokens_seen},
        "jaccard_prompts_vs_rollouts": [round(x, 4) for x in prompts.jaccard(rollouts[0], k)],
        "jaccard_rollouts_seed_vs_seed": (
            [round(x, 4) for x in rollouts[0].jaccard(rollouts[1], k)] if len(rollouts) > 1 else None
        ),
        "seconds": round(time.perf_counter() - start, 1),
    }
    (out / "rollout_jaccard.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        f"# GRPO profiling: prompts vs base-policy rollouts ({result['model']}, {a.rows} prompts, k={k} of "
        f"{result['num_experts']})",
        "",
        "| layer | Jaccard prompts vs rollouts | Jaccard rollouts seed vs seed |",
        "|---|---|---|",
    ]
    floor = result["jaccard_rollouts_seed_vs_seed"] or [None] * len(result["jaccard_prompts_vs_rollouts"])
    for i, (j, f) in enumerate(zip(result["jaccard_prompts_vs_rollouts"], floor)):
        lines.append(f"| {i} | {j} | {f} |")
    (out / "rollout_jaccard.md").write_text("\n".join(lines) + "\n")
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
