"""Selection quality on the lab model: the paper's Tables 2, 4 and 6 in miniature.

The lab model (``hellora pretrain``: a small OLMoE pretrained in-project, so its routing is learned) is fine-tuned
on the held-out arithmetic target task under each adapter configuration, for every seed, with the same rows, order,
steps and budget; HELLoRA rows select from one routing profile per seed (the paper's LoRA warm-up on a seeded 10%
slice). Reported per configuration, mean +- sd over seeds: trainable %, held-out target loss, exact match,
forgetting (change in held-out loss on the untrained domains code / safety / prose), seconds per step as a ratio to
the attention + router floor, and the paired delta of target loss against HELLoRA (layer top-k, k = experts per
token) within each seed. Also checks the acceptance criteria of issue 14 and writes bench/results/quality.{json,md}.

    python bench/quality.py --seeds 0 1 2 --rows core           # first the core rows
    python bench/quality.py --seeds 0 1 2 --rows extra --resume  # then the rest, added to the same results

Results accumulate in the JSON (one entry per configuration and seed); --resume skips entries already there.
"""

from __future__ import annotations

import argparse
import json
import os
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
sys.path.insert(0, str(REPO / "bench"))

from benchlib import command_line, machine_info  # noqa: E402

RESULTS = REPO / "bench" / "results"
UNTRAINED = ("code", "safety", "prose")
REFERENCE = "HELLoRA layer k=2"


def configs(num_experts: int, k: int) -> dict[str, list]:
    from hellora_trl.recipes.lab.quality import QualityConfig as C

    core = [
        C("attention + router only", "floor"),
        C(f"LoRA all experts (ours, k={num_experts})", k=num_experts),
        C("LoRA all experts (PEFT target_parameters)", "peft_all"),
        C(f"HELLoRA layer k={k}", k=k),
        C(f"random k={k}", k=k, selection="random"),
        C(f"cold k={k}", k=k, selection="cold"),
        C(f"model k={k}", k=k, selection="model"),
        C("mass 0.5", selection="mass"),
        *[C(f"HELLoRA layer k={kk}", k=kk) for kk in (1, 4, 8) if kk != k and kk < num_experts],
    ]
    extra = [
        C(f"LoRI-D all experts (k={num_experts})", k=num_experts, variant="lori_d"),
        C(f"LoRI-S all experts (k={num_experts})", k=num_experts, variant="lori_s"),
        C(f"HELLoRI-D k={k}", k=k, variant="lori_d"),
        C(f"HELLoRI-S k={k}", k=k, variant="lori_s"),
        C(f"HELLoRA k={k} dynamic rank", k=k, dynamic_rank=True),
    ]
    return {"core": core, "extra": extra, "all": core + extra}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None]
    if not values:
        return float("nan"), float("nan")
    return statistics.mean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def _fmt(values: list[float], spec: str = ".4f") -> str:
    mean, sd = _mean_sd(values)
    return f"{mean:{spec}} ± {sd:{spec.lstrip('+')}}" if len(values) > 1 else f"{mean:{spec}}"


def step_time_key(runs: list[dict]) -> str:
    """CPU seconds per step when every run has them (robust on a shared machine), else wall seconds."""
    return "cpu_sec_per_step" if runs and all("cpu_sec_per_step" in r["metrics"] for r in runs) else "sec_per_step"


def summarize(results: dict[str, Any]) -> dict[str, Any]:
    """Per-configuration aggregates, paired deltas against the reference and the acceptance checks."""
    runs, base = results["runs"], results["base"]
    seeds = sorted({r["seed"] for r in runs})
    by = {(r["name"], r["seed"]): r["metrics"] for r in runs}
    names = list(dict.fromkeys(r["name"] for r in runs))
    floor = "attention + router only"
    table = []
    for name in names:
        rows = [(s, by[(name, s)]) for s in seeds if (name, s) in by]
        forgetting = [statistics.mean(m["domain_loss"][d] - base[str(s)]["domain_loss"][d] for d in UNTRAINED)
                      for s, m in rows]
        near = [m["domain_loss"]["math"] - base[str(s)]["domain_loss"]["math"] for s, m in rows]
        key = step_time_key(runs)
        ratio = [m[key] / by[(floor, s)][key] for s, m in rows if (floor, s) in by]
        delta = [m["target_loss"] - by[(REFERENCE, s)]["target_loss"] for s, m in rows if (REFERENCE, s) in by]
        table.append({
            "name": name, "seeds": [s for s, _ in rows],
            "trainable_percent": _mean_sd([m["trainable_percent"] for _, m in rows])[0],
            "target_loss": [m["target_loss"] for _, m in rows],
            "exact_match": [m["exact_match"] for _, m in rows],
            "forgetting": forgetting,
            "math_change": near,
            "step_ratio": ratio,
            "delta_vs_hellora": delta if name != REFERENCE else [],
        })
    return {"table": table, "acceptance": acceptance(results, by, seeds)}


def acceptance(results: dict[str, Any], by: dict, seeds: list[int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    base, prof = results["base"], results["profiles"]
    k, E = results["k"], results["num_experts"]
    uniform = k / E
    conc = {s: prof[str(s)]["forward_concentration"] for s in seeds if str(s) in prof}
    out["1_topk_share_over_uniform_min"] = {s: min(c) / uniform for s, c in conc.items()}
    out["1_met"] = bool(conc) and all(min(c) >= 2 * uniform for c in conc.values())
    hot, cold, rnd = REFERENCE, f"cold k={k}", f"random k={k}"
    paired = [s for s in seeds if all((n, s) in by for n in (hot, cold, rnd))]
    out["2_per_seed"] = {s: {"hot": by[(hot, s)]["target_loss"], "cold": by[(cold, s)]["target_loss"],
                             "random": by[(rnd, s)]["target_loss"]} for s in paired}
    out["2_met"] = bool(paired) and all(v["hot"] < v["cold"] and v["hot"] < v["random"] for v in out["2_per_seed"].values())
    allx = f"LoRA all experts (ours, k={E})"
    both = [s for s in seeds if (hot, s) in by and (allx, s) in by]
    if both:
        rec = [(base[str(s)]["target_loss"] - by[(hot, s)]["target_loss"])
               / (base[str(s)]["target_loss"] - by[(allx, s)]["target_loss"]) for s in both]
        params = [by[(hot, s)]["trainable"] / by[(allx, s)]["trainable"] for s in both]
        out["3_recovery_per_seed"] = rec
        out["3_recovery_mean"] = statistics.mean(rec)
        out["3_trainable_ratio"] = statistics.mean(params)
        out["3_met"] = statistics.mean(rec) >= 0.8 and statistics.mean(params) <= 0.25
        floor = "attention + router only"
        if all((floor, s) in by for s in both):
            # the stricter reading: share of the gain that expert adapters add on top of the attention + router floor
            out["3_recovery_over_floor_mean"] = statistics.mean(
                (by[(floor, s)]["target_loss"] - by[(hot, s)]["target_loss"])
                / (by[(floor, s)]["target_loss"] - by[(allx, s)]["target_loss"]) for s in both)
            out["3_floor_recovery_mean"] = statistics.mean(
                (base[str(s)]["target_loss"] - by[(floor, s)]["target_loss"])
                / (base[str(s)]["target_loss"] - by[(allx, s)]["target_loss"]) for s in both)
        forget = {n: statistics.mean(statistics.mean(by[(n, s)]["domain_loss"][d] - base[str(s)]["domain_loss"][d]
                                                     for d in UNTRAINED) for s in both) for n in (hot, allx)}
        out["4_forgetting_mean"] = forget
        out["4_met"] = forget[hot] <= forget[allx]
    jac = [prof[str(s)]["jaccard_warmup_vs_forward"] for s in seeds if str(s) in prof]
    if jac:
        per_layer = [statistics.mean(col) for col in zip(*jac)]
        out["5_jaccard_per_layer"] = per_layer
        out["5_jaccard_mean"] = statistics.mean(per_layer)
        out["5_met"] = statistics.mean(per_layer) >= 0.6
    return out


def markdown(results: dict[str, Any]) -> str:
    summary = summarize(results)
    acc = summary["acceptance"]
    s = results["settings"]
    lines = [
        "### Selection quality on the lab model (Tables 2 / 4 / 6 in miniature)",
        "",
        f"Lab model `{results['lab_key']}` ({results['lab_parameters']:,} parameters, {results['num_experts']} "
        f"experts, top-{results['k']}), fine-tuned on held-out one-step arithmetic word problems: r={s['lora_r']}, "
        f"{s['steps']} steps x batch {s['batch_size']}, lr {s['learning_rate']}, seeds {results['seeds_done']}. "
        f"Target loss: completion tokens of {s['eval_rows']} held-out rows; exact match: greedy, {s['generate_rows']} "
        f"rows; forgetting: change in held-out loss on code / safety / prose (lower is better); math Δ: the same on "
        f"held-out math word problems, the domain nearest the target; step ratio: "
        + ("process CPU seconds" if step_time_key(results["runs"]) == "cpu_sec_per_step" else
           "wall seconds (noisy: a shared 2-core CPU with other jobs running)")
        + f" per step / the floor's; Δ vs HELLoRA: paired within seed, "
        f"mean ± sd over seeds (positive = worse than HELLoRA). Base model: target loss "
        f"{_fmt([b['target_loss'] for b in results['base'].values()])}, exact match "
        f"{_fmt([b['exact_match'] for b in results['base'].values()], '.3f')}.",
        "",
        "| configuration | trainable % | target loss | exact match | forgetting | math Δ | step ratio | Δ target loss vs HELLoRA |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in summary["table"]:
        delta = _fmt(row["delta_vs_hellora"], "+.4f") if row["delta_vs_hellora"] else "—"
        lines.append(
            f"| {row['name']} | {row['trainable_percent']:.3f} | {_fmt(row['target_loss'])} | "
            f"{_fmt(row['exact_match'], '.3f')} | {_fmt(row['forgetting'], '+.4f')} | {_fmt(row['math_change'], '+.3f')} | "
            f"{_fmt(row['step_ratio'], '.2f') if row['step_ratio'] else '—'} | {delta} |"
        )
    yes = {True: "met", False: "**missed**"}
    lines += ["", "Acceptance (issue 14):", ""]
    if "1_met" in acc:
        lines.append(f"1. top-k share on target data ≥ 2x uniform in every layer: {yes[acc['1_met']]} (min ratio per "
                     f"seed: {', '.join(f'{v:.2f}' for v in acc['1_topk_share_over_uniform_min'].values())})")
    if acc.get("2_per_seed"):
        per = "; ".join(f"seed {s}: hot {v['hot']:.4f}, cold {v['cold']:.4f}, random {v['random']:.4f}"
                        for s, v in acc["2_per_seed"].items())
        lines.append(f"2. hot-k beats cold-k and random-k in every seed: {yes[acc['2_met']]} ({per})")
    if "3_met" in acc:
        lines.append(f"3. HELLoRA recovers {acc['3_recovery_mean']:.0%} of all-experts LoRA's loss reduction with "
                     f"{acc['3_trainable_ratio']:.0%} of its trainable parameters (≥ 80% with ≤ 25%): {yes[acc['3_met']]}")
        if "3_recovery_over_floor_mean" in acc:
            lines.append(f"   Caveat: the attention + router floor alone recovers {acc['3_floor_recovery_mean']:.0%}; of the "
                         f"gain expert adapters add on top of the floor, HELLoRA k={results['k']} gets "
                         f"{acc['3_recovery_over_floor_mean']:.0%}.")
        f = acc["4_forgetting_mean"]
        lines.append(f"4. forgetting HELLoRA {f[REFERENCE]:+.4f} vs all experts "
                     f"{list(f.values())[1]:+.4f} (no worse): {yes[acc['4_met']]}")
    if "5_met" in acc:
        lines.append(f"5. LoRA warm-up vs forward-only hot sets, Jaccard per layer "
                     f"{', '.join(f'{v:.2f}' for v in acc['5_jaccard_per_layer'])} (mean {acc['5_jaccard_mean']:.2f}, "
                     f"≥ 0.6): {yes[acc['5_met']]}")
    lines += ["", f"Command: `{results['command']}`", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--recipe", default="default", help="lab recipe name (hellora_trl.recipes.lab.LAB_RECIPES)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--rows", choices=("core", "extra", "all"), default="all")
    parser.add_argument("--only", nargs="*", default=None, help="run only these configuration names")
    parser.add_argument("--steps", type=int, default=120)
    parser.add_argument("--eval_rows", type=int, default=96)
    parser.add_argument("--generate_rows", type=int, default=32)
    parser.add_argument("--domain_rows", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--name", default="quality", help="results file stem in bench/results")
    parser.add_argument("--resume", action="store_true", help="keep existing results, skip what is done")
    parser.add_argument("--render", action="store_true", help="only rewrite the markdown from the existing JSON")
    parser.add_argument("--merge", nargs="*", default=None,
                        help="results stems to fold into --name (runs of the same lab model, e.g. rows run in a "
                             "second process), then rewrite the markdown; the merged files are left in place")
    args = parser.parse_args(argv)
    if args.merge:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        have = {(r["name"], r["seed"]) for r in results["runs"]}
        for stem in args.merge:
            other = json.loads((RESULTS / f"{stem}.json").read_text())
            if other["lab_key"] != results["lab_key"] or other["settings"] != results["settings"]:
                raise SystemExit(f"{stem} was measured on another lab model or with other settings.")
            results["runs"] += [r for r in other["runs"] if (r["name"], r["seed"]) not in have]
            results["command"] += f" && {other['command']}"
        results["seeds_done"] = sorted({r["seed"] for r in results["runs"]})
        (RESULTS / f"{args.name}.json").write_text(json.dumps(results, indent=1))
        args.render = True
    if args.render:
        results = json.loads((RESULTS / f"{args.name}.json").read_text())
        (RESULTS / f"{args.name}.md").write_text(markdown(results))
        print(markdown(results))
        return results
    torch.set_num_threads(args.threads)

    from hellora_trl.recipes import lab
    from hellora_trl.recipes.lab import quality as q

    path = lab.lab_model_path(args.recipe)
    card = lab.read_card(path)
    E, k = card["recipe"]["num_experts"], card["recipe"]["num_experts_per_tok"]
    settings = q.FineTuneSettings(steps=args.steps, eval_rows=args.eval_rows, generate_rows=args.generate_rows,
                                  domain_rows=args.domain_rows, max_new_tokens=20)
    out_json = RESULTS / f"{args.name}.json"
    results: dict[str, Any]
    if args.resume and out_json.is_file():
        results = json.loads(out_json.read_text())
        if results["lab_key"] != card["key"]:
            raise SystemExit(f"{out_json} holds results of lab model {results['lab_key']}, not {card['key']}.")
        results["command"] += f" && {command_line(__file__, argv)}"
    else:
        results = {"command": command_line(__file__, argv), "machine": machine_info("cpu"), "lab_key": card["key"],
                   "lab_recipe": card["recipe"], "lab_parameters": card["parameters"], "num_experts": E, "k": k,
                   "settings": vars(settings), "base": {}, "profiles": {}, "runs": []}
    done = {(r["name"], r["seed"]) for r in results["runs"]}
    rows = configs(E, k)[args.rows]
    if args.only:
        rows = [c for c in rows if c.name in args.only]
    work = Path(tempfile.mkdtemp(prefix="hellora-quality-"))

    def save() -> None:
        results["seeds_done"] = sorted({r["seed"] for r in results["runs"]})
        RESULTS.mkdir(parents=True, exist_ok=True)
        out_json.write_text(json.dumps(results, indent=1))
        (RESULTS / f"{args.name}.md").write_text(markdown(results))

    for seed in args.seeds:
        train, held_out = q.target_data(settings, seed)
        domains = q.domain_texts(settings, seed)
        profile_path = work / f"profile-{seed}.json"
        if str(seed) not in results["base"] or not profile_path.is_file():
            model, tokenizer = q._load(path)
            started = time.perf_counter()
            results["base"][str(seed)] = q.score(model, tokenizer, held_out, domains, settings)
            forward = q.routing_profile(model, tokenizer, [{"question": r["prompt"][len("Question: "):-len("\nAnswer:")],
                                                            "answer": r["completion"]} for r in train])
            warm = q.take_profile(path, train, settings, seed, profile_path)
            results["profiles"][str(seed)] = {
                "forward_concentration": forward.concentration(),
                "warmup_concentration": warm.concentration(),
                "jaccard_warmup_vs_forward": warm.jaccard(forward),
                "seconds": time.perf_counter() - started,
            }
            print(f"seed {seed}: base {results['base'][str(seed)]['target_loss']:.4f}, profiles "
                  f"{results['profiles'][str(seed)]}", flush=True)
            save()
        for config in rows:
            if (config.name, seed) in done:
                continue
            started = time.perf_counter()
            metrics = q.finetune(config, path, train, settings, seed, profile_path, held_out, domains)
            results["runs"].append({"name": config.name, "seed": seed, "metrics": metrics,
                                    "wall_seconds": time.perf_counter() - started})
            em = "-" if metrics["exact_match"] is None else f"{metrics['exact_match']:.3f}"
            print(f"seed {seed} {config.name}: target loss {metrics['target_loss']:.4f}, exact match "
                  f"{em}, trainable {metrics['trainable_percent']:.3f}%, "
                  f"{time.perf_counter() - started:.0f}s", flush=True)
            save()
    save()
    print(markdown(results))
    return results


if __name__ == "__main__":
    main()
