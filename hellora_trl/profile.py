"""The routing profile record: per-layer token->expert counts and where they came from, with its JSON format.

Apart from the act of measuring (:mod:`hellora_trl.profiling`) and of choosing (:mod:`hellora_trl.selection`), so
both can depend on it and tools that only read profiles (reports, ``hellora select``) need neither.
"""

from __future__ import annotations

import json
import operator
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch
from torch import nn

from .registry import find_moe_layers
from .utils import atomic_write_text, unwrap_model

PROFILE_FORMAT_VERSION = 1
HotMap = dict[str, list[int]]  # experts module name -> sorted hot expert ids


def check_k(k: Any, num_experts: int) -> int:
    """A hot-set size must be an integer in [1, num_experts]; returns it as an ``int``.

    Any integer type counts (``numpy.int64``, a 0-d integer tensor); ``bool``, floats and strings do not."""
    try:
        value = None if isinstance(k, bool) else operator.index(k)
    except TypeError:
        value = None
    if value is None or value < 1 or value > num_experts:
        raise ValueError(f"k must be an integer in [1, {num_experts}] (the number of experts), got {k!r}.")
    return value


def rank_experts(counts: torch.Tensor, descending: bool = True) -> torch.Tensor:
    """Expert ids ordered by count; a stable sort keeps ties in index order (lower index first)."""
    key = -counts if descending else counts
    return torch.sort(key, dim=-1, stable=True).indices


@dataclass
class ExpertProfile:
    """Token->expert assignment counts, (num_layers x num_experts) int64, plus where they came from."""

    counts: torch.Tensor
    layer_names: list[str]
    num_experts: int
    experts_per_token: int
    family: str = "unknown"
    tokens_seen: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    has_shared_experts: bool = False

    def __post_init__(self) -> None:
        self.counts = torch.as_tensor(self.counts, dtype=torch.int64).cpu()
        if self.counts.dim() != 2:
            raise ValueError(f"Profile counts must be 2-D (layers x experts), got shape {tuple(self.counts.shape)}.")
        if self.counts.shape != (len(self.layer_names), self.num_experts):
            raise ValueError(
                f"Profile counts have shape {tuple(self.counts.shape)} but there are {len(self.layer_names)} layer "
                f"names and num_experts={self.num_experts}."
            )
        if (self.counts < 0).any():
            raise ValueError("Profile counts must be non-negative.")

    # ------------------------------------------------------------------------------------------ views
    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def shares(self) -> torch.Tensor:
        """Per-layer share of assignments per expert (rows sum to 1 where the layer saw tokens)."""
        totals = self.counts.sum(dim=1, keepdim=True).clamp_min(1)
        return self.counts.double() / totals

    def top_k(self, k: int) -> HotMap:
        """Per-layer top-k experts by count, ties to the lower index (the ``layer`` selection)."""
        check_k(k, self.num_experts)
        return {name: sorted(rank_experts(self.counts[i])[:k].tolist()) for i, name in enumerate(self.layer_names)}

    def concentration(self, k: int | None = None) -> list[float]:
        """Share of each layer's assignments taken by its top-k experts (uniform routing gives k/E)."""
        k = k or self.experts_per_token
        check_k(k, self.num_experts)
        top = torch.sort(self.counts, dim=1, descending=True, stable=True).values[:, :k]
        totals = self.counts.sum(dim=1).clamp_min(1)
        return (top.sum(dim=1).double() / totals).tolist()

    def jaccard(self, other: "ExpertProfile", k: int | None = None) -> list[float]:
        """Per-layer Jaccard similarity of the two profiles' top-k hot sets."""
        mine, theirs = self._paired_hot_sets(other, k)
        return [len(a & b) / max(len(a | b), 1) for a, b in zip(mine, theirs)]

    def coverage(self, other: "ExpertProfile", k: int | None = None) -> list[float]:
        """Per-layer share of ``other``'s routing mass that lands on this profile's hot set."""
        mine, _ = self._paired_hot_sets(other, k)
        shares = other.shares()
        return [float(shares[i, sorted(hot)].sum()) for i, hot in enumerate(mine)]

    def _paired_hot_sets(self, other: "ExpertProfile", k: int | None) -> tuple[list[set], list[set]]:
        self._check_compatible(other)
        k = k or self.experts_per_token
        return (
            [set(v) for v in self.top_k(k).values()],
            [set(v) for v in other.top_k(k).values()],
        )

    def _check_compatible(self, other: "ExpertProfile") -> None:
        if self.layer_names != other.layer_names or self.num_experts != other.num_experts:
            raise ValueError(
                "Profiles describe different models: "
                f"{self.num_layers} layers x {self.num_experts} experts vs "
                f"{other.num_layers} layers x {other.num_experts} experts (or different layer names)."
            )

    def merge(self, other: "ExpertProfile") -> "ExpertProfile":
        """Sum of two profiles of the same model (e.g. two data shards)."""
        self._check_compatible(other)
        return ExpertProfile(
            counts=self.counts + other.counts,
            layer_names=list(self.layer_names),
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            family=self.family,
            tokens_seen=self.tokens_seen + other.tokens_seen,
            source={"merged": [self.source, other.source]},
            has_shared_experts=self.has_shared_experts,
        )

    def check_matches(self, model: nn.Module) -> None:
        """Raise a clear error when this profile was not taken on (a model shaped like) ``model``."""
        layers = find_moe_layers(unwrap_model(model))
        names = [layer.name for layer in layers]
        if names != self.layer_names:
            raise ValueError(
                f"Profile does not match the model: the profile has {self.num_layers} MoE layers "
                f"({self.layer_names[:2]}...), the model has {len(names)} ({names[:2]}...). Profile the model "
                "again, or pass the profile taken on this architecture."
            )
        bad = [layer.name for layer in layers if layer.num_experts != self.num_experts]
        if bad:
            raise ValueError(
                f"Profile has {self.num_experts} experts per layer but the model's layers {bad[:3]} have "
                f"{layers[0].num_experts}."
            )

    # ------------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "hellora_trl.ExpertProfile",
            "version": PROFILE_FORMAT_VERSION,
            "family": self.family,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "has_shared_experts": self.has_shared_experts,
            "tokens_seen": self.tokens_seen,
            "layer_names": self.layer_names,
            "counts": self.counts.tolist(),
            "source": self.source,
        }

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Atomic JSON. ``extra`` (e.g. the selected hot map) is stored alongside and ignored by ``load``."""
        data = self.to_dict()
        if extra:
            data.update(extra)
        return atomic_write_text(path, json.dumps(data, indent=1))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExpertProfile":
        if not isinstance(data, Mapping) or data.get("format") != "hellora_trl.ExpertProfile":
            raise ValueError("Not a hellora_trl expert profile (missing format marker).")
        version = data.get("version", PROFILE_FORMAT_VERSION)
        if isinstance(version, bool) or not isinstance(version, int) or not 1 <= version <= PROFILE_FORMAT_VERSION:
            raise ValueError(
                f"Unsupported profile format version {version!r}: this hellora_trl reads version "
                f"{PROFILE_FORMAT_VERSION} (a newer release wrote it?)."
            )
        try:
            counts = torch.tensor(data["counts"])
            if counts.numel() == 0:  # torch reads [] as float32: say what is wrong, not "NaN or 1.5"
                raise ValueError(f"counts is empty (shape {tuple(counts.shape)}): the profile holds no MoE layer or "
                                 "no expert; profile the model again (hellora profile)")
            if counts.dtype.is_floating_point or counts.dtype == torch.bool or counts.dtype.is_complex:
                raise ValueError(f"counts must be whole numbers (got {counts.dtype} values, e.g. NaN or 1.5)")
            return cls(
                counts=counts.to(torch.int64),
                layer_names=list(data["layer_names"]),
                num_experts=int(data["num_experts"]),
                experts_per_token=int(data["experts_per_token"]),
                family=data.get("family", "unknown"),
                tokens_seen=int(data.get("tokens_seen", 0)),
                source=dict(data.get("source", {})),
                has_shared_experts=bool(data.get("has_shared_experts", False)),
            )
        except (KeyError, TypeError, ValueError, RuntimeError, OverflowError) as err:
            raise ValueError(f"Invalid expert profile: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertProfile":
        return cls.load_with_extra(path)[0]

    @classmethod
    def load_with_extra(cls, path: str | os.PathLike) -> tuple["ExpertProfile", dict[str, Any]]:
        """The profile and the whole JSON record, so fields saved with it (``hot_experts``...) need no second read."""
        path = Path(path)
        if path.is_dir():  # FileNotFoundError: the file asked for is not there (callers report both alike)
            raise FileNotFoundError(
                f"Expert profile {path} is a directory, not a file; pass the profile JSON in it "
                f"(e.g. {path / 'hellora_profile.json'})."
            )
        if not path.is_file():
            raise FileNotFoundError(f"Expert profile not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except UnicodeDecodeError as err:
            raise ValueError(f"Expert profile {path} is not UTF-8 JSON text ({err}). Re-run profiling.") from err
        except json.JSONDecodeError as err:
            raise ValueError(f"Expert profile {path} is not valid JSON ({err}). Re-run profiling.") from err
        try:
            return cls.from_dict(data), data
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def __repr__(self) -> str:
        return (
            f"ExpertProfile(family={self.family!r}, layers={self.num_layers}, experts={self.num_experts}, "
            f"top_k={self.experts_per_token}, tokens_seen={self.tokens_seen})"
        )
