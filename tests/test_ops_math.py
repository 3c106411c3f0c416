"""The pure-math helpers of ``expert_lora/ops.py`` against plain-torch references (values and gradients), so the
mutation runner (``tools/mutation.py ops``) has a fast, focused test subset: grouped GEMMs over sorted row
groups, the low-rank ``LoraRows`` autograd function (forward and backward, one or two A/B pairs, with and
without per-row weights, with an unused output) and the in-place ``AddRows``."""

import pytest
import torch

from hellora_trl.expert_lora.ops import (
    AddRows,
    grouped_mm_available,
    kernel_calls,
    reset_kernel_calls,
    LoraRows,
    add_rows,
    grouped_mm,
    grouped_mm_loop,
    grouped_outer,
    lora_compute_dtype,
    project,
    row_scale,
    take_rows,
)

SIZES = [3, 0, 4, 2]  # rows per group, one group empty


def offsets_of(sizes):
    return torch.tensor(sizes, dtype=torch.int32).cumsum(0).to(torch.int32)


def groups_of(sizes):
    return torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))


def rand(*shape, seed=0, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def test_project_plain_and_transposed():
    x, w = rand(5, 3), rand(4, 3, seed=1)
    assert torch.allclose(project(x, w, False), x @ w.T)
    assert torch.allclose(project(x, w.T.contiguous(), True), x @ w.T)


def test_lora_compute_dtype_follows_autocast_for_float32_factors_only():
    assert lora_compute_dtype(torch.float32, "cpu") == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert lora_compute_dtype(torch.float32, "cpu") == torch.bfloat16
        assert lora_compute_dtype(torch.float16, "cpu") == torch.float16
        assert lora_compute_dtype(torch.float64, "cpu") == torch.float64


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_mm_and_loop_match_per_group_products(dtype):
    n, d_in, d_out = sum(SIZES), 16, 8
    x, w = rand(n, d_in, dtype=dtype), rand(len(SIZES), d_in, d_out, seed=1, dtype=dtype)
    group = groups_of(SIZES)
    expected = torch.stack([x[t] @ w[group[t]] for t in range(n)])
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else {}
    for fn in (grouped_mm, grouped_mm_loop):
        assert torch.allclose(fn(x, w, offsets_of(SIZES)), expected, **tol)
    one = grouped_mm_loop(x[:3], w[:1], offsets_of([3]))  # a single group: its product, not a concatenation
    assert torch.allclose(one, x[:3] @ w[0])


def test_grouped_mm_loop_with_no_rows_and_bad_offsets():
    w = rand(2, 4, 6)
    for offsets in (offsets_of([0, 0]), torch.zeros(0, dtype=torch.int32)):
        out = grouped_mm_loop(rand(0, 4), w, offsets)
        assert out.shape == (0, 6) and out.dtype == torch.float64
    with pytest.raises(ValueError, match="offsets cover 3 rows, input has 5"):
        grouped_mm_loop(rand(5, 4), w, offsets_of([1, 2]))
    with pytest.raises(ValueError, match="offsets cover 0 rows, input has 5"):
        grouped_mm_loop(rand(5, 4), w, torch.zeros(0, dtype=torch.int32))


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_grouped_outer_matches_per_group_sums(dtype):
    n = sum(SIZES)
    a, b = rand(n, 8, dtype=dtype), rand(n, 16, seed=1, dtype=dtype)
    out = grouped_outer(a, b, offsets_of(SIZES))
    starts = [0, 3, 3, 7]
    for g, (start, size) in enumerate(zip(starts, SIZES)):
        expected = a[start : start + size].T @ b[start : start + size]
        assert torch.allclose(out[g], expected, rtol=1e-5, atol=1e-5), g
    assert torch.equal(out[1], torch.zeros_like(out[1]))


def test_take_rows_and_row_scale():
    x = rand(5, 3)
    assert take_rows(x, None) is x
    assert torch.equal(take_rows(x, torch.tensor([4, 0, 4])), x[[4, 0, 4]])
    assert row_scale(0.5, None, torch.float32) == 0.5
    weights = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float32)
    scaled = row_scale(0.5, weights, torch.float64)
    assert scaled.dtype == torch.float64 and scaled.shape == (3, 1) and scaled.flatten().tolist() == [0.5, 1.0, 2.0]


def reference_lora(source, rows, sizes, scaling, row_weights, factors):
    """Plain autograd: scaling * w_t * B_g (A_g x_t) for every row t of slot g, per (A, B) pair."""
    x = source if rows is None else source[rows]
    group = groups_of(sizes)
    outs = []
    for a, b in zip(factors[0::2], factors[1::2]):
        xa = torch.einsum("ti,tri->tr", x, a[group])
        if row_weights is not None:
            xa = xa * row_weights[:, None]
        outs.append(scaling * torch.einsum("tr,tor->to", xa, b[group]))
    return outs


def make_factors(pairs, k, r, d_in, d_out, seed=2):
    factors = []
    for p in range(pairs):
        factors += [rand(k, r, d_in, seed=seed + 2 * p), rand(k, d_out + p, r, seed=seed + 2 * p + 1)]
    return [f.requires_grad_() for f in factors]


@pytest.mark.parametrize("pairs, use", [(1, "all"), (2, "all"), (2, "first"), (2, "last")])
@pytest.mark.parametrize("with_rows", [False, True])
@pytest.mark.parametrize("with_weights", [False, True])
def test_lora_rows_forward_and_backward_match_autograd(pairs, use, with_rows, with_weights):
    sizes, r, d_in, d_out, scaling = [2, 0, 3], 2, 5, 4, 0.75
    n = sum(sizes)
    source = rand(7 if with_rows else n, d_in, seed=1).requires_grad_()
    rows = torch.tensor([6, 0, 3, 3, 1]) if with_rows else None
    weights = (rand(n, seed=9).abs() + 0.5).requires_grad_() if with_weights else None
    factors = make_factors(pairs, len(sizes), r, d_in, d_out)
    outs = LoraRows.apply(source, rows, offsets_of(sizes), scaling, weights, *factors)
    refs = reference_lora(source, rows, sizes, scaling, weights, factors)
    assert len(outs) == pairs
    for out, ref in zip(outs, refs):
        assert torch.allclose(out, ref)
    picked = {"all": range(pairs), "first": [0], "last": [pairs - 1]}[use]
    probes = [rand(*refs[i].shape, seed=20 + i) for i in range(pairs)]
    inputs = [source, *factors] + ([weights] if with_weights else [])
    got = torch.autograd.grad(sum((outs[i] * probes[i]).sum() for i in picked), inputs, allow_unused=True)
    want = torch.autograd.grad(sum((refs[i] * probes[i]).sum() for i in picked), inputs, allow_unused=True)
    for g, w in zip(got, want):
        w = torch.zeros_like(g) if w is None and g is not None else w
        assert (g is None) == (w is None)
        if g is not None:
            assert torch.allclose(g, w), (use, pairs)


def test_lora_rows_without_input_grad_and_float32():
    sizes, r, d_in, d_out = [2, 2], 4, 16, 8  # as many rows as the rank: columns are told apart by width only
    source = rand(4, d_in, dtype=torch.float32)
    factors = [f.detach().float().requires_grad_() for f in make_factors(2, 2, r, d_in, d_out)]
    outs = LoraRows.apply(source, None, offsets_of(sizes), 2.0, None, *factors)
    refs = reference_lora(source, None, sizes, 2.0, None, factors)
    for out, ref in zip(outs, refs):
        assert out.dtype == torch.float32 and torch.allclose(out, ref, rtol=1e-4, atol=1e-4)
    got = torch.autograd.grad(sum(o.sum() for o in outs), factors)
    want = torch.autograd.grad(sum(o.sum() for o in refs), factors)
    for g, w in zip(got, want):
        assert g.dtype == torch.float32 and torch.allclose(g, w, rtol=1e-4, atol=1e-4)


def test_add_rows_in_place_with_gradients():
    base = rand(4, 3).requires_grad_()
    delta = rand(3, 3, seed=1, dtype=torch.float32).requires_grad_()
    rows = torch.tensor([2, 0, 2])
    y = add_rows(base * 1.0, delta, rows)
    expected = (base * 1.0).index_add(0, rows, delta.double())
    assert torch.allclose(y, expected)
    probe = rand(4, 3, seed=5)
    g_base, g_delta = torch.autograd.grad((y * probe).sum(), [base, delta])
    assert torch.allclose(g_base, probe) and g_delta.dtype == torch.float32
    assert torch.allclose(g_delta.double(), probe[rows])
    square = rand(3, 3, seed=3)
    full = add_rows(square * 1.0, delta, None)
    assert full.dtype == torch.float64 and torch.allclose(full, square + delta.double())
    z = base * 1.0
    assert AddRows.apply(z, rows, delta) is not None and z._version > 0  # y is modified in place


def test_grouped_mm_gradients_with_an_expanded_output_gradient():
    # float32 with 16-byte rows takes torch's grouped kernel where it has one; a bare .sum() gives it an expanded
    # (stride-0) gradient, which grouped_mm makes contiguous before the kernel's backward sees it
    n = sum(SIZES)
    x = rand(n, 16, dtype=torch.float32).requires_grad_()
    w = rand(len(SIZES), 16, 8, seed=1, dtype=torch.float32).requires_grad_()
    grouped_mm(x, w, offsets_of(SIZES)).sum().backward()
    x_ref, w_ref = x.detach().clone().requires_grad_(), w.detach().clone().requires_grad_()
    grouped_mm_loop(x_ref, w_ref, offsets_of(SIZES)).sum().backward()
    assert torch.allclose(x.grad, x_ref.grad, atol=1e-5) and torch.allclose(w.grad, w_ref.grad, atol=1e-5)


def test_kernel_calls_count_one_dispatch_per_call():
    x, w = rand(sum(SIZES), 16, dtype=torch.float32), rand(len(SIZES), 16, 8, seed=1, dtype=torch.float32)
    for dtype in (torch.float32, torch.float64):
        xd, wd = x.to(dtype), w.to(dtype)
        way = "kernel" if grouped_mm_available(xd, wd) else "loop"
        reset_kernel_calls()
        grouped_mm(xd, wd, offsets_of(SIZES))
        grouped_outer(xd, xd, offsets_of(SIZES))
        assert kernel_calls() == {f"grouped_mm/{way}": 1, f"grouped_outer/{way}": 1}, dtype
    reset_kernel_calls()
    assert kernel_calls() == {}
