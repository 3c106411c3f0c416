"""Dynamic rank vs fixed rank on the embedded offline default (tiny OLMoE, generated GSM8K-style problems).

Every row trains the same model (same seed, data order, hot experts: one routing profile is taken first and
shared by all rows) for the same number of steps and differs only in how many rank components each hot expert
may train: all ``r`` (plain HELLoRA), a fixed reduced rank (rank masks, no growth), or dynamic rank (start at
``r_init``, grow by saliency up to an average of ``r_budget`` per hot expert). Reports trainable % (active
entries only), the last logged training loss, held-out loss (completion tokens of unseen problems), seconds per
optimizer step and the final spread of active ranks. Writes bench/results/dynamic_rank.md.

    python bench/dynamic_rank_ablation.py --steps 60 --seeds 0
"""

from __future__ import annotations

import argparse
import functools
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
RESULTS = REPO / "bench" / "results" / "dynamic_rank.md"


def rows(r: int, r_budget: int, r_init: int) -> list[dict[str, Any]]:
    """The configurations: name plus growth settings (None: plain HELLoRATrainer, every rank trains; otherwise
    DynamicRankTrainer with these r_init/r_budget/routing, a uniform-growth callback or a warm Adam start)."""
    grow = dict(r_init=r_init, r_budget=r_budget)
    return [
        {"name": f"fixed r={r} (HELLoRA)", "dr": None},
        {"name": f"fixed rank {r_budget} (masks, no growth)", "dr": dict(r_init=r_budget, r_budget=r_budget)},
        {"name": f"fixed rank {r_init} (masks, no growth)", "dr": dict(r_init=r_init, r_budget=r_init)},
        {"name": f"dynamic {r_init}->{r_budget}: routing x grad", "dr": dict(grow, routing="profile")},
        {"name": f"dynamic {r_init}->{r_budget}: grad only", "dr": dict(grow, routing="none")},
        {"name": f"dynamic {r_init}->{r_budget}: uniform growth (control)", "dr": dict(grow), "uniform": True},
        {"name": f"dynamic {r_init}->{r_budget}: routing x grad, warm Adam v", "dr": dict(grow, warm_optimizer_state=True)},
    ]


def uniform_callback():
    """Same schedule and budget, saliency replaced by "least-grown expert first": the control that tells whether
    choosing experts by saliency matters at all."""
    from hellora_trl.experimental.dynamic_rank import DynamicRankCallback, dynamic_rank_state

    class UniformGrowth(DynamicRankCallback):
        def scores(self, model):
            state = dynamic_rank_state(model, self.adapter_name)
            return {name: 1.0 / layer.active.double() for name, layer in state.layers.items()}

    return UniformGrowth


def training_args(out: Path, steps: int, seed: int, k: int, profile: Path):
    from hellora_trl.recipes.sft import parse_args

    argv = [
        "--output_dir", str(out), "--max_steps", str(steps), "--seed", str(seed), "--hellora_k", str(k),
        "--hellora_profile_path", str(profile), "--hellora_plots", "false", "--eval_limit", "0",
        "--disable_tqdm", "true", "--logging_steps", "5",
    ]
    return parse_args(argv)


def take_profile(args: argparse.Namespace, seed: int, work: Path) -> None:
    """Profile once per seed (written to the shared profile path), so no row's adapter init follows a warm-up run
    that consumed random numbers and every row trains the same hot experts."""
    from hellora_trl.recipes.sft import build_model_and_tokenizer, load_task_data, lora_config_from
    from hellora_trl.trainer import HELLoRATrainer

    script_args, train_args, model_args = training_args(work / "profile", args.steps, seed, args.k, work / "profile.json")
    model, tokenizer = build_model_and_tokenizer(model_args, train_args)
    train, _ = load_task_data(script_args, seed=seed)
    trainer = HELLoRATrainer(
        model=model, args=train_args, train_dataset=train, processing_class=tokenizer,
        peft_config=lora_config_from(model_args),
    )
    trainer._hot_map(None)  # profile + select + write hellora_profile_path, no training


def run_row(row: dict[str, Any], args: argparse.Namespace, seed: int, work: Path) -> dict[str, Any]:
    from hellora_trl.accounting import trainable_parameter_report
    from hellora_trl.recipes.data import synthetic_gsm8k
    from hellora_trl.config import convert_config
    from hellora_trl.experimental.dynamic_rank import DynamicRankCallback, active_ranks
    from hellora_trl.experimental.dynamic_rank_trainer import DynamicRankConfig, DynamicRankTrainer
    from hellora_trl.recipes.sft import build_model_and_tokenizer, load_task_data, lora_config_from
    from hellora_trl.trainer import HELLoRATrainer

    script_args, train_args, model_args = training_args(work / "run", args.steps, seed, args.k, work / "profile.json")
    model_args.lora_r, model_args.lora_alpha = args.r, 2 * args.r
    model, tokenizer = build_model_and_tokenizer(model_args, train_args)
    train, _ = load_task_data(script_args, seed=seed)
    held_out = synthetic_gsm8k(args.eval_rows, seed=10_000 + seed)
    trainer_class = HELLoRATrainer
    if row["dr"] is not None:  # the opt-in experimental trainer, with this row's growth settings
        dr = dict(row["dr"])
        callback_class = uniform_callback() if row.get("uniform") else DynamicRankCallback
        if dr.pop("warm_optimizer_state", False):
            callback_class = functools.partial(callback_class, warm_optimizer_state=True)
        trainer_class = type("RowTrainer", (DynamicRankTrainer,), {"callback_class": callback_class})
        train_args = convert_config(
            train_args, DynamicRankConfig, hellora_dr_r_init=dr["r_init"], hellora_dr_r_budget=dr["r_budget"],
            hellora_dr_interval=args.interval, hellora_dr_grow_step=1, hellora_dr_grow_until=args.grow_until,
            hellora_dr_routing=dr.get("routing", "profile"),
        )
    trainer = trainer_class(
        model=model, args=train_args, train_dataset=train, eval_dataset=held_out,
        processing_class=tokenizer, peft_config=lora_config_from(model_args),
    )
    started = time.perf_counter()
    output = trainer.train()
    seconds = time.perf_counter() - started
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    ranks = active_ranks(trainer.model) if row["dr"] is not None else None
    flat = [v for layer in (ranks or {}).values() for v in layer]
    return {
        "trainable_percent": trainable_parameter_report(trainer.model)["trainable_percent"],
        "final_loss": losses[-1] if losses else output.metrics["train_loss"],
        "eval_loss": trainer.evaluate()["eval_loss"],
        "sec_per_step": output.metrics["train_runtime"] / max(trainer.state.global_step, 1),
        "wall": seconds,
        "ranks": f"{min(flat)}-{max(flat)} (mean {statistics.mean(flat):.2f})" if flat else f"{args.r} (all)",
    }


def hook_overhead(args: argparse.Namespace) -> dict[str, float]:
    """Median seconds of one training step (fwd + bwd + AdamW, batch 8 x 160 tokens) with and without rank masks,
    alternated step by step on the same batch so a busy shared machine slows both alike."""
    from hellora_trl import apply_hellora, default_lora_config, find_moe_layers
    from hellora_trl.experimental.dynamic_rank import init_rank_masks
    from hellora_trl.recipes.offline import tiny_moe_model
    from hellora_trl.recipes.models import OFFLINE_MODEL

    steps = {}
    for name in ("fixed", "masks"):
        base = tiny_moe_model("olmoe", seed=0, **OFFLINE_MODEL)
        hot = {layer.name: list(range(args.k)) for layer in find_moe_layers(base)}
        model = apply_hellora(base, hot, default_lora_config(r=args.r, lora_alpha=2 * args.r))
        if name == "masks":
            init_rank_masks(model, args.r_init, args.r_budget)
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
        ids = torch.randint(3, base.config.vocab_size, (8, 160), generator=torch.Generator().manual_seed(0))
        steps[name] = _train_step(model, optimizer, ids)
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(args.time_rounds):
        for name, step in steps.items():
            started = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - started)
    return {name: statistics.median(values[1:] or values) for name, values in times.items()}


def _train_step(model, optimizer, ids):
    def step() -> None:
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    return step


def markdown(results: list[dict[str, Any]], baseline: str | None) -> str:
    head = ["configuration", "trainable %", "final train loss", "held-out loss", "Δ held-out vs fixed budget rank",
            "s/step", "active ranks: min-max (mean)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = next((res["per_seed"] for res in results if res["name"] == baseline), None)
    for res in results:
        per = res["per_seed"]
        delta = "–"
        if base is not None and res["name"] != baseline:
            delta = _mean_sd([p["eval_loss"] - b["eval_loss"] for p, b in zip(per, base)], "+.3f")
        ranks = sorted({p["ranks"] for p in per})
        lines.append(
            f"| {res['name']} | {per[0]['trainable_percent']:.3f} | {_mean_sd([p['final_loss'] for p in per], '.3f')} | "
            f"{_mean_sd([p['eval_loss'] for p in per], '.3f')} | {delta} | "
            f"{_mean_sd([p['sec_per_step'] for p in per], '.2f')} | {'; '.join(ranks)} |"
        )
    return "\n".join(lines)


def _mean_sd(values: list[float], fmt: str) -> str:
    text = format(statistics.mean(values), fmt)
    return text + (f" ± {statistics.stdev(values):.3f}" if len(values) > 1 else "")


def section(
    results: list[dict[str, Any]], args: argparse.Namespace, command: str, overhead: dict[str, float] | None
) -> str:
    load = f", load average {os.getloadavg()[0]:.2f} at the end" if hasattr(os, "getloadavg") else ""
    baseline = f"fixed rank {args.r_budget} (masks, no growth)"
    return f"""## {args.steps} steps, seeds {args.seeds}

    {command}

LoRA r={args.r}, alpha={2 * args.r}; k={args.k} hot experts per layer; dynamic rows start at rank {args.r_init} and grow
to an average of {args.r_budget} per hot expert and layer, every {args.interval} steps until {args.grow_until:.0%} of
training, one rank per pick. Held-out: {args.eval_rows} unseen problems. Mean ± sd over seeds; Δ is paired per seed
against "{baseline}" (same trainable count). Machine: {platform.machine()} CPU, shared, {torch.get_num_threads()} torch
thread{load}.

{markdown(results, baseline)}
{_per_seed(results)}{_overhead_line(overhead, args)}"""


def _per_seed(results: list[dict[str, Any]]) -> str:
    """Per-seed held-out losses (so any paired comparison can be recomputed) and saliency vs the uniform control."""
    lines = ["", "Held-out loss per seed:", ""]
    for res in results:
        lines.append(f"- {res['name']}: " + ", ".join(f"{p['eval_loss']:.3f}" for p in res["per_seed"]))
    by_name = {res["name"]: res["per_seed"] for res in results}
    ours = next((v for k, v in by_name.items() if k.endswith("routing x grad")), None)
    control = next((v for k, v in by_name.items() if "uniform" in k), None)
    if ours and control:
        diffs = [a["eval_loss"] - b["eval_loss"] for a, b in zip(ours, control)]
        lines += ["", f"Saliency (routing x grad) minus uniform growth, paired per seed: {_mean_sd(diffs, '+.3f')}."]
    return "\n".join(lines) + "\n"


def _overhead_line(overhead: dict[str, float] | None, args: argparse.Namespace) -> str:
    if not overhead:
        return ""
    ratio = overhead["masks"] / overhead["fixed"]
    return (
        f"\nRank-mask hooks, alternated steps on one batch (median of {args.time_rounds}): "
        f"{overhead['fixed'] * 1e3:.0f} ms/step without, {overhead['masks'] * 1e3:.0f} ms/step with ({ratio:.2f}x). "
        "Inactive components still run as zeros, so dynamic rank saves trainable entries, not compute.\n"
    )


HEADER = """# Dynamic rank vs fixed rank (tiny offline OLMoE)

Written by `bench/dynamic_rank_ablation.py`; each section below names the command that produced it (run from
the repository root). Setup shared by all sections: the embedded offline default of `hellora train` (tiny
OLMoE-architecture model, 4 layers x 16 experts, top-2 routing, hidden 128; generated GSM8K-style problems; batch
8, lr 5e-3 cosine, 5 warm-up steps), LoRA on attention, routers and the hot experts. One routing profile per seed
(the default LoRA warm-up on 10% of the data) is taken before the rows and shared, so every row adapts the same
experts from the same adapter init and sees the same batches. Trainable % counts active entries only (attention
and router adapters always keep the full rank). Loss is the causal-LM loss on completion tokens; "final train
loss" is the mean of the last 5 steps. s/step is wall time on a shared 2-core box: differences under ~15% are noise.
"""


def write(
    results: list[dict[str, Any]], args: argparse.Namespace, command: str, overhead: dict[str, float] | None = None
) -> None:
    """Replace this command's section (keyed by its heading) and keep the others; atomic rename."""
    new = section(results, args, command, overhead)
    key = new.splitlines()[0]
    sections = []
    if RESULTS.is_file():
        body = RESULTS.read_text().split("\n## ")[1:]
        sections = ["## " + part.rstrip("\n") + "\n" for part in body]
    sections = [part for part in sections if part.splitlines()[0] != key] + [new]
    sections.sort(key=lambda part: int(part.split()[1]))  # "## <steps> steps, seeds ...": shortest run first
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    tmp = RESULTS.with_name(f".{RESULTS.name}.{os.getpid()}.tmp")
    tmp.write_text(HEADER + "\n" + "\n".join(sections))
    os.replace(tmp, RESULTS)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seeds", default="0", help="Comma-separated seeds (model init, data order).")
    parser.add_argument("--r", type=int, default=8)
    parser.add_argument("--r_budget", type=int, default=4)
    parser.add_argument("--r_init", type=int, default=2)
    parser.add_argument("--k", type=int, default=4, help="Hot experts per layer (of 16).")
    parser.add_argument("--interval", type=int, default=5)
    parser.add_argument("--grow_until", type=float, default=0.5)
    parser.add_argument("--eval_rows", type=int, default=64)
    parser.add_argument("--time_rounds", type=int, default=30, help="Alternated steps of the hook timing (0: skip).")
    parser.add_argument("--only", default="", help="Comma-separated row indices to run (default: all).")
    args = parser.parse_args()
    torch.set_num_threads(1)
    command = shlex.join(["python", "bench/dynamic_rank_ablation.py", *sys.argv[1:]])
    plan = rows(args.r, args.r_budget, args.r_init)
    if args.only:
        plan = [plan[int(i)] for i in args.only.split(",")]
    results = [{"name": row["name"], "per_seed": []} for row in plan]
    for seed in (int(s) for s in args.seeds.split(",")):
        work = Path(tempfile.mkdtemp(prefix=f"dr-ablation-{seed}-"))
        try:
            take_profile(args, seed, work)
            for row, result in zip(plan, results):
                measured = run_row(row, args, seed, work)
                result["per_seed"].append(measured)
                print(row["name"], {k: v for k, v in measured.items()}, flush=True)
        finally:
            shutil.rmtree(work, ignore_errors=True)
        write([r for r in results if r["per_seed"]], args, command)  # after every seed: partial runs keep rows
    overhead = hook_overhead(args) if args.time_rounds else None
    write([r for r in results if r["per_seed"]], args, command, overhead)
    print(f"wrote {RESULTS}", overhead)


if __name__ == "__main__":
    main()
