"""Numeric ops of the expert-LoRA layer: grouped GEMMs over rows sorted by expert, and the autograd functions
that keep the low-rank path's memory at (rows x rank).

Apart from PEFT so that they can be tested (and tracked against upstream) on their own. The grouped GEMM mirrors
transformers 5.23's ``integrations/moe.py`` ``grouped_mm`` dispatch (``torch._grouped_mm`` where a kernel exists for
the operands, a per-group loop otherwise); :func:`grouped_mm_loop` is the readable reference the fast path is
tested against.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.nn.functional as F


def project(x: torch.Tensor, weight: torch.Tensor, transposed: bool) -> torch.Tensor:
    """x @ W.T for (out, in) weights, x @ W for transposed (in, out) storage (GPT-OSS)."""
    return x @ weight if transposed else F.linear(x, weight)


_GROUPED_MM_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
_GROUPED_MM = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)
_TORCH_VERSION = tuple(int(p) for p in torch.__version__.split("+")[0].split(".")[:2])

# How often each dispatch of grouped_mm / grouped_outer took torch's kernel or the per-group loop, keyed
# "<op>/kernel" and "<op>/loop": one integer increment per call, so tests (and the GPU kit) can assert that the
# kernel, not the loop, ran where it supports the operands.
KERNEL_CALLS: Counter = Counter()


def kernel_calls() -> dict[str, int]:
    """A snapshot of :data:`KERNEL_CALLS` (missing keys read as 0 from the live counter)."""
    return dict(KERNEL_CALLS)


def reset_kernel_calls() -> None:
    KERNEL_CALLS.clear()


def lora_compute_dtype(factor_dtype: torch.dtype, device_type: str) -> torch.dtype:
    """The dtype the low-rank GEMMs run in: the autocast dtype when autocast is on for ``device_type`` and the
    factors are float32 master weights (what PEFT's LoRA gets from autocast on ``F.linear``), else the factors'."""
    if factor_dtype == torch.float32 and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return factor_dtype


def grouped_mm_available(x: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether torch's grouped GEMM kernel accepts these operands; otherwise :func:`grouped_mm` loops over groups.

    The kernel has no float64 support ("Expected mat_a to be Float32, BFloat16 or Float16"), no CPU kernel before
    torch 2.9, needs compute capability 8.0+ on CUDA, and rejects strides that are not multiples of 16 bytes
    (e.g. a bf16 LoRA of rank 4), in the forward or in the backward (whose operands are (rows, out) gradients).
    """
    if _GROUPED_MM is None or x.dtype not in _GROUPED_MM_DTYPES or x.dtype != weight.dtype or x.shape[0] == 0:
        return False
    if x.dim() != 2 or weight.dim() != 3 or not (_aligned_16(x) and _aligned_16(weight)):
        return False
    if (weight.shape[-1] * weight.element_size()) % 16:
        return False
    if weight.device.type == "cuda":
        return torch.cuda.get_device_capability(weight.device) >= (8, 0)
    return weight.device.type == "cpu" and _TORCH_VERSION >= (2, 9)


def _aligned_16(t: torch.Tensor) -> bool:
    """16-byte aligned start and 16-byte multiple strides (unit strides and size-1 dims aside)."""
    size = t.element_size()
    strides_ok = all((stride * size) % 16 == 0 for stride, dim in zip(t.stride(), t.shape) if stride != 1 and dim > 1)
    return strides_ok and t.data_ptr() % 16 == 0 and (t.shape[-1] * size) % 16 == 0


def grouped_mm(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """``x[rows of group g] @ weight[g]`` for rows sorted by group; ``offsets`` (G,) int32 are the cumulative row
    counts (empty groups allowed). ``weight`` is (G, in, out), typically a transposed view of an (G, out, in) stack.

    One kernel call when torch has one for these operands, a loop over the non-empty groups otherwise. Every row
    must belong to a group (``offsets[-1] == len(x)``): the kernel leaves rows past the last offset uninitialised.
    """
    if grouped_mm_available(x, weight):
        KERNEL_CALLS["grouped_mm/kernel"] += 1
        out = _GROUPED_MM(x, weight, offs=offsets)
        if out.requires_grad:
            # The kernel's backward rejects expanded (stride-0) gradients, e.g. from a bare .sum().
            out.register_hook(_contiguous)
        return out
    KERNEL_CALLS["grouped_mm/loop"] += 1
    return grouped_mm_loop(x, weight, offsets)


def _contiguous(grad: torch.Tensor) -> torch.Tensor:
    return grad.contiguous()


def grouped_mm_loop(x: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """Reference/fallback for :func:`grouped_mm`: one matmul per non-empty group (float64, old torch, other devices)."""
    ends = offsets.tolist()
    if (ends[-1] if ends else 0) != x.shape[0]:
        raise ValueError(f"grouped_mm: offsets cover {ends[-1] if ends else 0} rows, input has {x.shape[0]}.")
    pieces, start = [], 0
    for g, end in enumerate(ends):
        if end > start:
            pieces.append(x[start:end] @ weight[g])
        start = end
    if not pieces:
        return x.new_zeros(0, weight.shape[-1])
    return torch.cat(pieces) if len(pieces) > 1 else pieces[0]


def grouped_outer(a: torch.Tensor, b: torch.Tensor, offsets: torch.Tensor) -> torch.Tensor:
    """(G, a.shape[1], b.shape[1]): ``a[rows of g].T @ b[rows of g]`` per group, zeros for empty groups. The
    weight gradient of :func:`grouped_mm`."""
    if _outer_kernel_ok(a, b):
        KERNEL_CALLS["grouped_outer/kernel"] += 1
        return _GROUPED_MM(a.t(), b, offs=offsets)
    KERNEL_CALLS["grouped_outer/loop"] += 1
    out = a.new_zeros(offsets.shape[0], a.shape[1], b.shape[1])
    start = 0
    for g, end in enumerate(offsets.tolist()):
        if end > start:
            out[g] = a[start:end].T @ b[start:end]
        start = end
    return out


def _outer_kernel_ok(a: torch.Tensor, b: torch.Tensor) -> bool:
    """The 2-D x 2-D grouped kernel: same rules as :func:`grouped_mm_available` on the row widths."""
    if _GROUPED_MM is None or a.dtype not in _GROUPED_MM_DTYPES or a.dtype != b.dtype or a.shape[0] == 0:
        return False
    if not (a.is_contiguous() and b.is_contiguous()) or a.data_ptr() % 16 or b.data_ptr() % 16:
        return False
    if (a.shape[1] * a.element_size()) % 16 or (b.shape[1] * b.element_size()) % 16:
        return False
    if a.device.type == "cuda":
        return torch.cuda.get_device_capability(a.device) >= (8, 0)
    return a.device.type == "cpu" and _TORCH_VERSION >= (2, 9)


class LoraRows(torch.autograd.Function):
    """``scaling * (x @ A_j.T) @ B_j.T`` (times an optional per-row weight) for rows grouped by hot slot j, for
    one or more (A, B) pairs sharing the input rows ``x = source[rows]`` (gate and up).

    Why not plain autograd: it would keep the gathered input rows (n, in) and, through the ``index_add`` that
    adds the delta back, every (n, out) delta alive until backward. Here only the (n, P*r) product is saved; the
    input rows are gathered again from ``source``, a tensor the graph keeps anyway (the layer input, or the
    activation that the routing-weight product saves). Pairs sharing the input run their A factors as one
    grouped GEMM (N = P*r rather than P thin ones), forward and backward.
    """

    @staticmethod
    def forward(ctx, source, rows, offsets, scaling, row_weights, *factors):
        # float32 master factors under autocast: the GEMMs run in the autocast dtype on cast copies (k x r x in,
        # small); their gradients go back to the factors' dtype in backward.
        ctx.factor_dtype = factors[0].dtype
        dtype = lora_compute_dtype(ctx.factor_dtype, source.device.type)
        factors = tuple(f.to(dtype) for f in factors)
        a = _stacked_a(factors)
        r = factors[0].shape[1]
        x = (source if rows is None else source.index_select(0, rows)).to(dtype)
        xa = grouped_mm(x, a.transpose(1, 2), offsets)  # (n, P*r)
        del x  # the gathered rows (n, in) are dead: not held through the B products
        scaled = xa * row_scale(scaling, row_weights, dtype)
        outputs = tuple(
            grouped_mm(_columns(scaled, i, r), b.transpose(1, 2), offsets) for i, b in enumerate(factors[1::2])
        )
        ctx.scaling = scaling
        ctx.save_for_backward(source, rows, offsets, row_weights, xa, *factors)
        return outputs

    @staticmethod
    def backward(ctx, *grads):
        source, rows, offsets, row_weights, xa, *factors = ctx.saved_tensors
        a = _stacked_a(factors)
        dtype, r = a.dtype, factors[0].shape[1]
        scale = row_scale(ctx.scaling, row_weights, dtype)
        scaled = xa * scale
        grad_b, grad_scaled = [], []
        for i, (b, grad) in enumerate(zip(factors[1::2], grads)):
            if grad is None:
                grad_b.append(None)
                grad_scaled.append(xa.new_zeros(xa.shape[0], r))
                continue
            grad = grad.contiguous().to(dtype)
            grad_b.append(grouped_outer(grad, _columns(scaled, i, r), offsets))  # (k, out, r)
            grad_scaled.append(grouped_mm(grad, b, offsets))  # (n, r)
        grad_scaled = torch.cat(grad_scaled, dim=1) if len(grad_scaled) > 1 else grad_scaled[0]
        grad_weights = None
        if row_weights is not None and ctx.needs_input_grad[4]:
            grad_weights = ((grad_scaled * xa).sum(-1) * ctx.scaling).to(row_weights.dtype)
        grad_xa = grad_scaled * scale
        x = (source if rows is None else source.index_select(0, rows)).to(dtype)
        grad_a = grouped_outer(grad_xa, x, offsets).split(r, dim=1)  # (k, r, in) per pair
        # Free the re-gathered rows (n, in) and the (n, P*r) products before the input gradient allocates its
        # dense (len(source), in) buffer: that allocation is where a training step's memory peaks (issue 22).
        del x, scaled, grad_scaled
        grad_source = None
        if ctx.needs_input_grad[0]:
            grad_x = grouped_mm(grad_xa, a, offsets).to(source.dtype)
            grad_source = grad_x if rows is None else torch.zeros_like(source).index_add_(0, rows, grad_x)
        grads_ab = [None if g is None else g.to(ctx.factor_dtype) for pair in zip(grad_a, grad_b) for g in pair]
        return grad_source, None, None, None, grad_weights, *grads_ab


def _stacked_a(factors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The A factors of (A, B, A, B, ...) stacked along the rank dimension: (k, P*r, in)."""
    a = factors[0::2]
    return torch.cat(a, dim=1) if len(a) > 1 else a[0]


def _columns(t: torch.Tensor, i: int, width: int) -> torch.Tensor:
    """Columns [i*width, (i+1)*width) as a contiguous block (the grouped kernel wants dense rows)."""
    return t if t.shape[1] == width else t[:, i * width : (i + 1) * width].contiguous()


def row_scale(scaling: float, row_weights: Optional[torch.Tensor], dtype: torch.dtype):
    return scaling if row_weights is None else row_weights.to(dtype).unsqueeze(-1) * scaling


class AddRows(torch.autograd.Function):
    """``y[rows] += delta`` in place, saving only ``rows`` (``index_add`` would keep ``delta`` for backward)."""

    @staticmethod
    def forward(ctx, y, rows, delta):
        ctx.mark_dirty(y)
        ctx.save_for_backward(rows)
        ctx.delta_dtype = delta.dtype
        return y.index_add_(0, rows, delta.to(y.dtype))

    @staticmethod
    def backward(ctx, grad):
        (rows,) = ctx.saved_tensors
        return grad, None, grad.index_select(0, rows).to(ctx.delta_dtype)


@dataclass
class RowGroups:
    """Assignment rows sorted by expert, grouped once per layer call and shared by gate/up, down and LoRA.

    ``expert`` (n,) is each row's expert id (ascending); ``offsets`` (E,) int32 are the cumulative row counts over
    the whole expert stack (zero for experts without rows), the boundaries of the base grouped GEMMs;
    ``hot_rows`` are the positions of the rows of hot experts (``None``: every row is hot) and ``hot_offsets``
    (k,) int32 their cumulative counts per hot slot, the boundaries of the low-rank grouped GEMMs.
    """

    expert: torch.Tensor
    offsets: torch.Tensor
    hot_offsets: torch.Tensor
    hot_rows: Optional[torch.Tensor]
    num_hot_rows: int


def take_rows(x: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    return x if rows is None else x.index_select(0, rows)


def add_rows(y: torch.Tensor, delta: torch.Tensor, rows: Optional[torch.Tensor]) -> torch.Tensor:
    """``y[rows] += delta`` in place: ``y`` is a fresh GEMM output that no backward formula saved."""
    if rows is None:
        return y.add_(delta.to(y.dtype))
    return AddRows.apply(y, rows, delta)
