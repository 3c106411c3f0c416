"""Names and enumerations shared by the whole package, in one torch-free place.

Configs (``choices``), the CLI, the Axolotl schema and the modules that implement each choice all read these
tuples, so a new strategy or file name is added once. Importing this module costs nothing (no torch, no PEFT).
"""

from __future__ import annotations

VERSION = "0.1.0"  # hellora_trl.__version__

# Hot-expert selection strategies (hellora_trl.selection): per-layer top-k (the paper), global top-k, bottom-k and
# seeded random (ablations), adaptive k by routing mass, seeded random weighted by routing counts (an ablation).
STRATEGIES = ("layer", "model", "cold", "random", "mass", "random_weighted")
# Where adapters go (paper's All / +Gate / Pure).
COMPONENTS = ("all", "router", "experts")
# How routing is profiled: the paper's LoRA warm-up, or forward passes only.
PROFILE_MODES = ("lora_warmup", "forward")
# Method variants on the hot placement (hellora_trl.variants).
VARIANTS = ("lora", "lori_d", "lori_s")
# LoRI-S magnitude threshold scopes.
SCOPES = ("global", "layer", "module")
# Dynamic rank's saliency routing term (hellora_trl.experimental.dynamic_rank).
DR_ROUTING = ("profile", "live", "none")
# Training recipes (hellora_trl.recipes.sft) and evaluation benchmarks (hellora_trl.recipes.eval).
# Families of the offline tiny random models (`--tiny`, hellora_trl.recipes.offline builds one config per name).
TINY_FAMILIES = ("olmoe", "mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "phimoe", "deepseek_v2", "deepseek_v3",
                 "gpt_oss")
TASKS = ("gsm8k", "codealpaca", "saferpaca", "sft")  # sft: any TRL-format dataset, passed through
EVAL_TASKS = ("gsm8k", "humaneval", "safety")
# Expert-LoRA layer paths (hellora_trl.expert_lora).
EXPERT_PATHS = ("auto", "fused", "split", "loop")

DEFAULT_DENSITY = 0.1  # LoRI-S: share of B entries kept
PEFT_PREFIX = "base_model.model."  # what PeftModel puts in front of the transformers model's names
HOT_KEY = "lora_hot_experts"  # the hot-expert buffer of an expert-LoRA layer (saved with the adapter)

# Files HELLoRA writes next to PEFT's.
PROFILE_FILE = "hellora_profile.json"
STAGING_DIR = ".hellora-staging"
HEATMAP_FILE = "hellora_expert_heatmap.png"
CONCENTRATION_FILE = "hellora_concentration.png"
OVERHEAD_FILE = "hellora_overhead.png"
VARIANT_FILE = "hellora_variant.json"
MASKS_FILE = "hellora_masks.safetensors"
RANKS_FILE = "hellora_dynamic_rank.json"
SUMMARY_FILE = "hellora_summary.json"
# Written into output_dir when a training run starts and removed when its final adapter is saved there: while it
# exists, the folder's adapter, profile and figures may come from different runs (an interrupted rerun).
RUN_MARKER_FILE = "hellora_run_in_progress.json"

# Generated held-out problems use the run's seed plus this offset, so they never repeat the training problems.
HELD_OUT_SEED_OFFSET = 10_000
