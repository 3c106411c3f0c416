"""An analytic lower bound on HELLoRA k's step-time ratio to the attention-only floor (issue 22): GEMM FLOPs.

The floor trains LoRA rank r on attention (q, k, v, o) of a frozen MoE model; HELLoRA k adds LoRA rank r on the
router and on gate, up and down of the k hot experts of each layer (``apply_hellora``'s defaults). The adapter
must add, per layer, the FLOPs of its low-rank products on the rows it applies to, forward and backward (2 FLOPs per
multiply-add), in one of two formulations, whichever is cheaper for the row count:

* activation space (HELLoRA's hot experts): for a projection ``in -> out`` on ``m`` rows, forward ``x A^T`` and
  ``(x A^T) B^T`` (2mr(in+out)) and backward the gradients of B, of ``x A^T``, of A and of the input
  (4mr(in+out)): ``6 m r (in + out)``;
* folded weight ``W + BA`` (HELLoRA's router): the fold (2 r in out), the weight gradient ``g^T x``
  (2 m in out) and the gradients of B and A from it (4 r in out); the base GEMMs then run on the folded weight at
  no extra cost.

The router's rows are all T tokens; the hot experts' rows are the routed assignments that reach a hot expert
(``hot_share`` of the T * top_k assignments). For rows spread over several hot experts the cheaper formulation
applied to all of them at once is still a lower bound (each expert's cost is concave in its row count).

The floor's FLOPs, counted the same way (GEMMs only; the frozen weights get no weight gradient):

* attention projections: forward ``2 T H (q + 2 kv)`` and ``2 T q H`` (o), backward the input gradients (the
  first layer's q, k, v inputs need none: the embedding is frozen); the attention LoRA, ``6 T r (in + out)`` per
  projection (minus the first layer's input gradients, ``2 T r H`` each for q, k, v);
* attention scores and values: ``4 B h S^2 d`` forward and twice that backward, counted dense (as
  ``torch.utils.flop_counter`` does: causal masking would halve it; counting it dense makes the floor larger and
  the bound smaller, i.e. the bound stays a lower bound);
* router: ``2 T H E`` forward, as much backward (the routing weights' gradient reaches the attention LoRA);
* experts: ``6 n H I`` forward for n = T * top_k assignments (gate, up, down), as much backward (input gradients);
* LM head: ``2 T H V`` forward and backward.

``bound = (floor + adapter) / floor`` is the ratio a FLOP-bound machine would show if the adapter were
implemented with no FLOP beyond those of the cheaper formulation and no other cost (``count_gemm_flops`` checks
the floor's count, and HELLoRA's own, against what a step dispatches); elementwise work (activations, norms,
softmax, AdamW) is left out of both. The measured ratio can sit below it when the floor's step is not
FLOP-bound (its elementwise and framework time dilutes the adapter's GEMMs).

    python bench/flop_bound.py        # the bound at the sweep's shape and at real layer shapes: flop-bound.{md,json}
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))


@dataclass(frozen=True)
class Shape:
    """What the FLOP count needs of a model, a batch and the adapter."""

    hidden: int
    intermediate: int  # per expert
    experts: int
    top_k: int
    layers: int
    batch: int
    seq: int
    heads: int
    kv_heads: int
    vocab: int
    rank: int
    head_dim: Optional[int] = None  # default hidden // heads
    lm_head: bool = True  # count the LM head (a whole model); False: decoder layers only


def lora_flops(rows: float, rank: int, fan_in: int, fan_out: int, input_grad: bool = True) -> float:
    """Forward + backward GEMM FLOPs of a rank-``rank`` LoRA ``in -> out`` applied in activation space to ``rows``
    rows: ``x A^T``, ``(x A^T) B^T``, and the gradients of B, of ``x A^T``, of A and (``input_grad``) of x."""
    flops = 6 * rows * rank * (fan_in + fan_out)
    return flops if input_grad else flops - 2 * rows * rank * fan_in


def folded_lora_flops(rows: float, rank: int, fan_in: int, fan_out: int) -> float:
    """The same LoRA with the adapted weight folded, ``W' = W + BA`` (the base GEMMs then run on W' at no extra
    cost): the fold (2 in out r), the weight gradient ``g^T x`` (2 rows in out) and the gradients of B and A
    from it (4 in out r)."""
    return 2 * rows * fan_in * fan_out + 6 * fan_in * fan_out * rank


def least_lora_flops(rows: float, rank: int, fan_in: int, fan_out: int) -> float:
    """The cheaper of the two formulations for ``rows`` rows of one weight. For rows spread over several hot
    experts it is still a lower bound: each expert's cost is concave in its row count, so the sum is least with
    every row on one expert."""
    return min(lora_flops(rows, rank, fan_in, fan_out), folded_lora_flops(rows, rank, fan_in, fan_out))


def step_flops(shape: Shape, hot_share: float | list[float], score_density: float = 1.0) -> dict[str, float]:
    """GEMM FLOPs of one training step (forward + backward) of the floor, by part, and of the adapter.

    ``hot_share``: the share of routed assignments that reach a hot expert, one value or one per layer. Returns the
    floor's parts; ``router LoRA`` and ``hot-expert LoRA``, the least the adapter needs (the cheaper formulation,
    :func:`least_lora_flops`); ``adapter`` their sum, ``bound`` = (floor + adapter) / floor; and ``hellora``, the
    FLOPs of HELLoRA's own implementation (router LoRA folded, hot-expert LoRA in activation space).
    ``score_density``: the share of the S x S attention scores computed (1: dense, as counted by torch's FLOP
    counter; 0.5: a causal kernel that skips the masked half)."""
    s = shape
    shares = list(hot_share) if isinstance(hot_share, (list, tuple)) else [hot_share] * s.layers
    if len(shares) != s.layers:
        raise ValueError(f"hot_share has {len(shares)} values for {s.layers} layers.")
    if any(not 0.0 <= x <= 1.0 for x in shares):
        raise ValueError(f"hot_share values must lie in [0, 1]; got {shares}.")
    d = s.head_dim or s.hidden // s.heads
    q, kv = s.heads * d, s.kv_heads * d
    T, H, I, E, r = s.batch * s.seq, s.hidden, s.intermediate, s.experts, s.rank
    n = T * s.top_k
    out = dict.fromkeys(("attention projections", "attention LoRA", "attention scores", "router", "expert GEMMs",
                         "LM head", "router LoRA", "hot-expert LoRA"), 0.0)
    implemented = 0.0
    for layer in range(s.layers):
        first = layer == 0
        qkv = 2 * T * H * (q + 2 * kv)
        out["attention projections"] += (qkv if first else 2 * qkv) + 2 * (2 * T * q * H)
        for fan_out in (q, kv, kv):
            out["attention LoRA"] += lora_flops(T, r, H, fan_out, input_grad=not first)
        out["attention LoRA"] += lora_flops(T, r, q, H)
        out["attention scores"] += 3 * (4 * s.batch * s.heads * s.seq * s.seq * d) * score_density
        out["router"] += 2 * (2 * T * H * E)
        out["expert GEMMs"] += 2 * (6 * n * H * I)
        out["router LoRA"] += least_lora_flops(T, r, H, E)
        m = shares[layer] * n
        out["hot-expert LoRA"] += 2 * least_lora_flops(m, r, H, I) + least_lora_flops(m, r, I, H)  # gate, up; down
        implemented += folded_lora_flops(T, r, H, E) + 2 * lora_flops(m, r, H, I) + lora_flops(m, r, I, H)
    if s.lm_head:
        out["LM head"] = 2 * (2 * T * H * s.vocab)
    floor = sum(v for k, v in out.items() if k not in ("router LoRA", "hot-expert LoRA"))
    adapter = out["router LoRA"] + out["hot-expert LoRA"]
    return {**out, "floor": floor, "adapter": adapter, "bound": (floor + adapter) / floor,
            "hellora": floor + implemented}


def count_gemm_flops(fn) -> tuple[float, dict[str, float]]:
    """GEMM FLOPs that ``fn()`` dispatches (forward and backward), by aten operator, with the conventions of
    :func:`step_flops` (2 per multiply-add; attention scores dense, its backward 2x the forward); raises on a
    matrix-product operator it has no formula for, so that nothing is silently left out."""
    import torch
    from torch.utils._python_dispatch import TorchDispatchMode

    aten = torch.ops.aten
    counts: dict[str, float] = {}

    def mm(a, b) -> float:
        return 2.0 * a.shape[0] * a.shape[1] * b.shape[-1]

    def grouped(a, b) -> float:
        if a.dim() == 2 and b.dim() == 3:
            return 2.0 * a.shape[0] * a.shape[1] * b.shape[2]
        if a.dim() == 2 and b.dim() == 2:  # (K, M) x (M, N) over groups of M: weight gradients
            return 2.0 * a.shape[0] * a.shape[1] * b.shape[1]
        return 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[-1]  # 3-D x 3-D

    def attention(q, k, v) -> float:
        b, h, length, d = q.shape
        return 2.0 * b * h * length * k.shape[-2] * (d + v.shape[-1])

    formulas = {
        aten.mm.default: lambda a, b, *r, **kw: mm(a, b),
        aten.addmm.default: lambda c, a, b, *r, **kw: mm(a, b),
        aten.bmm.default: lambda a, b, *r, **kw: 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2],
        aten.baddbmm.default: lambda c, a, b, *r, **kw: 2.0 * a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2],
        aten._grouped_mm.default: lambda a, b, *r, **kw: grouped(a, b),
        aten._scaled_dot_product_flash_attention_for_cpu.default: lambda q, k, v, *r, **kw: attention(q, k, v),
        aten._scaled_dot_product_flash_attention_for_cpu_backward.default:
            lambda g, q, k, v, *r, **kw: 2 * attention(q, k, v),
    }
    unknown = ("matmul", "linear", "conv", "dot", "mm", "attention")

    class Counter(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            kwargs = kwargs or {}
            formula = formulas.get(func)
            name = func.overloadpacket.__name__
            if formula is not None:
                counts[name] = counts.get(name, 0.0) + formula(*args, **kwargs)
            elif any(u in name for u in unknown) and name not in ("_reshape_alias",):
                raise NotImplementedError(f"count_gemm_flops has no FLOP formula for aten.{name}.")
            return func(*args, **kwargs)

    with Counter():
        fn()
    return sum(counts.values()), counts


def shape_of(preset, lm_head: bool = True) -> Shape:
    """The FLOP shape of a ``step_throughput.Preset``."""
    head_dim = dict(preset.extra).get("head_dim")
    return Shape(hidden=preset.hidden, intermediate=preset.intermediate, experts=preset.experts, top_k=preset.top_k,
                 layers=preset.layers, batch=preset.batch, seq=preset.seq, heads=preset.heads,
                 kv_heads=preset.kv_heads, vocab=preset.vocab, rank=preset.rank, head_dim=head_dim, lm_head=lm_head)


def bound_of_row(shape: dict[str, Any], hot_share: float | list[float]) -> dict[str, float]:
    """The FLOP bound of a sweep row, from its ``asdict(Preset)`` shape and its per-layer hot share."""
    counts = step_flops(Shape(
        hidden=shape["hidden"], intermediate=shape["intermediate"], experts=shape["experts"], top_k=shape["top_k"],
        layers=shape["layers"], batch=shape["batch"], seq=shape["seq"], heads=shape["heads"],
        kv_heads=shape["kv_heads"], vocab=shape["vocab"], rank=shape["rank"],
        head_dim=dict(tuple(x) for x in shape.get("extra", ())).get("head_dim")), hot_share)
    return {"bound": counts["bound"], "floor_flops": counts["floor"], "adapter_flops": counts["adapter"],
            "hellora_flops_x_floor": counts["hellora"] / counts["floor"]}


# Real layer shapes (one decoder layer, no LM head: a deep model amortises it): name -> preset name.
REAL_SHAPES = {
    "OLMoE-1B-7B (hidden 2048, 64 experts of 1024, top-8)": "olmoe-1b-7b",
    "Qwen3-30B-A3B (hidden 2048, 128 experts of 768, top-8)": "qwen3-moe",
    "DeepSeek-V3-like (hidden 7168, 256 experts of 2048, top-8; OLMoE-style attention)": "deepseek-v3-like-1l-gpu",
}


def real_shape_rows(hot_share: float, rank: int, seq: int) -> list[dict[str, Any]]:
    """The bound for one decoder layer of each real shape (dense and causal-halved attention scores)."""
    from dataclasses import replace

    from step_throughput import PRESETS

    rows = []
    for label, name in REAL_SHAPES.items():
        shape = replace(shape_of(PRESETS[name], lm_head=False), layers=1, batch=1, seq=seq, rank=rank)
        counts = step_flops(shape, hot_share)
        rows.append({"shape": label, "preset": name, "rank": rank, "seq": seq, "hot_share": hot_share,
                     "floor_gflop": counts["floor"] / 1e9, "adapter_gflop": counts["adapter"] / 1e9,
                     "expert_lora_share_of_adapter": counts["hot-expert LoRA"] / counts["adapter"],
                     "bound": counts["bound"], "bound_causal": step_flops(shape, hot_share, 0.5)["bound"]})
    return rows


def counted_check(experts: int, tiny: bool = False, seed: int = 0) -> dict[str, float]:
    """The sweep's floor and HELLoRA k on one expert count, their first training step counted by
    :func:`count_gemm_flops`, next to :func:`step_flops`'s floor and HELLoRA-implementation FLOPs."""
    from scaling_sweep import SCALING_BASE, TINY_BASE
    from step_throughput import Preset, build_setups

    preset = Preset(experts=experts, **(TINY_BASE if tiny else SCALING_BASE))
    setups, info = build_setups(preset, ["skewed"], ["floor", "hellora"], seed, 0.5, False, None)
    shares = info["routers"]["skewed"]["top_k_share_per_layer"]
    expected = step_flops(shape_of(preset), shares)
    by = {s.name: s for s in setups}
    return {"experts": experts, "floor_counted": count_gemm_flops(by["floor"].step)[0], "floor_expected": expected["floor"],
            "hellora_counted": count_gemm_flops(by[f"hellora-k{preset.top_k}"].step)[0],
            "hellora_expected": expected["hellora"], "bound": expected["bound"]}


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    from benchlib import command_line, markdown_table, write_results
    from scaling_sweep import SCALING_BASE
    from step_throughput import Preset

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hot-share", type=float, default=0.5, help="share of assignments on hot experts")
    parser.add_argument("--ranks", default="32,16,8", help="LoRA ranks for the real-shape table")
    parser.add_argument("--seq", type=int, default=2048, help="sequence length at real shapes")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--count", default="16", help="expert counts whose sweep steps are also counted by dispatch "
                        "(the check that the formulas match what runs; '' for none)")
    parser.add_argument("--no-write", action="store_true")
    args = parser.parse_args(argv)
    if not 0.0 <= args.hot_share <= 1.0:
        raise SystemExit(f"--hot-share is a share of assignments in [0, 1]; got {args.hot_share}.")
    try:
        ranks = [int(x) for x in args.ranks.split(",")]
    except ValueError:
        raise SystemExit(f"--ranks takes comma-separated integers such as 32,16; got {args.ranks!r}.") from None
    bench = [{"experts": e, **step_flops(shape_of(Preset(experts=e, **SCALING_BASE)), args.hot_share)}
             for e in (16, 64, 128, 256)]
    try:
        count = [int(x) for x in args.count.split(",")] if args.count else []
    except ValueError:
        raise SystemExit(f"--count takes comma-separated expert counts such as 16,64 (or ''); got {args.count!r}.") from None
    counted = [counted_check(e) for e in count]
    real = [row for rank in ranks for row in real_shape_rows(args.hot_share, rank, args.seq)]
    command = command_line(__file__, argv)
    b = SCALING_BASE
    lo, hi = min(r["bound"] for r in bench), max(r["bound"] for r in bench)
    real32 = [r for r in real if r["rank"] == 32]
    if lo > 1.05:
        verdict = ("so no implementation of a rank-32 adapter reaches the 1.05x target on a FLOP-bound machine: the "
                   "target is below what the adapter must compute at this shape")
    else:
        verdict = "so the 1.05x target is within what a FLOP-minimal rank-32 adapter could reach"
    reading = (
        f"Reading: at the sweep's shape the adapter's necessary GEMM FLOPs alone are {lo - 1:.1%}-{hi - 1:.1%} of "
        f"the floor's ({args.hot_share:.0%} hot share; the sweep's own rows use their measured shares), {verdict}. "
        "A measured ratio can sit below the bound where the floor's step is not FLOP-bound (its elementwise, "
        "softmax, optimizer and framework time has no counterpart in the adapter and dilutes it). At real layer "
        "shapes (rank 32, one layer) the bound is " + ", ".join(f"{r['bound']:.3f}" for r in real32)
        + " (OLMoE, Qwen3-MoE, DeepSeek-V3-like): the adapter's share of the work shrinks as the layers widen."
    )
    lines = [
        "### FLOP lower bound on HELLoRA k's step time x floor",
        "",
        f"GEMM FLOPs of one training step (forward + backward), counted by `bench/flop_bound.py` (its docstring "
        f"lists every term); {args.hot_share:.0%} of the routed assignments on hot experts (the sweep's skewed "
        "router; the sweep itself uses each row's measured share). bound = (floor + the adapter's necessary "
        "FLOPs) / floor: the least step-time ratio an implementation of the rank-r adapter (as activation-space "
        "LoRA or as a folded weight, whichever needs fewer FLOPs) could reach on a FLOP-bound machine. Attention "
        "scores are counted dense (a causal kernel does about half): that makes the floor larger and the bound "
        "lower, so it stays a lower bound.",
        "",
        f"The sweep's shape (hidden {b['hidden']}, intermediate {b['intermediate']}, {b['layers']} layers, "
        f"top-{b['top_k']}, batch {b['batch']} x {b['seq']}, r=32, LM head included):",
        "",
        markdown_table(
            ["experts", "floor GFLOP", "router LoRA GFLOP", "hot-expert LoRA GFLOP", "bound x floor"],
            ([r["experts"], f"{r['floor'] / 1e9:.3f}", f"{r['router LoRA'] / 1e9:.3f}",
              f"{r['hot-expert LoRA'] / 1e9:.3f}", f"{r['bound']:.3f}"] for r in bench),
        ),
        "",
        "Check against what runs (the sweep's floor and HELLoRA k, first training step, every matrix product "
        "counted as it is dispatched, `count_gemm_flops`; expected from the formulas with the row's hot share; "
        "HELLoRA's own implementation folds the router LoRA and runs the hot-expert LoRA in activation space):",
        "",
        markdown_table(
            ["experts", "floor counted", "floor formula", "HELLoRA counted", "HELLoRA formula", "bound x floor"],
            ([c["experts"], f"{c['floor_counted']:,.0f}", f"{c['floor_expected']:,.0f}", f"{c['hellora_counted']:,.0f}",
              f"{c['hellora_expected']:,.0f}", f"{c['bound']:.3f}"] for c in counted),
        ),
        "",
        reading,
        "",
        f"Real layer shapes (one decoder layer, sequence {args.seq}, no LM head):",
        "",
        markdown_table(
            ["layer", "r", "floor GFLOP", "adapter GFLOP", "of which hot experts", "bound x floor",
             "bound, causal scores halved"],
            ([r["shape"], r["rank"], f"{r['floor_gflop']:.1f}", f"{r['adapter_gflop']:.2f}",
              f"{r['expert_lora_share_of_adapter']:.0%}", f"{r['bound']:.3f}", f"{r['bound_causal']:.3f}"]
             for r in real),
        ),
        "",
        f"Command: `{command}`",
    ]
    markdown = "\n".join(lines)
    print(markdown)
    data = {"command": command, "hot_share": args.hot_share, "bench_shape": bench, "counted": counted,
            "real_shapes": real}
    if not args.no_write:
        write_results("flop-bound", markdown, data, args.out)
    return data


if __name__ == "__main__":
    main()
