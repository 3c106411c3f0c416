"""Expert-count sweep of ``bench/step_throughput.py``: the same model with only the number of experts changing.

For each row (one expert count, or one real layer shape on a GPU) one process builds the frozen random model and
the skewed router (k favourites take about half of the assignments), then ``--runs`` times alternates the floor,
PEFT's all-experts LoRA, HELLoRA with every expert hot and HELLoRA k (k = experts per token) for ``--steps`` steps
(after ``--warmup``); each run gives each configuration's median step time and its ratio to that run's floor; the
table shows the median of those ratios over runs and their range. Peak memory comes from one step per
configuration (weights + buffers + optimizer state + the step's transient peak, as in the single-preset tables).

Profiling cost per row, alternated with the training steps of the same runs: forward-only profiling of one batch
(``profile_experts``), one LoRA warm-up step (every expert hot, routing counter attached) and the counter's own cost
(that step minus the uncounted all-hot step), as a share of a run that profiles a 10% slice (one warm-up epoch on
it) and trains one epoch: ``share = 0.1 t_profile / (0.1 t_profile + t_train)``. The counter's per-layer
histogram (E int64 per layer) is what the distributed warm-up all-reduces once per profile; its size is listed.

Written by ``step_throughput.main`` when ``--experts`` or ``--sweep`` is given:
``<out>/<name>.{md,json}`` and ``<out>/<name>.png`` (2 panels: step time x floor, peak memory x floor), rewritten
after every row so that a run stopped by a time limit keeps the rows it finished.
"""

from __future__ import annotations

import gc
import os
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Optional

import torch

from benchlib import (
    RESULTS_DIR,
    alternate,
    command_line,
    machine_info,
    machine_line,
    markdown_table,
    median,
    write_results,
)

from flop_bound import bound_of_row  # noqa: E402  (after benchlib: the bench folder's own modules)

CONFIGS = ("floor", "peft-all", "ours-all", "hellora-k")
PROFILE_FRACTION = 0.10

# The issue-22 CPU shape: OLMoE architecture, hidden 256, intermediate 128, 2 layers, top-8, batch 2 x 256.
SCALING_BASE = dict(hidden=256, intermediate=128, top_k=8, layers=2, batch=2, seq=256)
TINY_BASE = dict(hidden=64, intermediate=32, top_k=2, layers=2, batch=2, seq=32, rank=8, alpha=16)

# Named sweeps: (base shape name or None for presets listed by name, expert counts or preset names).
SWEEPS: dict[str, dict[str, Any]] = {
    "scaling": {"base": "scaling", "experts": (16, 64, 128, 256)},
    "tiny-scaling": {"base": "tiny", "experts": (4, 8, 16)},
    # Real layer shapes on a GPU: Qwen3-MoE (128 experts of 768) and a DeepSeek-V3-like layer (256 of 2048).
    "gpu-scaling": {"presets": ("qwen3-moe-2l-gpu", "deepseek-v3-like-1l-gpu")},
}


def parse_experts(text: str) -> list[int]:
    """``"16,64,128,256"`` -> [16, 64, 128, 256]; a one-line SystemExit on anything else."""
    try:
        values = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise SystemExit(f"--experts takes comma-separated integers such as 16,64,128,256; got {text!r}.") from None
    if not values or any(v < 2 for v in values):
        raise SystemExit(f"--experts needs expert counts of at least 2; got {text!r}.")
    if len(set(values)) != len(values):
        raise SystemExit(f"--experts lists an expert count twice: {text!r}.")
    return sorted(values)


def sweep_rows(args, presets: dict) -> list[tuple[str, Any]]:
    """(row label, Preset) per row of the sweep the arguments ask for."""
    from step_throughput import Preset

    if args.sweep:
        if args.sweep not in SWEEPS:
            raise SystemExit(f"Unknown --sweep {args.sweep!r}; choose from {sorted(SWEEPS)}.")
        spec = SWEEPS[args.sweep]
        if "presets" in spec:
            return [(name, presets[name]) for name in spec["presets"]]
        experts = list(spec["experts"]) if args.experts is None else parse_experts(args.experts)
        base = SCALING_BASE if spec["base"] == "scaling" else TINY_BASE
        return [(str(e), Preset(experts=e, **base)) for e in experts]
    experts = parse_experts(args.experts)
    names = args.preset.split(",")
    if len(names) != 1 or names[0] not in presets:
        raise SystemExit(f"--experts sweeps one base preset; got --preset {args.preset!r}.")
    base = presets[names[0]]
    if base.top_k > min(experts):
        raise SystemExit(f"--experts {min(experts)} is below the preset's top-{base.top_k}.")
    return [(str(e), replace(base, experts=e)) for e in experts]


def _range(values: list[float]) -> list[float]:
    return [min(values), max(values)] if values else [float("nan"), float("nan")]


def measure_row(label: str, preset, args) -> dict[str, Any]:
    """One row: ``args.runs`` alternated runs of the four configurations plus the profiling modes."""
    from hellora_trl import RoutingCounter, profile_experts
    from step_throughput import build_setups, memory_of, trainable

    if preset.device == "cuda" and not torch.cuda.is_available():
        return {"label": label, "experts": preset.experts, "skipped": "needs CUDA"}
    k = preset.top_k
    setups, info = build_setups(preset, ["skewed"], ["floor", "peft-all", "ours-all", "hellora"], args.seed,
                                args.skew_target, False, None)
    setups = [s for s in setups if not (s.kind == "hellora" and s.k != k)]
    by_kind = {("hellora-k" if s.kind == "hellora" else s.kind): s for s in setups}
    batch, routed = setups[0].batch, setups[0].routed
    counter = RoutingCounter(by_kind["ours-all"].model)
    ours_all_step = by_kind["ours-all"].step

    def counted_warmup():
        with counter:
            return ours_all_step()

    runs = {name: by_kind[name].step for name in CONFIGS}
    runs["profile-forward"] = lambda: profile_experts(routed, [batch], progress=False)
    runs["warmup-counted"] = counted_warmup
    alternate(runs, args.warmup, preset.device)
    per_run: dict[str, dict[str, list[float]]] = {name: {"wall": [], "cpu": []} for name in runs}
    for run in range(args.runs):
        timings = alternate(runs, args.steps, preset.device, f"E={label} run {run + 1}/{args.runs}")
        for name, t in timings.items():
            per_run[name]["wall"].append(median(t.wall))
            per_run[name]["cpu"].append(median(t.cpu))
    memory = {name: memory_of(by_kind[name], preset.device) for name in CONFIGS}
    floor_mem = memory["floor"]["peak_bytes"]
    configs = {}
    for name in CONFIGS + ("profile-forward", "warmup-counted"):
        entry: dict[str, Any] = {"step_s_runs": per_run[name]["wall"], "cpu_s_runs": per_run[name]["cpu"]}
        for clock, key in (("wall", "time_x"), ("cpu", "cpu_x")):
            ratios = [a / f for a, f in zip(per_run[name][clock], per_run["floor"][clock])]
            entry[key], entry[f"{key}_range"] = median(ratios), _range(ratios)
        if name in memory:
            entry.update(memory[name], mem_x=memory[name]["peak_bytes"] / floor_mem, trainable=trainable(by_kind[name].model))
        configs[name] = entry
    peft_over_ours = [p / o for p, o in zip(per_run["peft-all"]["wall"], per_run["hellora-k"]["wall"])]
    peft_over_ours_cpu = [p / o for p, o in zip(per_run["peft-all"]["cpu"], per_run["hellora-k"]["cpu"])]
    profiling = _profiling_shares(per_run)
    return {
        "label": label, "experts": preset.experts, "shape": asdict(preset), "configs": configs,
        "peft_over_hellora": median(peft_over_ours), "peft_over_hellora_range": _range(peft_over_ours),
        "peft_over_hellora_cpu": median(peft_over_ours_cpu),
        "profiling": profiling,
        "histogram_bytes": preset.layers * preset.experts * 8,
        "top_k_share": info["routers"]["skewed"]["top_k_share_per_layer"],
        "flop_bound": bound_of_row(asdict(preset), info["routers"]["skewed"]["top_k_share_per_layer"]),
    }


def _profiling_shares(per_run: dict[str, dict[str, list[float]]]) -> dict[str, float]:
    """Profiling time as a share of a run (10% slice profiled, one epoch trained), from CPU-time medians."""
    t = {name: median(v["cpu"]) for name, v in per_run.items()}
    f = PROFILE_FRACTION
    forward, warm, train = t["profile-forward"], t["warmup-counted"], t["hellora-k"]
    return {
        "fraction": f,
        "forward_s": forward, "warmup_s": warm, "train_s": train,
        "forward_share": f * forward / (f * forward + train),
        "warmup_share": f * warm / (f * warm + train),
        # the routing counter itself: a counted all-hot step over an uncounted one
        "counter_x": warm / t["ours-all"] if t["ours-all"] else float("nan"),
    }


def render(name: str, rows: list[dict[str, Any]], args, machine, command, load_end, figure: Optional[str]) -> str:
    done = [r for r in rows if "configs" in r]
    header = ["experts", "PEFT all-experts x floor", "ours all-experts x floor", "HELLoRA k x floor",
              "HELLoRA CPU-time x floor", "FLOP bound x floor", "PEFT / HELLoRA step", "HELLoRA peak memory x floor",
              "PEFT peak memory x floor"]

    def cell(c: dict[str, Any], key: str = "time_x") -> str:
        lo, hi = c[f"{key}_range"]
        return f"{c[key]:.2f} ({lo:.2f}-{hi:.2f})"

    table = markdown_table(header, (
        [r["label"], cell(r["configs"]["peft-all"]), cell(r["configs"]["ours-all"]), cell(r["configs"]["hellora-k"]),
         cell(r["configs"]["hellora-k"], "cpu_x"), f"{_flop_bound(r)['bound']:.3f}", f"{r['peft_over_hellora']:.2f}",
         f"{r['configs']['hellora-k']['mem_x']:.3f}", f"{r['configs']['peft-all']['mem_x']:.3f}"]
        for r in done
    ))
    prof = markdown_table(
        ["experts", "forward-only profiling share", "LoRA warm-up share", "counted warm-up step x uncounted",
         "histogram bytes (all layers)"],
        ([r["label"], f"{r['profiling']['forward_share']:.2%}", f"{r['profiling']['warmup_share']:.2%}",
          f"{r['profiling']['counter_x']:.3f}", f"{r['histogram_bytes']:,}"] for r in done),
    )
    shape = done[0]["shape"] if done else {}
    smoke = args.runs < 5 or args.steps < 5
    load_start = machine.get("load_avg_1m_at_start")
    lines = [
        f"### Expert-count sweep: `{name}`" + (" (SMOKE RUN: not a measurement)" if smoke else ""),
        "",
    ]
    if smoke:
        lines += [
            f"**Smoke run** ({args.runs} run(s) of {args.steps} steps) on a shared machine with load average "
            f"{load_start} at start and {load_end} at the end: it shows that the sweep runs, its step-time ratios are "
            "not valid measurements. Rerun on a quiet machine with `--runs 8 --steps 5`.",
            "",
        ]
    if shape:
        lines += [
            f"{shape['family']} architecture, hidden {shape['hidden']}, intermediate {shape['intermediate']}, "
            f"top-{shape['top_k']}, {shape['layers']} layers, batch {shape['batch']} x {shape['seq']}, {shape['dtype']} on "
            f"{shape['device']}, LoRA r={shape['rank']}; only the expert count changes. Skewed router (the k "
            f"favourites take about half of the assignments); HELLoRA k = {shape['top_k']}. Per run: median of "
            f"{args.steps} alternated steps after {args.warmup} warm-up; table: median over {args.runs} runs of each "
            "run's ratio to its floor (range in brackets). Wall-clock ratios first, process CPU-time ratios beside "
            "(less disturbed by other jobs). Peak memory from one step. FLOP bound: (the floor's GEMM FLOPs + the "
            "least the rank-r router and hot-expert LoRA must add, forward + backward, for this row's hot-expert "
            "share of assignments) / the floor's, the step-time ratio a FLOP-bound machine would show with the adapter "
            "computed in the fewest FLOPs (activation-space or folded-weight LoRA; `bench/flop_bound.py`, which also gives it at real layer "
            "shapes: `bench/results/flop-bound.md`).",
            "",
        ]
    lines += [table, "", f"Profiling cost (share of a run that profiles a {PROFILE_FRACTION:.0%} slice and trains "
              "one epoch; CPU-time medians):", "", prof, ""]
    skipped = [r for r in rows if "skipped" in r]
    if skipped:
        lines += [f"Not run: {', '.join(r['label'] + ' (' + r['skipped'] + ')' for r in skipped)}.", ""]
    if figure:
        lines += [f"![step time and memory vs experts]({figure})", ""]
    lines += [f"Command: `{command}`", "", f"Machine: {machine_line(machine)}; load average {load_end} at the end."]
    return "\n".join(lines)


def _flop_bound(row: dict[str, Any]) -> dict[str, float]:
    """The row's FLOP bound, computed from its shape and hot share when a results file predates the column."""
    return row.get("flop_bound") or bound_of_row(row["shape"], row["top_k_share"])


def plot(rows: list[dict[str, Any]], path: Path, title: str = "") -> Optional[Path]:
    """Two panels against the expert count: step time x floor (median, range as error bars), peak memory x floor."""
    done = [r for r in rows if "configs" in r]
    if not done:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from hellora_trl.utils import atomic_write

    experts = [r["experts"] for r in done]
    labels = {"floor": "floor (attention LoRA)", "peft-all": "PEFT all-experts", "ours-all": "ours all-experts",
              "hellora-k": "HELLoRA k"}
    fig, (ax_t, ax_m) = plt.subplots(1, 2, figsize=(10, 4))
    for name, label in labels.items():
        med = [r["configs"][name]["time_x"] for r in done]
        lo = [m - r["configs"][name]["time_x_range"][0] for m, r in zip(med, done)]
        hi = [r["configs"][name]["time_x_range"][1] - m for m, r in zip(med, done)]
        ax_t.errorbar(experts, med, yerr=[lo, hi], marker="o", capsize=3, label=label)
        ax_m.plot(experts, [r["configs"][name]["mem_x"] for r in done], marker="o", label=label)
    for ax, panel in ((ax_t, "step time x floor (median, range over runs)"), (ax_m, "peak memory x floor")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(experts, [str(e) for e in experts])
        ax.set_xlabel("experts per layer")
        ax.set_title(panel, fontsize=10)
        ax.grid(alpha=0.3)
    ax_t.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110))
    plt.close(fig)
    return path


def run_sweep(args, presets: dict, argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    """The sweep's results (None, with a message, when every row needs CUDA and there is none)."""
    import step_throughput

    rows_spec = sweep_rows(args, presets)
    if args.runs < 1 or args.steps < 1:
        raise SystemExit("--runs and --steps must be at least 1.")
    name = args.name or args.sweep or "scaling"
    device = rows_spec[0][1].device
    if device == "cuda" and not torch.cuda.is_available():
        print(f"[{name}] skipped: needs CUDA.")
        return None
    machine = machine_info(device)
    command = command_line(step_throughput.__file__, argv)
    out = Path(args.out or RESULTS_DIR)
    smoke = args.runs < 5 or args.steps < 5
    rows: list[dict[str, Any]] = []

    def publish() -> tuple[str, dict[str, Any], Optional[str]]:
        """Results of the rows so far (rewritten after every row, so a run killed by a time limit keeps them)."""
        load_end = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
        figure = None
        if not args.no_write and any("configs" in r for r in rows):
            note = f"SMOKE RUN ({args.runs} runs x {args.steps} steps, load average {load_end}): not a measurement"
            png = plot(rows, out / f"{name}.png", note if smoke else "")
            # README renders bench/results/*.md from the repository root: link the figure from there when it is ours.
            try:
                figure = str(png.resolve().relative_to(Path(step_throughput.__file__).resolve().parents[1]))
            except ValueError:
                figure = png.name
        markdown = render(name, rows, args, machine, command, load_end, figure)
        data = {"sweep": name, "command": command, "machine": machine, "load_avg_1m_at_end": load_end,
                "runs": args.runs, "steps": args.steps, "warmup": args.warmup, "smoke": smoke,
                "rows_planned": [label for label, _ in rows_spec], "rows": list(rows)}
        if not args.no_write:
            write_results(name, markdown, data, out)
        return markdown, data, figure

    for label, preset in rows_spec:
        rows.append(measure_row(label, preset, args))
        gc.collect()
        if device == "cuda":
            torch.cuda.empty_cache()
        publish()
    markdown, data, figure = publish()
    print(markdown, flush=True)
    if not args.no_write:
        print(f"wrote {out / (name + '.md')}, {out / (name + '.json')}" + (f" and {figure}" if figure else ""))
    return data


def rerender(json_path: Path) -> Path:
    """Rewrite ``<name>.{md,json}`` from an existing results file, adding what is computed rather than measured
    (the FLOP bound column); no step is timed again."""
    import json
    from types import SimpleNamespace

    data = json.loads(Path(json_path).read_text())
    for row in data["rows"]:
        if "configs" in row:
            row["flop_bound"] = _flop_bound(row)
    args = SimpleNamespace(runs=data["runs"], steps=data["steps"], warmup=data["warmup"])
    out = Path(json_path).parent
    png = out / f"{data['sweep']}.png"
    figure = png.name if png.exists() else None  # relative to the results file (render_readme rebases it)
    markdown = render(data["sweep"], data["rows"], args, data["machine"], data["command"], data["load_avg_1m_at_end"],
                      figure)
    write_results(data["sweep"], markdown, data, out)
    return out / f"{data['sweep']}.md"


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Re-render a sweep's results file (computed columns only).")
    parser.add_argument("--rerender", type=Path, required=True, help="a sweep's <name>.json")
    cli = parser.parse_args()
    if not cli.rerender.is_file():
        raise SystemExit(f"--rerender needs an existing sweep results file; {cli.rerender} is not one.")
    print(f"wrote {rerender(cli.rerender)}")
