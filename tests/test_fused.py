"""The fused CPU fast path: a frozen linear layer plus its sparse delta in one autograd node.

Its specification is the reference path, ``F.linear(x, W, b) + sparse_delta_linear(x, values, pattern)``: the same
output and the same gradients for x and the values, bit for bit with the CSR kernel, to float rounding with the
gather kernel (it sums the same products in another order), exactly on hand-checkable integer cases.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from peft import get_peft_model
from tiny_models import build, example_input, output

import grin_peft.fused as fused_module
from grin_peft import GrinConfig, GrinError, GrinLayer
from grin_peft.fused import fused_sparse_linear, use_gather
from grin_peft.sparse import SparsePattern, sparse_delta_linear

KERNELS = ["gather", "csr"]


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


# ----------------------------------------------------------------------------------------------- against the reference


@pytest.mark.parametrize(
    "out_features, in_features, nnz", [(7, 5, 3), (64, 48, 20), (64, 48, 300), (40, 150, 900), (300, 200, 600)]
)
def test_csr_kernel_equals_the_reference_bit_for_bit(out_features, in_features, nnz):
    weight, bias, values, x, pattern = setup(out_features, in_features, nnz)
    expected = reference(weight, bias, values, x, pattern)
    got = forward_backward(lambda: fused_sparse_linear(x, weight, bias, values, pattern, "csr"), x, values)
    for a, b in zip(got, expected):
        assert torch.equal(a, b)


@pytest.mark.parametrize(
    "out_features, in_features, nnz", [(7, 5, 3), (64, 48, 20), (64, 48, 300), (40, 150, 900), (300, 200, 600)]
)
def test_gather_kernel_equals_the_reference_to_float_rounding(out_features, in_features, nnz):
    weight, bias, values, x, pattern = setup(out_features, in_features, nnz)
    expected = reference(weight, bias, values, x, pattern)
    got = forward_backward(lambda: fused_sparse_linear(x, weight, bias, values, pattern, "gather"), x, values)
    for a, b in zip(got, expected):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("kernel", KERNELS)
def test_gradcheck_float64(kernel):
    weight, bias, values, x, pattern = setup(9, 6, 12, dtype=torch.float64, shape=(4,))
    values = torch.nn.Parameter(values.detach().double())
    assert torch.autograd.gradcheck(lambda x, v: fused_sparse_linear(x, weight, bias, v, pattern, kernel), (x, values))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_takes_the_csr_kernel_and_equals_the_reference(dtype):
    weight, bias, values, x, pattern = setup(64, 48, 20, dtype=dtype)
    assert not use_gather(pattern, dtype)
    expected = reference(weight, bias, values, x, pattern)
    got = forward_backward(lambda: fused_sparse_linear(x, weight, bias, values, pattern), x, values)
    for a, b in zip(got, expected):
        assert a.dtype == b.dtype and torch.equal(a, b)
    with pytest.raises(GrinError, match="float32/float64"):
        fused_sparse_linear(x, weight, bias, values, pattern, "gather")


def test_kernel_choice_follows_the_entry_count():
    few = SparsePattern.from_flat_indices(torch.arange(10), 100, 100)
    many = SparsePattern.from_flat_indices(torch.arange(1000), 100, 100)
    assert use_gather(few, torch.float32) and not use_gather(many, torch.float32)
    limit = int(fused_module.GATHER_ENTRIES_PER_FEATURE * 200)
    assert use_gather(SparsePattern.from_flat_indices(torch.arange(limit), 100, 100), torch.float32)
    assert not use_gather(SparsePattern.from_flat_indices(torch.arange(limit + 1), 100, 100), torch.float32)


# ----------------------------------------------------------------------------------------- what is computed, kept


@pytest.mark.parametrize("kernel", KERNELS)
def test_frozen_input_or_frozen_values_get_only_the_other_gradient(kernel):
    weight, bias, values, x, pattern = setup(20, 16, 30)
    y = fused_sparse_linear(x.detach(), weight, bias, values, pattern, kernel)
    (grad_values,) = torch.autograd.grad(y.sum(), values)
    expected = torch.autograd.grad(
        (F.linear(x.detach(), weight, bias) + sparse_delta_linear(x.detach(), values, pattern)).sum(), values
    )[0]
    torch.testing.assert_close(grad_values, expected)
    y = fused_sparse_linear(x, weight, bias, values.detach(), pattern, kernel)
    (grad_x,) = torch.autograd.grad(y.sum(), x)
    torch.testing.assert_close(
        grad_x,
        torch.autograd.grad((F.linear(x, weight, bias) + sparse_delta_linear(x, values.detach(), pattern)).sum(), x)[
            0
        ],
    )
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


@pytest.mark.parametrize("nnz", [10, 500])
def test_gather_never_keeps_more_than_the_input(nnz):
    # few entries: only the gathered input columns ([tokens, K]); many: the input itself, as the reference keeps
    weight, bias, values, x, pattern = setup(50, 40, nnz, shape=(64,), bias=False)
    kept = saved_bytes(lambda: fused_sparse_linear(x, weight, None, values, pattern, "gather"))
    parameters = weight.nbytes + values.nbytes
    assert kept - parameters == min(nnz, 40) * 64 * 4


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_csr_keeps_the_transposed_input_only_where_it_costs_no_more_than_the_input(dtype):
    weight, bias, values, x, pattern = setup(30, 40, 400, dtype=dtype, shape=(16,), bias=False)
    kept = saved_bytes(lambda: fused_sparse_linear(x, weight, None, values, pattern, "csr"))
    assert kept - weight.nbytes - values.nbytes == x.nbytes


def test_bad_calls_are_refused():
    weight, bias, values, x, pattern = setup(20, 16, 30)
    with pytest.raises(GrinError, match="frozen"):
        fused_sparse_linear(x, weight.clone().requires_grad_(), bias, values, pattern)
    with pytest.raises(GrinError, match="kernel"):
        fused_sparse_linear(x, weight, bias, values, pattern, "dense")
    with pytest.raises(GrinError, match=r"\[out, in\]"):
        transposed = SparsePattern.from_flat_indices(torch.arange(30), 20, 16, transposed=True)
        fused_sparse_linear(x, weight, bias, values, transposed)
    with pytest.raises(GrinError, match="values expected"):
        fused_sparse_linear(x, weight, bias, values[:-1], pattern)


# ----------------------------------------------------------------------------------------------- in a GRIN model


def grin_llama(density, fused):
    """A tiny Llama with a random GRIN delta kept on the sparse paths (dense_threshold=1)."""
    config = GrinConfig(target_modules="all-linear", density=density, score="random", seed=0, dense_threshold=1.0)
    model = get_peft_model(build("llama"), config)
    for module in model.modules():
        if isinstance(module, GrinLayer):
            module.grin_fused = fused
    return model


@pytest.mark.parametrize("density", [0.01, 0.3], ids=["gather", "csr"])
def test_a_grin_model_trains_the_same_on_the_fast_path(density, monkeypatch):
    calls = []
    monkeypatch.setattr(
        "grin_peft.layer.fused_sparse_linear", lambda *a, **k: calls.append(1) or fused_sparse_linear(*a, **k)
    )
    results = []
    for fused in (False, True):
        model = grin_llama(density, fused)
        out = output(model, example_input("llama"))
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
    assert len(calls) == len(model.base_model.grin_layers())  # every layer, in the fused model only
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


def test_the_reference_path_serves_what_the_fast_path_does_not(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "grin_peft.layer.fused_sparse_linear", lambda *a, **k: calls.append(1) or fused_sparse_linear(*a, **k)
    )
    model = grin_llama(0.05, True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output(model, example_input("llama"))
    assert not calls  # autocast would recast the base matmul: reference path
    layer = next(iter(model.base_model.grin_layers().values()))
    layer.get_base_layer().weight.requires_grad_(True)
    output(model, example_input("llama"))
    assert len(calls) == len(model.base_model.grin_layers()) - 1  # a trainable base weight: reference path
