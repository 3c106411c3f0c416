"""The figures of a HELLoRA run: where the experts work (heatmap), how concentrated routing is, what profiling
cost. Drawn by the trainer after profiling and training, and by ``hellora report``.

matplotlib (the ``plots`` extra) is imported only when a figure is drawn; :func:`matplotlib_available` tells
without failing.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Mapping

from .profile import ExpertProfile, HotMap
from .utils import atomic_write

__all__ = [
    "matplotlib_available",
    "plot_concentration",
    "plot_heatmap",
    "plot_overhead",
    "pyplot",
    "save_figure",
    "short_layer_name",
]


def matplotlib_available() -> bool:
    """Whether matplotlib imports (a plain install has no ``plots`` extra)."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def pyplot():
    """matplotlib.pyplot on the Agg backend, or an ImportError that names the extra to install."""
    try:
        import matplotlib

        matplotlib.use("Agg", force=False)
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - exercised only without the extra
        raise ImportError("Plots need matplotlib: pip install 'hellora-trl[plots]'.") from err
    return plt


def short_layer_name(name: str) -> str:
    """'model.layers.12.mlp.experts' -> 'L12'."""
    digits = [part for part in name.split(".") if part.isdigit()]
    return f"L{digits[0]}" if digits else name


# ------------------------------------------------------------------------------------------------ figures
def plot_heatmap(
    profile: ExpertProfile, hot_experts: HotMap | None, path: str | Path, title: str | None = None
) -> Path:
    """Layers x experts share of routed tokens, hot experts boxed (the paper's Figures 5-7).

    The figure grows with the model (up to 24 x 18 in) and its fonts grow with it, so a 58-layer x 256-expert
    heatmap stays legible when shown at page width.
    """
    plt = pyplot()
    from matplotlib.patches import Rectangle

    shares = profile.shares().numpy()
    width = min(max(6.0, 0.18 * profile.num_experts + 2.5), 24.0)
    height = min(max(3.0, 0.35 * profile.num_layers + 1.5), 18.0)
    font = 10.0 * max(1.0, width / 12.0)
    row_points = 72.0 * 0.8 * height / profile.num_layers
    with plt.rc_context({"font.size": font}):
        fig, ax = plt.subplots(figsize=(width, height), dpi=100)
        image = ax.imshow(shares, aspect="auto", cmap="viridis", interpolation="nearest")
        fig.colorbar(image, ax=ax, label="share of the layer's routed tokens", fraction=min(0.15, 1.5 / width), pad=0.02)
        edge = max(1.2, min(2.0, 0.2 * 72.0 * 0.85 * width / profile.num_experts))
        for i, name in enumerate(profile.layer_names):
            for e in (hot_experts or {}).get(name, []):  # inset, so neighbouring hot experts stay separate boxes
                ax.add_patch(Rectangle((e - 0.45, i - 0.45), 0.9, 0.9, fill=False, edgecolor="red", linewidth=edge))
        ax.set_xlabel("expert")
        ax.set_ylabel("MoE layer")
        ax.set_yticks(range(profile.num_layers), [short_layer_name(n) for n in profile.layer_names])
        ax.tick_params(axis="y", labelsize=min(font, 0.75 * row_points))
        ax.set_title(title or f"Expert activation ({profile.tokens_seen} tokens; hot experts boxed)")
        return save_figure(fig, path)


def plot_concentration(profiles: Mapping[str, ExpertProfile], k: int, path: str | Path) -> Path:
    """Per-layer share of routing taken by the top-k experts, against the uniform k/E line."""
    plt = pyplot()
    outside = len(profiles) > 2  # many lines: a legend inside would hide some of them
    fig, ax = plt.subplots(figsize=(9.5 if outside else 7, 4), dpi=100)
    for label, profile in profiles.items():
        values = profile.concentration(k)
        ax.plot(range(len(values)), values, marker="o", label=label)
    for num_experts in sorted({p.num_experts for p in profiles.values()}):
        ax.axhline(k / num_experts, color="gray", linestyle="--", label=f"uniform (k/E = {k}/{num_experts})")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("MoE layer index")
    ax.set_ylabel(f"share routed to top-{k}")
    ax.set_title(f"Routing concentration of the top-{k} experts per layer")
    if outside:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    else:
        ax.legend(loc="best", fontsize=8)
    return save_figure(fig, path)


def plot_overhead(seconds: Mapping[str, float], path: str | Path, note: str | None = None) -> Path:
    """Wall time of each phase of a run (profiling vs training), with its share of the total.

    ``note`` (what each number measures) is printed under the bars. The exact values are also stored in the PNG's
    text chunk ``hellora_seconds`` (JSON), so a reader can check the figure against ``hellora_summary.json``."""
    plt = pyplot()
    labels = list(seconds)
    values = [float(seconds[label]) for label in labels]
    total = sum(values) or 1.0
    fig, ax = plt.subplots(figsize=(6, 3.4 if note else 2.8), dpi=100)
    bars = ax.barh(labels, values, color=["tab:orange", "tab:blue", "tab:green", "tab:gray"][: len(labels)])
    for bar, value in zip(bars, values):
        ax.text(bar.get_width(), bar.get_y() + bar.get_height() / 2, f" {value:.1f}s ({100 * value / total:.1f}%)",
                va="center")
    ax.set_xlabel("seconds")
    ax.set_xlim(0, max(values) * 1.35 if values and max(values) > 0 else 1)
    ax.set_title("HELLoRA run time by phase")
    if note:
        import textwrap

        fig.text(0.01, 0.01, textwrap.fill(note, 100), fontsize=6.5, va="bottom", ha="left", color="dimgray")
        fig.tight_layout(rect=(0, 0.16, 1, 1))
    metadata = {"hellora_seconds": json.dumps(dict(zip(labels, values)))}
    if note:
        metadata["Description"] = note
    return save_figure(fig, path, metadata=metadata, layout=not note)


def save_figure(fig, path: str | Path, metadata: Mapping[str, str] | None = None, layout: bool = True) -> Path:
    """Save a figure atomically (readers never see half a PNG) and free it; ``metadata`` goes into the PNG's text
    chunks (``PIL.Image.open(path).text``). ``layout=False``: the caller has laid the figure out already."""
    if layout:
        fig.tight_layout()
    try:
        return atomic_write(path, lambda target: fig.savefig(target, **({"metadata": dict(metadata)} if metadata else {})))
    finally:
        fig.clf()
        import matplotlib.pyplot as plt

        plt.close(fig)
