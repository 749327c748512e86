"""The fused CPU fast path: a frozen linear layer with its sparse delta written into the weight for each matmul.

Its specification is the merged layer, ``F.linear(x, W + D, b)`` with ``W + D`` rounded as a merge rounds it
(:func:`grin_peft.dense.merged_linear`): the same output and ``grad_x`` bit for bit with every kernel, the same
values gradient bit for bit with the ``dense`` kernel and to float rounding with ``gather`` and ``csr`` (they sum the
same products in other orders); against the reference path (base output plus a separate sparse delta) float
rounding in float32; exact on hand-checkable integer cases. The weight itself is left bit-identical.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import grin_peft.fused as fused_module
from grin_peft import GrinError
from grin_peft.dense import merged_linear
from grin_peft.fused import fused_sparse_linear, pick_kernel
from grin_peft.sparse import sparse_delta_linear
from grin_peft.sparse_pattern import SparsePattern

KERNELS = ["gather", "csr", "dense"]


def setup(out_features, in_features, nnz, dtype=torch.float32, seed=0, shape=(2, 5), bias=True):
    g = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=g).to(dtype)
    b = torch.randn(out_features, generator=g).to(dtype) if bias else None
    indices = torch.randperm(out_features * in_features, generator=g)[:nnz].sort().values
    pattern = SparsePattern.from_flat_indices(indices, out_features, in_features)
    values = torch.nn.Parameter(torch.randn(nnz, generator=g) * 0.1)
    x = torch.randn(*shape, in_features, generator=g).to(dtype).requires_grad_()
    return weight, b, values, x, pattern


def forward_backward(fn, x, values, seed=7):
    """Output and the gradients of x and values for a fixed upstream gradient."""
    y = fn()
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    grad_x, grad_values = torch.autograd.grad(y, (x, values), grad_y)
    return y.detach(), grad_x, grad_values


def merged(weight, bias, values, x, pattern):
    return forward_backward(lambda: merged_linear(x, weight, bias, [(values, pattern.indices)]), x, values)


def reference(weight, bias, values, x, pattern):
    return forward_backward(lambda: F.linear(x, weight, bias) + sparse_delta_linear(x, values, pattern), x, values)


# ----------------------------------------------------------------------------------------------- hand-checked


@pytest.mark.parametrize("kernel", KERNELS)
def test_a_hand_checked_layer(kernel):
    # W = [[1, 2, 0], [0, 1, -1]], b = [1, -1], delta D[0, 2] = 0.5 and D[1, 0] = -2 (flat positions 2 and 3)
    weight = torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]])
    bias = torch.tensor([1.0, -1.0])
    pattern = SparsePattern.from_flat_indices(torch.tensor([2, 3]), 2, 3)
    values = torch.tensor([0.5, -2.0], requires_grad=True)
    x = torch.tensor([[1.0, 2.0, 4.0], [-1.0, 0.0, 2.0]], requires_grad=True)
    y = fused_sparse_linear(x, weight, bias, values, pattern, kernel)
    # row 0: [1 + 4 + 0 + 1 + 0.5 * 4, 0 + 2 - 4 - 1 - 2 * 1] = [8, -5]; row 1: [-1 + 1 + 1, 0 - 2 - 1 + 2] = [1, -1]
    assert torch.equal(y, torch.tensor([[8.0, -5.0], [1.0, -1.0]]))
    grad_y = torch.tensor([[1.0, 2.0], [3.0, -1.0]])
    grad_x, grad_values = torch.autograd.grad(y, (x, values), grad_y)
    # grad_x = grad_y @ (W + D): W + D = [[1, 2, 0.5], [-2, 1, -1]]
    assert torch.equal(grad_x, torch.tensor([[-3.0, 4.0, -1.5], [5.0, 5.0, 2.5]]))
    # grad D[0, 2] = sum_n grad_y[n, 0] x[n, 2] = 4 + 6; grad D[1, 0] = sum_n grad_y[n, 1] x[n, 0] = 2 + 1
    assert torch.equal(grad_values, torch.tensor([10.0, 3.0]))
    assert torch.equal(weight, torch.tensor([[1.0, 2.0, 0.0], [0.0, 1.0, -1.0]]))  # written in, then restored


# ----------------------------------------------------------------------------------------------- against the merge

SHAPES = [(7, 5, 3), (64, 48, 20), (64, 48, 300), (40, 150, 900), (300, 200, 600)]


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("out_features, in_features, nnz", SHAPES)
def test_every_kernel_is_the_merged_layer(kernel, out_features, in_features, nnz):
    weight, bias, values, x, pattern = setup(out_features, in_features, nnz)
    before = weight.clone()
    y, grad_x, grad_values = forward_backward(
        lambda: fused_sparse_linear(x, weight, bias, values, pattern, kernel), x, values
    )
    want_y, want_grad_x, want_grad_values = merged(weight, bias, values, x, pattern)
    assert torch.equal(y, want_y) and torch.equal(grad_x, want_grad_x)
    if kernel == "dense":
        assert torch.equal(grad_values, want_grad_values)
    else:
        scale = float(want_grad_values.abs().max())
        torch.testing.assert_close(grad_values, want_grad_values, rtol=1e-6, atol=1e-6 * scale)
    assert torch.equal(weight, before)


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("out_features, in_features, nnz", SHAPES)
def test_in_float32_every_kernel_equals_the_reference_path_to_float_rounding(kernel, out_features, in_features, nnz):
    weight, bias, values, x, pattern = setup(out_features, in_features, nnz)
    expected = reference(weight, bias, values, x, pattern)
    got = forward_backward(lambda: fused_sparse_linear(x, weight, bias, values, pattern, kernel), x, values)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("kernel", KERNELS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_is_the_merged_layer(kernel, dtype):
    # a 16-bit weight: W + D rounded once to its dtype, as a merge writes it; float32 values and their gradient
    weight, bias, values, x, pattern = setup(64, 48, 300, dtype=dtype)
    before = weight.clone()
    got = forward_backward(lambda: fused_sparse_linear(x, weight, bias, values, pattern, kernel), x, values)
    expected = merged(weight, bias, values, x, pattern)
    assert got[0].dtype == got[1].dtype == dtype and got[2].dtype == torch.float32
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    # the values' gradient against exact sums: the dense kernel's is the merged layer's, a 16-bit weight gradient
    # (bit for bit); gather and csr sum the 16-bit products in float32
    grad_y = torch.randn(got[0].shape, generator=torch.Generator().manual_seed(7)).to(dtype)
    exact = (grad_y.double().reshape(-1, 64).t() @ x.detach().double().reshape(-1, 48)).view(-1)[pattern.indices]
    if kernel == "dense":
        assert torch.equal(got[2], expected[2])
    else:
        torch.testing.assert_close(got[2].double(), exact, rtol=1e-5, atol=1e-5 * float(exact.abs().max()))
    assert torch.equal(weight, before)


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_float64(kernel):
    weight, bias, values, x, pattern = setup(9, 6, 12, dtype=torch.float64, shape=(4,))
    values = torch.nn.Parameter(values.detach().double())
    assert torch.autograd.gradcheck(lambda x, v: fused_sparse_linear(x, weight, bias, v, pattern, kernel), (x, values))


def test_kernel_choice_follows_the_entry_count():
    def kernel_for(nnz):
        return pick_kernel(SparsePattern.from_flat_indices(torch.arange(nnz), 100, 100))

    gather_limit = int(fused_module.GATHER_ENTRIES_PER_FEATURE * 200)
    dense_limit = int(fused_module.DENSE_FRACTION * 100 * 100)
    assert kernel_for(1) == kernel_for(gather_limit) == "gather"
    assert kernel_for(gather_limit + 1) == kernel_for(dense_limit) == "csr"
    assert kernel_for(dense_limit + 1) == kernel_for(100 * 100) == "dense"
    # 16-bit inputs: lower limits for both (gather and SDDMM work in float32 copies, the bf16 GEMM is cheap)
    half_gather = int(fused_module.GATHER_ENTRIES_PER_FEATURE_16BIT * 200)
    half_dense = int(fused_module.DENSE_FRACTION_16BIT * 100 * 100)
    for dtype in (torch.bfloat16, torch.float16):
        counts = (half_gather, half_gather + 1, half_dense, half_dense + 1)
        kinds = [pick_kernel(SparsePattern.from_flat_indices(torch.arange(n), 100, 100), dtype) for n in counts]
        assert kinds == ["gather", "csr", "csr", "dense"]


# ----------------------------------------------------------------------------------------- what is computed, kept


@pytest.mark.parametrize("kernel", KERNELS)
def test_frozen_input_or_frozen_values_get_only_the_other_gradient(kernel):
    weight, bias, values, x, pattern = setup(20, 16, 30)
    y = fused_sparse_linear(x.detach(), weight, bias, values, pattern, kernel)
    (grad_values,) = torch.autograd.grad(y.sum(), values)
    expected = torch.autograd.grad(merged_linear(x.detach(), weight, bias, [(values, pattern.indices)]).sum(), values)
    torch.testing.assert_close(grad_values, expected[0])
    y = fused_sparse_linear(x, weight, bias, values.detach(), pattern, kernel)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    expected = torch.autograd.grad(merged_linear(x, weight, bias, [(values.detach(), pattern.indices)]).sum(), x)
    assert torch.equal(grad_x, expected[0])
    with torch.no_grad():
        assert fused_sparse_linear(x, weight, bias, values, pattern, kernel).grad_fn is None


@pytest.mark.parametrize("kernel", KERNELS)
def test_no_tokens(kernel):
    weight, bias, values, x, pattern = setup(20, 16, 30, shape=(0,))
    y, grad_x, grad_values = forward_backward(
        lambda: fused_sparse_linear(x, weight, bias, values, pattern, kernel), x, values
    )
    assert y.shape == (0, 20) and grad_x.shape == (0, 16) and torch.equal(grad_values, torch.zeros(30))


def saved_bytes(fn) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while ``fn`` runs."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize(
    "kernel, nnz, dtype, kept_columns",
    [
        ("gather", 10, torch.float32, 10),  # few entries: only the gathered input columns ([tokens, K])
        ("gather", 500, torch.float32, 40),  # many: the input itself, as the reference keeps it
        ("csr", 500, torch.float32, 40),  # the input itself
        ("csr", 500, torch.bfloat16, 40),
        ("dense", 500, torch.float32, 40),
    ],
)
def test_never_keeps_more_than_the_input(kernel, nnz, dtype, kept_columns):
    weight, bias, values, x, pattern = setup(50, 40, nnz, dtype=dtype, shape=(64,), bias=False)
    kept = saved_bytes(lambda: fused_sparse_linear(x, weight, None, values, pattern, kernel))
    assert kept - values.nbytes == kept_columns * 64 * x.element_size()  # the weight is not saved (nor copied)


@pytest.mark.parametrize("kernel, nnz", [("gather", 500), ("csr", 500), ("dense", 500)])
def test_layers_reading_one_input_keep_it_once(kernel, nnz):
    """q/k/v and gate/up read the same hidden states: like the reference path, the layers keep that tensor, not a
    copy each."""
    weight, bias, values, x, pattern = setup(50, 40, nnz, shape=(64,), bias=False)
    other = weight.flip(0).contiguous()

    def two_layers():
        fused_sparse_linear(x, weight, None, values, pattern, kernel)
        fused_sparse_linear(x, other, None, values, pattern, kernel)

    assert saved_bytes(two_layers) - values.nbytes == x.nbytes


def test_bad_calls_are_refused():
    weight, bias, values, x, pattern = setup(20, 16, 30)
    with pytest.raises(GrinError, match="frozen"):
        fused_sparse_linear(x, weight.clone().requires_grad_(), bias, values, pattern)
    with pytest.raises(GrinError, match="kernel"):
        fused_sparse_linear(x, weight, bias, values, pattern, "spmm")
    with pytest.raises(GrinError, match=r"\[out, in\]"):
        transposed = SparsePattern.from_flat_indices(torch.arange(30), 20, 16, transposed=True)
        fused_sparse_linear(x, weight, bias, values, transposed)
    with pytest.raises(GrinError, match="contiguous"):
        fused_sparse_linear(x, weight.t().contiguous().t(), bias, values, pattern)
    with pytest.raises(GrinError, match="values expected"):
        fused_sparse_linear(x, weight, bias, values[:-1], pattern)
