"""Choosing the hot experts from a routing profile."""

from __future__ import annotations

from typing import Callable

import torch

from .profiling import ExpertProfile, _check_k

HotMap = dict[str, list[int]]
STRATEGIES = ("layer", "model", "cold", "random", "mass")


def default_k(profile: ExpertProfile) -> int:
    """Experts per token (8 OLMoE, 2 Mixtral...), doubled for models with shared experts (DeepSeek-MoE)."""
    k = profile.experts_per_token * (2 if profile.has_shared_experts else 1)
    return min(k, profile.num_experts)


def _ranked(counts: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Expert ids ordered by count; a stable sort keeps ties in index order (lower index first)."""
    key = -counts if descending else counts
    return torch.sort(key, dim=-1, stable=True).indices


def _per_layer(profile: ExpertProfile, pick: Callable[[int, torch.Tensor], list[int]]) -> HotMap:
    return {name: sorted(int(e) for e in pick(i, profile.counts[i])) for i, name in enumerate(profile.layer_names)}


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
    * ``random``: k experts per layer drawn with ``seed`` (an ablation);
    * ``mass``: per layer, the smallest top set whose share of assignments reaches ``mass``, clipped to
      [``min_k``, ``max_k``] (an adaptive k per layer; ``k`` is ignored).
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"Unknown selection strategy {strategy!r}; choose one of {STRATEGIES}.")
    E = profile.num_experts
    if strategy == "mass":
        return _select_by_mass(profile, mass, min_k, max_k if max_k is not None else E)
    k = default_k(profile) if k is None else k
    _check_k(k, E)
    if strategy == "layer":
        return _per_layer(profile, lambda i, c: _ranked(c)[:k].tolist())
    if strategy == "cold":
        return _per_layer(profile, lambda i, c: _ranked(c, descending=False)[:k].tolist())
    if strategy == "model":
        top = _ranked(profile.counts.sum(dim=0))[:k].tolist()
        return _per_layer(profile, lambda i, c: top)
    generator = torch.Generator().manual_seed(seed)
    return _per_layer(profile, lambda i, c: torch.randperm(E, generator=generator)[:k].tolist())


def _select_by_mass(profile: ExpertProfile, mass: float, min_k: int, max_k: int) -> HotMap:
    if not 0.0 < mass <= 1.0:
        raise ValueError(f"mass must be in (0, 1], got {mass}.")
    _check_k(min_k, profile.num_experts)
    _check_k(max_k, profile.num_experts)
    if min_k > max_k:
        raise ValueError(f"min_k ({min_k}) must not exceed max_k ({max_k}).")

    def pick(i: int, counts: torch.Tensor) -> list[int]:
        order = _ranked(counts)
        total = counts.sum().item()
        cumulative = torch.cumsum(counts[order].double(), 0) / max(total, 1)
        needed = int(torch.searchsorted(cumulative, torch.tensor([mass], dtype=torch.float64) - 1e-12).item()) + 1
        return order[: min(max(needed, min_k), max_k)].tolist()

    return _per_layer(profile, pick)


def validate_hot_map(hot_experts: HotMap, layer_names: list[str], num_experts: int) -> None:
    """Clear errors for a hot map that does not fit the model."""
    missing = [n for n in layer_names if n not in hot_experts]
    extra = [n for n in hot_experts if n not in layer_names]
    if missing or extra:
        raise ValueError(
            "The hot-expert map does not match the model's MoE layers: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, unknown {extra[:3]}"
            f"{'...' if len(extra) > 3 else ''}. Keys must be the experts module names, e.g. {layer_names[0]!r}."
        )
    for name, ids in hot_experts.items():
        if len(ids) == 0:
            raise ValueError(f"Layer {name!r} has no hot experts; k must be >= 1.")
        if len(set(ids)) != len(ids) or any(not 0 <= int(e) < num_experts for e in ids):
            raise ValueError(f"Layer {name!r}: hot experts {ids} must be distinct ids in [0, {num_experts}).")
