"""Measuring routing: how many tokens the router sends to each expert of each MoE layer.

Counts are read where the experts module receives ``top_k_index`` (fused layout) or from the router's logits
(per-expert ModuleList layout), so one mechanism serves every registered family. The record they produce is
:class:`~hellora_trl.profile.ExpertProfile`; which rows a warm-up sees is decided here too
(:func:`warmup_indices`), so the trainer, the CLI, reports and the Axolotl plugin profile the same rows.
"""

from __future__ import annotations

import math
import random
from contextlib import contextmanager
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .distributed import all_reduce_sum, zero3_enabled
from .profile import ExpertProfile
from .registry import MoEFamily, MoELayer, experts_per_token, family_for, find_moe_layers
from .utils import unwrap_model

IGNORE_INDEX = -100  # label of tokens that are never a target (padding, masked prompts)


def warmup_row_cap(max_steps: int | None, rows_per_step: int) -> int | None:
    """The most warm-up rows worth profiling for a run of ``max_steps`` optimizer steps of ``rows_per_step`` rows
    (per-device batch x accumulation x processes): no more than the run itself trains on. None: no cap (no
    ``max_steps``, i.e. epochs decide the length)."""
    if max_steps is None or max_steps <= 0:
        return None
    return max(1, int(max_steps) * max(1, int(rows_per_step)))


def warmup_indices(num_rows: int, fraction: float, seed: int, max_rows: int | None = None) -> list[int]:
    """The seeded random ``fraction`` of ``num_rows`` rows (at least one, at most ``max_rows``), in order, that the
    warm-up sees.

    The same (length, fraction, seed, max_rows) always gives the same rows, whoever asks (trainer, CLI, report,
    plugin). ``max_rows`` (:func:`warmup_row_cap`) keeps a short run's warm-up no longer than the run.
    """
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
        raise ValueError(f"fraction must be in (0, 1], got {fraction!r}; e.g. 0.1 profiles a 10% warm-up slice.")
    if num_rows == 0:
        raise ValueError("The dataset is empty; there is nothing to sample a warm-up slice from.")
    count = min(num_rows, max(1, round(fraction * num_rows)))
    if max_rows is not None:
        count = max(1, min(count, int(max_rows)))
    if count == num_rows:
        return list(range(num_rows))
    return sorted(random.Random(seed).sample(range(num_rows), count))


def warmup_slice(dataset, fraction: float, seed: int, max_rows: int | None = None):
    """The warm-up rows of a map-style ``datasets.Dataset`` (all of them: ``dataset`` itself), at most
    ``max_rows`` of them when given."""
    if not hasattr(dataset, "__len__") or not hasattr(dataset, "select"):
        raise ValueError(
            f"The warm-up slice needs a map-style datasets.Dataset (with len), got {type(dataset).__name__}."
        )
    indices = warmup_indices(len(dataset), fraction, seed, max_rows)
    return dataset if len(indices) == len(dataset) else dataset.select(indices)


class _StopForward(Exception):
    """Ends a counting-only forward once every MoE layer's routing was recorded (``RoutingCounter.stop_early``)."""


class RoutingCounter:
    """Forward hooks that add each layer's token->expert assignments into a counts tensor.

    Padding tokens are excluded when ``set_token_mask`` was given the batch's attention mask. Forwards that run
    inside backward (gradient-checkpoint recomputation) are not counted twice.

    ``stop_early`` (forward-only profiling): once every MoE layer of a forward has been counted, the hook raises
    a private exception that :func:`profile_experts` catches, so the last layer's experts, any later layers and
    the LM head never run. Counts are unchanged: routing is read before the experts compute.
    """

    def __init__(self, model: nn.Module, family: MoEFamily | None = None, *, per_row: bool = False) -> None:
        base = unwrap_model(model)
        self.outer = model
        self.model = base
        self.family = family or family_for(base)
        self.layers: list[MoELayer] = find_moe_layers(base, self.family)
        self.num_experts = self.layers[0].num_experts
        self.top_k = experts_per_token(base.config, self.family)
        self.counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64)
        self.tokens_seen = 0
        self.token_mask: torch.Tensor | None = None
        # per_row: also keep (batch, layers, experts) counts per forward, so one pass over a dataset gives the
        # profile of any subset of its rows (every warm-up fraction and seed) as a sum.
        self.per_row = per_row
        self.row_batches: list[torch.Tensor] = []
        self._seq_len = 0
        self._depth = 0
        self._shape: tuple[int, ...] | None = None
        self._handles: list[Any] = []
        self.enabled = True
        self.stop_early = False
        self._recorded = 0  # layers counted in the current forward

    def _model_hook(self, module, args, kwargs) -> None:
        """Remember which tokens are real (not padding) for the MoE hooks of this forward.

        Hooked on every level of the model (wrappers, the transformers model, its decoder): a wrapper may call the
        next level's ``.forward`` directly, which skips that level's hooks (PEFT 0.20's ``LoraModel`` does), so the
        batch is read at the outermost level that runs hooks and at each one below until a mask is found. Tokens
        are counted once per forward, when the outermost hooked level returns."""
        if not self.enabled or _in_backward():
            return
        self._depth += 1
        if self._depth == 1:  # a new forward: nothing recorded or read yet
            self.token_mask, self._shape, self._recorded = None, None, 0
        mask = kwargs.get("attention_mask")
        if mask is None and len(args) > 1 and isinstance(args[1], torch.Tensor):
            mask = args[1]  # model(input_ids, attention_mask) called positionally
        ids = kwargs.get("input_ids", args[0] if args else None)
        shaped = ids if isinstance(ids, torch.Tensor) else kwargs.get("inputs_embeds")
        if self.token_mask is None and isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.token_mask = mask.reshape(-1).bool()
        if self._shape is None and isinstance(shaped, torch.Tensor):
            self._shape = tuple(shaped.shape[:2]) if shaped.dim() >= 2 else (shaped.numel(),)
            if self.per_row and shaped.dim() >= 2:
                batch, self._seq_len = int(shaped.shape[0]), int(shaped.shape[1])
                self.row_batches.append(torch.zeros(batch, len(self.layers), self.num_experts, dtype=torch.int32))

    def _model_done(self, module, args, kwargs, output) -> None:
        if not self.enabled or _in_backward() or self._depth == 0:
            return
        self._depth -= 1
        if self._depth == 0:
            if self.token_mask is not None:
                self.tokens_seen += int(self.token_mask.sum())
            elif self._shape is not None:
                self.tokens_seen += math.prod(self._shape)

    def _mask_levels(self, model: nn.Module) -> list[nn.Module]:
        """The model as given, each wrapper level below it, the transformers model and its decoder."""
        levels, current = [], model
        while isinstance(current, nn.Module) and current not in levels:
            levels.append(current)
            if hasattr(current, "module") and isinstance(current.module, nn.Module):
                current = current.module
            elif hasattr(current, "get_base_model"):
                current = current.get_base_model()
            elif isinstance(getattr(current, "model", None), nn.Module) and hasattr(current, "peft_config"):
                current = current.model  # PEFT's LoraModel (tuner) around the transformers model
            else:
                break
        base = self.model
        decoder = getattr(base, getattr(base, "base_model_prefix", "") or "model", None)
        for level in (base, decoder):
            if isinstance(level, nn.Module) and level not in levels:
                levels.append(level)
        return levels

    def _record(self, layer_idx: int, index: torch.Tensor) -> None:
        if not self.enabled or _in_backward():
            return
        index = index.detach().reshape(-1, index.shape[-1])
        mask = self.token_mask
        masked = mask is not None and mask.numel() == index.shape[0]
        if self.per_row and self.row_batches:
            self._record_rows(layer_idx, index.cpu(), mask.cpu() if masked else None)
        if masked:
            index = index[mask.to(index.device)]
        flat = index.reshape(-1)
        flat = flat[(flat >= 0) & (flat < self.num_experts)]
        self.counts[layer_idx] += torch.bincount(flat.cpu(), minlength=self.num_experts)
        self._recorded += 1
        if self.stop_early and self._recorded >= len(self.layers):
            raise _StopForward

    def _record_rows(self, layer_idx: int, index: torch.Tensor, mask: torch.Tensor | None) -> None:
        rows = torch.arange(index.shape[0]) // max(self._seq_len, 1)
        if mask is not None:
            index, rows = index[mask], rows[mask]
        rows = rows.repeat_interleave(index.shape[-1])
        flat = index.reshape(-1)
        keep = (flat >= 0) & (flat < self.num_experts)
        current = self.row_batches[-1]
        size = current.shape[0] * self.num_experts
        counts = torch.bincount(rows[keep] * self.num_experts + flat[keep], minlength=size)
        current[:, layer_idx] += counts[:size].reshape(-1, self.num_experts).int()

    def row_counts(self) -> torch.Tensor:
        """Per-row counts (rows x layers x experts, int32) of every counted forward, in order (``per_row=True``)."""
        if not self.per_row:
            raise ValueError("row_counts() needs RoutingCounter(..., per_row=True).")
        if not self.row_batches:
            return torch.zeros(0, len(self.layers), self.num_experts, dtype=torch.int32)
        return torch.cat(self.row_batches)

    def attach(self) -> "RoutingCounter":
        self._depth = 0
        for level in self._mask_levels(self.outer):
            self._handles.append(level.register_forward_pre_hook(self._model_hook, with_kwargs=True))
            self._handles.append(level.register_forward_hook(self._model_done, with_kwargs=True, always_call=True))
        for i, layer in enumerate(self.layers):
            if self.family.layout == "fused":
                handle = layer.experts.register_forward_pre_hook(self._experts_hook(i), with_kwargs=True)
            else:
                handle = layer.router.register_forward_hook(self._router_hook(i))
            self._handles.append(handle)
        return self

    def _experts_hook(self, i: int):
        def hook(module, args, kwargs):
            index = args[1] if len(args) > 1 else kwargs.get("top_k_index", kwargs.get("router_indices"))
            if index is not None:
                self._record(i, index)

        return hook

    def _router_hook(self, i: int):
        def hook(module, args, output):
            first = output[0] if isinstance(output, tuple) else output
            if not first.is_floating_point():  # the router already returns top-k ids (DeepSeek-MoE remote code)
                self._record(i, first.detach())
            else:  # router logits: softmax is monotone, so top-k of the logits is the routed set
                self._record(i, torch.topk(first.detach().float(), self.top_k, dim=-1).indices)

        return hook

    def detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __enter__(self) -> "RoutingCounter":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.detach()

    def to_profile(self, source: dict[str, Any] | None = None, reduce: bool = True) -> ExpertProfile:
        counts, tokens = self.counts.clone(), self.tokens_seen
        if reduce:  # every rank must select the same hot experts
            packed = all_reduce_sum(torch.cat([counts.reshape(-1), torch.tensor([tokens], dtype=torch.int64)]))
            counts, tokens = packed[:-1].reshape(counts.shape), int(packed[-1])
        if tokens == 0:
            # No attention mask seen: each token makes top_k assignments in every layer.
            tokens = int(counts[0].sum()) // max(self.top_k, 1)
        elif int(counts.sum()) == 0:
            raise RuntimeError(
                f"Profiling saw {tokens} tokens but recorded no routing in any MoE layer: this model's experts "
                f"({type(self.layers[0].experts).__name__}) are not fed the routing the way family "
                f"{self.family.name!r} expects. Register the family (hellora_trl.registry.register_family) or report it."
            )
        base_config = getattr(self.layers[0].block, "config", None)
        return ExpertProfile(
            counts=counts,
            layer_names=[layer.name for layer in self.layers],
            num_experts=self.num_experts,
            experts_per_token=self.top_k,
            family=self.family.name,
            tokens_seen=tokens,
            source=dict(source or {}),
            has_shared_experts=bool(base_config is not None and self.family.has_shared_experts(base_config))
            or _model_has_shared(self.layers, self.family),
        )


def _model_has_shared(layers: list[MoELayer], family: MoEFamily) -> bool:
    return any(hasattr(layers[0].block, attr) for attr in family.shared_expert_attrs)


def _single_unsharded_process() -> bool:
    """No process group beyond this process and no ZeRO-3 partitioning (whose hooks expect whole forwards)."""
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return False
    return not zero3_enabled()


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def _iter_batches(data: Any, batch_size: int, collate, allow_empty: bool = False) -> Iterator[Mapping[str, torch.Tensor]]:
    try:
        from datasets import Dataset
    except ImportError:  # pragma: no cover - datasets is a dependency
        Dataset = ()
    if isinstance(data, Dataset):
        if len(data) == 0:
            if allow_empty:
                return
            raise ValueError("Cannot profile on an empty dataset.")
        if "input_ids" not in data.column_names:
            raise ValueError(
                f"profile_experts needs a tokenized dataset with an `input_ids` column; got columns {data.column_names}."
            )
        columns = [c for c in ("input_ids", "attention_mask") if c in data.column_names]
        for start in range(0, len(data), batch_size):
            rows = data[start : start + batch_size]
            yield collate([{c: rows[c][i] for c in columns} for i in range(len(rows["input_ids"]))])
        return
    seen = False
    for batch in data:
        seen = True
        yield batch
    if not seen and not allow_empty:
        raise ValueError("Cannot profile on an empty dataset (the iterable yielded no batch).")


def pad_collate(pad_token_id: int = 0, labels: bool = False):
    """Right-pad a list of {input_ids[, attention_mask][, labels]} rows into tensors (the package's one collate).

    ``labels=True`` adds ``labels``: a row's own ``labels`` (prompt tokens already masked by the framework) or its
    ``input_ids``, with padding set to -100 so it is never a target.
    """

    def collate(rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            row_mask = r.get("attention_mask")
            mask[i, :n] = torch.as_tensor(row_mask if row_mask is not None else [1] * n)
            row_labels = r.get("labels")
            targets[i, :n] = torch.as_tensor(row_labels if row_labels is not None else r["input_ids"])
        batch = {"input_ids": ids, "attention_mask": mask}
        if labels:
            batch["labels"] = targets.masked_fill(mask == 0, IGNORE_INDEX)
        return batch

    return collate


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


def profile_experts(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = True,
    source: dict[str, Any] | None = None,
    pad_batches_to: int | None = None,
    reduce: bool = True,
) -> ExpertProfile:
    """Forward-only profiling: count the router's token->expert assignments per MoE layer.

    ``data`` is a tokenized ``datasets.Dataset`` (``input_ids``[, ``attention_mask``]), a DataLoader, or any
    iterable of batch dicts. Padding tokens are not counted. Under ``torch.distributed`` the counts are summed
    over ranks, so every rank returns the same profile.

    ``pad_batches_to`` (distributed runs, where ranks hold shards of different sizes): run uncounted one-token
    forwards until this many batches ran, so every rank makes the same number of forward passes (ZeRO-3 gathers
    weights collectively in each one); ``data`` may then be empty on this rank.

    ``reduce=False``: this process's counts only, no collective (a model one process holds alone, such as the lab
    model that the main process pretrains while the other ranks wait).
    """
    counter = RoutingCounter(model)
    _run_counted(model, counter, data, batch_size, max_batches, progress, "HELLoRA profiling", pad_batches_to)
    meta = {"mode": "forward", "batch_size": batch_size, "max_batches": max_batches}
    meta.update(source or {})
    return counter.to_profile(meta, reduce=reduce)


def profile_rows(
    model: nn.Module,
    data: Any,
    *,
    batch_size: int = 8,
    progress: bool = True,
    source: dict[str, Any] | None = None,
) -> tuple[ExpertProfile, torch.Tensor]:
    """Forward-only profile of a tokenized dataset plus its per-row counts (rows x layers x experts, int32).

    Row ``i`` of the counts is dataset row ``i``; summing any subset gives that subset's profile exactly (warm-up
    stability for every fraction and seed from one pass).
    """
    if not hasattr(data, "column_names") or len(data) == 0 or "input_ids" not in data.column_names:
        raise ValueError("profile_rows needs a non-empty tokenized dataset with an `input_ids` column.")
    counter = RoutingCounter(model, per_row=True)
    _run_counted(model, counter, data, batch_size, None, progress, "HELLoRA profiling rows")
    per_row = counter.row_counts()
    profile = counter.to_profile({"mode": "forward", "batch_size": batch_size, **(source or {})})
    if per_row.shape[0] != len(data) or not torch.equal(per_row.sum(0).long(), profile.counts):
        raise RuntimeError(
            "Per-row routing counts do not add up to the layer totals for this model family (its routing indices "
            "are not laid out batch x sequence); use labelled profiles (one `hellora profile` per fraction) instead."
        )
    return profile, per_row


def _run_counted(
    model: nn.Module,
    counter: RoutingCounter,
    data: Any,
    batch_size: int,
    max_batches: int | None,
    progress: bool,
    desc: str,
    pad_batches_to: int | None = None,
) -> None:
    """Forward passes over ``data`` in eval mode without gradients, counted by ``counter``."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    from tqdm.auto import tqdm

    pad_id = getattr(getattr(unwrap_model(model), "config", None), "pad_token_id", None) or 0
    device = next(model.parameters()).device
    batches = _iter_batches(data, batch_size, pad_collate(pad_id), allow_empty=pad_batches_to is not None)
    bar = tqdm(total=_maybe_len(data, batch_size, max_batches), desc=desc, disable=not progress, unit="batch")
    ran = 0
    # Stopping mid-forward would leave sharded (FSDP/ZeRO-3) or collective state half way: one process only.
    counter.stop_early = _single_unsharded_process()
    with counter, _eval_mode(model), torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            try:
                model(**inputs, use_cache=False)
            except _StopForward:  # every MoE layer counted: the rest of the forward is not needed
                pass
            ran += 1
            bar.update(1)
        counter.enabled = False  # filler forwards are not counted
        filler = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        for _ in range(max(0, (pad_batches_to or 0) - ran)):
            model(input_ids=filler, attention_mask=torch.ones_like(filler), use_cache=False)
        counter.enabled = True
    bar.close()


def _maybe_len(data: Any, batch_size: int, max_batches: int | None) -> int | None:
    try:
        n = len(data)
    except TypeError:
        return max_batches
    try:
        from datasets import Dataset

        if isinstance(data, Dataset):
            n = math.ceil(n / batch_size)
    except ImportError:  # pragma: no cover
        pass
    return min(n, max_batches) if max_batches is not None else n
