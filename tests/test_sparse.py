"""The sparse delta op: y = x @ D^T with exact gradients, without ever forming D densely.

Every test compares against the dense reference ``x @ sparse_delta_dense(values, pattern)^T`` (transposed back for
Conv1D-style patterns), which is the definition of what the op computes.
"""

from __future__ import annotations

import pytest
import torch
from torch.profiler import ProfilerActivity, profile

import grin_peft.sparse as sparse_module
from grin_peft.errors import GrinError
from grin_peft.sparse import sparse_delta_dense, sparse_delta_linear
from grin_peft.sparse_pattern import SparsePattern


def random_indices(out_features: int, in_features: int, nnz: int, seed: int = 0) -> torch.Tensor:
    """``nnz`` distinct sorted flat positions, without a randperm over huge weights."""
    g = torch.Generator().manual_seed(seed)
    numel = out_features * in_features
    if numel <= 1 << 20:
        return torch.randperm(numel, generator=g)[:nnz].sort().values
    candidates = torch.unique(torch.randint(numel, (2 * nnz,), generator=g))
    assert candidates.numel() >= nnz
    return candidates[torch.randperm(candidates.numel(), generator=g)[:nnz]].sort().values


def dense_d(values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """D as [out, in] whatever the storage layout."""
    dense = sparse_delta_dense(values, pattern)
    return dense.t() if pattern.transposed else dense


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


def check_against_dense(pattern, x, values, atol=1e-4, rtol=1e-4):
    """Forward, grad wrt x and grad wrt values of the op equal those of the dense reference (float32 rounding)."""
    x = x.detach().requires_grad_()
    values = values.detach().requires_grad_()
    y = sparse_delta_linear(x, values, pattern)
    grad_y = torch.randn_like(y)
    grad_x, grad_values = torch.autograd.grad(y, (x, values), grad_y)

    x_ref = x.detach().double().requires_grad_()
    values_ref = values.detach().double().requires_grad_()
    y_ref = x_ref @ dense_d(values_ref, pattern).t()
    grad_x_ref, grad_values_ref = torch.autograd.grad(y_ref, (x_ref, values_ref), grad_y.double())

    assert y.shape == y_ref.shape and y.dtype == x.dtype
    torch.testing.assert_close(y.double(), y_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_x.double(), grad_x_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(grad_values.double(), grad_values_ref, atol=atol, rtol=rtol)


# ----------------------------------------------------------------------------------------------- correctness


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
@pytest.mark.parametrize(
    "out_features, in_features, density, tokens",
    [(7, 5, 0.3, 4), (64, 48, 0.05, 33), (300, 200, 0.01, 70), (1024, 1024, 1e-3, 600), (40, 1500, 0.02, 9)],
)
def test_matches_dense_reference(out_features, in_features, density, tokens, transposed):
    nnz = max(1, int(out_features * in_features * density))
    pattern = SparsePattern.from_flat_indices(
        random_indices(out_features, in_features, nnz), out_features, in_features, transposed
    )
    check_against_dense(pattern, torch.randn(tokens, in_features), torch.randn(nnz))


@pytest.mark.parametrize("seed", range(12))
def test_matches_dense_reference_on_random_shapes_and_densities(seed):
    g = torch.Generator().manual_seed(seed)
    out_features, in_features, tokens = (int(v) for v in torch.randint(1, 80, (3,), generator=g))
    nnz = int(torch.randint(0, out_features * in_features + 1, (1,), generator=g))
    transposed = bool(seed % 2)
    pattern = SparsePattern.from_flat_indices(
        random_indices(out_features, in_features, nnz, seed), out_features, in_features, transposed
    )
    check_against_dense(pattern, torch.randn(tokens, in_features, generator=g), torch.randn(nnz, generator=g))


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_gradcheck_float64(transposed):
    pattern = SparsePattern.from_flat_indices(random_indices(6, 5, 9), 6, 5, transposed)
    x = torch.randn(2, 3, 5, dtype=torch.float64, requires_grad=True)
    values = torch.randn(9, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, v: sparse_delta_linear(x, v, pattern), (x, values))


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_several_token_blocks_with_a_tail(monkeypatch, transposed):
    # shrink the CPU token block to 16 tokens for an 8-wide layer: 40 tokens give two full blocks and a tail
    monkeypatch.setattr(sparse_module, "_CPU_BLOCK_ELEMENTS", 16 * 8)
    pattern = SparsePattern.from_flat_indices(random_indices(8, 6, 11), 8, 6, transposed)
    x = torch.randn(40, 6, dtype=torch.float64, requires_grad=True)
    values = torch.randn(11, dtype=torch.float64, requires_grad=True)
    check_against_dense(pattern, x, values)
    assert torch.autograd.gradcheck(lambda x, v: sparse_delta_linear(x, v, pattern), (x, values), fast_mode=True)


def test_single_entry():
    pattern = SparsePattern.from_flat_indices(torch.tensor([2 * 9 + 4]), 6, 9)  # D[2, 4]
    x = torch.randn(5, 9)
    y = sparse_delta_linear(x, torch.tensor([3.0]), pattern)
    expected = torch.zeros(5, 6)
    expected[:, 2] = 3.0 * x[:, 4]
    torch.testing.assert_close(y, expected)
    check_against_dense(pattern, x, torch.tensor([3.0]))


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_all_entries_density_one(transposed):
    pattern = SparsePattern.from_flat_indices(torch.arange(12 * 10), 12, 10, transposed)
    check_against_dense(pattern, torch.randn(8, 10), torch.randn(120))


def test_empty_rows_and_columns():
    # entries only in rows {0, 5} and columns {1, 2}: every other row of D and of D^T is empty
    out_features, in_features = 8, 6
    flat = torch.tensor([0 * 6 + 1, 0 * 6 + 2, 5 * 6 + 2])
    pattern = SparsePattern.from_flat_indices(flat, out_features, in_features)
    check_against_dense(pattern, torch.randn(4, in_features), torch.randn(3))


@pytest.mark.parametrize("transposed", [False, True], ids=["linear", "conv1d"])
def test_no_entries_gives_zero_output_and_zero_gradients(transposed):
    pattern = SparsePattern.from_flat_indices(torch.empty(0, dtype=torch.int64), 4, 3, transposed)
    x = torch.randn(2, 3, requires_grad=True)
    values = torch.empty(0, requires_grad=True)
    y = sparse_delta_linear(x, values, pattern)
    assert torch.equal(y, torch.zeros(2, 4))
    y.sum().backward()
    assert torch.equal(x.grad, torch.zeros(2, 3))
    assert values.grad.shape == (0,)


def test_no_tokens():
    pattern = SparsePattern.from_flat_indices(random_indices(4, 3, 5), 4, 3)
    x = torch.randn(0, 3, requires_grad=True)
    values = torch.randn(5, requires_grad=True)
    y = sparse_delta_linear(x, values, pattern)
    assert y.shape == (0, 4)
    y.sum().backward()
    assert torch.equal(values.grad, torch.zeros(5))


def test_leading_batch_dims_keep_their_shape():
    pattern = SparsePattern.from_flat_indices(random_indices(7, 5, 10), 7, 5)
    x = torch.randn(2, 3, 4, 5)
    assert sparse_delta_linear(x, torch.randn(10), pattern).shape == (2, 3, 4, 7)
    check_against_dense(pattern, x, torch.randn(10))


def test_non_contiguous_input():
    pattern = SparsePattern.from_flat_indices(random_indices(7, 5, 10), 7, 5, transposed=True)
    x = torch.randn(5, 6, 3).permute(2, 1, 0)  # [3, 6, 5], last dim strided
    assert not x.is_contiguous()
    check_against_dense(pattern, x, torch.randn(10))


def test_values_in_storage_order_for_both_layouts():
    # the same D stored [out, in] and [in, out]: values follow each layout's flat order, outputs agree
    out_features, in_features = 6, 4
    rows, cols = torch.tensor([0, 1, 3, 5, 5]), torch.tensor([3, 0, 2, 1, 3])
    entry_values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    order_linear = torch.argsort(rows * in_features + cols)
    order_conv1d = torch.argsort(cols * out_features + rows)
    linear = SparsePattern.from_flat_indices((rows * in_features + cols)[order_linear], out_features, in_features)
    conv1d = SparsePattern.from_flat_indices(
        (cols * out_features + rows)[order_conv1d], out_features, in_features, transposed=True
    )
    x = torch.randn(3, in_features)
    values_linear = entry_values[order_linear].requires_grad_()
    values_conv1d = entry_values[order_conv1d].requires_grad_()
    y_linear = sparse_delta_linear(x, values_linear, linear)
    y_conv1d = sparse_delta_linear(x, values_conv1d, conv1d)
    torch.testing.assert_close(y_linear, y_conv1d)
    (y_linear.sum() + y_conv1d.sum()).backward()
    # each entry's gradient lands at that entry's storage position
    torch.testing.assert_close(
        values_linear.grad[torch.argsort(order_linear)], values_conv1d.grad[torch.argsort(order_conv1d)]
    )


def test_int32_indices_are_accepted():
    indices = random_indices(9, 7, 12).to(torch.int32)
    check_against_dense(SparsePattern.from_flat_indices(indices, 9, 7), torch.randn(5, 7), torch.randn(12))


def test_index_fallback_matches_csr_kernels(monkeypatch):
    # backends without CSR kernels (e.g. MPS) take the gather/index_add path: same numbers
    pattern = SparsePattern.from_flat_indices(random_indices(30, 20, 50), 30, 20, transposed=True)
    monkeypatch.setattr(sparse_module, "_use_csr_kernels", lambda device: False)
    check_against_dense(pattern, torch.randn(3, 11, 20), torch.randn(50))


# ----------------------------------------------------------------------------------------------- gradients needed


def test_frozen_input_gets_no_gradient_and_values_still_train():
    pattern = SparsePattern.from_flat_indices(random_indices(8, 6, 10), 8, 6)
    x = torch.randn(4, 6)
    values = torch.randn(10, requires_grad=True)
    sparse_delta_linear(x, values, pattern).sum().backward()
    expected = torch.autograd.grad((x @ dense_d(values, pattern).t()).sum(), values)[0]
    torch.testing.assert_close(values.grad, expected)


def test_backward_keeps_only_what_the_needed_gradients_use():
    pattern = SparsePattern.from_flat_indices(random_indices(8, 6, 10), 8, 6)
    x = torch.randn(4, 6, requires_grad=True)
    y = sparse_delta_linear(x, torch.randn(10), pattern)  # frozen values: x is not needed for backward
    saved_x, saved_values = y.grad_fn.saved_tensors
    assert saved_x is None and saved_values is not None
    y = sparse_delta_linear(torch.randn(4, 6), torch.randn(10, requires_grad=True), pattern)
    saved_x, saved_values = y.grad_fn.saved_tensors
    assert saved_x is not None and saved_values is None


def test_no_graph_when_nothing_requires_grad():
    pattern = SparsePattern.from_flat_indices(random_indices(8, 6, 10), 8, 6)
    assert sparse_delta_linear(torch.randn(4, 6), torch.randn(10), pattern).grad_fn is None


# ----------------------------------------------------------------------------------------------- dtypes


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_match_reference_and_keep_their_dtype(dtype):
    pattern = SparsePattern.from_flat_indices(random_indices(96, 80, 300), 96, 80, transposed=True)
    x = torch.randn(3, 17, 80, dtype=dtype, requires_grad=True)
    values = torch.randn(300, requires_grad=True)  # float32 master values, as GRIN layers keep them
    y = sparse_delta_linear(x, values, pattern)
    assert y.dtype == dtype
    reference = x.detach().double() @ dense_d(values.detach().double(), pattern).t()
    torch.testing.assert_close(y.double(), reference, atol=2e-2, rtol=2e-2)
    y.float().square().sum().backward()
    assert x.grad.dtype == dtype and values.grad.dtype == torch.float32
    assert torch.isfinite(values.grad).all()


def test_values_dtype_may_differ_from_input_dtype():
    pattern = SparsePattern.from_flat_indices(random_indices(9, 7, 12), 9, 7)
    x = torch.randn(5, 7, requires_grad=True)
    values = torch.randn(12, dtype=torch.float64, requires_grad=True)
    y = sparse_delta_linear(x, values, pattern)
    assert y.dtype == torch.float32
    y.sum().backward()
    assert values.grad.dtype == torch.float64 and x.grad.dtype == torch.float32
    torch.testing.assert_close(y.double(), x.detach().double() @ dense_d(values.detach(), pattern).t())


def test_cpu_autocast_bfloat16_behaves_like_a_linear_layer():
    pattern = SparsePattern.from_flat_indices(random_indices(32, 24, 40), 32, 24)
    x = torch.randn(6, 24, requires_grad=True)
    values = torch.randn(40, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = sparse_delta_linear(x, values, pattern)
        assert y.dtype == torch.nn.functional.linear(x, torch.randn(32, 24)).dtype == torch.bfloat16
        loss = y.float().square().sum()
    loss.backward()
    assert x.grad.dtype == torch.float32 and values.grad.dtype == torch.float32
    reference = x.detach() @ dense_d(values.detach(), pattern).t()
    torch.testing.assert_close(y.float(), reference, atol=5e-2, rtol=2e-2)


# ----------------------------------------------------------------------------------------------- memory


def largest_allocation_bytes(step) -> int:
    """Largest memory any op (with its children) allocated during ``step``, from torch's own allocator records.

    tracemalloc does not see torch's allocations; the profiler attributes each CPU allocation to the op that made it.
    """
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    return max((event.cpu_memory_usage for event in prof.events()), default=0)


def test_memory_probe_catches_a_dense_delta():
    # guards the next test: the probe must see an out x in allocation when one happens
    out_features = in_features = 2048
    pattern = SparsePattern.from_flat_indices(
        random_indices(out_features, in_features, 400), out_features, in_features
    )
    x = torch.randn(8, in_features, requires_grad=True)
    values = torch.randn(pattern.nnz, requires_grad=True)

    def dense_step():
        (x @ sparse_delta_dense(values, pattern).t()).square().sum().backward()

    assert largest_allocation_bytes(dense_step) >= out_features * in_features * 4


def test_training_step_never_allocates_anything_near_out_by_in():
    out_features = in_features = 8192
    nnz = int(out_features * in_features * 1e-4)
    pattern = SparsePattern.from_flat_indices(
        random_indices(out_features, in_features, nnz), out_features, in_features
    )
    x = torch.randn(2, 16, in_features, requires_grad=True)
    values = torch.randn(nnz, requires_grad=True)

    def sparse_step():
        sparse_delta_linear(x, values, pattern).square().sum().backward()

    dense_bytes = out_features * in_features * 4
    assert largest_allocation_bytes(sparse_step) < dense_bytes / 64
    assert values.grad is not None and x.grad is not None


# ----------------------------------------------------------------------------------------------- the dense delta


def test_dense_delta_uses_the_weight_storage_layout():
    flat = torch.tensor([1, 5, 11])
    values = torch.tensor([1.0, 2.0, 3.0])
    linear = sparse_delta_dense(values, SparsePattern.from_flat_indices(flat, 3, 4), dtype=torch.float64)
    conv1d = sparse_delta_dense(values, SparsePattern.from_flat_indices(flat, 3, 4, transposed=True))
    assert linear.shape == (3, 4) and linear.dtype == torch.float64
    assert conv1d.shape == (4, 3)
    for dense in (linear, conv1d):
        assert torch.equal(dense.reshape(-1)[flat].float(), values)
        assert int(torch.count_nonzero(dense)) == 3


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "x, values, match",
    [
        (torch.randn(2, 5), torch.randn(3), r"\[\.\.\., 4\]"),
        (torch.randn(2, 4), torch.randn(4), "3 entries"),
        (torch.randn(2, 4), torch.randn(3, 1), "3 entries"),
        (torch.ones(2, 4, dtype=torch.int64), torch.randn(3), "floating point"),
    ],
    ids=["wrong-in-features", "wrong-nnz", "2-D-values", "integer-input"],
)
def test_mismatched_operands_are_refused(x, values, match):
    pattern = SparsePattern.from_flat_indices(torch.tensor([0, 5, 9]), 3, 4)
    with pytest.raises(GrinError, match=match):
        sparse_delta_linear(x, values, pattern)
