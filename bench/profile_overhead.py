"""HELLoRA's profiling phase as a share of a whole run, for forward-only and LoRA-warm-up profiling.

A run = profiling on a warm-up slice (a fraction f of the training set) + training HELLoRA (k = experts per
token) on the full set. Measured in one process, alternated step by step on the same model and batch:

* ``t_forward``: forward-only profiling per batch (``profile_experts``: eval mode, no grad, routing counted);
* ``t_warmup``: one LoRA warm-up step (every expert hot, routing counted; fwd + bwd + fused AdamW);
* ``t_train``: one HELLoRA training step (fwd + bwd + fused AdamW);
* fixed costs, once per run: forward profiling's counter and selection; the warm-up's adapter build
  (``apply_hellora`` with every expert hot) and its removal (``unload``) plus selection.

For N training batches per epoch, E training epochs and W warm-up epochs (the trainer's defaults: W = 1):

    share_forward(f) = (f N t_forward + c_forward) / (f N t_forward + c_forward + E N t_train)
    share_warmup(f)  = (f N W t_warmup + c_warmup) / (f N W t_warmup + c_warmup + E N t_train)

    python bench/profile_overhead.py --preset olmoe-small     # writes bench/results/profile-overhead-olmoe-small.*
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, Callable, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import alternate, command_line, machine_info, machine_line, markdown_table, median, write_results  # noqa: E402
from step_throughput import (  # noqa: E402
    PRESETS,
    Preset,
    attach,
    build_base,
    calibrate_skew,
    hot_maps,
    make_optimizer,
    make_step,
    shared_copy,
)

FRACTIONS = (0.01, 0.05, 0.10, 0.20, 0.50)


def forward_profiling(model, batches: list[dict[str, torch.Tensor]]) -> Callable[[], Any]:
    """The real ``profile_experts`` over ``len(batches)`` batches (its per-call setup amortised over them)."""
    from hellora_trl import profile_experts

    return lambda: profile_experts(model, batches, progress=False)


def counted(step: Callable[[], Any], model) -> Callable[[], Any]:
    """A training step with the routing counter attached, as in the LoRA warm-up."""
    from hellora_trl import RoutingCounter

    counter = RoutingCounter(model)

    def run() -> Any:
        with counter:
            return step()

    return run


def _counted(counter):
    """The counter's profile with one count per expert: these timings run no forward, and selection refuses an
    all-zero profile (it has nothing to rank); its cost does not depend on the values."""
    counter.counts += 1
    return counter.to_profile()


def fixed_costs(routed, preset: Preset, batch, k: int, repeats: int) -> dict[str, float]:
    """Median seconds of the once-per-run work of each mode (selection included in both)."""
    from hellora_trl import RoutingCounter, find_moe_layers, select_hot_experts

    every = {l.name: list(range(preset.experts)) for l in find_moe_layers(routed)}
    forward, warmup = [], []
    for _ in range(repeats):
        start = time.perf_counter()
        counter = RoutingCounter(routed)
        with counter:
            pass
        select_hot_experts(_counted(counter), k=k)
        forward.append(time.perf_counter() - start)
        start = time.perf_counter()
        model = attach("hellora", shared_copy(routed), preset, every)
        counter = RoutingCounter(model)
        make_optimizer(model, preset.device)
        model.unload()
        select_hot_experts(_counted(counter), k=k)
        warmup.append(time.perf_counter() - start)
    return {"forward": median(forward), "warmup": median(warmup)}


def shares(times: dict[str, float], fixed: dict[str, float], batches: int, epochs: float, warmup_epochs: float):
    train = epochs * batches * times["train"]
    rows = []
    for f in FRACTIONS:
        fwd = f * batches * times["forward"] + fixed["forward"]
        warm = f * batches * warmup_epochs * times["warmup"] + fixed["warmup"]
        rows.append({"fraction": f, "epochs": epochs, "forward_share": fwd / (fwd + train), "warmup_share": warm / (warm + train)})
    return rows


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="olmoe-small", choices=sorted(PRESETS))
    parser.add_argument("--steps", type=int, default=7, help="timed rounds (alternated)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--profile-batches", type=int, default=4, help="batches per forward-profiling call")
    parser.add_argument("--train-batches", type=int, default=1000, help="N: training batches per epoch")
    parser.add_argument(
        "--epochs", default="3,1", help="E: training epochs, comma-separated (3 = HELLoRAConfig's default; 1 = worst case)"
    )
    parser.add_argument("--warmup-epochs", type=float, default=1.0, help="W: LoRA warm-up epochs over the slice")
    parser.add_argument("--router", default="skewed", choices=("skewed", "uniform"))
    parser.add_argument("--threads", type=int, default=0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> Optional[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = PRESETS[args.preset]
    if preset.device == "cuda" and not torch.cuda.is_available():
        print(f"[{args.preset}] skipped: needs CUDA.")
        return None
    command, machine = command_line(__file__, argv), machine_info(preset.device)
    base, batch = build_base(preset, args.seed)
    k = preset.top_k
    routed = shared_copy(base)
    if args.router == "skewed":
        calibrate_skew(routed, batch, k, 0.5, args.seed)
    hot = hot_maps(routed, batch, [k])[k]
    every = {name: list(range(preset.experts)) for name in hot}
    train_model = attach("hellora", shared_copy(routed), preset, hot)
    warm_model = attach("hellora", shared_copy(routed), preset, every)
    train_step = make_step(train_model, make_optimizer(train_model, preset.device), batch)
    warm_step = counted(make_step(warm_model, make_optimizer(warm_model, preset.device), batch), warm_model)
    runs = {"forward": forward_profiling(routed, [batch] * args.profile_batches), "warmup": warm_step, "train": train_step}
    alternate(runs, args.warmup, preset.device)
    timings = alternate(runs, args.steps, preset.device)
    times = {name: median(t.wall) for name, t in timings.items()}
    times["forward"] /= args.profile_batches
    cpu = {name: median(t.cpu) for name, t in timings.items()}
    cpu["forward"] /= args.profile_batches
    fixed = fixed_costs(routed, preset, batch, k, repeats=3)
    epochs = [float(e) for e in args.epochs.split(",")]
    by_epochs = {e: shares(times, fixed, args.train_batches, e, args.warmup_epochs) for e in epochs}
    rows = [r for e in epochs for r in by_epochs[e]]
    checks = [(e, next(r for r in by_epochs[e] if abs(r["fraction"] - 0.10) < 1e-9)["forward_share"]) for e in epochs]
    header = ["warm-up fraction"]
    for e in epochs:
        header += [f"forward-only, E={e:g}", f"LoRA warm-up, E={e:g}"]
    table = markdown_table(
        header,
        (
            [f"{f:.0%}"] + [f"{by_epochs[e][i][k]:.2%}" for e in epochs for k in ("forward_share", "warmup_share")]
            for i, f in enumerate(FRACTIONS)
        ),
    )
    p = preset
    markdown = "\n".join(
        [
            f"### Profiling overhead: `{args.preset}`",
            "",
            f"Share of a whole run spent profiling: profiling on a warm-up slice (fraction f of the training set; "
            f"the LoRA warm-up trains {args.warmup_epochs:g} epoch over it) + HELLoRA k={k} training for E epochs of "
            f"N={args.train_batches} batches of {p.batch} x {p.seq} (E=3 is HELLoRAConfig's default); "
            f"{args.router} router, {p.dtype} on {p.device}. Per-batch medians of {args.steps} alternated rounds: "
            f"forward-only {times['forward']:.3f} s ({times['forward'] / times['train']:.3f}x a training step), "
            f"warm-up step {times['warmup']:.3f} s ({times['warmup'] / times['train']:.3f}x), training step "
            f"{times['train']:.3f} s; fixed costs: forward {fixed['forward']:.3f} s, warm-up {fixed['warmup']:.3f} s "
            f"(adapter build + unload + selection). share = P / (P + E N t_train). Process CPU-time ratios, less "
            f"sensitive to other jobs: forward-only {cpu['forward'] / cpu['train']:.3f}x, warm-up "
            f"{cpu['warmup'] / cpu['train']:.3f}x a training step.",
            "",
            table,
            "",
            *[
                f"- Target forward-only at 10% <= 3% of the run, E={e:g}: {'met' if v <= 0.03 else 'MISSED'} ({v:.2%})."
                for e, v in checks
            ],
            "",
            f"Command: `{command}`",
            "",
            f"Machine: {machine_line(machine)}. Shared with other jobs: per-step times are noisy, the shares use "
            "medians of steps alternated in one process.",
        ]
    )
    print(markdown, flush=True)
    data = {"preset": args.preset, "command": command, "machine": machine, "per_batch_s": times, "per_batch_cpu_s": cpu,
            "fixed_s": fixed,
            "rows": rows, "train_batches": args.train_batches, "epochs": epochs,
            "warmup_epochs": args.warmup_epochs,
            "target_forward_10pct": [{"epochs": e, "share": v, "met": v <= 0.03} for e, v in checks],
            "raw": {n: {"wall": t.wall, "cpu": t.cpu} for n, t in timings.items()}}
    if not args.no_write:
        paths = write_results(f"profile-overhead-{args.preset}", markdown, data, args.out)
        print(f"wrote {paths[0]} and {paths[1]}")
    return data


if __name__ == "__main__":
    main()
