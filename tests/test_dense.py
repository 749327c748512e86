"""`grin_peft.dense`: the dense regime computes what the sparse op computes, with a merge's exact rounding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from grin_peft.dense import merged_linear, merged_weight
from grin_peft.errors import GrinError
from grin_peft.sparse import sparse_delta_linear
from grin_peft.sparse_pattern import SparsePattern


def setup(out_features, in_features, density, transposed=False, dtype=torch.float32, seed=0, tokens=64):
    g = torch.Generator().manual_seed(seed)
    shape = (in_features, out_features) if transposed else (out_features, in_features)
    weight = torch.randn(shape, generator=g).to(dtype)
    bias = torch.randn(out_features, generator=g).to(dtype)
    numel = out_features * in_features
    nnz = round(numel * density)
    indices = torch.randperm(numel, generator=g)[:nnz].sort().values.to(torch.int32)
    values = torch.nn.Parameter(torch.randn(nnz, generator=g) * 0.1)
    x = torch.randn(3, tokens // 3, in_features, generator=g).to(dtype).requires_grad_()
    pattern = SparsePattern.from_flat_indices(indices, out_features, in_features, transposed=transposed)
    return weight, bias, indices, values, x, pattern


def forward_backward(fn, x, values, seed=7):
    y = fn()
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed)).to(y.dtype)
    x.grad = values.grad = None
    y.backward(grad_y)
    return y.detach(), x.grad.clone(), values.grad.clone()


@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("density", [0.01, 0.25, 0.5])
def test_matches_the_sparse_op_in_float32(transposed, density):
    weight, bias, indices, values, x, pattern = setup(48, 80, density, transposed)
    base = weight.t() if transposed else weight

    def sparse():
        return F.linear(x, base, bias) + sparse_delta_linear(x, values, pattern)

    def dense():
        return merged_linear(x, weight, bias, [(values, indices)], transposed=transposed)

    expected, dense_results = forward_backward(sparse, x, values), forward_backward(dense, x, values)
    for got, want in zip(dense_results, expected):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_follows_the_sparse_op_to_its_rounding(dtype):
    weight, bias, indices, values, x, pattern = setup(48, 80, 0.5, dtype=dtype)
    sparse = forward_backward(lambda: F.linear(x, weight, bias) + sparse_delta_linear(x, values, pattern), x, values)
    dense = forward_backward(lambda: merged_linear(x, weight, bias, [(values, indices)]), x, values)
    assert dense[0].dtype == dtype and dense[2].dtype == torch.float32
    for got, want in zip(dense, sparse):
        scale = want.float().abs().max()
        assert (got.float() - want.float()).abs().max() <= 2e-2 * scale


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merged_weight_is_a_merge_bit_for_bit_and_leaves_the_weight_alone(dtype):
    weight, _, indices, values, _, _ = setup(16, 24, 0.3, dtype=dtype)
    before = weight.clone()
    merged = merged_weight(weight, [(values, indices)])
    expected = weight.clone().reshape(-1)
    idx = indices.long()
    expected[idx] = (expected[idx].float() + values.detach()).to(dtype)  # what GrinLayer.merge writes
    assert merged.dtype == dtype and torch.equal(merged.reshape(-1), expected)
    assert torch.equal(weight, before)


def test_several_deltas_add_up_and_each_gets_its_gradient():
    weight, _, indices, values, _, _ = setup(8, 8, 0.5)
    other_idx = torch.tensor([0, 5, 63], dtype=torch.int64)
    other = torch.nn.Parameter(torch.tensor([1.0, 2.0, 3.0]))
    merged = merged_weight(weight, [(values, indices), (other, other_idx)])
    probe = torch.randn(8, 8)
    (merged * probe).sum().backward()
    torch.testing.assert_close(values.grad, probe.reshape(-1)[indices.long()])
    torch.testing.assert_close(other.grad, probe.reshape(-1)[other_idx])
    dense = torch.zeros(64).index_put((indices.long(),), values.detach())
    dense[other_idx] += other.detach()
    torch.testing.assert_close(merged.detach(), weight + dense.view(8, 8))


def test_a_trainable_weight_still_gets_its_gradient():
    weight, bias, indices, values, x, _ = setup(12, 20, 0.5)
    weight.requires_grad_()
    merged_linear(x, weight, bias, [(values, indices)]).sum().backward()
    expected = torch.ones(x.shape[:-1] + (12,)).reshape(-1, 12).t() @ x.detach().reshape(-1, 20)
    torch.testing.assert_close(weight.grad, expected)


def test_mismatched_values_and_indices_are_refused():
    weight, _, indices, values, _, _ = setup(8, 8, 0.5)
    with pytest.raises(GrinError, match="equal length"):
        merged_weight(weight, [(values[:-1], indices)])
