"""The expert-LoRA layer: LoRA factors for the hot experts of a fused MoE experts module, nothing for the rest.

PEFT's ``target_parameters`` LoRA folds ``W + BA`` for the whole (E, out, in) expert stack on every forward.
Here the low-rank path runs in activation space and only on the rows the router sends to hot experts,
``scaling * B @ A`` applied to activations, never materialising an adapted weight. Rows are sorted by expert
once per layer call and that grouping is reused for gate/up, down and the low-rank factors (grouped GEMMs via
``torch._grouped_mm`` where torch has a kernel for the operands, a loop over groups otherwise, e.g. float64).
Two paths (see :attr:`HotExpertLoraLayer.expert_path`):

* fused (default when the wrapped module runs transformers' ``grouped_mm``/``batched_mm``): every assignment in
  one grouped pass over the whole expert stack, the low-rank delta added on the hot rows only;
* split (``eager`` and custom kernels): cold assignments go through the wrapped module unchanged, hot slots
  masked out by the sentinel index ``num_experts``, and hot assignments run in one grouped pass.

The layer plugs into PEFT through ``LoraConfig._register_custom_module`` so that PEFT's save/load, enable/
disable, ``merge_and_unload`` and trainable-parameter marking all apply to it.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Any, Optional, Sequence

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from ..constants import EXPERT_PATHS
from ..utils import full_shape
from .ops import (
    AddRows,
    LoraRows,
    RowGroups,
    add_rows,
    grouped_mm,
    lora_compute_dtype,
    project,
    row_scale,
    take_rows,
)

# transformers' vectorised experts implementations whose math the fused path computes itself.
FUSABLE_IMPLEMENTATIONS = ("grouped_mm", "batched_mm")

# Optimizer steps taken in this process (any torch.optim optimizer: a global step hook, registered on first use).
# A fused optimizer (AdamW(fused=True), the Trainer's default) writes the parameters without bumping their
# version counters, so "B is zero" cannot be cached on versions alone (HotExpertLoraLayer._b_is_zero).
_optimizer_steps = [0]
_step_hook: list[Any] = []


def _count_step(optimizer, args, kwargs) -> None:
    _optimizer_steps[0] += 1


def optimizer_steps() -> int:
    """Optimizer steps taken in this process so far (counted from the first call)."""
    if not _step_hook:
        from torch.optim.optimizer import register_optimizer_step_post_hook

        _step_hook.append(register_optimizer_step_post_hook(_count_step))
    return _optimizer_steps[0]


def experts_implementation(base: nn.Module) -> str:
    """The experts implementation the wrapped module would run (``eager`` when it has no config)."""
    return getattr(getattr(base, "config", None), "_experts_implementation", "eager") or "eager"


def expert_factor_shapes(experts: nn.Module, fuse_gate_up: bool = False) -> dict[str, tuple[int, int]]:
    """(in_features, out_features) of each adapted projection of one expert, keyed by factor name."""
    transposed = bool(getattr(experts, "is_transposed", False))
    has_gate = bool(getattr(experts, "has_gate", hasattr(experts, "gate_up_proj")))
    up_name = "gate_up_proj" if has_gate else "up_proj"
    up_shape = full_shape(getattr(experts, up_name))[1:]  # full_shape: real shape under ZeRO-3 partitioning
    down_shape = full_shape(experts.down_proj)[1:]
    up_in, up_out = (up_shape[0], up_shape[1]) if transposed else (up_shape[1], up_shape[0])
    down_in, down_out = (down_shape[0], down_shape[1]) if transposed else (down_shape[1], down_shape[0])
    if not has_gate:
        return {"up": (up_in, up_out), "down": (down_in, down_out)}
    if fuse_gate_up:
        return {"gate_up": (up_in, up_out), "down": (down_in, down_out)}
    return {"gate": (up_in, up_out // 2), "up": (up_in, up_out // 2), "down": (down_in, down_out)}


class HotExpertLoraLayer(nn.Module, BaseTunerLayer):
    """LoRA on a subset of the experts of a fused experts module.

    Factors are stacked per hot expert: ``lora_<proj>_A[adapter]`` is (k, r, in) and ``lora_<proj>_B[adapter]``
    is (k, out, r), where ``<proj>`` is gate/up/down (or gate_up when fused). ``lora_hot_experts[adapter]``
    records which experts the k slots belong to; it is saved with the adapter so a checkpoint describes itself.
    """

    adapter_layer_names = (
        "lora_gate_A",
        "lora_gate_B",
        "lora_up_A",
        "lora_up_B",
        "lora_gate_up_A",
        "lora_gate_up_B",
        "lora_down_A",
        "lora_down_B",
    )
    other_param_names = ("r", "lora_alpha", "scaling", "lora_dropout", "lora_hot_experts")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        hot_experts: Sequence[int],
        r: int = 8,
        lora_alpha: int = 8,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        fuse_gate_up: bool = False,
        eager_accepts_sentinel: bool = True,
        expert_path: str = "auto",
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.expert_path = expert_path
        self.num_experts = int(getattr(base_layer, "num_experts", full_shape(base_layer.down_proj)[0]))
        self.is_transposed = bool(getattr(base_layer, "is_transposed", False))
        self.is_concatenated = bool(getattr(base_layer, "is_concatenated", True))
        self.has_gate = bool(getattr(base_layer, "has_gate", hasattr(base_layer, "gate_up_proj")))
        self.has_bias = bool(getattr(base_layer, "has_bias", False))
        self.fuse_gate_up = fuse_gate_up and self.has_gate
        self.eager_accepts_sentinel = eager_accepts_sentinel
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_dropout = nn.ModuleDict({})
        for name in self.adapter_layer_names:
            setattr(self, name, nn.ParameterDict({}))
        self.lora_hot_experts = BufferDict({}, persistent=True)
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.kwargs = kwargs
        self._zero_cache: dict[str, tuple] = {}
        self._lookup_cache: dict[tuple, tuple] = {}
        self.update_layer(adapter_name, hot_experts, r, lora_alpha, lora_dropout, init_lora_weights, use_rslora)

    # ----------------------------------------------------------------------------------------- construction
    @property
    def factor_names(self) -> tuple[str, ...]:
        return tuple(expert_factor_shapes(self.get_base_layer(), self.fuse_gate_up))

    def update_layer(
        self,
        adapter_name: str,
        hot_experts: Sequence[int],
        r: int,
        lora_alpha: float,
        lora_dropout: float = 0.0,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
    ) -> None:
        hot = sorted({int(e) for e in hot_experts})
        if r <= 0:
            raise ValueError(f"LoRA rank r must be positive, got {r}.")
        if any(e < 0 or e >= self.num_experts for e in hot):
            raise ValueError(f"Hot expert ids {hot} out of range for a layer with {self.num_experts} experts.")
        base = self.get_base_layer()
        weight = base.down_proj
        device = weight.device
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_dropout[adapter_name] = nn.Dropout(lora_dropout) if lora_dropout > 0 else nn.Identity()
        # Persistent in the adapter file: the hot map travels with the weights.
        self._register_hot(adapter_name, torch.tensor(hot, dtype=torch.long, device=device))
        k = len(hot)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        for proj, (fan_in, fan_out) in expert_factor_shapes(base, self.fuse_gate_up).items():
            a = nn.Parameter(torch.empty(k, r, fan_in, device=device, dtype=dtype))
            b = nn.Parameter(torch.empty(k, fan_out, r, device=device, dtype=dtype))
            getattr(self, f"lora_{proj}_A")[adapter_name] = a
            getattr(self, f"lora_{proj}_B")[adapter_name] = b
        self.reset_lora_parameters(adapter_name, init_lora_weights)
        self.set_adapter(self.active_adapters)

    def _register_hot(self, adapter_name: str, hot: torch.Tensor) -> None:
        self.lora_hot_experts[adapter_name] = hot

    def reset_lora_parameters(self, adapter_name: str, init_lora_weights: bool | str = True) -> None:
        """A: PEFT's kaiming-uniform init per expert; B: zeros so the adapted model starts equal to the base."""
        for proj in self.factor_names:
            a = getattr(self, f"lora_{proj}_A")[adapter_name]
            b = getattr(self, f"lora_{proj}_B")[adapter_name]
            if a.device.type == "meta":
                continue
            with torch.no_grad():
                for i in range(a.shape[0]):
                    nn.init.kaiming_uniform_(a[i], a=math.sqrt(5))
                if init_lora_weights is False:  # PEFT's meaning: a non-identity (random) start, for tests
                    nn.init.normal_(b, std=0.02)
                else:
                    nn.init.zeros_(b)

    def hot_experts(self, adapter_name: str = "default") -> list[int]:
        return self.lora_hot_experts[adapter_name].tolist()

    # ------------------------------------------------------------------------------------------------ forward
    @property
    def expert_path(self) -> str:
        """How hot experts are computed: ``"auto"`` (default), ``"fused"``, ``"split"`` or ``"loop"``.

        * ``fused``: one grouped pass over every assignment (rows sorted by expert once, grouped GEMMs over the
          whole weight stack, cold experts included) with the low-rank path added on the hot rows only. Cheapest:
          one sort, one gather, no masked work. Replicates transformers' ``grouped_mm``/``batched_mm`` math.
        * ``split``: cold assignments through the wrapped module (so its ``_experts_implementation`` is honoured),
          hot assignments in one grouped pass.
        * ``loop``: ``split`` with hot experts one at a time: the readable reference the fast paths are tested
          against.
        * ``auto``: ``fused`` when the wrapped module would run transformers' ``grouped_mm`` or ``batched_mm``
          (the same function computed another way), ``split`` for ``eager`` and any other (custom) kernel.
        """
        return self._expert_path

    @expert_path.setter
    def expert_path(self, value: str) -> None:
        if value not in EXPERT_PATHS:
            raise ValueError(f"expert_path must be one of {EXPERT_PATHS}, got {value!r}.")
        self._expert_path = value

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor, *args, **kwargs):
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.r]
        if self.disable_adapters or self.merged or not active:
            if self.merged and self.disable_adapters:
                self.unmerge()
            return base(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        if len(active) > 1:
            raise ValueError("HotExpertLoraLayer runs one active adapter at a time; got " f"{active}.")
        adapter = active[0]
        if not torch.is_grad_enabled() and self._b_is_zero(adapter):
            # B == 0 makes the adapter an exact identity; the base call keeps inference bit-identical to the base
            # model (the split cold/hot path sums in another order). With grad enabled the path must run so B
            # receives its gradient.
            return base(hidden_states, top_k_index, top_k_weights, *args, **kwargs)
        path = self._resolve_path(base)
        if path == "fused" and not args and not kwargs:  # extra arguments are the wrapped module's to interpret
            return self._fused_forward(adapter, base, hidden_states, top_k_index, top_k_weights)
        slots = self._slot_lookup(adapter, top_k_index.device)[top_k_index]  # (T, K), -1 for cold assignments
        hot_mask = slots >= 0
        out = self._cold_forward(base, hidden_states, top_k_index, top_k_weights, hot_mask, *args, **kwargs)
        if not bool(hot_mask.any()):
            return out + self._graph_anchor(adapter, out.dtype)
        hot_forward = self._hot_forward_loop if path == "loop" else self._hot_forward
        return out + hot_forward(adapter, hidden_states, top_k_weights, slots, hot_mask).to(out.dtype)

    def _resolve_path(self, base: nn.Module) -> str:
        if self._expert_path != "auto":
            return self._expert_path
        return "fused" if experts_implementation(base) in FUSABLE_IMPLEMENTATIONS else "split"

    def _graph_anchor(self, adapter: str, dtype: torch.dtype) -> torch.Tensor:
        """0 * sum(factors): keeps every factor in the graph so DDP/ZeRO see a (zero) gradient on every rank even
        when no row reached a hot expert."""
        return (0.0 * sum(p.sum() for p in self._factors(adapter))).to(dtype)

    def _b_is_zero(self, adapter: str) -> bool:
        """Whether every B factor is zero, re-checked only when a factor may have changed: an in-place edit (tensor
        version), another storage (ZeRO-3 gathers, ``.to``), or any optimizer step (fused optimizers leave the
        version counter alone)."""
        factors = [getattr(self, f"lora_{p}_B")[adapter] for p in self.factor_names]
        versions = (optimizer_steps(), *(f._version for f in factors), *(f.data_ptr() for f in factors))
        cached = self._zero_cache.get(adapter)
        if cached is None or cached[0] != versions:
            cached = (versions, all(not bool(f.any()) for f in factors))
            self._zero_cache[adapter] = cached
        return cached[1]

    def _slot_lookup(self, adapter: str, device: torch.device) -> torch.Tensor:
        """Expert id -> hot slot (-1 when cold), with one extra entry for the ``num_experts`` sentinel.

        Built once per adapter and device and rebuilt only when the hot list changes (another tensor, or an in-place edit),
        so the split path allocates nothing of size E per step."""
        hot = self.lora_hot_experts[adapter]
        key = (adapter, str(device))
        cached = self._lookup_cache.get(key)
        # The cache holds the hot tensor itself: identity plus version, no reused-address false hit.
        if cached is not None and cached[0] is hot and cached[1] == hot._version:
            return cached[2]
        lookup = torch.full((self.num_experts + 1,), -1, dtype=torch.long, device=device)
        lookup[hot.to(device)] = torch.arange(hot.numel(), device=device)
        self._lookup_cache[key] = (hot, hot._version, lookup)
        return lookup

    def _factors(self, adapter: str) -> list[torch.Tensor]:
        return [getattr(self, f"lora_{p}_{s}")[adapter] for p in self.factor_names for s in ("A", "B")]

    # ------------------------------------------------------------------------------------ fused / grouped paths
    def _fused_forward(self, adapter, base, hidden, index, weights) -> torch.Tensor:
        """All assignments in one grouped pass: sort by expert once, base GEMMs for every row, LoRA on hot rows."""
        top_k = index.shape[-1]
        expert, perm = torch.sort(index.reshape(-1), stable=True)
        hot = self.lora_hot_experts[adapter].to(index.device)
        groups = self._group_rows(expert, hot, every_hot=hot.numel() == self.num_experts)
        token = perm // top_k
        rows = self._expert_rows(base, adapter, hidden, token, groups, weights.reshape(-1)[perm])
        out = self._sum_per_token(rows, token, hidden)
        if groups.num_hot_rows == 0:
            out = out + self._graph_anchor(adapter, out.dtype)
        return out

    def _hot_forward(self, adapter, hidden, weights, slots, hot_mask) -> torch.Tensor:
        """Hot assignments only (split path): grouped by slot once, one grouped pass, scattered back per token."""
        base = self.get_base_layer()
        token_idx, k_pos = hot_mask.nonzero(as_tuple=True)
        slot, order = torch.sort(slots[token_idx, k_pos], stable=True)
        token_idx, k_pos = token_idx[order], k_pos[order]
        hot = self.lora_hot_experts[adapter].to(slot.device)
        groups = self._group_rows(hot[slot], hot, every_hot=True)
        rows = self._expert_rows(base, adapter, hidden, token_idx, groups, weights[token_idx, k_pos])
        return self._sum_per_token(rows, token_idx, hidden)

    @staticmethod
    def _sum_per_token(rows: torch.Tensor, token: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """Rows added into their tokens' outputs; the backward is one row gather (nothing (S, H) is saved)."""
        out = torch.zeros(hidden.shape[0], rows.shape[-1], dtype=rows.dtype, device=rows.device)
        return AddRows.apply(out, token, rows).to(hidden.dtype)

    def _group_rows(self, expert: torch.Tensor, hot: torch.Tensor, every_hot: bool) -> "RowGroups":
        """Group boundaries for rows already sorted by expert; ``every_hot`` means every row is a hot row.

        The hot rows are read off the expert boundaries, indexed by the hot list (k entries): hot expert j owns
        the contiguous rows ``[offsets[e] - counts[e], offsets[e])`` of the sorted order, so their positions are
        one ``repeat_interleave`` of k starts, O(k + hot rows). No (E,) slot lookup, no mask over all rows, no
        ``nonzero``. The (E,) ``bincount`` is the base grouped GEMMs' own boundaries (transformers computes it
        too).
        """
        counts = torch.bincount(expert, minlength=self.num_experts)
        offsets = counts.cumsum(0, dtype=torch.int32)
        hot_counts = counts.index_select(0, hot)
        hot_offsets = hot_counts.cumsum(0, dtype=torch.int32)
        if every_hot:
            return RowGroups(expert, offsets, hot_offsets, None, expert.shape[0])
        num_hot = int(hot_offsets[-1]) if hot_offsets.numel() else 0
        # Row i of hot slot j sits at starts[j] + i; shift = starts[j] - (hot rows before slot j).
        shift = offsets.index_select(0, hot) - hot_offsets
        hot_rows = torch.repeat_interleave(shift.long(), hot_counts, output_size=num_hot)
        hot_rows += torch.arange(num_hot, device=expert.device)
        return RowGroups(expert, offsets, hot_offsets, hot_rows, num_hot)

    def _expert_rows(self, base, adapter, hidden, token, groups: "RowGroups", row_weights) -> torch.Tensor:
        """Rows (sorted by expert; row i is token ``token[i]``) through their experts, plus
        ``scaling * B @ A`` in activation space on the hot rows, times their routing weights.

        The grouping (``groups``) is computed once and reused by gate/up, down and the low-rank paths. When the
        down projection is linear (no bias, no post-expert norm) the routing weight scales its input, which is
        half as wide as its output on every supported family.
        """
        gated = self.has_gate
        hot_rows, offsets = groups.hot_rows, groups.hot_offsets
        y = self._base_rows(base, hidden[token], "gate_up_proj" if gated else "up_proj", groups)
        if groups.num_hot_rows:
            y = self._add_up_delta(adapter, y, hidden, take_rows(token, hot_rows), groups)
        h = base._apply_gate(y) if gated else base.act_fn(y)
        post_norm = getattr(base, "has_post_expert_norm", False)
        linear_down = not (self.has_bias or post_norm)
        out = self._base_rows(base, h * row_weights.unsqueeze(-1).to(h.dtype) if linear_down else h, "down_proj", groups)
        if groups.num_hot_rows:
            hot_weights = take_rows(row_weights, hot_rows) if linear_down else None
            (delta,) = self._lora_deltas(adapter, ("down",), h, hot_rows, offsets, hot_weights)
            out = add_rows(out, delta, hot_rows)
            del delta
        if post_norm:
            out = base.post_expert_norm(out)
        if not linear_down:
            out = out * row_weights.unsqueeze(-1).to(out.dtype)
        return out

    def _add_up_delta(self, adapter, y, hidden, hot_tokens, groups: "RowGroups") -> torch.Tensor:
        """``y`` (gate_up or up rows) plus the low-rank delta on its hot rows. A method of its own so that the
        (hot rows, 2 x intermediate) deltas and their concatenation are freed as soon as they are added: held by
        the caller, they stayed alive through the down projection, where the layer's memory peaks (issue 22: up
        to 3 x hot rows x intermediate floats of the step's transient peak)."""
        gated, offsets = self.has_gate, groups.hot_offsets
        if gated and not self.fuse_gate_up:
            gate, up = self._lora_deltas(adapter, ("gate", "up"), hidden, hot_tokens, offsets, None)
            delta = self._interleave_gate_up(gate, up)
            del gate, up
        else:
            (delta,) = self._lora_deltas(adapter, ("gate_up" if gated else "up",), hidden, hot_tokens, offsets, None)
        return add_rows(y, delta, groups.hot_rows)

    def _base_rows(self, base, x, name: str, groups: "RowGroups") -> torch.Tensor:
        """Frozen base projection ``name`` of every row, grouped over the whole (E, ...) stack (no weight copy)."""
        weight = getattr(base, name)
        y = grouped_mm(x.to(weight.dtype), weight if self.is_transposed else weight.transpose(1, 2), groups.offsets)
        if self.has_bias:
            y = y + getattr(base, f"{name}_bias")[groups.expert]
        return y

    def _lora_deltas(self, adapter, projs, source, rows, offsets, row_weights) -> tuple[torch.Tensor, ...]:
        """Low-rank deltas of ``source[rows]`` (rows grouped by hot slot) for each projection in ``projs``."""
        factors = [getattr(self, f"lora_{p}_{s}")[adapter] for p in projs for s in ("A", "B")]
        scaling = self.scaling[adapter]
        dropout = self.lora_dropout[adapter]
        if isinstance(dropout, nn.Identity) or not self.training:
            return LoraRows.apply(source, rows, offsets, scaling, row_weights, *factors)
        # Dropout draws a mask per projection: plain autograd (it keeps the dropped inputs for backward).
        x = take_rows(source, rows)
        dtype = lora_compute_dtype(factors[0].dtype, source.device.type)
        scale = row_scale(scaling, row_weights, dtype)
        deltas = []
        for a, b in zip(factors[0::2], factors[1::2]):
            xa = grouped_mm(dropout(x.to(dtype)), a.to(dtype).transpose(1, 2), offsets) * scale
            deltas.append(grouped_mm(xa, b.to(dtype).transpose(1, 2), offsets))
        return tuple(deltas)

    # ------------------------------------------------------------------------------ split path: cold experts
    def _cold_forward(self, base, hidden, index, weights, hot_mask, *args, **kwargs) -> torch.Tensor:
        """The wrapped module on cold assignments only; hot slots carry the skip sentinel and weight 0."""
        weights = weights.masked_fill(hot_mask, 0.0)
        if experts_implementation(base) == "eager" and not self.eager_accepts_sentinel:
            return base(hidden, index, weights, *args, **kwargs)
        index = index.masked_fill(hot_mask, self.num_experts)
        with _expert_parallel_sentinels(base):
            return base(hidden, index, weights, *args, **kwargs)

    # --------------------------------------------------------------- loop path: the per-expert reference
    def _hot_forward_loop(self, adapter, hidden, weights, slots, hot_mask) -> torch.Tensor:
        """Hot experts one at a time (slow, kept as the readable reference for the grouped paths)."""
        base = self.get_base_layer()
        token_idx, k_pos = hot_mask.nonzero(as_tuple=True)
        slot = slots[token_idx, k_pos]
        order = torch.argsort(slot, stable=True)
        token_idx, k_pos, slot = token_idx[order], k_pos[order], slot[order]
        hot = self.hot_experts(adapter)
        counts = torch.bincount(slot, minlength=len(hot)).tolist()
        lora_dtype = self.lora_down_A[adapter].dtype
        x_all = hidden[token_idx]
        routing = weights[token_idx, k_pos]
        pieces = []
        start = 0
        for j, n in enumerate(counts):
            if n == 0:
                continue
            x = x_all[start : start + n]
            y = self._expert_forward(base, adapter, j, hot[j], x, lora_dtype)
            pieces.append(y * routing[start : start + n, None].to(y.dtype))
            start += n
        out = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=pieces[0].dtype, device=hidden.device)
        return out.index_add(0, token_idx, torch.cat(pieces))

    def _lora(self, adapter: str, proj: str, j: int, x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        a = getattr(self, f"lora_{proj}_A")[adapter][j]
        b = getattr(self, f"lora_{proj}_B")[adapter][j]
        x = self.lora_dropout[adapter](x.to(dtype))
        return (x @ a.T) @ b.T * self.scaling[adapter]

    def _expert_forward(self, base, adapter, j, expert, x, lora_dtype) -> torch.Tensor:
        """One hot expert: base projections plus the low-rank path, the family's own gating in between."""
        t = self.is_transposed
        if self.has_gate:
            gate_up = project(x, base.gate_up_proj[expert], t)
            if self.has_bias:
                gate_up = gate_up + base.gate_up_proj_bias[expert]
            gate_up = gate_up + self._gate_up_delta(adapter, j, x, lora_dtype).to(gate_up.dtype)
            h = base._apply_gate(gate_up)
        else:
            up = project(x, base.up_proj[expert], t)
            if self.has_bias:
                up = up + base.up_proj_bias[expert]
            h = base.act_fn(up + self._lora(adapter, "up", j, x, lora_dtype).to(up.dtype))
        out = project(h, base.down_proj[expert], t)
        if self.has_bias:
            out = out + base.down_proj_bias[expert]
        out = out + self._lora(adapter, "down", j, h, lora_dtype).to(out.dtype)
        if getattr(base, "has_post_expert_norm", False):
            out = base.post_expert_norm(out)
        return out

    def _gate_up_delta(self, adapter, j, x, dtype) -> torch.Tensor:
        if self.fuse_gate_up:
            return self._lora(adapter, "gate_up", j, x, dtype)
        gate = self._lora(adapter, "gate", j, x, dtype)
        up = self._lora(adapter, "up", j, x, dtype)
        return self._interleave_gate_up(gate, up)

    def _interleave_gate_up(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """Place gate and up halves the way the family stores gate_up (concatenated or interleaved)."""
        if self.is_concatenated:
            return torch.cat([gate, up], dim=-1)
        return torch.stack([gate, up], dim=-1).flatten(-2)

    # ------------------------------------------------------------------------------------------- merging
    def delta_weights(self, adapter: str) -> dict[str, torch.Tensor]:
        """scaling * B @ A per hot expert, shaped like the base parameter slices (for merge and export)."""
        base = self.get_base_layer()
        s = self.scaling[adapter]

        def ba(proj: str) -> torch.Tensor:
            a = getattr(self, f"lora_{proj}_A")[adapter]
            b = getattr(self, f"lora_{proj}_B")[adapter]
            return torch.bmm(b, a) * s  # (k, out, in)

        deltas: dict[str, torch.Tensor] = {}
        if self.has_gate:
            gu = ba("gate_up") if self.fuse_gate_up else self._interleave_rows(ba("gate"), ba("up"))
            deltas["gate_up_proj"] = gu
        else:
            deltas["up_proj"] = ba("up")
        deltas["down_proj"] = ba("down")
        if self.is_transposed:
            deltas = {k: v.transpose(1, 2) for k, v in deltas.items()}
        return {k: v.to(getattr(base, k).dtype) for k, v in deltas.items()}

    def _interleave_rows(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.is_concatenated:
            return torch.cat([gate, up], dim=1)
        return torch.stack([gate, up], dim=2).flatten(1, 2)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        base = self.get_base_layer()
        for adapter in adapter_names or self.active_adapters:
            if adapter not in self.r or adapter in self.merged_adapters:
                continue
            hot = self.lora_hot_experts[adapter]
            with torch.no_grad():
                for name, delta in self.delta_weights(adapter).items():
                    param = getattr(base, name)
                    merged = param.data[hot] + delta
                    if safe_merge and not torch.isfinite(merged).all():
                        raise ValueError(f"NaNs detected in the merged weights of adapter {adapter!r}.")
                    param.data[hot] = merged
            self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        base = self.get_base_layer()
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            hot = self.lora_hot_experts[adapter]
            with torch.no_grad():
                for name, delta in self.delta_weights(adapter).items():
                    getattr(base, name).data[hot] -= delta

    def delete_adapter(self, adapter_name: str) -> None:
        super().delete_adapter(adapter_name)
        for dct in (self.r, self.lora_alpha, self.scaling):
            dct.pop(adapter_name, None)
        if adapter_name in self.lora_hot_experts:
            del self.lora_hot_experts[adapter_name]

    def __repr__(self) -> str:
        hot = {a: self.hot_experts(a) for a in self.r}
        return f"hellora.{type(self).__name__}(hot={hot}, r={self.r})\n  (base_layer): {self.get_base_layer()!r}"


@contextmanager
def _expert_parallel_sentinels(module: nn.Module):
    """transformers' grouped/batched experts skip the ``num_experts`` sentinel only in expert-parallel mode."""
    previous = getattr(module, "_is_expert_parallel", None)
    if previous is None:
        yield
        return
    module._is_expert_parallel = True
    try:
        yield
    finally:
        module._is_expert_parallel = previous


class RouterLoraLayer(nn.Module, BaseTunerLayer):
    """LoRA on a router's weight. Routers are custom modules (top-k, softmax, bias correction...), so the small
    (E, H) weight is adapted functionally and the family's own router forward runs unchanged.

    Why not PEFT's ``ParamWrapper`` (``target_parameters=["...router.weight"]``), which does the same for any 2-D
    parameter and is what the PEFT baseline uses: a module-level layer saves under ``lora_A``/``lora_B`` names that
    ``load_hellora`` and the exports map one to one, gathers as one unit under ZeRO-3 (PEFT's ParamWrapper folds the
    delta into a partitioned parameter), and is refused no ``LoraConfig`` option silently (see
    ``adapter.check_layer_options``)."""

    adapter_layer_names = ("lora_A", "lora_B")
    other_param_names = ("r", "lora_alpha", "scaling")

    def __init__(
        self,
        base_layer: nn.Module,
        adapter_name: str,
        r: int = 8,
        lora_alpha: int = 8,
        init_lora_weights: bool | str = True,
        use_rslora: bool = False,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.r: dict[str, int] = {}
        self.lora_alpha: dict[str, float] = {}
        self.scaling: dict[str, float] = {}
        self.lora_A = nn.ModuleDict({})
        self.lora_B = nn.ModuleDict({})
        self._disable_adapters = False
        self.merged_adapters: list[str] = []
        self._active_adapter = adapter_name
        self.kwargs = kwargs
        self.update_layer(adapter_name, r, lora_alpha, init_lora_weights, use_rslora)

    def update_layer(self, adapter_name, r, lora_alpha, init_lora_weights=True, use_rslora=False) -> None:
        weight = self.get_base_layer().weight
        out_features, in_features = full_shape(weight)
        dtype = weight.dtype if weight.dtype.is_floating_point else torch.float32
        self.r[adapter_name] = r
        self.lora_alpha[adapter_name] = lora_alpha
        self.scaling[adapter_name] = lora_alpha / math.sqrt(r) if use_rslora else lora_alpha / r
        self.lora_A[adapter_name] = nn.Linear(in_features, r, bias=False, device=weight.device, dtype=dtype)
        self.lora_B[adapter_name] = nn.Linear(r, out_features, bias=False, device=weight.device, dtype=dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                nn.init.kaiming_uniform_(self.lora_A[adapter_name].weight, a=math.sqrt(5))
                if init_lora_weights is False:
                    nn.init.normal_(self.lora_B[adapter_name].weight, std=0.02)
                else:
                    nn.init.zeros_(self.lora_B[adapter_name].weight)
        self.set_adapter(self.active_adapters)

    def delta_weight(self, adapter: str) -> torch.Tensor:
        return (self.lora_B[adapter].weight @ self.lora_A[adapter].weight) * self.scaling[adapter]

    def forward(self, *args, **kwargs):
        base = self.get_base_layer()
        active = [a for a in self.active_adapters if a in self.r]
        if self.disable_adapters or self.merged or not active:
            if self.merged and self.disable_adapters:
                self.unmerge()
            return base(*args, **kwargs)
        weight = base.weight
        for adapter in active:
            weight = weight + self.delta_weight(adapter).to(weight.dtype)
        return torch.func.functional_call(base, {"weight": weight}, args, kwargs, strict=False)

    def merge(self, safe_merge: bool = False, adapter_names: Optional[list[str]] = None) -> None:
        weight = self.get_base_layer().weight
        for adapter in adapter_names or self.active_adapters:
            if adapter in self.r and adapter not in self.merged_adapters:
                with torch.no_grad():
                    weight.data += self.delta_weight(adapter).to(weight.dtype)
                self.merged_adapters.append(adapter)

    def unmerge(self) -> None:
        weight = self.get_base_layer().weight
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            with torch.no_grad():
                weight.data -= self.delta_weight(adapter).to(weight.dtype)

    def __repr__(self) -> str:
        return f"hellora.{type(self).__name__}(r={self.r})\n  (base_layer): {self.get_base_layer()!r}"
