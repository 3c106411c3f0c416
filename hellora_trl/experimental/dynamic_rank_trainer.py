"""``DynamicRankTrainer``: ``HELLoRATrainer`` whose hot experts grow their LoRA rank during training (experimental).

Opt in by choosing this trainer and its config, as with TRL's experimental trainers; the core trainer knows nothing
of dynamic rank::

    from hellora_trl.experimental.dynamic_rank_trainer import DynamicRankConfig, DynamicRankTrainer

    args = DynamicRankConfig(output_dir="out", hellora_dr_r_init=4, hellora_dr_r_budget=16)
    trainer = DynamicRankTrainer(model=model, args=args, train_dataset=data, processing_class=tokenizer)

The trainer adds a :class:`~hellora_trl.experimental.dynamic_rank.DynamicRankCallback` built from the
``hellora_dr_*`` fields and, on resume, restores the checkpoint's active ranks before training goes on. The
``hellora_dr_*`` fields are ``hellora_*`` fields, so they are part of the run fingerprint: resuming with other
growth settings is refused. See docs/dynamic_rank.md.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from ..config import HELLoRAConfig
from ..constants import DR_ROUTING
from ..trainer import HELLoRATrainer
from .dynamic_rank import DynamicRankCallback, restore_dynamic_rank

__all__ = ["DynamicRankConfig", "DynamicRankTrainer", "dynamic_rank_sizes"]


@dataclass
class DynamicRankConfig(HELLoRAConfig):
    """``HELLoRAConfig`` plus the ``hellora_dr_*`` settings of rank growth."""

    hellora_dr_r_init: int | None = field(
        default=None, metadata={"help": "Dynamic rank: initial active rank per hot expert (default max(1, r // 4))."}
    )
    hellora_dr_r_budget: int | None = field(
        default=None,
        metadata={
            "help": "Dynamic rank: average active rank per hot expert at the end of growth (default "
            "max(hellora_dr_r_init, r // 2): an explicit hellora_dr_r_init above r // 2 raises the default budget to it)."
        },
    )
    hellora_dr_interval: int = field(default=10, metadata={"help": "Dynamic rank: optimizer steps between growths."})
    hellora_dr_grow_step: int = field(default=1, metadata={"help": "Dynamic rank: components added per grant."})
    hellora_dr_grow_until: float = field(
        default=0.5, metadata={"help": "Dynamic rank: share of training after which ranks stop growing."}
    )
    hellora_dr_routing: str = field(
        default="profile",
        metadata={
            "choices": list(DR_ROUTING),
            "help": "Dynamic rank saliency routing term: 'profile' (the profiling counts), 'live' or 'none'.",
        },
    )

    def __post_init__(self) -> None:
        super().__post_init__()
        checks = [
            (self.hellora_variant != "lori_s", "dynamic rank cannot be combined with hellora_variant='lori_s' (both mask B)"),
            (self.hellora_dr_routing in DR_ROUTING, f"hellora_dr_routing must be one of {DR_ROUTING}"),
            (self.hellora_dr_interval >= 1 and self.hellora_dr_grow_step >= 1, "hellora_dr_interval/grow_step >= 1"),
            (0.0 < self.hellora_dr_grow_until <= 1.0, "hellora_dr_grow_until must be in (0, 1]"),
        ]
        for ok, message in checks:
            if not ok:
                raise ValueError(f"{message}.")


def dynamic_rank_sizes(args: DynamicRankConfig, r: int) -> tuple[int, int]:
    """(r_init, r_budget) for LoRA rank ``r``: the configured values or their defaults, checked against ``r``."""
    r_init = args.hellora_dr_r_init or max(1, r // 4)
    r_budget = args.hellora_dr_r_budget or max(r_init, r // 2)
    if not 1 <= r_init <= r_budget <= r:
        raise ValueError(
            f"Dynamic rank needs 1 <= hellora_dr_r_init <= hellora_dr_r_budget <= r={r}, got r_init={r_init}, "
            f"r_budget={r_budget}."
        )
    return r_init, r_budget


class DynamicRankTrainer(HELLoRATrainer):
    """``HELLoRATrainer`` + rank growth for hot experts; takes a :class:`DynamicRankConfig` (a ``HELLoRAConfig``
    or ``SFTConfig`` is converted, the ``hellora_dr_*`` fields at their defaults).

    ``callback_class`` builds the growth callback (a :class:`DynamicRankCallback` subclass, or a
    ``functools.partial`` of one with more options): a subclass of the trainer swaps the saliency or the optimizer
    warm start without touching the config."""

    config_class = DynamicRankConfig
    default_output_dir = "hellora-dynamic-rank"
    callback_class = DynamicRankCallback

    def __init__(self, model, *pos, **kwargs):
        super().__init__(model, *pos, **kwargs)
        r_init, r_budget = dynamic_rank_sizes(self.args, self.hellora_peft_config.r)
        self.dynamic_rank = self.callback_class(
            r_init,
            r_budget,
            interval=self.args.hellora_dr_interval,
            grow_step=self.args.hellora_dr_grow_step,
            grow_until=self.args.hellora_dr_grow_until,
            routing=self.args.hellora_dr_routing,
            profile=lambda: self.hellora_profile,
        )
        self.add_callback(self.dynamic_rank)

    def hellora_adapter_installed(self, peft_model, checkpoint: str | None) -> None:
        if checkpoint:
            restore_dynamic_rank(peft_model, checkpoint)  # the callback keeps restored ranks and grows from there
