"""Where HELLoRA's peak memory above the attention-only floor goes (issue 22), measured the way the sweep measures it.

The scaling sweep's peak memory of a configuration is ``static + transient``: the bytes of the model's parameters,
buffers and optimizer state (distinct storages), plus the transient peak of one training step above what was live
when it started (CPU: the profiler's allocation events replayed in time order; ``benchlib.transient_peak_bytes``).
This script builds the sweep's shape (``--experts``; floor = LoRA r on attention, HELLoRA k = ``apply_hellora``'s
defaults: attention + router + k hot experts per layer) and breaks the difference HELLoRA minus floor down:

* static: trainable parameters of each adapter group (attention / router / hot-expert LoRA), AdamW's two moments and
  its per-parameter step counters, the hot-expert lists (buffers); the expected extra static bytes are computed
  from the parameter counts alone (4 B per float32 weight, x3 with exp_avg and exp_avg_sq) and compared with the
  measured difference;
* transient: the step's peak (when it happens: the profiler's memory categories live at the peak), and the
  tensors the forward saves for backward (``torch.autograd.graph.saved_tensors_hooks``; distinct storages, model
  weights and the batch excluded), attributed to the module that saved them: attention, router, the experts'
  base path, the experts' low-rank path (``LoraRows``/``AddRows``), norms, the rest (embedding, LM head, loss).
  The low-rank path's saved bytes are compared with what its backward needs, counted from the hot-row count:
  ``xa`` (hot rows x 2r for gate+up, x r for down, float32), the hot rows' token and row indices (int64), the
  hot rows' routing weights and the per-slot offsets.

    python bench/memory_hot_path.py --experts 16,64,256     # writes bench/results/memory-hot-path.{md,json}
"""

from __future__ import annotations

import argparse
import collections
import os
import sys
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchlib import command_line, machine_info, machine_line, markdown_table, write_results  # noqa: E402
from scaling_sweep import SCALING_BASE, TINY_BASE, parse_experts  # noqa: E402
from step_throughput import Preset, build_setups, memory_of  # noqa: E402

GROUPS = ("attention", "router", "experts: base path", "experts: low-rank path", "norms", "rest (embedding, LM head, loss)")


def adapter_group(name: str) -> str:
    """The adapter group of a trainable parameter's name."""
    if ".mlp.experts." in name:
        return "hot-expert LoRA"
    if ".mlp.gate." in name or ".router." in name:
        return "router LoRA"
    return "attention LoRA"


def module_group(name: str) -> str:
    if ".mlp.experts" in name:
        return "experts: base path"
    if ".mlp.gate" in name or ".mlp.router" in name:
        return "router"
    if "self_attn" in name and not name.endswith("_norm"):
        return "attention"
    if name.endswith("norm") or name.endswith("layernorm"):
        return "norms"
    return GROUPS[-1]


@contextmanager
def _low_rank_tag(state: dict[str, Any]) -> Iterator[None]:
    """While the layer's LoraRows/AddRows run, saved tensors count as the low-rank path's."""
    from hellora_trl.expert_lora import layer as layer_module

    originals = {name: getattr(layer_module, name) for name in ("LoraRows", "AddRows")}

    def tagged(fn):
        class Tagged:
            @staticmethod
            def apply(*args):
                state["tag"] = "experts: low-rank path"
                try:
                    return fn.apply(*args)
                finally:
                    state["tag"] = None

        return Tagged

    for name, fn in originals.items():
        setattr(layer_module, name, tagged(fn))
    # add_rows (ops) calls AddRows from its own module: tag it there too.
    from hellora_trl.expert_lora import ops as ops_module

    original_add = ops_module.AddRows
    ops_module.AddRows = tagged(original_add)
    try:
        yield
    finally:
        for name, fn in originals.items():
            setattr(layer_module, name, fn)
        ops_module.AddRows = original_add


def saved_bytes_by_group(setup, hot_rows: Optional[list] = None) -> tuple[dict[str, int], int]:
    """Bytes of the distinct storages one training step's forward saves for backward, per module group, and the
    saved storages' total (model weights, buffers, optimizer state and the batch excluded). ``hot_rows``, when
    given, receives (layer, assignments routed to its hot experts) for each HotExpertLoraLayer call of that step."""
    from hellora_trl import HotExpertLoraLayer

    model = setup.model
    exclude = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    exclude |= {t.untyped_storage().data_ptr() for t in setup.batch.values()}
    stack: list[str] = []
    state: dict[str, Any] = {"tag": None}
    seen: dict[int, tuple[str, int]] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        ptr = storage.data_ptr()
        if ptr not in exclude and ptr not in seen and t.device.type != "meta":
            group = state["tag"] or (module_group(stack[-1]) if stack else GROUPS[-1])
            seen[ptr] = (group, storage.nbytes())
        return t

    def enter(name: str):
        def hook(module, args) -> None:
            stack.append(name)

        return hook

    def leave(module, args, output) -> None:
        stack.pop()

    def count(layer, args) -> None:
        hot_rows.append((layer, int(torch.isin(args[1], layer.lora_hot_experts["default"]).sum())))

    handles = []
    for name, module in model.named_modules():
        if hot_rows is not None and isinstance(module, HotExpertLoraLayer):
            handles.append(module.register_forward_pre_hook(count))
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        with _low_rank_tag(state), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            setup.step()
    finally:
        for h in handles:
            h.remove()
    by = collections.Counter()
    for group, nbytes in seen.values():
        by[group] += nbytes
    return {g: by.get(g, 0) for g in GROUPS}, sum(by.values())


def peak_categories(setup) -> dict[str, int]:
    """Bytes live at the step's transient peak, by the profiler's memory category (ACTIVATION, GRADIENT, ...),
    and under ``"at"`` the innermost Python line running when the peak was reached."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True, record_shapes=True, with_stack=True) as prof:
        setup.step()
    memory = prof._memory_profile()
    live: dict[Any, tuple[Any, int, int]] = {}
    current = peak = 0
    at_peak: dict[Any, tuple[Any, int, int]] = {}
    peak_time = None
    for time, action, (key, version), size in memory.timeline:
        action = str(action)
        if action.endswith("CREATE"):
            live[key] = (key, version, size)
            current += size
        elif action.endswith("DESTROY") and key in live:
            current -= live.pop(key)[2]
        elif action.endswith("INCREMENT_VERSION") and key in live:
            live[key] = (key, version + 1, live[key][2])
        if current > peak:
            peak, at_peak, peak_time = current, dict(live), time
    spanning = [e for e in prof.profiler.kineto_results.events()
                if peak_time is not None and e.start_ns() <= peak_time <= e.end_ns() and ".py(" in e.name()]
    where = min(spanning, key=lambda e: e.end_ns() - e.start_ns()).name() if spanning else "?"
    by = collections.Counter()
    for key, version, size in at_peak.values():
        category = memory._categories.get(key, version)
        by[category.name if category is not None else "UNKNOWN"] += size
    return {**by, "at": where}


def static_breakdown(setup) -> dict[str, int]:
    """Parameter, optimizer-state and buffer bytes of one configuration (the sweep's ``static_bytes`` split)."""
    model, optimizer = setup.model, setup.optimizer
    out = collections.Counter()
    trainable = collections.Counter()
    for name, p in model.named_parameters():
        if p.requires_grad:
            out["trainable parameters"] += p.numel() * p.element_size()
            trainable[adapter_group(name)] += p.numel()
        else:
            out["frozen base weights"] += p.numel() * p.element_size()
    for state in optimizer.state.values():
        for key, t in state.items():
            if isinstance(t, torch.Tensor):
                out["AdamW moments" if key in ("exp_avg", "exp_avg_sq") else "AdamW step counters"] += t.untyped_storage().nbytes()
    for name, b in model.named_buffers():
        out["hot-expert lists" if "lora_hot_experts" in name else "other buffers"] += b.untyped_storage().nbytes()
    return {**out, **{f"params: {g}": n for g, n in trainable.items()}}


def low_rank_expected(hot_rows: list, rank: int) -> int:
    """Bytes the low-rank path's backward needs saved, from the hot-row counts of the step (``hot_rows``: (layer,
    m) per layer call): per layer, ``xa`` for gate+up (m x 2r) and down (m x r) in the factors' dtype, the hot rows'
    token and row indices (m int64 each), their routing weights (m, float32) and the hot slots' offsets (k int32,
    shared by gate/up and down)."""
    total = 0
    for layer, m in hot_rows:
        k = layer.lora_hot_experts["default"].numel()
        factor_bytes = layer.lora_down_A["default"].element_size()
        total += m * 3 * rank * factor_bytes + 2 * m * 8 + m * 4 + k * 4
    return total


def forward_peak_bytes(setup) -> int:
    """Transient peak of the forward and loss alone (the graph kept alive, no backward): when it equals the
    step's, the step peaks at the end of the forward, where every saved activation is live."""
    from benchlib import transient_peak_bytes

    kept = []

    def forward() -> None:
        kept.append(setup.model(**setup.batch, labels=setup.batch["input_ids"]).loss)

    peak = transient_peak_bytes(forward, "cpu")
    kept.clear()
    return peak


def measure(experts: int, seed: int, tiny: bool) -> dict[str, Any]:
    """Floor and HELLoRA k on the sweep's shape with ``experts`` experts: the sweep's peak-memory numbers and their
    breakdown."""
    preset = Preset(experts=experts, **(TINY_BASE if tiny else SCALING_BASE))
    setups, _ = build_setups(preset, ["skewed"], ["floor", "hellora"], seed, 0.5, False, None)
    by = {s.name: s for s in setups if s.name in ("floor", f"hellora-k{preset.top_k}")}
    floor, ours = by["floor"], by[f"hellora-k{preset.top_k}"]
    for s in (floor, ours):  # the optimizer state exists after the first step, as in the sweep (warm-up first)
        s.step()
    out: dict[str, Any] = {"experts": experts, "rank": preset.rank, "k": preset.top_k}
    for key, s in (("floor", floor), ("hellora", ours)):
        memory = memory_of(s, "cpu")
        hot_rows: list = []
        saved, saved_total = saved_bytes_by_group(s, hot_rows)
        out[key] = {**memory, "static": static_breakdown(s), "saved": saved, "saved_total": saved_total,
                    "at_peak": peak_categories(s), "forward_peak_bytes": forward_peak_bytes(s),
                    "hot_rows_per_layer": [m for _, m in hot_rows]}
        if key == "hellora":
            out["low_rank_saved_expected"] = low_rank_expected(hot_rows, preset.rank)
    f, o = out["floor"], out["hellora"]
    extra_trainable = sum(v for k, v in o["static"].items() if k.startswith("params:") and "attention" not in k)
    extra_tensors = sum(1 for p in ours.model.parameters() if p.requires_grad) - sum(
        1 for p in floor.model.parameters() if p.requires_grad)
    out["static_extra_measured"] = o["static_bytes"] - f["static_bytes"]
    # float32 weight + exp_avg + exp_avg_sq = 12 B per trainable parameter; a 4-byte step counter per tensor;
    # the hot lists (k int64 per layer).
    out["static_extra_expected"] = (12 * extra_trainable + 4 * extra_tensors
                                    + o["static"].get("hot-expert lists", 0))
    out["extra_trainable"] = extra_trainable
    out["low_rank_saved_measured"] = o["saved"]["experts: low-rank path"]
    out["transient_extra"] = o["transient_peak_bytes"] - f["transient_peak_bytes"]
    out["peak_x_floor"] = o["peak_bytes"] / f["peak_bytes"]
    # The least any rank-r, k-hot adapter trained with AdamW adds: its weights and moments, and what its
    # backward must keep (the low-rank path's saved tensors); the floor's own activations unchanged.
    inherent = out["static_extra_expected"] + out["low_rank_saved_expected"]
    out["inherent_x_floor"] = (f["peak_bytes"] + inherent) / f["peak_bytes"]
    out["static_only_x_floor"] = (f["peak_bytes"] + out["static_extra_expected"]) / f["peak_bytes"]
    return out


def mib(n: float) -> str:
    return f"{n / 2**20:.2f}"


def render(rows: list[dict[str, Any]], machine, command, load) -> str:
    summary = markdown_table(
        ["experts", "floor peak MiB", "HELLoRA peak MiB", "HELLoRA x floor", "static extra MiB (measured / expected)",
         "transient extra MiB", "floor + weights & AdamW x floor", "floor + weights & AdamW + low-rank saved x floor"],
        ([r["experts"], mib(r["floor"]["peak_bytes"]), mib(r["hellora"]["peak_bytes"]), f"{r['peak_x_floor']:.3f}",
          f"{mib(r['static_extra_measured'])} / {mib(r['static_extra_expected'])}", f"{r['transient_extra'] / 2**20:+.2f}",
          f"{r['static_only_x_floor']:.3f}", f"{r['inherent_x_floor']:.3f}"] for r in rows),
    )
    saved = markdown_table(
        ["experts", "config", *GROUPS, "total saved", "step transient peak", "forward + loss transient peak"],
        ([r["experts"], key, *(mib(r[key]["saved"][g]) for g in GROUPS), mib(r[key]["saved_total"]),
          mib(r[key]["transient_peak_bytes"]), mib(r[key]["forward_peak_bytes"])]
         for r in rows for key in ("floor", "hellora")),
    )
    low_rank = markdown_table(
        ["experts", "low-rank path saved bytes, measured", "expected (xa + indices + routing weights + offsets)", "equal"],
        ([r["experts"], f"{r['low_rank_saved_measured']:,}", f"{r['low_rank_saved_expected']:,}",
          "yes" if r["low_rank_saved_measured"] == r["low_rank_saved_expected"] else "NO"] for r in rows),
    )
    static_keys = sorted({k for r in rows for key in ("floor", "hellora") for k in r[key]["static"]})
    static = markdown_table(
        ["experts", "config", *static_keys],
        ([r["experts"], key, *(f"{r[key]['static'].get(k, 0):,}" for k in static_keys)]
         for r in rows for key in ("floor", "hellora")),
    )
    at_peak = markdown_table(
        ["experts", "config", "live at the transient peak, by profiler category (MiB)", "running at the peak"],
        ([r["experts"], key, ", ".join(f"{c} {mib(v)}" for c, v in sorted(
            ((c, v) for c, v in r[key]["at_peak"].items() if c != "at"), key=lambda x: -x[1])),
          f"`{r[key]['at_peak']['at']}`"] for r in rows for key in ("floor", "hellora")),
    )
    r0 = rows[0]
    reading = []
    for r in rows:
        f, o = r["floor"], r["hellora"]
        base_saved = f["saved"]["experts: base path"] - o["saved"]["experts: base path"]
        # within 0.1%: the router LoRA's training moves a few assignments between the two measured steps
        at_forward = all(abs(x["forward_peak_bytes"] - x["transient_peak_bytes"]) <= 1e-3 * x["transient_peak_bytes"]
                         for x in (f, o))
        reading.append(
            f"- E={r['experts']}: HELLoRA {r['peak_x_floor']:.3f}x the floor. Static +{mib(r['static_extra_measured'])} "
            f"MiB ({'exactly' if r['static_extra_measured'] == r['static_extra_expected'] else 'NOT'} the expected "
            f"12 B per extra trainable parameter: {r['extra_trainable']:,} router and hot-expert LoRA weights with "
            f"AdamW's two moments), on its own {r['static_only_x_floor'] - 1:.1%} of the floor's peak. Transient "
            f"{r['transient_extra'] / 2**20:+.2f} MiB: the step peaks "
            f"{'at the end of the forward (forward + loss peak = step peak within 0.1%), before any gradient exists' if at_forward else 'inside the backward'}; "
            f"the low-rank path saves {mib(r['low_rank_saved_measured'])} MiB "
            f"({'exactly' if r['low_rank_saved_measured'] == r['low_rank_saved_expected'] else 'NOT'} what its "
            f"backward needs), the experts' base path {mib(base_saved)} MiB less than transformers' experts forward.")
    lines = [
        "### Peak memory of HELLoRA k against the attention-only floor: breakdown",
        "",
        f"The scaling sweep's shape (OLMoE architecture, hidden {SCALING_BASE['hidden']}, intermediate "
        f"{SCALING_BASE['intermediate']}, {SCALING_BASE['layers']} layers, top-{SCALING_BASE['top_k']}, batch "
        f"{SCALING_BASE['batch']} x {SCALING_BASE['seq']}, float32, skewed router, LoRA r={r0['rank']}, HELLoRA "
        f"k={r0['k']}), peak = static (weights, buffers, AdamW state) + the step's transient peak, measured as "
        "`bench/step_throughput.py` does (`memory_of`). Memory counts are exact (no timing involved).",
        "",
        summary,
        "",
        *reading,
        "",
        "Removed for issue 22: the hot rows' gate/up deltas and their concatenation were held through the down "
        "projection (now freed once added, `HotExpertLoraLayer._add_up_delta`), and `LoraRows` held its gathered "
        "rows through the B products and, in backward, through the dense input gradient, where the step peaks. "
        "What is left above the floor is the adapter itself: its float32 weights and AdamW's two moments (12 B per "
        "parameter, a fixed size: k, r and the expert shape, not E) and the activations its backward needs (the "
        "rank-r products of the hot rows). Nothing else above the floor remains to remove without changing the "
        "adapter (rank, k, optimizer) or recomputing the low-rank products in backward. The ratio falls with E "
        "because the floor's static bytes (the frozen experts, E x 3 x hidden x intermediate floats per layer) grow "
        "with E while the adapter's bytes do not.",
        "",
        "Static bytes (exact; `expected` = 12 B per extra trainable float32 parameter (weight, exp_avg, exp_avg_sq) "
        "+ a 4-byte AdamW step counter per extra tensor + the hot-expert lists):",
        "",
        static,
        "",
        "Tensors the forward saves for backward (distinct storages, MiB; weights and batch excluded), by the module "
        "that saved them first:",
        "",
        saved,
        "",
        at_peak,
        "",
        "The low-rank path's saved tensors against what its backward needs (bytes):",
        "",
        low_rank,
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {machine_line(machine)}; load average {load} at the end.",
    ]
    return "\n".join(lines)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--experts", default="16,64,256", help="comma-separated expert counts")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tiny", action="store_true", help="tiny shape (tests)")
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--name", default="memory-hot-path")
    parser.add_argument("--no-write", action="store_true")
    return parser.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> dict[str, Any]:
    args = parse_args(argv)
    experts = parse_experts(args.experts)
    if args.threads:
        torch.set_num_threads(args.threads)
    machine = machine_info("cpu")
    rows = [measure(e, args.seed, args.tiny) for e in experts]
    load = round(os.getloadavg()[0], 2) if hasattr(os, "getloadavg") else None
    command = command_line(__file__, argv)
    markdown = render(rows, machine, command, load)
    print(markdown, flush=True)
    data = {"command": command, "machine": machine, "load_avg_1m_at_end": load, "tiny": args.tiny, "rows": rows}
    if not args.no_write:
        paths = write_results(args.name, markdown, data, args.out)
        print(f"wrote {paths[0]} and {paths[1]}")
    return data


if __name__ == "__main__":
    main()
