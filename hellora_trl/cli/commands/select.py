"""``hellora select``: profile -> hot experts per layer, saved with the profile (the trainer's record); prints a table.

Goes through the same pipeline as the trainer and the Axolotl plugin: :class:`~hellora_trl.selection.SelectionSettings`
-> :func:`~hellora_trl.selection.plan_hot_experts` -> :func:`~hellora_trl.selection.save_plan`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

from ...constants import STRATEGIES
from ..arguments import TRAINER_SEED, ModelArguments, parse_command, require
from ..loading import source_of

DESCRIPTION = "Choose the hot experts of each MoE layer from a routing profile. Pass a model to check the profile fits it."


@dataclass
class SelectArguments:
    profile: str = field(default=None, metadata={"help": "Profile JSON (from `hellora profile` or a training run)."})
    output: str = field(
        default="hellora_hot_experts.json",
        metadata={"help": "Output: the profile with `hot_experts` and `selection` stored alongside (the trainer's "
                  "hellora_profile.json layout)."},
    )
    k: int | None = field(default=None, metadata={"help": "Hot experts per layer (default: experts per token, "
                                                          "doubled with shared experts)."})
    strategy: str = field(default="layer", metadata={"help": "Selection strategy.", "choices": list(STRATEGIES)})
    seed: int = field(default=TRAINER_SEED, metadata={"help": "Seed of the 'random' strategy."})
    mass: float = field(default=0.5, metadata={"help": "'mass': share of routing each layer's hot set covers."})
    min_k: int = field(default=1, metadata={"help": "'mass': smallest hot set."})
    max_k: int | None = field(default=None, metadata={"help": "'mass': largest hot set (default: all experts)."})

    def settings(self):
        """Always a fresh selection from the counts (a hot map already stored in the profile is replaced)."""
        from ...selection import SelectionSettings

        return SelectionSettings(k=self.k, strategy=self.strategy, seed=self.seed, mass=self.mass, min_k=self.min_k,
                                 max_k=self.max_k, reselect=True)


def hot_table(profile, hot: dict[str, list[int]]) -> str:
    """Per layer: how many experts are hot, which, and what share of that layer's routing they take."""
    from ...recipes.reporting import short_layer_name

    shares = profile.shares()
    lines = [f"{'layer':<8} {'k':>3} {'share':>6}  hot experts"]
    for i, name in enumerate(profile.layer_names):
        ids = hot[name]
        lines.append(f"{short_layer_name(name):<8} {len(ids):>3} {float(shares[i, ids].sum()):>6.1%}  "
                     f"{', '.join(map(str, ids))}")
    total = sum(float(shares[i, hot[n]].sum()) for i, n in enumerate(profile.layer_names)) / profile.num_layers
    lines.append(f"mean share of routing on hot experts: {total:.1%}")
    return "\n".join(lines)


def run(argv: Sequence[str]) -> int:
    from ...recipes.models import load_model
    from ...selection import load_plan, plan_hot_experts, save_plan

    args, model_args = parse_command("select", (SelectArguments, ModelArguments), argv, DESCRIPTION)
    profile, _, _ = load_plan(require(args.profile, "--profile", "the profile JSON to select from"))
    if model_args.given():
        profile.check_matches(load_model(source_of(model_args), meta=True))
    hot, record = plan_hot_experts(profile, args.settings(), origin=args.profile)
    (path,) = save_plan(profile, hot, {**record, "profile": args.profile}, args.output)
    print(hot_table(profile, hot))
    print(f"Wrote {path}")
    return 0
