"""Where HELLoRA's step time above the attention-only floor goes, and which of it grows with the expert count.

For each expert count E, one process builds the issue-22 shape (OLMoE architecture, hidden 256, intermediate 128,
2 layers, top-8, batch 2 x 256, float32, skewed router) with two adapters on the same frozen base: the floor
(LoRA r=32 on attention) and HELLoRA k=8 (``apply_hellora``'s defaults: attention + router + 8 hot experts per
layer). Each configuration runs ``--steps`` training steps (forward + backward + fused AdamW) under
``torch.profiler`` (CPU activities) after ``--warmup`` unprofiled ones. Per operator: self CPU time per step, its
share of the step, and the difference HELLoRA minus floor. Across E: the operators whose per-step self time in
HELLoRA grows by more than ``--growth`` from the smallest to the largest E, and what the layer's own
(``HotExpertLoraLayer`` / ``RouterLoraLayer``) operators cost.

Self CPU time under the profiler is distorted by the profiler itself and by other jobs on a shared machine:
read shares and differences, not absolute times. Operator *counts* per step are exact.

    python bench/profile_hot_path.py --experts 16,256     # writes bench/results/profile-hot-path.{md,json}
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import command_line, machine_info, machine_line, markdown_table, median, write_results  # noqa: E402
from scaling_sweep import SCALING_BASE, TINY_BASE, parse_experts  # noqa: E402
from step_throughput import (  # noqa: E402
    Preset,
    attach,
    build_base,
    calibrate_skew,
    hot_maps,
    make_optimizer,
    make_step,
    shared_copy,
)

# The issue-22 shape (the scaling sweep's): only the expert count changes.
SCALING_SHAPE, TINY_SHAPE = SCALING_BASE, TINY_BASE


def scaling_preset(experts: int, tiny: bool = False) -> Preset:
    return Preset(experts=experts, **(TINY_SHAPE if tiny else SCALING_SHAPE))


def op_table(step) -> dict[str, dict[str, float]]:
    """Per operator name: self CPU microseconds and calls of one profiled call of ``step``."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], record_shapes=True, with_flops=True) as prof:
        step()
    return {e.key: {"self_us": e.self_cpu_time_total, "calls": e.count, "flops": e.flops} for e in prof.key_averages()}


def median_table(tables: list[dict[str, dict[str, float]]]) -> dict[str, dict[str, float]]:
    """Per operator, the median over profiled steps (an operator missing from a step counts 0): one step slowed
    down by another job on the machine moves a mean, not a median."""
    names = set().union(*tables)
    return {
        name: {key: median([t.get(name, {}).get(key, 0.0) for t in tables]) for key in ("self_us", "calls", "flops")}
        for name in names
    }


def profile_one(experts: int, steps: int, warmup: int, seed: int, tiny: bool) -> dict[str, Any]:
    """Floor and HELLoRA k stepped alternately, one profiled step each per round; per-operator medians."""
    preset = scaling_preset(experts, tiny)
    base, batch = build_base(preset, seed)
    routed = shared_copy(base)
    calibrate_skew(routed, batch, preset.top_k, 0.5, seed)
    hot = hot_maps(routed, batch, [preset.top_k])[preset.top_k]
    kinds = ("floor", "hellora")
    step_fns = {}
    for kind in kinds:
        model = attach(kind, shared_copy(routed), preset, hot if kind == "hellora" else None)
        step_fns[kind] = make_step(model, make_optimizer(model, "cpu"), batch)
    for _ in range(warmup):
        for kind in kinds:
            step_fns[kind]()
    tables: dict[str, list] = {kind: [] for kind in kinds}
    for r in range(steps):
        for kind in (kinds if r % 2 == 0 else kinds[::-1]):
            tables[kind].append(op_table(step_fns[kind]))
    return {"experts": experts, **{kind: median_table(tables[kind]) for kind in kinds}}


def summarize(profiles: list[dict[str, Any]], top: int, growth: float) -> dict[str, Any]:
    """Top operators of the HELLoRA-minus-floor difference per E, and the operators that grow with E."""
    per_e = []
    for p in profiles:
        floor, ours = p["floor"], p["hellora"]
        # Sum of self times over every operator = the step's CPU time seen by the profiler (nested ops excluded).
        total_floor = sum(v["self_us"] for v in floor.values())
        total_ours = sum(v["self_us"] for v in ours.values())
        names = set(floor) | set(ours)
        diff = []
        for name in names:
            f = floor.get(name, {"self_us": 0.0, "calls": 0.0})
            o = ours.get(name, {"self_us": 0.0, "calls": 0.0})
            diff.append({
                "op": name,
                "hellora_us": round(o["self_us"], 1),
                "floor_us": round(f["self_us"], 1),
                "extra_us": round(o["self_us"] - f["self_us"], 1),
                "extra_share_of_floor": (o["self_us"] - f["self_us"]) / total_floor if total_floor else 0.0,
                "hellora_calls": o["calls"],
                "floor_calls": f["calls"],
            })
        diff.sort(key=lambda d: -d["extra_us"])
        flops_floor = sum(v["flops"] for v in floor.values())
        flops_ours = sum(v["flops"] for v in ours.values())
        per_e.append({
            "experts": p["experts"],
            "floor_total_us": round(total_floor, 1),
            "hellora_total_us": round(total_ours, 1),
            "hellora_x_floor_profiled": total_ours / total_floor if total_floor else float("nan"),
            "top_extra": diff[:top],
            # FLOPs the profiler attributes (matrix products, mostly): exact, unlike times
            "flops": {"floor": flops_floor, "hellora": flops_ours,
                      "hellora_x_floor": flops_ours / flops_floor if flops_floor else float("nan"),
                      "by_op": {n: {"floor": floor.get(n, {}).get("flops", 0.0), "hellora": ours.get(n, {}).get("flops", 0.0)}
                                for n in names if floor.get(n, {}).get("flops") or ours.get(n, {}).get("flops")}},
            "calls_per_step": {"floor": sum(v["calls"] for v in floor.values()),
                               "hellora": sum(v["calls"] for v in ours.values())},
        })
    growing = []
    if len(profiles) > 1:
        lo, hi = profiles[0], profiles[-1]
        for name in set(lo["hellora"]) | set(hi["hellora"]):
            a = lo["hellora"].get(name, {"self_us": 0.0, "calls": 0.0})
            b = hi["hellora"].get(name, {"self_us": 0.0, "calls": 0.0})
            fa = lo["floor"].get(name, {"self_us": 0.0})["self_us"]
            fb = hi["floor"].get(name, {"self_us": 0.0})["self_us"]
            grew = b["self_us"] - a["self_us"]
            if grew > growth * max(a["self_us"], 1.0) and grew > 50.0:
                growing.append({
                    "op": name,
                    f"hellora_us_E{lo['experts']}": round(a["self_us"], 1),
                    f"hellora_us_E{hi['experts']}": round(b["self_us"], 1),
                    f"floor_us_E{lo['experts']}": round(fa, 1),
                    f"floor_us_E{hi['experts']}": round(fb, 1),
                    "extra_growth_us": round(grew - (fb - fa), 1),
                    "calls": [a["calls"], b["calls"]],
                })
        growing.sort(key=lambda d: -d["extra_growth_us"])
    return {"per_experts": per_e, "growing": growing[:top]}


def render(summary: dict[str, Any], args, machine, command, load) -> str:
    lines = [
        "### Hot-path profile: HELLoRA k=8 against the attention-only floor",
        "",
        f"OLMoE architecture, hidden {SCALING_SHAPE['hidden']}, intermediate {SCALING_SHAPE['intermediate']}, "
        f"{SCALING_SHAPE['layers']} layers, top-{SCALING_SHAPE['top_k']}, batch {SCALING_SHAPE['batch']} x "
        f"{SCALING_SHAPE['seq']}, float32, skewed router"
        + (" (tiny shape: smoke test)" if args.tiny else "")
        + f"; torch.profiler (CPU) over {args.steps} training steps per configuration (alternated) after {args.warmup} unprofiled; "
        "per operator the median over steps of its self CPU microseconds; the profiler and other jobs inflate absolute times, shares are what to read.",
        "",
    ]
    for e in summary["per_experts"]:
        lines += [
            f"#### {e['experts']} experts: profiled self CPU {e['hellora_total_us'] / 1e3:.1f} ms vs floor "
            f"{e['floor_total_us'] / 1e3:.1f} ms ({e['hellora_x_floor_profiled']:.3f}x); operator calls per step "
            f"{e['calls_per_step']['hellora']:.0f} vs {e['calls_per_step']['floor']:.0f}; counted FLOPs "
            f"{e['flops']['hellora'] / 1e9:.2f} G vs {e['flops']['floor'] / 1e9:.2f} G "
            f"({e['flops']['hellora_x_floor']:.3f}x, exact)",
            "",
            markdown_table(
                ["op", "HELLoRA us/step", "floor us/step", "extra us", "extra / floor step", "calls (ours / floor)"],
                ([d["op"], f"{d['hellora_us']:.0f}", f"{d['floor_us']:.0f}", f"{d['extra_us']:+.0f}",
                  f"{d['extra_share_of_floor']:+.1%}", f"{d['hellora_calls']:.0f} / {d['floor_calls']:.0f}"]
                 for d in e["top_extra"]),
            ),
            "",
        ]
    if summary["growing"]:
        lo, hi = summary["per_experts"][0]["experts"], summary["per_experts"][-1]["experts"]
        lines += [
            f"#### Operators whose HELLoRA self time grows from {lo} to {hi} experts (by growth beyond the floor's)",
            "",
            markdown_table(
                ["op", f"HELLoRA E={lo}", f"HELLoRA E={hi}", f"floor E={lo}", f"floor E={hi}", "extra growth us",
                 "calls"],
                ([g["op"], f"{g[f'hellora_us_E{lo}']:.0f}", f"{g[f'hellora_us_E{hi}']:.0f}",
                  f"{g[f'floor_us_E{lo}']:.0f}", f"{g[f'floor_us_E{hi}']:.0f}", f"{g['extra_growth_us']:+.0f}",
                  f"{g['calls'][0]:.0f} -> {g['calls'][1]:.0f}"] for g in summary["growing"]),
            ),
            "",
        ]
    lines += [
        "Peak memory above the floor, broken down: [memory-hot-path.md](memory-hot-path.md) "
        "(`bench/memory_hot_path.py`). GEMM FLOPs the adapter must add, the lower bound on the step-time ratio: "
        "[flop-bound.md](flop-bound.md) (`bench/flop_bound.py`).",
        "",
        f"Command: `{command}`", "", f"Machine: {machine_line(machine)}; load average {load} at the end.",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default="16,256", help="comma-separated expert counts")
    parser.add_argument("--steps", type=int, default=5, help="profiled steps per configuration (alternated; per-operator medians)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--top", type=int, default=15, help="operators listed per table")
    parser.add_argument("--growth", type=float, default=0.5, help="relative growth that counts as 'grows with E'")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny shape (tests)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="profile-hot-path")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    experts = parse_experts(args.experts)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info("cpu")
    profiles = [profile_one(e, args.steps, args.warmup, args.seed, args.tiny) for e in experts]
    summary = summarize(profiles, args.top, args.growth)
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    command = command_line(__file__, argv)
    markdown = render(summary, args, machine, command, load)
    print(markdown, flush=True)
    data = {"command": command, "machine": machine, "load_avg_1m_at_end": load, "steps": args.steps,
            "warmup": args.warmup, "tiny": args.tiny, **summary}
    if not args.no_write:
        paths = write_results(args.name, markdown, data, args.out)
        print(f"wrote {paths[0]} and {paths[1]}")
    return data


if __name__ == "__main__":
    main()
