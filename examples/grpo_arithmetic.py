"""HELLoRA GRPO on the lab model's held-out arithmetic (CPU, minutes): profile routing, adapt the hot experts only,
train with TRL's GRPOTrainer, and report a held-out number before vs after.

    accelerate launch examples/grpo_arithmetic.py                      # the lab model, fresh adapter
    accelerate launch examples/grpo_arithmetic.py --hellora_init_adapter outputs/sft_gsm8k_offline
    accelerate launch examples/grpo_arithmetic.py --config configs/olmoe_grpo.yaml   # a GPU recipe

Every field of TRL's GRPOConfig, the hellora_* fields and ModelConfig is accepted on the command line or in the YAML
(`--help` lists them); the same script is `hellora grpo`. What the run measures, and the shared code, is in
hellora_trl/recipes/rl.py; what is profiled and why, in docs/rl.md.

Outputs in --output_dir: the adapter, hellora_profile.json (profile + hot experts), the heatmap and profile figures,
and hellora_summary.json (before/after on the held-out rows, wall time).
"""

from hellora_trl.recipes.rl import main

if __name__ == "__main__":
    main("grpo")
