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
from .ops import RowGroups, grouped_mm, grouped_mm_available, grouped_mm_loop, grouped_outer

__all__ = [
    "EXPERT_PATHS",
    "FUSABLE_IMPLEMENTATIONS",
    "HotExpertLoraLayer",
    "RouterLoraLayer",
    "RowGroups",
    "expert_factor_shapes",
    "experts_implementation",
    "grouped_mm",
    "grouped_mm_available",
    "grouped_mm_loop",
    "grouped_outer",
]
