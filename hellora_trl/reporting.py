"""Figures of routing profiles: where the experts work, and what profiling cost."""

from __future__ import annotations

from pathlib import Path
from typing import Mapping, Sequence

from .profiling import ExpertProfile
from .selection import HotMap


def _pyplot():
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("Plots need matplotlib: pip install 'hellora-trl[plots]'.") from err
    return plt


def _short(name: str) -> str:
    """'model.layers.12.mlp.experts' -> 'L12'."""
    digits = [part for part in name.split(".") if part.isdigit()]
    return f"L{digits[0]}" if digits else name


def plot_heatmap(
    profile: ExpertProfile, hot_experts: HotMap | None, path: str | Path, title: str | None = None
) -> Path:
    """Layers x experts share of routed tokens, hot experts boxed (the paper's Figures 5-7)."""
    plt = _pyplot()
    from matplotlib.patches import Rectangle

    shares = profile.shares().numpy()
    width = min(max(6.0, 0.18 * profile.num_experts + 2.5), 24.0)
    height = min(max(3.0, 0.35 * profile.num_layers + 1.5), 18.0)
    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
    fig.colorbar(image, ax=ax, label="share of the layer's routed tokens")
    for i, name in enumerate(profile.layer_names):
        for e in (hot_experts or {}).get(name, []):
            ax.add_patch(Rectangle((e - 0.5, i - 0.5), 1, 1, fill=False, edgecolor="red", linewidth=1.2))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer")
    ax.set_yticks(range(profile.num_layers), [_short(n) for n in profile.layer_names])
    ax.set_title(title or f"Expert activation ({profile.tokens_seen} tokens; hot experts boxed)")
    return _save(fig, path)


def plot_concentration(profiles: Mapping[str, ExpertProfile], k: int, path: str | Path) -> Path:
    """Per-layer share of routing taken by the top-k experts, against the uniform k/E line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4), dpi=100)
    num_experts = None
    for label, profile in profiles.items():
        values = profile.concentration(k)
        ax.plot(range(len(values)), values, marker="o", label=label)
        num_experts = profile.num_experts
    if num_experts:
        ax.axhline(k / num_experts, color="gray", linestyle="--", label=f"uniform (k/E = {k}/{num_experts})")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer index")
    ax.set_ylabel(f"share routed to top-{k}")
    ax.set_title(f"Routing concentration of the top-{k} experts per layer")
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def plot_overhead(seconds: Mapping[str, float], path: str | Path) -> Path:
    """Wall time of each phase of a run (profiling vs training), with its share of the total."""
    plt = _pyplot()
    labels = list(seconds)
    values = [float(seconds[label]) for label in labels]
    total = sum(values) or 1.0
    fig, ax = plt.subplots(figsize=(6, 2.8), dpi=100)
    bars = ax.barh(labels, values, color=["tab:orange", "tab:blue", "tab:green", "tab:gray"][: len(labels)])
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f}s ({100 * value / total:.1f}%)",
                va="center")
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(values) * 1.35 if values and max(values) > 0 else 1)
    ax.set_title("HELLoRA run time by phase")
    return _save(fig, path)


def plot_stability(fractions: Sequence[float], jaccard: Sequence[float], coverage: Sequence[float], path) -> Path:
    """Mean Jaccard and coverage of hot sets from warm-up slices vs the full-data profile (the paper's Table 10)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    xs = [100 * f for f in fractions]
    ax.plot(xs, jaccard, marker="o", label="Jaccard vs full data")
    ax.plot(xs, coverage, marker="s", label="coverage of full-data routing")
    ax.set_xscale("log")
    ax.set_xticks(xs, [f"{x:g}%" for x in xs])
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("warm-up fraction")
    ax.set_title("Hot-set stability vs warm-up fraction")
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _save(fig, path: str | Path) -> Path:
    import os
    import tempfile

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        fig.savefig(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
        fig.clf()
        import matplotlib.pyplot as plt

        plt.close(fig)
    return path
