"""The expert-LoRA layer (PEFT tuner layers in :mod:`.layer`) and its numeric ops (:mod:`.ops`).

``hellora_trl.expert_lora`` stays the import path for both.
"""

from .layer import (
    EXPERT_PATHS,
    FUSABLE_IMPLEMENTATIONS,
    HotExpertLoraLayer,
    RouterLoraLayer,
    expert_factor_shapes,
    experts_implementation,
)
from .ops import (
    KERNEL_CALLS,
    RowGroups,
    grouped_mm,
    grouped_mm_available,
    grouped_mm_loop,
    grouped_outer,
    kernel_calls,
    lora_compute_dtype,
    reset_kernel_calls,
)

__all__ = [
    "EXPERT_PATHS",
    "FUSABLE_IMPLEMENTATIONS",
    "HotExpertLoraLayer",
    "KERNEL_CALLS",
    "RouterLoraLayer",
    "RowGroups",
    "expert_factor_shapes",
    "experts_implementation",
    "grouped_mm",
    "grouped_mm_available",
    "grouped_mm_loop",
    "grouped_outer",
    "kernel_calls",
    "lora_compute_dtype",
    "reset_kernel_calls",
]
