"""Dynamic rank for hot experts (DR-LoRA-style): start small, grow the ranks of the experts that need them.

Every hot expert is allocated the full LoRA rank ``r`` (the tensors of :class:`HotExpertLoraLayer` keep their
shapes), but only a prefix of ``active`` rank components per expert can train. For an inactive component ``i``
the column ``B[j, :, i]`` is held at exactly 0: a gradient hook zeroes its gradient, so AdamW (moments and
decoupled weight decay alike) never moves it. Its row ``A[j, i, :]`` then gets an exactly-zero gradient too
(``dL/dA_i = scaling * B_i^T ...`` with ``B_i = 0``), so it keeps its random init (weight decay aside) until the
component is switched on.
The scaling ``lora_alpha / r`` never changes, so growing a rank never rescales what was already learned.

Growth: each layer may use ``k * r_budget`` active components in total. Every ``interval`` optimizer steps (until
``grow_until`` of training) a layer's remaining budget is spread over the remaining growth events; the quota goes
``grow_step`` ranks at a time to the hot experts of highest saliency = routing share x growth potential, where
the growth potential is the mean |gradient| the *inactive* B columns would have received (read in the hook
before it is zeroed, accumulated since the last growth): the first-order rate at which a new component would
reduce the loss. B starts at 0, so ``|grad * param|``-style scores are 0 for every new component; the pre-mask
gradient is the quantity that ranks "who would use another rank".

Active ranks are saved next to the adapter (``hellora_dynamic_rank.json``, written atomically by the model's
``save_pretrained``) and restored by :func:`restore_dynamic_rank`. The state is an entry of
:mod:`hellora_trl.adapter_state`'s table, whose accounting hook counts only active entries as trainable. Compute is not reduced: inactive components still run (as zeros).
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn
from transformers import TrainerCallback

from ..adapter_state import get_extra, set_extra
from ..constants import DR_ROUTING, RANKS_FILE
from ..distributed import all_reduce_sum
from ..expert_lora import HotExpertLoraLayer
from ..profile import ExpertProfile
from ..profiling import RoutingCounter
from ..utils import atomic_write_text, unwrap_model
from ..variants import variant_of

logger = logging.getLogger(__name__)

ROUTING_SOURCES = DR_ROUTING
_KIND = "dynamic_rank"  # this module's entry kind in the adapter-state table
_FORMAT_VERSION = 1


# ------------------------------------------------------------------------------------------------ state
@dataclass
class LayerRanks:
    """Rank state of one experts module: active components per hot slot and the rank mask the hooks read."""

    module: HotExpertLoraLayer
    hot: list[int]
    active: torch.Tensor  # (k,) int64 on CPU: components 0..active[j]-1 of slot j are trainable
    mask: torch.Tensor  # (k, r) bool on the factors' device; factor masks are broadcast views of it
    budget: int  # most active components this layer may hold in total
    grad_score: torch.Tensor  # (k,) float32 on device: summed mean |pre-mask grad| of inactive B columns


@dataclass
class DynamicRankState:
    """Dynamic-rank state of one adapter, kept beside the model (the adapter modules are shared with PEFT)."""

    adapter: str
    r: int
    r_init: int
    r_budget: int
    layers: dict[str, LayerRanks]
    hooks: dict[str, Any] = field(default_factory=dict)

    def __deepcopy__(self, memo: dict) -> "DynamicRankState":
        """A copied model gets its own layers (through ``memo``) and fresh hooks: tensor hooks are not copied."""
        layers = copy.deepcopy(self.layers, memo)
        state = DynamicRankState(self.adapter, self.r, self.r_init, self.r_budget, layers)
        if self.hooks:
            _ensure_hooks(state)
        return state

    def changeable_entries(self) -> dict[int, Callable[[int], int]]:
        """Only active rank components can change: an A row or a B column per active component (read live)."""
        entries: dict[int, Callable[[int], int]] = {}
        for layer in self.layers.values():
            for _, a, b in _factor_pairs(layer, self.adapter):
                entries[id(a)] = lambda n, layer=layer, width=a.shape[2]: int(layer.active.sum()) * width
                entries[id(b)] = lambda n, layer=layer, width=b.shape[1]: int(layer.active.sum()) * width
        return entries

    def save(self, directory: Path) -> None:
        """``hellora_dynamic_rank.json`` next to a saved adapter."""
        counts = _entry_counts(self)
        record = {
            "format_version": _FORMAT_VERSION,
            "r": self.r,
            "r_init": self.r_init,
            "r_budget": self.r_budget,
            "active_entries": counts["active"],
            "allocated_entries": counts["allocated"],
            "layers": {
                name: {"hot_experts": layer.hot, "active_ranks": layer.active.tolist(), "budget": layer.budget}
                for name, layer in self.layers.items()
            },
        }
        atomic_write_text(directory / RANKS_FILE, json.dumps(record, indent=2))


def dynamic_rank_state(model: nn.Module, adapter_name: str = "default") -> DynamicRankState | None:
    """The dynamic-rank state of ``adapter_name`` (None when the adapter has fixed ranks)."""
    return get_extra(model, adapter_name, _KIND)


def active_ranks(model: nn.Module, adapter_name: str = "default") -> dict[str, list[int]]:
    """``{experts module name: [active rank per hot expert, in hot-expert order]}``."""
    state = _require(model, adapter_name)
    return {name: layer.active.tolist() for name, layer in state.layers.items()}


def _require(model: nn.Module, adapter_name: str) -> DynamicRankState:
    state = dynamic_rank_state(model, adapter_name)
    if state is None:
        raise ValueError(f"Adapter {adapter_name!r} has no dynamic rank: call init_rank_masks first.")
    return state


def _expert_layers(model: nn.Module, adapter_name: str) -> dict[str, HotExpertLoraLayer]:
    base = unwrap_model(model)
    layers = {
        name: module
        for name, module in base.named_modules()
        if isinstance(module, HotExpertLoraLayer) and adapter_name in module.r
    }
    if not layers:
        raise ValueError(
            f"No hot-expert LoRA layers for adapter {adapter_name!r}: dynamic rank needs the fused-experts layout "
            "(HotExpertLoraLayer); ModuleList-layout experts are plain PEFT LoRA with one fixed rank."
        )
    return layers


def _factor_pairs(layer: LayerRanks, adapter: str) -> list[tuple[str, nn.Parameter, nn.Parameter]]:
    """(projection, A, B) of every adapted projection of one experts module."""
    module = layer.module
    return [
        (proj, getattr(module, f"lora_{proj}_A")[adapter], getattr(module, f"lora_{proj}_B")[adapter])
        for proj in module.factor_names
    ]


# ------------------------------------------------------------------------------------------------ masks
def init_rank_masks(
    model: nn.Module, r_init: int, r_budget: int | None = None, adapter_name: str = "default"
) -> DynamicRankState:
    """Switch on only the first ``r_init`` rank components of every hot expert; allow growth up to an average of
    ``r_budget`` (default ``r_init``: fixed reduced rank) per hot expert in each layer.

    Inactive B columns are zeroed now and held at 0 by gradient hooks. Idempotent on ranks: a model that already
    has dynamic rank keeps its active ranks (e.g. restored from a checkpoint); only missing hooks are added.
    """
    existing = dynamic_rank_state(model, adapter_name)
    if existing is not None:
        _ensure_hooks(existing)
        return existing
    if variant_of(model, adapter_name) == "lori_s":
        raise ValueError("Dynamic rank cannot be combined with LoRI-S: its masks already fix which B entries train.")
    modules = _expert_layers(model, adapter_name)
    r = _common_rank(modules, adapter_name)
    r_budget = r_init if r_budget is None else r_budget
    if not 1 <= r_init <= r_budget <= r:
        raise ValueError(f"Need 1 <= r_init ({r_init}) <= r_budget ({r_budget}) <= r ({r}).")
    layers = {}
    for name, module in modules.items():
        hot = module.hot_experts(adapter_name)
        device = module.lora_down_B[adapter_name].device
        layers[name] = LayerRanks(
            module=module,
            hot=hot,
            active=torch.full((len(hot),), r_init, dtype=torch.long),
            mask=torch.zeros(len(hot), r, dtype=torch.bool, device=device),
            budget=len(hot) * r_budget,
            grad_score=torch.zeros(len(hot), device=device),
        )
    state = DynamicRankState(adapter_name, r, r_init, r_budget, layers)
    for layer in layers.values():
        _apply_active(layer, adapter_name)
    set_extra(model, adapter_name, _KIND, state)
    _ensure_hooks(state)
    return state


def _common_rank(modules: Mapping[str, HotExpertLoraLayer], adapter_name: str) -> int:
    ranks = {module.r[adapter_name] for module in modules.values()}
    if len(ranks) != 1:
        raise ValueError(f"Hot-expert layers of adapter {adapter_name!r} have different ranks {sorted(ranks)}.")
    for module in modules.values():
        if hasattr(module.lora_down_B[adapter_name], "ds_numel"):
            raise NotImplementedError("Dynamic rank is not supported on DeepSpeed ZeRO-3 partitioned parameters.")
    return ranks.pop()


def _apply_active(layer: LayerRanks, adapter: str) -> None:
    """Rebuild the rank mask from ``active`` (in place: the hooks and accounting views read it) and zero the
    B columns that are now inactive."""
    r = layer.mask.shape[1]
    positions = torch.arange(r, device=layer.mask.device)
    layer.mask.copy_(positions[None, :] < layer.active.to(layer.mask.device)[:, None])
    with torch.no_grad():
        for _, _, b in _factor_pairs(layer, adapter):
            b.masked_fill_(~layer.mask[:, None, :], 0.0)


def set_active_ranks(
    model: nn.Module, ranks: Mapping[str, Sequence[int]], adapter_name: str = "default"
) -> DynamicRankState:
    """Set the active ranks of some layers directly (restore, tests, manual schedules). Lowering a rank prunes:
    the dropped B columns are zeroed. Budgets are not checked here: :func:`grow_ranks` is what respects them."""
    state = _require(model, adapter_name)
    for name, values in ranks.items():
        layer = state.layers.get(name)
        if layer is None:
            raise ValueError(f"{name!r} is not a dynamic-rank layer; known: {sorted(state.layers)[:3]}...")
        active = torch.as_tensor(list(values), dtype=torch.long)
        if active.shape != layer.active.shape or bool((active < 1).any()) or bool((active > state.r).any()):
            raise ValueError(f"{name}: need {len(layer.hot)} ranks in [1, {state.r}], got {list(values)}.")
        layer.active = active
        _apply_active(layer, adapter_name)
    return state


# ------------------------------------------------------------------------------------------------ hooks
def _ensure_hooks(state: DynamicRankState) -> None:
    """One hook per trainable B factor: record the pre-mask gradient of inactive columns, then zero them."""
    for name, layer in state.layers.items():
        for proj, _, b in _factor_pairs(layer, state.adapter):
            key = f"{name}.{proj}"
            if key not in state.hooks and b.requires_grad:
                state.hooks[key] = b.register_hook(_rank_hook(layer))


def _rank_hook(layer: LayerRanks) -> Callable[[torch.Tensor], torch.Tensor]:
    def hook(grad: torch.Tensor) -> torch.Tensor:
        inactive = ~layer.mask.to(grad.device)
        per_column = grad.detach().abs().float().mean(dim=1)  # (k, r): mean |grad| over output features
        potential = (per_column * inactive).sum(dim=1) / inactive.sum(dim=1).clamp_min(1)
        layer.grad_score += potential.to(layer.grad_score.device)
        return grad.masked_fill(inactive[:, None, :], 0.0)

    return hook


# ------------------------------------------------------------------------------------------------ accounting
def active_entry_counts(model: nn.Module, adapter_name: str = "default") -> dict[str, int]:
    """``active`` and ``allocated`` entries of the hot-expert factors (A and B), for reports."""
    return _entry_counts(_require(model, adapter_name))


def _entry_counts(state: DynamicRankState) -> dict[str, int]:
    active = allocated = 0
    for layer in state.layers.values():
        for _, a, b in _factor_pairs(layer, state.adapter):
            per_rank = a.shape[2] + b.shape[1]  # one rank component: an A row plus a B column
            active += int(layer.active.sum()) * per_rank
            allocated += a.numel() + b.numel()
    return {"active": active, "allocated": allocated}


# ------------------------------------------------------------------------------------------------ saliency
def routing_shares(routing: ExpertProfile | None, name: str, hot: Sequence[int]) -> torch.Tensor:
    """Share of the layer's routed assignments that went to each hot expert (1 each without routing data)."""
    if routing is None:
        return torch.ones(len(hot), dtype=torch.float64)
    if name not in routing.layer_names:
        raise ValueError(f"The routing profile has no layer {name!r}; was it taken on this model?")
    row = routing.counts[routing.layer_names.index(name)].double()
    return row[list(hot)] / row.sum().clamp_min(1)


def saliency(
    model: nn.Module, routing: ExpertProfile | None = None, adapter_name: str = "default"
) -> dict[str, torch.Tensor]:
    """Per layer, each hot expert's saliency: routing share x accumulated growth potential (float64, CPU).

    The growth potential is summed over every backward since the last :func:`reset_saliency` (and all-reduced
    across data-parallel ranks so every rank grows the same experts). Full experts (no inactive rank) score 0.
    """
    state = _require(model, adapter_name)
    scores = {}
    for name, layer in state.layers.items():
        potential = all_reduce_sum(layer.grad_score.detach().double()).cpu()
        score = routing_shares(routing, name, layer.hot) * potential
        score[layer.active >= state.r] = 0.0
        scores[name] = torch.nan_to_num(score, nan=0.0, posinf=0.0, neginf=0.0)
    return scores


def reset_saliency(model: nn.Module, adapter_name: str = "default") -> None:
    for layer in _require(model, adapter_name).layers.values():
        layer.grad_score.zero_()


# ------------------------------------------------------------------------------------------------ growth
def allocate(scores: torch.Tensor, active: torch.Tensor, r: int, quota: int, grow_step: int = 1) -> torch.Tensor:
    """New active ranks: ``quota`` components handed out ``grow_step`` at a time, highest score first (ties to the
    lower slot), passing over the experts again while quota is left. Experts scoring <= 0 (no evidence) or already
    at rank ``r`` get nothing, so less than ``quota`` may be used."""
    if grow_step < 1:
        raise ValueError(f"grow_step must be >= 1, got {grow_step}.")
    new = active.clone()
    order = sorted(range(len(active)), key=lambda j: (-float(scores[j]), j))
    eligible = [j for j in order if float(scores[j]) > 0]
    while quota > 0:
        progressed = False
        for j in eligible:
            add = min(grow_step, r - int(new[j]), quota)
            if add > 0:
                new[j] += add
                quota -= add
                progressed = True
            if quota == 0:
                break
        if not progressed:
            break
    return new


def growth_quotas(model: nn.Module, events_left: int, adapter_name: str = "default") -> dict[str, int]:
    """Components each layer may add at this growth event: its unused budget spread evenly (rounded up) over the
    events left, so the budget is reached by the last event instead of being spent at the first."""
    state = _require(model, adapter_name)
    events_left = max(int(events_left), 1)
    quotas = {}
    for name, layer in state.layers.items():
        remaining = max(layer.budget - int(layer.active.sum()), 0)
        quotas[name] = math.ceil(remaining / events_left)
    return quotas


def grow_ranks(
    model: nn.Module,
    scores: Mapping[str, torch.Tensor],
    quotas: Mapping[str, int] | int,
    grow_step: int = 1,
    optimizer: torch.optim.Optimizer | None = None,
    adapter_name: str = "default",
) -> dict[str, list[int]]:
    """Grow each layer's highest-saliency experts by ``grow_step`` within its quota and its budget.

    With ``optimizer``, the second-moment estimate of each newly active component is set to the mean of the
    expert's active ones (see :func:`_warm_second_moment`). Returns the ranks added per layer and hot slot.
    """
    state = _require(model, adapter_name)
    added = {}
    for name, layer in state.layers.items():
        quota = quotas if isinstance(quotas, int) else quotas.get(name, 0)
        quota = min(quota, max(layer.budget - int(layer.active.sum()), 0))
        new = allocate(scores[name], layer.active, state.r, quota, grow_step)
        if optimizer is not None:
            _warm_second_moment(optimizer, layer, adapter_name, layer.active, new)
        added[name] = (new - layer.active).tolist()
        layer.active = new
        _apply_active(layer, adapter_name)
    return added


def _warm_second_moment(
    optimizer: torch.optim.Optimizer, layer: LayerRanks, adapter: str, old: torch.Tensor, new: torch.Tensor
) -> None:
    """Adam's step count is per tensor, so a component switched on at step t gets bias corrections for step t
    while its moments start at 0: its first updates are ~3-6x the learning rate. This starts ``exp_avg_sq`` at the
    mean of the expert's active entries (same factor) to damp that. Opt-in: on the tiny offline model the damped
    components learned too slowly and the held-out loss was worse (bench/results/dynamic_rank.md)."""
    for _, a, b in _factor_pairs(layer, adapter):
        for param, rank_dim in ((a, 0), (b, 1)):  # rank axis of one slot's (r, in) / (out, r) slice
            moments = optimizer.state.get(param, {}).get("exp_avg_sq")
            if moments is None:
                continue
            for j in torch.nonzero(new > old).flatten().tolist():
                before, after = int(old[j]), int(new[j])
                v = moments[j]
                v.narrow(rank_dim, before, after - before).fill_(v.narrow(rank_dim, 0, before).mean())


def growth_events(interval: int, max_steps: int, grow_until: float) -> list[int]:
    """Optimizer steps after which ranks grow: every ``interval`` steps up to ``grow_until`` of training."""
    if interval < 1 or not 0.0 < grow_until <= 1.0:
        raise ValueError(f"Need interval >= 1 and grow_until in (0, 1], got {interval}, {grow_until}.")
    last = int(grow_until * max_steps)
    return list(range(interval, last + 1, interval))


# ------------------------------------------------------------------------------------------------ save / load
def save_dynamic_rank(model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default") -> Path | None:
    """Write ``hellora_dynamic_rank.json`` next to a saved adapter (atomically); remove a stale one for a
    fixed-rank adapter. Returns the file written, if any."""
    directory = Path(directory)
    path = directory / RANKS_FILE
    state = dynamic_rank_state(model, adapter_name)
    if state is None:
        if path.exists():
            path.unlink()
        return None
    directory.mkdir(parents=True, exist_ok=True)
    state.save(directory)
    return path


def read_dynamic_rank(directory: str | os.PathLike) -> dict[str, Any]:
    """The recorded active ranks of an adapter directory ({} for a fixed-rank adapter)."""
    path = Path(directory) / RANKS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def restore_dynamic_rank(
    model: nn.Module, directory: str | os.PathLike, adapter_name: str = "default"
) -> DynamicRankState | None:
    """Re-create the recorded ranks on a model that just loaded the adapter's weights (None: fixed rank).

    Refuses weights that are nonzero in an inactive B column: the file and the weights would disagree.
    """
    record = read_dynamic_rank(directory)
    if not record:
        return None
    ranks = {name: entry["active_ranks"] for name, entry in record["layers"].items()}
    modules = _expert_layers(model, adapter_name)
    if set(ranks) != set(modules):
        raise ValueError(f"{directory}: dynamic-rank layers {sorted(set(ranks) ^ set(modules))[:3]} do not match.")
    for name, entry in record["layers"].items():
        if entry["hot_experts"] != modules[name].hot_experts(adapter_name):
            raise ValueError(f"{directory}: hot experts of {name} differ from the model's.")
    _check_inactive_zero(modules, ranks, adapter_name, directory)
    state = init_rank_masks(model, record["r_init"], record["r_budget"], adapter_name)
    set_active_ranks(model, ranks, adapter_name)
    for name, entry in record["layers"].items():
        state.layers[name].budget = int(entry["budget"])
    return state


def _check_inactive_zero(modules, ranks, adapter: str, directory) -> None:
    for name, module in modules.items():
        active = torch.as_tensor(ranks[name])
        for proj in module.factor_names:
            b = getattr(module, f"lora_{proj}_B")[adapter].detach()
            inactive = torch.arange(b.shape[2], device=b.device)[None, :] >= active.to(b.device)[:, None]
            if bool(b.masked_select(inactive[:, None, :]).any()):
                raise ValueError(f"{directory}: {name} lora_{proj}_B is nonzero in an inactive rank component.")


# ------------------------------------------------------------------------------------------------ callback
class DynamicRankCallback(TrainerCallback):
    """Grow hot-expert ranks during ``Trainer.train()``.

    On train begin: ``init_rank_masks(r_init, r_budget)`` unless the model already has dynamic rank (restored
    from a checkpoint). After every ``interval``-th optimizer step up to ``grow_until`` of ``max_steps``: saliency
    -> per-layer quota -> growth, then the saliency accumulators restart. ``routing``: ``"profile"`` uses
    ``profile`` (an ExpertProfile, or a callable returning one, e.g. ``lambda: trainer.hellora_profile``),
    ``"live"`` counts routing during training, ``"none"`` ranks by gradient alone. ``warm_optimizer_state``
    starts the Adam second moment of new components at the expert's mean (off by default: on the tiny offline
    model it slowed the new components down, see docs/dynamic_rank.md). ``events`` records each growth.
    """

    def __init__(
        self,
        r_init: int,
        r_budget: int,
        interval: int = 10,
        grow_step: int = 1,
        grow_until: float = 0.5,
        routing: str = "profile",
        profile: ExpertProfile | Callable[[], ExpertProfile | None] | None = None,
        warm_optimizer_state: bool = False,
        adapter_name: str = "default",
    ) -> None:
        if routing not in ROUTING_SOURCES:
            raise ValueError(f"routing must be one of {ROUTING_SOURCES}, got {routing!r}.")
        growth_events(interval, 1, grow_until)  # validates interval and grow_until
        if grow_step < 1 or not 1 <= r_init <= r_budget:
            raise ValueError(f"Need grow_step >= 1 and 1 <= r_init <= r_budget, got {grow_step}, {r_init}, {r_budget}.")
        self.r_init, self.r_budget, self.interval = r_init, r_budget, interval
        self.grow_step, self.grow_until, self.routing = grow_step, grow_until, routing
        self.profile = profile
        self.warm_optimizer_state = warm_optimizer_state
        self.adapter_name = adapter_name
        self.events: list[dict[str, Any]] = []
        self._counter: RoutingCounter | None = None

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        init_rank_masks(model, self.r_init, self.r_budget, self.adapter_name)
        if self.routing == "live" and self._counter is None:
            self._counter = RoutingCounter(model).attach()

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        events = growth_events(self.interval, state.max_steps, self.grow_until)
        if state.global_step not in events:
            return
        left = sum(1 for step in events if step >= state.global_step)
        scores = self.scores(model)
        quotas = growth_quotas(model, left, self.adapter_name)
        added = grow_ranks(
            model, scores, quotas, self.grow_step, optimizer if self.warm_optimizer_state else None, self.adapter_name
        )
        reset_saliency(model, self.adapter_name)
        total = sum(sum(a) for a in added.values())
        self.events.append({"step": state.global_step, "added": total, "ranks": active_ranks(model, self.adapter_name)})
        logger.info("HELLoRA dynamic rank: step %d, +%d rank components", state.global_step, total)

    def on_train_end(self, args, state, control, **kwargs):
        if self._counter is not None:
            self._counter.detach()
            self._counter = None

    def scores(self, model: nn.Module) -> dict[str, torch.Tensor]:
        """Per-layer growth scores of the hot experts; override to try another saliency."""
        return saliency(model, self._routing(), self.adapter_name)

    def _routing(self) -> ExpertProfile | None:
        if self.routing == "none":
            return None
        if self.routing == "live":
            return self._counter.to_profile(reduce=True) if self._counter is not None else None
        profile = self.profile() if callable(self.profile) else self.profile
        if profile is None:
            raise ValueError("routing='profile' needs a routing profile (DynamicRankCallback(profile=...)).")
        return profile
