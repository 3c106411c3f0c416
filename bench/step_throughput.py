"""Training-step throughput of HELLoRA's hot-expert LoRA against the attention-only floor and PEFT's all-experts LoRA.

One process builds the same random OLMoE-architecture model for every configuration (frozen base weights are
shared, so the configurations differ only in their adapters) and alternates them step by step. A step is
forward + backward + AdamW (fused, the Trainer's default) over the trainable parameters on one fixed batch.

Configurations, each under two routers (``skewed``: the router is biased so that k chosen experts per layer take
about half of the assignments; ``uniform``: the random-init, near-uniform router):

* ``floor``        LoRA r=32 on attention (q, k, v, o) only: what any adapter costs at least;
* ``peft-all``     attention LoRA + PEFT's ``target_parameters`` LoRA on every expert's gate_up_proj/down_proj;
* ``ours-all``     HELLoRA with every expert hot (the LoRA warm-up's configuration);
* ``hellora-k8``   HELLoRA, k = experts per token hot experts per layer (top-k of a forward-only profile);
* ``hellora-k16``  HELLoRA, 2x that.

HELLoRA configurations use ``apply_hellora``'s default components ("all": attention + router + hot experts).

bf16 presets run every forward under bf16 autocast (``--autocast auto``), as the Trainer does with ``bf16=True``:
the base is bf16, LoRA factors are float32 master weights and their GEMMs run in bf16. ``--with-noautocast`` adds
HELLoRA k stepping without autocast (float32 low-rank GEMMs), to measure what bf16 compute buys.

    python bench/step_throughput.py --preset olmoe-small            # writes bench/results/olmoe-small.{md,json}
    python bench/step_throughput.py --preset olmoe-small-bf16
    python bench/step_throughput.py --preset olmoe-1b-7b            # the real OLMoE-1B-7B config, bf16, CUDA only
    python bench/step_throughput.py --preset qwen3-moe              # Qwen3-MoE layers (128 experts, top-8), CUDA only
    python bench/step_throughput.py --sweep scaling --runs 8 --threads 1   # expert-count sweep 16..256: scaling.{md,json,png}
    python bench/step_throughput.py --preset tiny --experts 4,8,16         # sweep any preset's shape over expert counts
"""

from __future__ import annotations

import argparse
import copy
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import (  # noqa: E402
    alternate,
    command_line,
    machine_info,
    machine_line,
    markdown_table,
    median,
    transient_peak_bytes,
    unique_bytes,
    write_results,
)

ATTENTION = ["q_proj", "k_proj", "v_proj", "o_proj"]
EXPERT_PARAMETERS = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
ROUTERS = ("skewed", "uniform")


@dataclass(frozen=True)
class Preset:
    """Model shape (OLMoE architecture), batch and precision of one benchmark."""

    hidden: int
    intermediate: int
    experts: int
    top_k: int
    layers: int
    batch: int
    seq: int
    dtype: str = "float32"
    device: str = "cpu"
    heads: int = 4
    kv_heads: int = 2
    vocab: int = 512
    rank: int = 32
    alpha: int = 64
    family: str = "olmoe"
    extra: tuple = ()  # further config fields, as (name, value) pairs (frozen dataclass: no dict)

    def config_overrides(self) -> dict[str, Any]:
        intermediate = "moe_intermediate_size" if self.family == "qwen3_moe" else "intermediate_size"
        return {
            "hidden_size": self.hidden,
            intermediate: self.intermediate,
            "num_experts": self.experts,
            "num_experts_per_tok": self.top_k,
            "num_hidden_layers": self.layers,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "vocab_size": self.vocab,
            "max_position_embeddings": max(512, self.seq),
            **dict(self.extra),
        }


# allenai/OLMoE-1B-7B-0924's config.json: 16 layers, hidden 2048, 64 experts of 1024, top-8, 16 heads, vocab 50304.
_OLMOE_1B_7B = dict(
    hidden=2048, intermediate=1024, experts=64, top_k=8, heads=16, kv_heads=16, vocab=50304,
    extra=(("rms_norm_eps", 1e-5), ("rope_theta", 10000.0), ("norm_topk_prob", False), ("clip_qkv", None)),
)
# Qwen3-30B-A3B's layer shapes (hidden 2048, 128 experts of 768, top-8, 32 heads / 4 KV heads of 128, vocab
# 151936); 12 of its 48 layers (~7.9B parameters in bf16, ~16 GB) leave room for PEFT's all-experts LoRA.
_QWEN3_MOE = dict(
    hidden=2048, intermediate=768, experts=128, top_k=8, heads=32, kv_heads=4, vocab=151936, family="qwen3_moe",
    extra=(("head_dim", 128), ("norm_topk_prob", True), ("rms_norm_eps", 1e-6), ("rope_theta", 1000000.0)),
)
PRESETS: dict[str, Preset] = {
    "tiny": Preset(hidden=64, intermediate=32, experts=8, top_k=2, layers=2, batch=2, seq=32, rank=8, alpha=16),
    "olmoe-small": Preset(hidden=512, intermediate=256, experts=64, top_k=8, layers=4, batch=4, seq=256),
    "olmoe-small-bf16": Preset(
        hidden=512, intermediate=256, experts=64, top_k=8, layers=4, batch=4, seq=256, dtype="bfloat16"
    ),
    "tiny-qwen3": Preset(hidden=64, intermediate=32, experts=16, top_k=4, layers=2, batch=2, seq=32, rank=8, alpha=16,
                         family="qwen3_moe", extra=(("head_dim", 16), ("norm_topk_prob", True))),
    # Real OLMoE-1B-7B layer shapes; 2 layers fit a 24 GB GPU with PEFT's all-experts LoRA.
    "olmoe-1b-7b-2l-gpu": Preset(layers=2, batch=4, seq=2048, dtype="bfloat16", device="cuda", **_OLMOE_1B_7B),
    # The whole model (6.9B parameters, random bf16 weights) and 8 x 2048 tokens per step: one H200 (PEFT's
    # all-experts LoRA is the largest configuration).
    "olmoe-1b-7b": Preset(layers=16, batch=8, seq=2048, dtype="bfloat16", device="cuda", **_OLMOE_1B_7B),
    "qwen3-moe": Preset(layers=12, batch=8, seq=2048, dtype="bfloat16", device="cuda", **_QWEN3_MOE),
    # The expert-count sweep at real layer shapes (``--sweep gpu-scaling``): 2 Qwen3-MoE layers (128 experts), and
    # one DeepSeek-V3-like layer (256 experts of 2048, hidden 7168, top-8; OLMoE's attention and router with 56
    # heads of 128 / 8 KV heads, vocab cut to 32000: the expert layer is what the sweep measures; ~23 GB of bf16
    # experts, sized for one H100/H200 with PEFT's all-experts LoRA).
    "qwen3-moe-2l-gpu": Preset(layers=2, batch=4, seq=2048, dtype="bfloat16", device="cuda", **_QWEN3_MOE),
    "deepseek-v3-like-1l-gpu": Preset(
        hidden=7168, intermediate=2048, experts=256, top_k=8, heads=56, kv_heads=8, vocab=32000, layers=1, batch=2,
        seq=2048, dtype="bfloat16", device="cuda", extra=(("norm_topk_prob", True), ("clip_qkv", None)),
    ),
}


# ------------------------------------------------------------------------------------------------ routers
class SkewedOlmoeRouter(nn.Module):
    """OLMoE's top-k router with a fixed additive bias on the logits of some experts (a benchmark device, not a
    model change): the biased experts take a chosen share of the assignments, like a trained router's favourites.
    Installed by swapping the class of an ``OlmoeTopKRouter`` instance, so the weights stay shared."""

    skew_bias: torch.Tensor

    def forward(self, hidden_states: torch.Tensor):
        hidden_states = hidden_states.reshape(-1, self.hidden_dim)
        router_logits = F.linear(hidden_states, self.weight) + self.skew_bias.to(hidden_states.dtype)
        router_probs = F.softmax(router_logits, dtype=torch.float, dim=-1)
        top_value, top_index = torch.topk(router_probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_value /= top_value.sum(dim=-1, keepdim=True)
        return router_logits, top_value.to(router_logits.dtype), top_index


_SKEWED_CLASSES: dict[type, type] = {}


def skew_routers(model: nn.Module, favourites: dict[str, list[int]], bias: float) -> None:
    """Give ``favourites[layer]`` a logit bias of ``bias`` in every MoE layer's router.

    One skewed class per router class, so that PEFT's custom-module mapping (keyed on the class) covers them all.
    """
    from hellora_trl import find_moe_layers

    for layer in find_moe_layers(model):
        router = layer.router
        if not isinstance(router, SkewedOlmoeRouter):
            if not (hasattr(router, "norm_topk_prob") and hasattr(router, "hidden_dim")):
                raise TypeError(f"The skewed router reproduces OLMoE's router; got {type(router).__name__}.")
            cls = type(router)
            if cls not in _SKEWED_CLASSES:
                _SKEWED_CLASSES[cls] = type("Skewed" + cls.__name__, (SkewedOlmoeRouter, cls), {})
            router.__class__ = _SKEWED_CLASSES[cls]
        skew = torch.zeros(layer.num_experts, device=router.weight.device)
        skew[favourites[layer.name]] = bias
        router.register_buffer("skew_bias", skew, persistent=False)


def top_share(model: nn.Module, batch: dict[str, torch.Tensor], k: int) -> list[float]:
    """Per layer, the share of assignments taken by the k most used experts on ``batch`` (forward only)."""
    from hellora_trl import profile_experts

    profile = profile_experts(model, [batch], progress=False)
    return [float(c) for c in profile.concentration(k)]


def calibrate_skew(
    model: nn.Module, batch: dict[str, torch.Tensor], k: int, target: float, seed: int
) -> tuple[dict[str, list[int]], float, list[float]]:
    """Random favourites (k per layer) and the bias that makes them take ``target`` of the assignments."""
    from hellora_trl import find_moe_layers

    generator = torch.Generator().manual_seed(seed)
    layers = find_moe_layers(model)
    favourites = {l.name: sorted(torch.randperm(l.num_experts, generator=generator)[:k].tolist()) for l in layers}
    lo, hi = 0.0, 16.0
    for _ in range(14):  # bisection on the mean share over layers
        mid = (lo + hi) / 2
        skew_routers(model, favourites, mid)
        if sum(top_share(model, batch, k)) / len(layers) < target:
            lo = mid
        else:
            hi = mid
    bias = (lo + hi) / 2
    skew_routers(model, favourites, bias)
    return favourites, bias, top_share(model, batch, k)


# ------------------------------------------------------------------------------------------ configurations
@dataclass
class Setup:
    """One benchmarked configuration: a model with its adapter, its optimizer and a step function."""

    name: str
    router: str
    kind: str  # floor | peft-all | ours-all | hellora
    k: Optional[int]
    model: nn.Module
    optimizer: torch.optim.Optimizer
    step: Callable[[], Any]
    batch: Optional[dict[str, torch.Tensor]] = None  # the fixed batch ``step`` trains on
    routed: Optional[nn.Module] = None  # the frozen base with this setup's router, before any adapter


def shared_copy(base: nn.Module) -> nn.Module:
    """A copy of ``base`` whose parameters and buffers are the very same tensors (memory stays one model)."""
    memo = {id(t): t for t in list(base.parameters()) + list(base.buffers())}
    return copy.deepcopy(base, memo)


def attach(kind: str, model: nn.Module, preset: Preset, hot: Optional[dict[str, list[int]]]) -> nn.Module:
    from peft import LoraConfig, get_peft_model

    from hellora_trl import apply_hellora, default_lora_config

    if kind == "floor":
        return get_peft_model(model, LoraConfig(r=preset.rank, lora_alpha=preset.alpha, target_modules=ATTENTION))
    if kind == "peft-all":
        config = LoraConfig(
            r=preset.rank, lora_alpha=preset.alpha, target_modules=ATTENTION, target_parameters=EXPERT_PARAMETERS
        )
        return get_peft_model(model, config)
    return apply_hellora(model, hot, default_lora_config(r=preset.rank, lora_alpha=preset.alpha))


def make_step(
    model: nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor], autocast: Optional[str] = None
) -> Callable[[], Any]:
    """One training step; ``autocast`` (a device type) runs the forward under bf16 autocast, as the Trainer does."""
    device = next(model.parameters()).device.type

    def step() -> float:
        with torch.autocast(device, dtype=torch.bfloat16, enabled=autocast is not None):
            loss = model(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(loss.detach())

    return step


def make_optimizer(model: nn.Module, device: str) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    try:
        return torch.optim.AdamW(params, lr=1e-5, fused=True)
    except (RuntimeError, TypeError):  # no fused kernel for this device/dtype
        return torch.optim.AdamW(params, lr=1e-5)


def hot_maps(model: nn.Module, batch: dict[str, torch.Tensor], ks: list[int]) -> dict[int, dict[str, list[int]]]:
    """HELLoRA's selection: per-layer top-k of a forward-only routing profile of the benchmark batch."""
    from hellora_trl import profile_experts, select_hot_experts

    profile = profile_experts(model, [batch], progress=False)
    return {k: select_hot_experts(profile, k=k) for k in ks}


def build_base(preset: Preset, seed: int) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """The frozen random model of ``preset`` and the fixed batch every configuration trains on."""
    from transformers import AutoModelForCausalLM

    from hellora_trl.recipes.offline import tiny_moe_config, tiny_moe_model

    dtype, device = getattr(torch, preset.dtype), preset.device
    if device == "cuda":  # random init on the GPU, in the benchmark's dtype: no float32 copy of a 7B model on the host
        torch.manual_seed(seed)
        with torch.device(device):
            base = AutoModelForCausalLM.from_config(tiny_moe_config(preset.family, **preset.config_overrides()), dtype=dtype)
    else:
        base = tiny_moe_model(preset.family, seed=seed, **preset.config_overrides()).to(dtype=dtype, device=device)
    base.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(3, preset.vocab, (preset.batch, preset.seq), generator=generator).to(device)
    return base, {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def build_setups(
    preset: Preset,
    routers: list[str],
    kinds: list[str],
    seed: int,
    skew_target: float,
    with_loop: bool,
    autocast: Optional[str] = None,
    with_noautocast: bool = False,
) -> tuple[list[Setup], dict[str, Any]]:
    from hellora_trl import find_moe_layers

    device = preset.device
    base, batch = build_base(preset, seed)
    k, E = preset.top_k, preset.experts
    info: dict[str, Any] = {"routers": {}}
    setups: list[Setup] = []
    for router in routers:
        routed = shared_copy(base)
        if router == "skewed":
            favourites, bias, shares = calibrate_skew(routed, batch, k, skew_target, seed)
            info["routers"][router] = {"bias": round(bias, 4), "favourites": favourites}
        maps = hot_maps(routed, batch, [k, 2 * k])
        maps[E] = {l.name: list(range(E)) for l in find_moe_layers(routed)}
        shares = top_share(routed, batch, k)
        info["routers"][router] = {**info["routers"].get(router, {}), "top_k_share_per_layer": shares}
        for kind in kinds:
            ks = {"hellora": [k, 2 * k], "ours-all": [E]}.get(kind, [None])
            for hot_k in ks:
                model = shared_copy(routed)
                model = attach(kind, model, preset, maps[hot_k] if hot_k else None)
                name = f"hellora-k{hot_k}" if kind == "hellora" else kind
                optimizer = make_optimizer(model, device)
                step = make_step(model, optimizer, batch, autocast)
                setups.append(Setup(name, router, kind, hot_k, model, optimizer, step, batch, routed))
                if with_loop and kind == "hellora" and hot_k == k:
                    setups.append(loop_setup(routed, preset, maps[k], batch, router, device, autocast))
                if with_noautocast and autocast and kind == "hellora" and hot_k == k:
                    model = attach("hellora", shared_copy(routed), preset, maps[k])
                    optimizer = make_optimizer(model, device)
                    step = make_step(model, optimizer, batch, None)
                    setups.append(Setup(f"hellora-k{k}-noautocast", router, kind, k, model, optimizer, step))
    info["tokens_per_step"] = preset.batch * preset.seq
    return setups, info


def loop_setup(routed, preset, hot, batch, router, device, autocast=None) -> Setup:
    """HELLoRA k with the per-expert loop path (the implementation before the grouped paths), for comparison."""
    from hellora_trl import HotExpertLoraLayer

    model = attach("hellora", shared_copy(routed), preset, hot)
    for module in model.modules():
        if isinstance(module, HotExpertLoraLayer):
            module.expert_path = "loop"
    optimizer = make_optimizer(model, device)
    k = preset.top_k
    step = make_step(model, optimizer, batch, autocast)
    return Setup(f"hellora-k{k}-loop", router, "hellora", k, model, optimizer, step)


# ------------------------------------------------------------------------------------------------ measuring
def memory_of(setup: Setup, device: str) -> dict[str, int]:
    """Static bytes (weights, buffers, optimizer state) plus the transient peak of one step above them."""
    state = [t for s in setup.optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    static = unique_bytes(list(setup.model.parameters()) + list(setup.model.buffers()) + state)
    transient = transient_peak_bytes(setup.step, device)
    return {"static_bytes": static, "transient_peak_bytes": transient, "peak_bytes": static + transient}


def trainable(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def summarize(setups: list[Setup], timings, memory, tokens: int) -> list[dict[str, Any]]:
    rows = []
    for s in setups:
        key = f"{s.name}/{s.router}"
        t = timings[key]
        rows.append(
            {
                "config": s.name,
                "router": s.router,
                "step_s": median(t.wall),
                "cpu_s": median(t.cpu),
                "tokens_per_s": tokens / median(t.wall),
                "peak_mib": memory[key]["peak_bytes"] / 2**20,
                "trainable": trainable(s.model),
                "wall_all": [round(x, 4) for x in t.wall],
                "cpu_all": [round(x, 4) for x in t.cpu],
                **memory[key],
            }
        )
    floors = {r["router"]: r for r in rows if r["config"] == "floor"}
    for r in rows:
        f = floors.get(r["router"])
        for name, field in (("time_x", "step_s"), ("cpu_x", "cpu_s"), ("mem_x", "peak_mib"), ("params_x", "trainable")):
            r[name] = r[field] / f[field] if f else float("nan")
    return rows


def check_targets(rows: list[dict[str, Any]], k: int) -> list[tuple[str, bool, str]]:
    """The issue's acceptance targets, judged on wall-clock medians (CPU-time ratios shown beside them)."""
    by = {(r["config"], r["router"]): r for r in rows}
    checks = []
    for router in ROUTERS:
        floor, peft, ours = by.get(("floor", router)), by.get(("peft-all", router)), by.get((f"hellora-k{k}", router))
        every = by.get(("ours-all", router))
        if floor and ours:
            detail = f"{ours['time_x']:.3f}x; CPU time {ours['cpu_x']:.3f}x"
            checks.append((f"{router}: hellora-k{k} step <= 1.10x floor", ours["time_x"] <= 1.10, detail))
            checks.append((f"{router}: hellora-k{k} peak memory <= floor + 10%", ours["mem_x"] <= 1.10, f"{ours['mem_x']:.3f}x"))
        if floor and peft and ours:
            removed = (peft["step_s"] - ours["step_s"]) / (peft["step_s"] - floor["step_s"])
            removed_cpu = (peft["cpu_s"] - ours["cpu_s"]) / (peft["cpu_s"] - floor["cpu_s"])
            detail = f"{removed:.1%}; CPU time {removed_cpu:.1%}"
            checks.append((f"{router}: removes >= 85% of PEFT's added step time", removed >= 0.85, detail))
        if peft and every:
            faster = every["step_s"] < peft["step_s"]
            smaller = every["peak_mib"] < peft["peak_mib"]
            detail = (
                f"{every['step_s'] / peft['step_s']:.3f}x time (CPU {every['cpu_s'] / peft['cpu_s']:.3f}x), "
                f"{every['peak_mib'] / peft['peak_mib']:.3f}x memory"
            )
            checks.append((f"{router}: ours-all faster and smaller than peft-all", faster and smaller, detail))
    return checks


def render(preset_name: str, preset: Preset, rows, checks, info, machine, command, args) -> str:
    header = ["config", "router", "step (s)", "x floor", "CPU-time x floor", "tokens/s", "peak MiB", "x floor",
              "trainable", "x floor"]
    table = markdown_table(
        header,
        (
            [r["config"], r["router"], f"{r['step_s']:.3f}", f"{r['time_x']:.3f}", f"{r['cpu_x']:.3f}",
             f"{r['tokens_per_s']:.0f}", f"{r['peak_mib']:.0f}", f"{r['mem_x']:.3f}", f"{r['trainable']:,}",
             f"{r['params_x']:.2f}"]
            for r in rows
        ),
    )
    shares = {r: sum(v["top_k_share_per_layer"]) / len(v["top_k_share_per_layer"]) for r, v in info["routers"].items()}
    share_text = ", ".join(f"{r}: {s:.0%}" for r, s in shares.items())
    p = preset
    lines = [
        f"### Step throughput: `{preset_name}`",
        "",
        f"{p.family} architecture, hidden {p.hidden}, intermediate {p.intermediate}, {p.experts} experts, "
        f"top-{p.top_k}, {p.layers} layers, vocab {p.vocab}; batch {p.batch} x seq {p.seq}; {p.dtype} on {p.device}"
        f"{' under bf16 autocast (float32 LoRA factors, bf16 GEMMs)' if info.get('autocast') else ''}; "
        f"LoRA r={p.rank}, alpha={p.alpha}. Median of {args.steps} alternated steps (fwd + bwd + fused AdamW) after {args.warmup} "
        f"warm-up steps; peak memory = weights + buffers + optimizer state + the step's transient peak. Share of "
        f"assignments on the top-{p.top_k} experts per layer: {share_text}.",
        "",
        table,
        "",
        "Targets (ratios from this run):",
        "",
        *[f"- {'met' if ok else 'MISSED'}: {what} ({detail})" for what, ok, detail in checks],
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_line(machine)}. Shared with other jobs, so absolute times are noisy; ratios come from "
        "configurations alternated step by step in one process.",
    ]
    return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- CLI
def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="olmoe-small", help=f"comma-separated, from {sorted(PRESETS)}")
    parser.add_argument("--steps", type=int, default=7, help="timed steps per configuration (alternated)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed steps per configuration first")
    parser.add_argument("--routers", default=",".join(ROUTERS))
    parser.add_argument("--configs", default="floor,peft-all,ours-all,hellora", help="kinds to run")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--skew-target", type=float, default=0.5, help="share of the skewed router's favourites")
    parser.add_argument("--with-loop", action="store_true", help="also time HELLoRA k with the per-expert loop path")
    parser.add_argument("--autocast", default="auto", choices=("auto", "on", "off"),
                        help="bf16 autocast around the forward (auto: on for bf16 presets, as the Trainer's bf16=True)")
    parser.add_argument("--with-noautocast", action="store_true",
                        help="also time HELLoRA k without autocast (float32 LoRA GEMMs on a bf16 base)")
    parser.add_argument("--out", type=Path, default=None, help="results directory (default bench/results)")
    parser.add_argument("--no-write", action="store_true", help="print only")
    parser.add_argument("--name", default=None, help="results file name (default: the preset, or the sweep)")
    sweep = parser.add_argument_group("expert-count sweep (bench/scaling_sweep.py)")
    sweep.add_argument("--experts", default=None,
                       help="comma-separated expert counts (e.g. 16,64,128,256): sweep --preset's shape over them, "
                            "or override a named --sweep's counts; writes one <name>.{md,json,png}")
    sweep.add_argument("--sweep", default=None,
                       help="named sweep: scaling (issue-22 CPU shape, 16/64/128/256 experts), tiny-scaling (tests), "
                            "gpu-scaling (Qwen3-MoE and DeepSeek-V3-like layers, CUDA)")
    sweep.add_argument("--runs", type=int, default=5, help="sweep: alternated runs per row (median and range)")
    return parser.parse_args(argv)


def run_preset(preset_name: str, args: argparse.Namespace, command: str) -> Optional[dict[str, Any]]:
    preset = PRESETS[preset_name]
    if preset.device == "cuda" and not torch.cuda.is_available():
        print(f"[{preset_name}] skipped: needs CUDA.")
        return None
    machine = machine_info(preset.device)
    use_autocast = args.autocast == "on" or (args.autocast == "auto" and preset.dtype == "bfloat16")
    autocast = preset.device if use_autocast else None
    setups, info = build_setups(
        preset, args.routers.split(","), args.configs.split(","), args.seed, args.skew_target, args.with_loop,
        autocast, args.with_noautocast,
    )
    info["autocast"] = use_autocast
    runs = {f"{s.name}/{s.router}": s.step for s in setups}
    print(f"[{preset_name}] {len(runs)} configurations: {', '.join(runs)}", flush=True)
    alternate(runs, args.warmup, preset.device, f"{preset_name} warm-up")
    timings = alternate(runs, args.steps, preset.device, f"{preset_name} timed")
    memory = {f"{s.name}/{s.router}": memory_of(s, preset.device) for s in setups}
    rows = summarize(setups, timings, memory, info["tokens_per_step"])
    checks = check_targets(rows, preset.top_k)
    markdown = render(preset_name, preset, rows, checks, info, machine, command, args)
    print(markdown, flush=True)
    data = {"preset": preset_name, "shape": asdict(preset), "command": command, "machine": machine, "rows": rows,
            "targets": [{"target": t, "met": ok, "value": v} for t, ok, v in checks], "routing": info,
            "steps": args.steps, "warmup": args.warmup}
    if not args.no_write:
        paths = write_results(args.name or preset_name, markdown, data, args.out)
        print(f"wrote {paths[0]} and {paths[1]}")
    return data


def main(argv: Optional[list[str]] = None) -> list[dict[str, Any]]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.experts is not None or args.sweep is not None:
        from scaling_sweep import run_sweep

        data = run_sweep(args, PRESETS, argv)
        return [] if data is None else [data]
    names = args.preset.split(",")
    unknown = [n for n in names if n not in PRESETS]
    if unknown:
        raise SystemExit(f"Unknown preset(s) {unknown}; choose from {sorted(PRESETS)}.")
    command = command_line(__file__, argv)
    return [d for d in (run_preset(n, args, command) for n in names) if d is not None]


if __name__ == "__main__":
    main()
