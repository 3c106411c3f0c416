"""Figures and summaries of routing profiles: where the experts work, how stable the hot sets are, what profiling
cost. ``write_report`` bundles them (PNGs + a markdown summary) for ``hellora report``."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import torch

from ..plots import (  # noqa: F401  (the run figures live in the core; this module's API re-exports them)
    plot_concentration,
    plot_heatmap,
    plot_overhead,
    pyplot,
    save_figure,
    short_layer_name,
)
from ..profile import ExpertProfile, HotMap, check_k
from ..profiling import warmup_indices
from ..selection import default_k, select_hot_experts, validate_hot_map
from ..utils import atomic_write_text

PAPER_FRACTIONS = (0.01, 0.05, 0.1, 0.2, 0.5)


def plot_stability(
    fractions: Sequence[float],
    jaccard: Sequence[float],
    coverage: Sequence[float],
    path,
    ceiling: float | None = None,
) -> Path:
    """Mean Jaccard and coverage of hot sets from warm-up slices vs the full-data profile (the paper's Table 10).

    ``ceiling`` is the coverage of the full-data hot set itself: no warm-up slice can cover more.
    """
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    xs = [100 * f for f in fractions]
    ax.plot(xs, jaccard, marker="o", label="Jaccard vs full data")
    ax.plot(xs, coverage, marker="s", label="coverage of full-data routing")
    if ceiling is not None:
        ax.axhline(ceiling, color="gray", linestyle="--", label=f"coverage of the full-data hot set ({ceiling:.2f})")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.minorticks_off()
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("warm-up fraction")
    ax.set_ylabel("mean over MoE layers")
    ax.set_title("Hot-set stability vs warm-up fraction")
    ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def plot_jaccard_matrix(profiles: Mapping[str, ExpertProfile], k: int, path: str | Path) -> Path:
    """Task-vs-task overlap of the hot sets (mean Jaccard over layers): do two tasks want the same experts?"""
    plt = pyplot()
    labels = list(profiles)
    matrix = jaccard_matrix(profiles, k)
    side = min(max(4.5, 0.9 * len(labels) + 3.0), 16.0)
    label_inches = 0.085 * max(len(label) for label in labels)  # room for the row labels left of the matrix
    fig, ax = plt.subplots(figsize=(side + 1.0 + label_inches, side + 0.5 * label_inches), dpi=100)
    image = ax.imshow(matrix, cmap="magma", vmin=0.0, vmax=1.0)
    fig.colorbar(image, ax=ax, label="mean Jaccard over layers", fraction=0.046, pad=0.04)
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{value:.2f}", ha="center", va="center", color="black" if value > 0.6 else "white")
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_title(f"Hot-set overlap between profiles (top-{k} per layer)")
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------------ numbers
def _mean(values: Iterable[float]) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


def jaccard_matrix(profiles: Mapping[str, ExpertProfile], k: int) -> list[list[float]]:
    """Mean over layers of the Jaccard similarity of each pair's top-k hot sets (1.0 on the diagonal)."""
    items = list(profiles.values())
    return [[_mean(a.jaccard(b, k)) for b in items] for a in items]


def check_same_model(profiles: Mapping[str, ExpertProfile]) -> None:
    """Comparisons between profiles only mean something on one architecture: say which profile differs."""
    labels = list(profiles)
    first = profiles[labels[0]]
    for label in labels[1:]:
        other = profiles[label]
        if other.layer_names != first.layer_names or other.num_experts != first.num_experts:
            raise ValueError(
                f"Profiles {labels[0]!r} ({first.num_layers} layers x {first.num_experts} experts) and {label!r} "
                f"({other.num_layers} x {other.num_experts}) come from different models; compare profiles of one "
                "model only."
            )


# ------------------------------------------------------------------------------------------------ warm-up stability
def subset_profile(full: ExpertProfile, per_row: torch.Tensor, rows: Sequence[int], source: dict) -> ExpertProfile:
    """The profile of a subset of rows, built from per-row counts."""
    counts = per_row[list(rows)].sum(0).long()
    tokens = int(counts[0].sum()) // max(full.experts_per_token, 1)
    return dataclasses.replace(full, counts=counts, tokens_seen=tokens, source=dict(source))


def _stability_row(fraction: float, parts: Sequence[ExpertProfile], full: ExpertProfile, k: int) -> dict[str, Any]:
    jaccard = [_mean(p.jaccard(full, k)) for p in parts]
    coverage = [_mean(p.coverage(full, k)) for p in parts]
    return {
        "fraction": fraction,
        "tokens": _mean(p.tokens_seen for p in parts),
        "jaccard": _mean(jaccard),
        "coverage": _mean(coverage),
        "jaccard_min_layer": min(min(p.jaccard(full, k)) for p in parts),
        "rows": parts[0].source.get("rows"),
        "repeats": len(parts),
    }


def warmup_stability(
    full: ExpertProfile,
    per_row: torch.Tensor,
    fractions: Sequence[float] = PAPER_FRACTIONS,
    k: int | None = None,
    seeds: Sequence[int] = (42,),
) -> dict[str, Any]:
    """Jaccard and coverage of warm-up hot sets against the full-data hot set (the paper's Table 10).

    Each fraction takes the trainer's seeded slice (one per seed; results are averaged over seeds). Coverage is
    the share of full-data routing that lands on the warm-up hot set; ``ceiling`` is that of the full-data hot
    set itself.
    """
    k = k or default_k(full)
    rows = []
    for fraction in fractions:
        parts = []
        for seed in seeds:
            idx = warmup_indices(per_row.shape[0], fraction, seed)
            parts.append(subset_profile(full, per_row, idx, {"fraction": fraction, "seed": seed, "rows": len(idx)}))
        rows.append(_stability_row(fraction, parts, full, k))
    return {"k": k, "ceiling": _mean(full.concentration(k)), "full_tokens": full.tokens_seen, "rows": rows}


def stability_from_profiles(
    reference: ExpertProfile, labelled: Mapping[float, ExpertProfile], k: int | None = None
) -> dict[str, Any]:
    """Table 10 from profiles taken separately, each labelled with its warm-up fraction."""
    k = k or default_k(reference)
    rows = [_stability_row(f, [labelled[f]], reference, k) for f in sorted(labelled)]
    return {"k": k, "ceiling": _mean(reference.concentration(k)), "full_tokens": reference.tokens_seen, "rows": rows}


# ------------------------------------------------------------------------------------------------ the report
def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", label).strip("_") or "profile"


def _profile_row(label: str, profile: ExpertProfile, k: int, heatmap: Path, boxed: str) -> dict[str, Any]:
    k_eff = min(k, profile.num_experts)
    conc = profile.concentration(k_eff)
    return {
        "label": label,
        "family": profile.family,
        "layers": profile.num_layers,
        "experts": profile.num_experts,
        "experts_per_token": profile.experts_per_token,
        "tokens": profile.tokens_seen,
        "k": k_eff,
        "concentration_mean": _mean(conc),
        "concentration_min": min(conc),
        "concentration_max": max(conc),
        "uniform": k_eff / profile.num_experts,
        "heatmap": heatmap.name,
        "boxed": boxed,
    }


def _markdown(summary: dict[str, Any]) -> str:
    k, lines = summary["k"], ["# HELLoRA routing report", ""]
    lines += [f"Concentration, overlap and stability use the top-{k} experts per layer. Heatmaps box the hot map "
              "stored in the profile file when there is one, else the selection named in the table.", ""]
    lines += ["## Profiles", "", "| profile | family | MoE layers | experts | top-k/token | tokens | top-k share (mean, min-max) "
              "| uniform k/E | boxed in heatmap |", "|---|---|---|---|---|---|---|---|---|"]
    for p in summary["profiles"]:
        lines.append(
            f"| {p['label']} | {p['family']} | {p['layers']} | {p['experts']} | {p['experts_per_token']} | "
            f"{p['tokens']} | {p['concentration_mean']:.3f} ({p['concentration_min']:.3f}-{p['concentration_max']:.3f}) | "
            f"{p['uniform']:.3f} | {p['boxed']} |"
        )
    if summary.get("jaccard"):
        labels = [p["label"] for p in summary["profiles"]]
        lines += ["", "## Hot-set overlap (mean Jaccard over layers)", "", "| | " + " | ".join(labels) + " |",
                  "|---" * (len(labels) + 1) + "|"]
        lines += [f"| {a} | " + " | ".join(f"{v:.3f}" for v in row) + " |" for a, row in zip(labels, summary["jaccard"])]
    elif summary.get("jaccard_skipped"):
        lines += ["", f"Hot-set overlap skipped: {summary['jaccard_skipped']}"]
    stability = summary.get("stability")
    if stability:
        lines += ["", "## Warm-up stability against the full-data profile (paper Table 10)", "",
                  f"top-{stability['k']} per layer; full data: {stability['full_tokens']} tokens; coverage of the "
                  f"full-data hot set itself (ceiling): {stability['ceiling']:.3f}.", "",
                  "| warm-up fraction | tokens | Jaccard | worst layer Jaccard | coverage | repeats |", "|---|---|---|---|---|---|"]
        for r in stability["rows"]:
            lines.append(f"| {100 * r['fraction']:g}% | {r['tokens']:.0f} | {r['jaccard']:.3f} | {r['jaccard_min_layer']:.3f} | "
                         f"{r['coverage']:.3f} | {r['repeats']} |")
    lines += ["", "## Figures", ""] + [f"![{name}]({path})" for name, path in summary["figures"].items()]
    return "\n".join(lines) + "\n"


def write_report(
    profiles: Mapping[str, ExpertProfile],
    out_dir: str | Path,
    *,
    k: int | None = None,
    strategy: str = "layer",
    hot_maps: Mapping[str, HotMap] | None = None,
    stability: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Heatmap per profile (hot experts boxed), concentration, task-vs-task Jaccard and warm-up stability figures,
    plus ``report.md`` and ``report.json``; returns every file written by name.

    Boxes come from ``hot_maps[label]`` (e.g. the map stored by ``hellora select`` or the trainer), else from
    ``select_hot_experts(profile, k, strategy)``. ``k`` defaults to the first profile's family default.
    """
    if not profiles and not stability:
        raise ValueError("Nothing to report: give at least one profile or a stability table.")
    out = Path(out_dir)
    hot_maps = hot_maps or {}
    first = next(iter(profiles.values()), None)
    k = k or (default_k(first) if first is not None else stability["k"])
    if profiles:  # k may exceed a smaller model's E (clipped per profile), never every profile's
        check_k(k, max(p.num_experts for p in profiles.values()))
    figures: dict[str, Path] = {}
    rows = []
    for label, profile in profiles.items():
        hot, boxed = _boxes(profile, hot_maps.get(label), k, strategy)
        name = f"heatmap_{_slug(label)}"
        while name in {p.stem for p in figures.values()}:  # labels that differ only in punctuation
            name += "_"
        path = plot_heatmap(profile, hot, out / f"{name}.png",
                            title=f"{label}: expert activation ({profile.tokens_seen} tokens; hot experts boxed)")
        figures[f"heatmap {label}"] = path
        rows.append(_profile_row(label, profile, k, path, boxed))
    summary: dict[str, Any] = {"k": k, "strategy": strategy, "profiles": rows}
    if profiles:
        figures["concentration"] = _concentration(profiles, k, out / "concentration.png")
    if len(profiles) > 1:
        try:
            check_same_model(profiles)
            summary["jaccard"] = jaccard_matrix(profiles, k)
            figures["jaccard"] = plot_jaccard_matrix(profiles, k, out / "jaccard.png")
        except ValueError as err:
            summary["jaccard_skipped"] = str(err)
    if stability:
        summary["stability"] = stability
        rs = stability["rows"]
        figures["stability"] = plot_stability([r["fraction"] for r in rs], [r["jaccard"] for r in rs],
                                              [r["coverage"] for r in rs], out / "stability.png", ceiling=stability["ceiling"])
    summary["figures"] = {name: path.name for name, path in figures.items()}
    files = dict(figures)
    files["report.json"] = atomic_write_text(out / "report.json", json.dumps(summary, indent=1, default=str))
    files["report.md"] = atomic_write_text(out / "report.md", _markdown(summary))
    return files


def _boxes(profile: ExpertProfile, stored: HotMap | None, k: int, strategy: str) -> tuple[HotMap, str]:
    """The hot map to draw and a note saying where it came from."""
    if stored:
        validate_hot_map(stored, profile.layer_names, profile.num_experts)
        sizes = sorted({len(v) for v in stored.values()})
        ks = str(sizes[0]) if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]}"
        return stored, f"stored hot map (k={ks})"
    k_eff = min(k, profile.num_experts)
    return select_hot_experts(profile, k_eff, strategy), f"top-{k_eff} ({strategy})"


def _concentration(profiles: Mapping[str, ExpertProfile], k: int, path: Path) -> Path:
    """One concentration figure when all profiles share a model; otherwise k is clipped to the smallest E."""
    k_eff = min([k] + [p.num_experts for p in profiles.values()])
    return plot_concentration(profiles, k_eff, path)

