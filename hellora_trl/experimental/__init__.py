"""Features beyond the paper that have not earned a place in the core (TRL's ``experimental/`` rule: the core never
imports this package; a user opts in by importing from it).

* :mod:`hellora_trl.experimental.dynamic_rank` -- DR-LoRA-style rank growth for hot experts (docs/dynamic_rank.md).
* :mod:`hellora_trl.experimental.dynamic_rank_trainer` -- ``DynamicRankTrainer`` / ``DynamicRankConfig``: the
  ``HELLoRATrainer`` subclass that trains with it.
"""
