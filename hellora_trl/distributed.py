"""Helpers that keep HELLoRA correct under DDP, FSDP2 and DeepSpeed ZeRO-2/3.

Under ZeRO-3 (``zero3_init_flag``) every parameter is partitioned from the moment the model is built: its
``.shape`` is an empty placeholder and the real shape is in ``ds_shape``, and a forward outside a DeepSpeed
engine sees no weights at all. Under FSDP2 parameters are ``DTensor`` shards. The functions here read real
shapes, gather weights for HELLoRA's own forward passes (profiling) and tell DeepSpeed to gather a whole MoE
block at once, so ranks that route tokens to different experts never wait on each other.

Nothing here changes a single-process or DDP run: without partitioned parameters every helper is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterator

import torch
from torch import nn

from .registry import find_moe_layers
from .utils import clean_param_name, has_zero3_params, is_zero3_param, unwrap_model


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """The sum of ``tensor`` over all ranks, on CPU (itself outside a distributed run).

    Built on ``accelerate.utils.reduce``; the tensor travels on the rank's device (NCCL needs CUDA tensors).
    """
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return tensor
    from accelerate import PartialState
    from accelerate.utils import reduce

    return reduce(tensor.to(PartialState().device), reduction="sum").cpu()


def is_main_process() -> bool:
    """Whether this process writes shared outputs (accelerate's main process; True outside a distributed run)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return True
    from accelerate import PartialState

    return PartialState().is_main_process


def is_local_main_process() -> bool:
    """Whether this process is the first one on its machine (``LOCAL_RANK`` 0, as set by ``accelerate launch`` and
    ``torchrun``; True outside a launched run). Works before any process group exists."""
    if os.environ.get("LOCAL_RANK", "").strip().lstrip("-").isdigit():
        return int(os.environ["LOCAL_RANK"]) == 0
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        from accelerate import PartialState

        return PartialState().is_local_main_process
    return True


@contextlib.contextmanager
def unsharded_construction() -> Iterator[None]:
    """Build models whole inside the block, even in a process set up for ZeRO-3 or FSDP.

    A training run under DeepSpeed ZeRO-3 makes transformers build every model inside ``deepspeed.zero.Init``
    (its weights partitioned at construction), and a ``zero.Init`` entered by the caller patches every module's
    constructor; FSDP's CPU-RAM-efficient loading puts non-first ranks' weights on the meta device. A model that
    one process builds and trains on its own (the lab model's pretraining) needs real, whole weights: inside
    this block transformers' ZeRO-3 flag is cleared, an active ``zero.Init`` is paused and accelerate's FSDP
    switch reads off, and all three are restored on exit. A no-op in a plain run.
    """
    hf_ds = sys.modules.get("transformers.integrations.deepspeed")
    hf_ref = getattr(hf_ds, "_hf_deepspeed_config_weak_ref", None) if hf_ds is not None else None
    ds_init = sys.modules.get("deepspeed.runtime.zero.partition_parameters")
    ds_active = ds_init is not None and getattr(ds_init, "top_level_context", None) is not None
    fsdp_env = os.environ.get("ACCELERATE_USE_FSDP")
    if hf_ref is not None:
        hf_ds.unset_hf_deepspeed_config()
    if ds_active:
        ds_init.shutdown_init_context()
    if fsdp_env is not None:
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    try:
        yield
    finally:
        if fsdp_env is not None:
            os.environ["ACCELERATE_USE_FSDP"] = fsdp_env
        if ds_active:
            ds_init.restore_init_context()
        if hf_ref is not None and hf_ref() is not None:
            hf_ds.set_hf_deepspeed_config(hf_ref())


def shard_bounds(n: int, world: int, rank: int) -> tuple[int, int]:
    """[start, end) of ``rank``'s contiguous share of ``n`` rows; the first ``n % world`` ranks get one extra row.

    Same split as ``datasets.Dataset.shard(contiguous=True)``, but defined for ``n < world`` (empty shards),
    which a small warm-up slice on many GPUs produces.
    """
    base, extra = divmod(n, world)
    start = rank * base + min(rank, extra)
    return start, start + base + (1 if rank < extra else 0)


def zero3_enabled() -> bool:
    """Whether the current training run is configured for DeepSpeed ZeRO-3 (transformers' global flag)."""
    try:
        from transformers.integrations import is_deepspeed_zero3_enabled
    except ImportError:  # pragma: no cover - transformers always has it
        return False
    return bool(is_deepspeed_zero3_enabled())


@contextlib.contextmanager
def gathered(params: list[nn.Parameter], modifier_rank: int | None = None) -> Iterator[None]:
    """Full (gathered) values of ZeRO-3 partitioned ``params`` inside the block; a no-op for other tensors.

    Collective under ZeRO-3: every rank must enter it with the same parameters.
    """
    zero = [p for p in params if is_zero3_param(p)]
    if not zero:
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(zero, modifier_rank=modifier_rank):
        yield


@contextlib.contextmanager
def zero3_forward_gathering(model: nn.Module) -> Iterator[None]:
    """Let a plain ``model(...)`` run on ZeRO-3 partitioned weights (profiling happens before any engine exists).

    Each module's own parameters are gathered right before its forward and released right after, so only one
    module's full weights are materialised at a time, as ZeRO-3 itself does. An MoE block is gathered whole
    when it starts: its router picks different experts on different ranks, and per-expert gathers would then
    pair up different experts' shards across ranks (same-sized all-gathers match by order, not by identity).
    Every rank must run the same number of forwards (see ``profile_experts(pad_batches_to=...)``).
    """
    if not has_zero3_params(model):
        yield
        return
    import deepspeed

    handles, open_contexts = [], {}

    def gather_on_entry(params: list[nn.Parameter]):
        def pre_hook(module: nn.Module, args) -> None:
            ctx = deepspeed.zero.GatheredParameters(params)
            ctx.__enter__()
            open_contexts.setdefault(id(module), []).append(ctx)

        return pre_hook

    def release_on_exit(module: nn.Module, args, output) -> None:
        stack = open_contexts.get(id(module))
        if stack:
            stack.pop().__exit__(None, None, None)

    for module, params in _gather_units(model):
        handles.append(module.register_forward_pre_hook(gather_on_entry(params)))
        handles.append(module.register_forward_hook(release_on_exit))
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()
        for stack in open_contexts.values():
            while stack:
                stack.pop().__exit__(None, None, None)


def _gather_units(model: nn.Module) -> list[tuple[nn.Module, list[nn.Parameter]]]:
    """(module, ZeRO-3 params to gather when it runs): each MoE block with all its parameters, every other
    module with its own direct parameters (modules inside an MoE block get none of their own)."""
    blocks = {id(layer.block): layer.block for layer in find_moe_layers(unwrap_model(model))}
    inside = {id(m) for block in blocks.values() for m in block.modules()}
    units = []
    for module in model.modules():
        if id(module) in blocks:
            params = [p for p in module.parameters() if is_zero3_param(p)]
        elif id(module) in inside:
            continue
        else:
            params = [p for p in module.parameters(recurse=False) if is_zero3_param(p)]
        if params:
            units.append((module, params))
    return units


def register_moe_leaf_modules(model: nn.Module) -> list[str]:
    """Mark every MoE block as a ZeRO-3 leaf module and return their names (empty when ZeRO-3 is not in use).

    ZeRO-3 normally gathers a submodule's weights when that submodule runs. In an MoE block the router decides
    which experts run, so two ranks may run different expert submodules and wait forever on each other's
    all-gathers; HELLoRA's expert-LoRA layer also reads the fused expert weights without calling the wrapped
    module. A leaf block is gathered whole when the block starts, the same on every rank.
    """
    if not (zero3_enabled() or has_zero3_params(model)):
        return []
    from deepspeed.utils import set_z3_leaf_modules_by_name

    base = unwrap_model(model)
    names = [layer.block_name for layer in find_moe_layers(base)]
    set_z3_leaf_modules_by_name(base, names)
    return names


def full_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """A detached CPU copy of the whole tensor: FSDP2 ``DTensor`` shards are all-gathered (collective)."""
    if hasattr(tensor, "full_tensor"):
        tensor = tensor.full_tensor()
    return tensor.detach().to("cpu", copy=True)


def gathered_adapter_state(model: nn.Module, strip_wrappers: bool = True) -> dict[str, torch.Tensor]:
    """Every LoRA tensor of ``model`` (PEFT names, adapter name kept) as full CPU tensors, on every rank.

    Trainable and frozen (LoRI's A) factors and the hot-expert buffers alike. Works on a plain/DDP model, an
    FSDP2-sharded one (DTensor) and under ZeRO-3 (gathered). Collective under FSDP2 and ZeRO-3: call it on every
    rank. ``strip_wrappers=False`` keeps the names exactly as ``model.state_dict()`` has them.
    """
    rename = clean_param_name if strip_wrappers else (lambda name: name)
    named = [(n, p) for n, p in model.named_parameters() if "lora_" in n]
    state: dict[str, torch.Tensor] = {}
    with gathered([p for _, p in named]):
        for name, param in named:
            state[rename(name)] = full_tensor(param)
    for name, buf in model.named_buffers():
        if "lora_" in name:
            state[rename(name)] = full_tensor(buf)
    return state


def end_distributed() -> None:
    """Barrier then destroy the process group, so multi-process runs exit cleanly (no gloo abort at exit)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
