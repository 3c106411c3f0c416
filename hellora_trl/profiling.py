"""Routing profiles: how many tokens the router sends to each expert of each MoE layer.

Counts are read where the experts module receives ``top_k_index`` (fused layout) or from the router's logits
(per-expert ModuleList layout), so one mechanism serves every registered family.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import nn

from .registry import MoEFamily, MoELayer, experts_per_token, family_for, find_moe_layers

PROFILE_FORMAT_VERSION = 1


def _default_file_mode() -> int:
    """0666 minus the process umask: what ``open(path, "w")`` would have given."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


def atomic_write_text(path: str | os.PathLike, text: str) -> Path:
    """Write via a temp file in the same folder + rename, so an interrupted save never leaves a torn file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _default_file_mode())  # mkstemp makes 0600; a profile or report is an ordinary file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


@dataclass
class ExpertProfile:
    """Token->expert assignment counts, (num_layers x num_experts) int64, plus where they came from."""

    counts: torch.Tensor
    layer_names: list[str]
    num_experts: int
    experts_per_token: int
    family: str = "unknown"
    tokens_seen: int = 0
    source: dict[str, Any] = field(default_factory=dict)
    has_shared_experts: bool = False

    def __post_init__(self) -> None:
        self.counts = torch.as_tensor(self.counts, dtype=torch.int64).cpu()
        if self.counts.dim() != 2:
            raise ValueError(f"Profile counts must be 2-D (layers x experts), got shape {tuple(self.counts.shape)}.")
        if self.counts.shape != (len(self.layer_names), self.num_experts):
            raise ValueError(
                f"Profile counts have shape {tuple(self.counts.shape)} but there are {len(self.layer_names)} layer "
                f"names and num_experts={self.num_experts}."
            )
        if (self.counts < 0).any():
            raise ValueError("Profile counts must be non-negative.")

    # ------------------------------------------------------------------------------------------ views
    @property
    def num_layers(self) -> int:
        return len(self.layer_names)

    def shares(self) -> torch.Tensor:
        """Per-layer share of assignments per expert (rows sum to 1 where the layer saw tokens)."""
        totals = self.counts.sum(dim=1, keepdim=True).clamp_min(1)
        return self.counts.double() / totals

    def top_k(self, k: int) -> dict[str, list[int]]:
        """Per-layer top-k experts by count, ties to the lower index."""
        from .selection import select_hot_experts

        return select_hot_experts(self, k=k, strategy="layer")

    def concentration(self, k: int | None = None) -> list[float]:
        """Share of each layer's assignments taken by its top-k experts (uniform routing gives k/E)."""
        k = k or self.experts_per_token
        _check_k(k, self.num_experts)
        top = torch.sort(self.counts, dim=1, descending=True, stable=True).values[:, :k]
        totals = self.counts.sum(dim=1).clamp_min(1)
        return (top.sum(dim=1).double() / totals).tolist()

    def jaccard(self, other: "ExpertProfile", k: int | None = None) -> list[float]:
        """Per-layer Jaccard similarity of the two profiles' top-k hot sets."""
        mine, theirs = self._paired_hot_sets(other, k)
        return [len(a & b) / max(len(a | b), 1) for a, b in zip(mine, theirs)]

    def coverage(self, other: "ExpertProfile", k: int | None = None) -> list[float]:
        """Per-layer share of ``other``'s routing mass that lands on this profile's hot set."""
        mine, _ = self._paired_hot_sets(other, k)
        shares = other.shares()
        return [float(shares[i, sorted(hot)].sum()) for i, hot in enumerate(mine)]

    def _paired_hot_sets(self, other: "ExpertProfile", k: int | None) -> tuple[list[set], list[set]]:
        self._check_compatible(other)
        k = k or self.experts_per_token
        return (
            [set(v) for v in self.top_k(k).values()],
            [set(v) for v in other.top_k(k).values()],
        )

    def _check_compatible(self, other: "ExpertProfile") -> None:
        if self.layer_names != other.layer_names or self.num_experts != other.num_experts:
            raise ValueError(
                "Profiles describe different models: "
                f"{self.num_layers} layers x {self.num_experts} experts vs "
                f"{other.num_layers} layers x {other.num_experts} experts (or different layer names)."
            )

    def merge(self, other: "ExpertProfile") -> "ExpertProfile":
        """Sum of two profiles of the same model (e.g. two data shards)."""
        self._check_compatible(other)
        return ExpertProfile(
            counts=self.counts + other.counts,
            layer_names=list(self.layer_names),
            num_experts=self.num_experts,
            experts_per_token=self.experts_per_token,
            family=self.family,
            tokens_seen=self.tokens_seen + other.tokens_seen,
            source={"merged": [self.source, other.source]},
            has_shared_experts=self.has_shared_experts,
        )

    def check_matches(self, model: nn.Module) -> None:
        """Raise a clear error when this profile was not taken on (a model shaped like) ``model``."""
        layers = find_moe_layers(_unwrap(model))
        names = [layer.name for layer in layers]
        if names != self.layer_names:
            raise ValueError(
                f"Profile does not match the model: the profile has {self.num_layers} MoE layers "
                f"({self.layer_names[:2]}...), the model has {len(names)} ({names[:2]}...). Profile the model "
                "again, or pass the profile taken on this architecture."
            )
        bad = [layer.name for layer in layers if layer.num_experts != self.num_experts]
        if bad:
            raise ValueError(
                f"Profile has {self.num_experts} experts per layer but the model's layers {bad[:3]} have "
                f"{layers[0].num_experts}."
            )

    # ------------------------------------------------------------------------------------------- I/O
    def to_dict(self) -> dict[str, Any]:
        return {
            "format": "hellora_trl.ExpertProfile",
            "version": PROFILE_FORMAT_VERSION,
            "family": self.family,
            "num_experts": self.num_experts,
            "experts_per_token": self.experts_per_token,
            "has_shared_experts": self.has_shared_experts,
            "tokens_seen": self.tokens_seen,
            "layer_names": self.layer_names,
            "counts": self.counts.tolist(),
            "source": self.source,
        }

    def save(self, path: str | os.PathLike, extra: Mapping[str, Any] | None = None) -> Path:
        """Atomic JSON. ``extra`` (e.g. the selected hot map) is stored alongside and ignored by ``load``."""
        data = self.to_dict()
        if extra:
            data.update(extra)
        return atomic_write_text(path, json.dumps(data, indent=1))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "ExpertProfile":
        if not isinstance(data, Mapping) or data.get("format") != "hellora_trl.ExpertProfile":
            raise ValueError("Not a hellora_trl expert profile (missing format marker).")
        try:
            return cls(
                counts=torch.tensor(data["counts"], dtype=torch.int64),
                layer_names=list(data["layer_names"]),
                num_experts=int(data["num_experts"]),
                experts_per_token=int(data["experts_per_token"]),
                family=data.get("family", "unknown"),
                tokens_seen=int(data.get("tokens_seen", 0)),
                source=dict(data.get("source", {})),
                has_shared_experts=bool(data.get("has_shared_experts", False)),
            )
        except (KeyError, TypeError, ValueError) as err:
            raise ValueError(f"Invalid expert profile: {err}") from err

    @classmethod
    def load(cls, path: str | os.PathLike) -> "ExpertProfile":
        return cls.load_with_extra(path)[0]

    @classmethod
    def load_with_extra(cls, path: str | os.PathLike) -> tuple["ExpertProfile", dict[str, Any]]:
        """The profile and the whole JSON record, so fields saved with it (``hot_experts``...) need no second read."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"Expert profile not found: {path}")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(f"Expert profile {path} is not valid JSON ({err}). Re-run profiling.") from err
        try:
            return cls.from_dict(data), data
        except ValueError as err:
            raise ValueError(f"{path}: {err}") from err

    def __repr__(self) -> str:
        return (
            f"ExpertProfile(family={self.family!r}, layers={self.num_layers}, experts={self.num_experts}, "
            f"top_k={self.experts_per_token}, tokens_seen={self.tokens_seen})"
        )


def _check_k(k: int, num_experts: int) -> None:
    if not isinstance(k, int) or k < 1 or k > num_experts:
        raise ValueError(f"k must be an integer in [1, {num_experts}] (the number of experts), got {k!r}.")


def _unwrap(model: nn.Module) -> nn.Module:
    """The transformers model inside PEFT/accelerate wrappers."""
    while True:
        if hasattr(model, "module") and isinstance(model.module, nn.Module):  # DDP / DeepSpeed engines
            model = model.module
        elif hasattr(model, "get_base_model"):
            model = model.get_base_model()
        else:
            return model


class RoutingCounter:
    """Forward hooks that add each layer's token->expert assignments into a counts tensor.

    Padding tokens are excluded when ``set_token_mask`` was given the batch's attention mask. Forwards that run
    inside backward (gradient-checkpoint recomputation) are not counted twice.
    """

    def __init__(self, model: nn.Module, family: MoEFamily | None = None) -> None:
        base = _unwrap(model)
        self.model = base
        self.family = family or family_for(base)
        self.layers: list[MoELayer] = find_moe_layers(base, self.family)
        self.num_experts = self.layers[0].num_experts
        self.top_k = experts_per_token(base.config, self.family)
        self.counts = torch.zeros(len(self.layers), self.num_experts, dtype=torch.int64)
        self.tokens_seen = 0
        self.token_mask: torch.Tensor | None = None
        self._handles: list[Any] = []
        self.enabled = True

    def _model_hook(self, module, args, kwargs) -> None:
        """Remember which tokens are real (not padding) for the MoE hooks of this forward."""
        if not self.enabled or _in_backward():
            return
        mask = kwargs.get("attention_mask")
        ids = kwargs.get("input_ids", args[0] if args else None)
        if isinstance(mask, torch.Tensor) and mask.dim() == 2:
            self.token_mask = mask.reshape(-1).bool()
            self.tokens_seen += int(self.token_mask.sum())
        else:
            self.token_mask = None
            embeds = kwargs.get("inputs_embeds")
            shaped = ids if isinstance(ids, torch.Tensor) else embeds
            if isinstance(shaped, torch.Tensor):
                self.tokens_seen += int(shaped.shape[0] * shaped.shape[1]) if shaped.dim() >= 2 else shaped.numel()

    def _record(self, layer_idx: int, index: torch.Tensor) -> None:
        if not self.enabled or _in_backward():
            return
        index = index.detach().reshape(-1, index.shape[-1])
        mask = self.token_mask
        if mask is not None and mask.numel() == index.shape[0]:
            index = index[mask.to(index.device)]
        flat = index.reshape(-1)
        flat = flat[(flat >= 0) & (flat < self.num_experts)]
        self.counts[layer_idx] += torch.bincount(flat.cpu(), minlength=self.num_experts)

    def attach(self) -> "RoutingCounter":
        self._handles.append(self.model.register_forward_pre_hook(self._model_hook, with_kwargs=True))
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
        if reduce:
            counts, tokens = all_reduce_counts(counts, tokens)
        if tokens == 0:
            # No attention mask seen: each token makes top_k assignments in every layer.
            tokens = int(counts[0].sum()) // max(self.top_k, 1)
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


def _in_backward() -> bool:
    return torch._C._current_graph_task_id() != -1


def all_reduce_counts(counts: torch.Tensor, tokens: int) -> tuple[torch.Tensor, int]:
    """Sum counts across ranks so every rank selects the same hot experts."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return counts, tokens
    backend = torch.distributed.get_backend()
    device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
    packed = torch.cat([counts.reshape(-1), torch.tensor([tokens], dtype=torch.int64)]).to(device)
    torch.distributed.all_reduce(packed)
    packed = packed.cpu()
    return packed[:-1].reshape(counts.shape), int(packed[-1])


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


def pad_collate(pad_token_id: int = 0):
    """Right-pad a list of {input_ids[, attention_mask]} rows into tensors."""

    def collate(rows: list[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        length = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), length), pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), length), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.as_tensor(r["input_ids"])
            mask[i, :n] = torch.as_tensor(r.get("attention_mask", [1] * n))
        return {"input_ids": ids, "attention_mask": mask}

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
) -> ExpertProfile:
    """Forward-only profiling: count the router's token->expert assignments per MoE layer.

    ``data`` is a tokenized ``datasets.Dataset`` (``input_ids``[, ``attention_mask``]), a DataLoader, or any
    iterable of batch dicts. Padding tokens are not counted. Under ``torch.distributed`` the counts are summed
    over ranks, so every rank returns the same profile.

    ``pad_batches_to`` (distributed runs, where ranks hold shards of different sizes): run uncounted one-token
    forwards until this many batches ran, so every rank makes the same number of forward passes (ZeRO-3 gathers
    weights collectively in each one); ``data`` may then be empty on this rank.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    counter = RoutingCounter(model)
    pad_id = getattr(getattr(_unwrap(model), "config", None), "pad_token_id", None) or 0
    device = next(model.parameters()).device
    batches = _iter_batches(data, batch_size, pad_collate(pad_id), allow_empty=pad_batches_to is not None)
    total = _maybe_len(data, batch_size, max_batches)
    try:
        from tqdm.auto import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    bar = tqdm(total=total, desc="HELLoRA profiling", disable=not progress or tqdm is None, unit="batch") if tqdm else None
    ran = 0
    with counter, _eval_mode(model), torch.no_grad():
        for i, batch in enumerate(batches):
            if max_batches is not None and i >= max_batches:
                break
            inputs = {k: v.to(device) for k, v in batch.items() if k in ("input_ids", "attention_mask")}
            model(**inputs, use_cache=False)
            ran += 1
            if bar is not None:
                bar.update(1)
        counter.enabled = False  # filler forwards are not counted
        filler = torch.full((1, 1), pad_id, dtype=torch.long, device=device)
        for _ in range(max(0, (pad_batches_to or 0) - ran)):
            model(input_ids=filler, attention_mask=torch.ones_like(filler), use_cache=False)
        counter.enabled = True
    if bar is not None:
        bar.close()
    meta = {"mode": "forward", "batch_size": batch_size, "max_batches": max_batches}
    meta.update(source or {})
    return counter.to_profile(meta)


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
