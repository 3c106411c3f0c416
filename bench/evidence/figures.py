"""Figures of the evidence report (bench/evidence/analyze.py draws them next to bench/results/evidence.md).

- ``evidence-share.png``: per (recipe, target), each arm's share S of the all-experts adapter's gain above the floor
  (result-token loss) against its parameter share P; the hot-k arms joined as the k-curve, the diagonal S = P is
  "as good as its parameters"; mean over models with the min-max range.
- ``evidence-small-data.png``: the small-data arm's held-out (solid) and training (dashed) result-token loss after
  every epoch, mean over runs, per target and regime.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Callable

HOT_ORDER = ("hot-k1", "hot-k2", "hot-k4", "hot-k8", "hot-k16", "hot-k32")
MARKED = ("random-k2", "random-weighted-k2", "cold-k2", "model-k2", "mass", "all-matched")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _label(ax, title: str, xlabel: str, ylabel: str, legend: int) -> None:
    ax.set_title(title, fontsize=9)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(ylabel, fontsize=8)
    ax.legend(fontsize=legend)


def _save(plt, fig, path: Path) -> Path:
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def share_points(table: dict, share: Callable[[dict, str], list[float]],
                 param_share: Callable[[dict, str], float | None]) -> dict[str, dict[str, float]]:
    """Arm -> {P, S mean, S min, S max, models} for every arm with both numbers."""
    out = {}
    for arm in (*HOT_ORDER, *MARKED):
        values, p = share(table, arm), param_share(table, arm)
        if values and p is not None:
            out[arm] = {"P": p, "S": statistics.fmean(values), "lo": min(values), "hi": max(values),
                        "models": len(values)}
    return out


def share_figure(points: dict[tuple, dict[str, dict[str, float]]], path: Path) -> Path | None:
    """One panel per (recipe, target) with any points; None (nothing written) when there are none."""
    panels = [(key, pts) for key, pts in sorted(points.items()) if pts]
    if not panels:
        return None
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.0), squeeze=False)
    for ax, ((recipe, target), pts) in zip(axes[0], panels):
        hot = [(a, pts[a]) for a in HOT_ORDER if a in pts]
        if hot:
            ax.errorbar([p["P"] for _, p in hot], [p["S"] for _, p in hot],
                        yerr=[[p["S"] - p["lo"] for _, p in hot], [p["hi"] - p["S"] for _, p in hot]],
                        marker="o", capsize=3, label="hot k (layer)")
            for arm, p in hot:
                ax.annotate(arm.replace("hot-", ""), (p["P"], p["S"]), textcoords="offset points", xytext=(4, 4),
                            fontsize=7)
        for i, arm in enumerate(MARKED):
            if arm in pts:
                p = pts[arm]
                nudge = (i - len(MARKED) / 2) * 0.006  # arms of equal P side by side, not on top of each other
                ax.errorbar([p["P"] + nudge], [p["S"]], yerr=[[p["S"] - p["lo"]], [p["hi"] - p["S"]]], marker="s",
                            linestyle="none", capsize=2, label=arm)
        ax.plot([0, 1], [0, 1], "k--", linewidth=0.8, label="S = P")
        ax.axhline(0, color="grey", linewidth=0.6)
        ax.axhline(1, color="grey", linewidth=0.6)
        models = max(p["models"] for p in pts.values())
        _label(ax, f"{recipe} / {target} ({models} models)", "parameter share P (expert adapter / all experts r=8)",
               "share S of the all-experts gain above the floor", legend=6)
    return _save(plt, fig, path)


def mean_curves(runs: list[dict[str, Any]], split: str) -> dict[tuple, dict[str, list[float]]]:
    """{(recipe, target, regime): {arm: mean result loss after each epoch}} of small-data runs, on ``split``
    (``held_out`` or ``train``), truncated to the shortest curve of the group."""
    groups: dict[tuple, dict[str, list[list[float]]]] = {}
    for r in runs:
        if r.get("regime") and r.get("curves"):
            curve = [p[split]["result"] for p in r["curves"]]
            groups.setdefault((r["recipe"], r["target"], r["regime"]), {}).setdefault(r["arm"], []).append(curve)
    out = {}
    for key, arms in groups.items():
        out[key] = {}
        for arm, curves in arms.items():
            width = min(len(c) for c in curves)
            out[key][arm] = [statistics.fmean(c[i] for c in curves) for i in range(width)]
    return out


def small_data_figure(runs: list[dict[str, Any]], path: Path) -> Path | None:
    held, train = mean_curves(runs, "held_out"), mean_curves(runs, "train")
    if not held:
        return None
    plt = _pyplot()
    keys = sorted(held)
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.8), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for i, arm in enumerate(sorted(held[key])):
            color = f"C{i}"
            ax.plot(range(len(held[key][arm])), held[key][arm], color=color, marker=".", label=f"{arm} held-out")
            ax.plot(range(len(train[key][arm])), train[key][arm], color=color, linestyle="--", linewidth=0.9,
                    label=f"{arm} train")
        _label(ax, " / ".join(key), "epoch", "result-token loss (nats)", legend=5)
    return _save(plt, fig, path)
