"""Features beyond the paper that have not earned a place in the core (TRL's ``experimental/`` rule: the core never
imports this package at module level; the trainer loads dynamic rank only when ``hellora_dynamic_rank=True``).

* :mod:`hellora_trl.experimental.dynamic_rank` -- DR-LoRA-style rank growth for hot experts (docs/dynamic_rank.md).
"""
