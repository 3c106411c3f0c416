"""Choosing the hot experts from a routing profile, and the one profile -> hot map -> record pipeline.

The trainer, the Axolotl plugin and ``hellora select`` all go through :func:`plan_hot_experts` and
:func:`save_plan`, so a stored hot map, ``min_k``/``max_k`` and the saved record mean the same everywhere.
"""

from __future__ import annotations

import logging
import numbers
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable

import torch

from .constants import STRATEGIES
from .profile import ExpertProfile, HotMap, check_k, rank_experts

logger = logging.getLogger(__name__)

__all__ = [
    "HotMap",
    "STRATEGIES",
    "SelectionSettings",
    "default_k",
    "load_plan",
    "plan_hot_experts",
    "save_plan",
    "select_hot_experts",
    "validate_hot_map",
]


def default_k(profile: ExpertProfile) -> int:
    """Experts per token (8 OLMoE, 2 Mixtral...), doubled for models with shared experts (DeepSeek-MoE)."""
    k = profile.experts_per_token * (2 if profile.has_shared_experts else 1)
    return min(k, profile.num_experts)


def _per_layer(profile: ExpertProfile, pick: Callable[[int, torch.Tensor], list[int]]) -> HotMap:
    return {name: sorted(int(e) for e in pick(i, profile.counts[i])) for i, name in enumerate(profile.layer_names)}


def _select_layer(profile: ExpertProfile, k: int, **_: Any) -> HotMap:
    return _per_layer(profile, lambda i, c: rank_experts(c)[:k].tolist())


def _select_cold(profile: ExpertProfile, k: int, **_: Any) -> HotMap:
    return _per_layer(profile, lambda i, c: rank_experts(c, descending=False)[:k].tolist())


def _select_model(profile: ExpertProfile, k: int, **_: Any) -> HotMap:
    top = rank_experts(profile.counts.sum(dim=0))[:k].tolist()
    return _per_layer(profile, lambda i, c: top)


def _select_random(profile: ExpertProfile, k: int, *, seed: int, **_: Any) -> HotMap:
    generator = torch.Generator().manual_seed(seed)
    return _per_layer(profile, lambda i, c: torch.randperm(profile.num_experts, generator=generator)[:k].tolist())


def _select_random_weighted(profile: ExpertProfile, k: int, *, seed: int, **_: Any) -> HotMap:
    """Per layer, k distinct experts drawn one after another with probability proportional to their counts among the
    experts not drawn yet (seeded; layers drawn in order from one generator). A layer with fewer than k experts that
    received any token is refused: a zero-count expert has probability 0, and filling the set with uniform picks
    would make the draw another strategy."""
    for name, counts in zip(profile.layer_names, profile.counts):
        used = int((counts > 0).sum())
        if used < k:
            raise ValueError(
                f"'random_weighted' selection draws k={k} experts by routing count, but layer {name!r} routed tokens "
                f"to only {used} of {profile.num_experts} experts; choose k <= {used} or another strategy."
            )
    generator = torch.Generator().manual_seed(seed)

    def pick(i: int, counts: torch.Tensor) -> list[int]:
        weights = counts.double().clone()
        chosen: list[int] = []
        for _ in range(k):
            cumulative = torch.cumsum(weights, 0)
            u = torch.rand((), generator=generator, dtype=torch.float64) * cumulative[-1]
            expert = int(torch.searchsorted(cumulative, u, right=True).clamp(max=len(weights) - 1))
            while weights[expert] == 0:  # u rounded up to the total: the last expert with weight
                expert -= 1
            chosen.append(expert)
            weights[expert] = 0.0
        return chosen

    return _per_layer(profile, pick)


def _select_mass(profile: ExpertProfile, k: int | None, *, mass: float, min_k: int, max_k: int, **_: Any) -> HotMap:
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}.")
    min_k, max_k = check_k(min_k, profile.num_experts), check_k(max_k, profile.num_experts)
    if min_k > max_k:
        raise ValueError(f"min_k ({min_k}) must not exceed max_k ({max_k}).")

    def pick(i: int, counts: torch.Tensor) -> list[int]:
        order = rank_experts(counts)
        total = counts.sum().item()
        cumulative = torch.cumsum(counts[order].double(), 0) / max(total, 1)
        needed = int(torch.searchsorted(cumulative, torch.tensor([mass], dtype=torch.float64) - 1e-12).item()) + 1
        return order[: min(max(needed, min_k), max_k)].tolist()

    return _per_layer(profile, pick)


# One entry per strategy; constants.STRATEGIES lists the same names for configs and the CLI (a test keeps them equal).
SELECTORS: dict[str, Callable[..., HotMap]] = {
    "layer": _select_layer,
    "model": _select_model,
    "cold": _select_cold,
    "random": _select_random,
    "mass": _select_mass,
    "random_weighted": _select_random_weighted,
}


def select_hot_experts(
    profile: ExpertProfile,
    k: int | None = None,
    strategy: str = "layer",
    *,
    seed: int = 0,
    mass: float = 0.5,
    min_k: int = 1,
    max_k: int | None = None,
) -> HotMap:
    """Map each MoE layer (experts module name) to its sorted hot expert ids.

    * ``layer``: per-layer top-k by count (the paper's default);
    * ``model``: the top-k of counts summed over layers, applied to every layer;
    * ``cold``: per-layer bottom-k (an ablation);
    * ``random``: k experts per layer drawn uniformly with ``seed`` (an ablation);
    * ``random_weighted``: k experts per layer drawn with ``seed`` without replacement, each draw with probability
      proportional to the experts' routing counts (an ablation: usage without the ranking); refuses a layer that
      routed tokens to fewer than k experts;
    * ``mass``: per layer, the smallest top set whose share of assignments reaches ``mass``, clipped to
      [``min_k``, ``max_k``] (an adaptive k per layer; ``k`` is ignored).
    """
    selector = SELECTORS.get(strategy)
    if selector is None:
        raise ValueError(f"Unknown selection strategy {strategy!r}; choose one of {STRATEGIES}.")
    E = profile.num_experts
    if strategy != "random" and int(profile.counts.sum()) == 0:
        raise ValueError(
            f"The profile has no routing counts (all zero, {profile.tokens_seen} tokens seen), so '{strategy}' "
            "selection has nothing to rank: the profiling recorded no routing. Profile again (and check that the "
            "model's family is supported)."
        )
    if strategy == "mass":
        if k is not None:
            logger.warning("HELLoRA: the 'mass' selection sizes each layer's hot set itself; k=%s is ignored.", k)
    else:
        k = check_k(default_k(profile) if k is None else k, E)
    return selector(profile, k, seed=seed, mass=mass, min_k=min_k, max_k=max_k if max_k is not None else E)


def validate_hot_map(hot_experts: HotMap, layer_names: list[str], num_experts: int) -> None:
    """Clear errors for a hot map that does not fit the model."""
    if not isinstance(hot_experts, dict):
        raise ValueError(f"A hot-expert map must be a dict of layer name -> expert ids, got {type(hot_experts).__name__}.")
    missing = [n for n in layer_names if n not in hot_experts]
    extra = [n for n in hot_experts if n not in layer_names]
    if missing or extra:
        raise ValueError(
            "The hot-expert map does not match the model's MoE layers: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unknown {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}. Keys must be the experts module names, e.g. {layer_names[0]!r}."
        )
    for name, ids in hot_experts.items():
        if not isinstance(ids, (list, tuple)) or len(ids) == 0:
            raise ValueError(f"Layer {name!r} has no hot experts (a list of expert ids); k must be >= 1.")
        whole = all(isinstance(e, numbers.Integral) and not isinstance(e, bool) for e in ids)
        if not whole or len(set(ids)) != len(ids) or any(not 0 <= e < num_experts for e in ids):
            raise ValueError(
                f"Layer {name!r}: hot experts {ids} must be distinct ids in [0, {num_experts}), as whole numbers."
            )


# ------------------------------------------------------------------------------------------------ the pipeline
@dataclass(frozen=True)
class SelectionSettings:
    """What decides a hot map, and what is recorded beside it (``components``/``variant`` are recorded only)."""

    k: int | None = None
    strategy: str = "layer"
    seed: int = 0
    mass: float = 0.5
    min_k: int = 1
    max_k: int | None = None
    reselect: bool = False
    components: str = "all"
    variant: str = "lora"

    @classmethod
    def from_args(cls, args: Any, seed: int | None = None) -> "SelectionSettings":
        """From any object with ``hellora_*`` attributes (``HELLoRAConfig``, the Axolotl args); missing ones keep
        their defaults. ``seed`` defaults to ``hellora_seed``, then ``seed``."""
        values = {}
        for name in ("k", "strategy", "mass", "min_k", "max_k", "reselect", "components", "variant"):
            key = "hellora_selection" if name == "strategy" else f"hellora_{name}"
            value = getattr(args, key, None)
            if value is not None:
                values[name] = value
        if seed is None:
            seed = getattr(args, "hellora_seed", None)
            seed = seed if seed is not None else getattr(args, "seed", 0)
        return cls(seed=int(seed), **values)

    def record(self, hot: HotMap, **extra: Any) -> dict[str, Any]:
        """The ``selection`` record saved with a profile: the settings plus the per-layer sizes actually chosen."""
        data = asdict(self)
        data.pop("reselect")
        data["mass"] = self.mass if self.strategy == "mass" else None
        data["per_layer_k"] = {name: len(ids) for name, ids in hot.items()}
        data.update(extra)
        return data


def plan_hot_experts(
    profile: ExpertProfile,
    settings: SelectionSettings,
    stored: HotMap | None = None,
    *,
    origin: str = "the profile",
) -> tuple[HotMap, dict[str, Any]]:
    """The hot map to train and its record: a ``stored`` map (``hellora select``, an earlier run) as is unless
    ``settings.reselect``; otherwise a fresh selection from the profile's counts."""
    if stored is not None and not settings.reselect:
        validate_hot_map(stored, profile.layer_names, profile.num_experts)
        sizes = sorted({len(ids) for ids in stored.values()})
        if settings.k is not None and sizes != [settings.k]:
            logger.warning(
                "HELLoRA: %s holds a hot map with %s experts per layer, not k=%d; using the stored map. "
                "Set hellora_reselect=True to select again from its counts.", origin, sizes, settings.k,
            )
        logger.info("HELLoRA: using the hot map stored in %s.", origin)
        return stored, settings.record(stored, stored_map=True)
    hot = select_hot_experts(
        profile,
        k=settings.k,
        strategy=settings.strategy,
        seed=settings.seed,
        mass=settings.mass,
        min_k=settings.min_k,
        max_k=settings.max_k,
    )
    return hot, settings.record(hot, stored_map=False)


def save_plan(profile: ExpertProfile, hot: HotMap, record: dict[str, Any], *paths: str | os.PathLike) -> list[Path]:
    """The profile with its hot map and selection record, atomically, to each path (one record shape)."""
    extra = {"hot_experts": hot, "selection": record}
    return [profile.save(path, extra=extra) for path in paths]


def load_plan(path: str | os.PathLike) -> tuple[ExpertProfile, HotMap | None, dict[str, Any]]:
    """A saved profile, its stored hot map (None when it has none) and its selection record ({} when none)."""
    profile, data = ExpertProfile.load_with_extra(path)
    return profile, data.get("hot_experts"), dict(data.get("selection") or {})
