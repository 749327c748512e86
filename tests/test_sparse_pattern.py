"""`SparsePattern`: validated flat positions into a weight, kept as the CSR structures both sparse paths read.

The op that reads it is tested in test_sparse.py, against the dense reference.
"""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from concurrency import run_on_threads
from test_sparse import random_indices

from grin_peft.errors import GrinError
from grin_peft.sparse import sparse_delta_dense, sparse_delta_linear
from grin_peft.sparse_pattern import SparsePattern


@pytest.fixture(autouse=True)
def seeded():
    torch.manual_seed(0)


# ----------------------------------------------------------------------------------------------- the pattern object


def test_pattern_records_its_shape_and_size():
    pattern = SparsePattern.from_flat_indices(random_indices(9, 7, 12), 9, 7, transposed=True)
    assert (pattern.out_features, pattern.in_features, pattern.nnz, pattern.transposed) == (9, 7, 12, True)
    assert "nnz=12" in repr(pattern)


def test_pattern_is_shared_not_copied():
    pattern = SparsePattern.from_flat_indices(random_indices(9, 7, 12), 9, 7)
    assert copy.deepcopy(pattern) is pattern and copy.copy(pattern) is pattern
    assert pattern.to("cpu") is pattern


def test_pattern_ignores_later_edits_to_the_callers_indices():
    indices = torch.tensor([0, 5, 9])
    pattern = SparsePattern.from_flat_indices(indices, 3, 4)
    indices[1] = 6
    assert pattern.indices.tolist() == [0, 5, 9]
    dense = sparse_delta_dense(torch.ones(3), pattern)
    assert dense.reshape(-1).nonzero().flatten().tolist() == [0, 5, 9]


def test_pattern_survives_pickling():
    pattern = SparsePattern.from_flat_indices(random_indices(9, 7, 12), 9, 7, transposed=True)
    clone = pickle.loads(pickle.dumps(pattern))
    x, values = torch.randn(3, 7), torch.randn(12)
    torch.testing.assert_close(sparse_delta_linear(x, values, clone), sparse_delta_linear(x, values, pattern))


def test_one_pattern_serves_concurrent_threads():
    pattern = SparsePattern.from_flat_indices(random_indices(64, 48, 200), 64, 48, transposed=True)
    x, values = torch.randn(20, 48), torch.randn(200)
    expected = sparse_delta_linear(x, values, pattern)
    results, errors = run_on_threads(lambda: [sparse_delta_linear(x, values, pattern) for _ in range(20)], 4)
    assert not errors
    assert len(results) == 80 and all(torch.equal(result, expected) for result in results)


# ----------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "indices, match",
    [
        (torch.tensor([3, 2, 7]), "strictly increasing"),
        (torch.tensor([1, 4, 4]), "strictly increasing"),
        (torch.tensor([-1, 3]), "out of range"),
        (torch.tensor([0, 12]), "out of range"),
        (torch.tensor([[0, 1], [2, 3]]), "1-D"),
        (torch.tensor([0.0, 1.0]), "int32 or int64"),
        (torch.tensor([True, False]), "int32 or int64"),
        ([0, 1, 2], "torch.Tensor"),
    ],
    ids=["unsorted", "duplicate", "negative", "past-the-end", "2-D", "float", "bool", "list"],
)
def test_invalid_indices_are_refused(indices, match):
    with pytest.raises(GrinError, match=match):
        SparsePattern.from_flat_indices(indices, 3, 4)


@pytest.mark.parametrize("out_features, in_features", [(0, 4), (3, -1), (3.0, 4), (True, 4)])
def test_invalid_shape_is_refused(out_features, in_features):
    with pytest.raises(GrinError, match="positive int"):
        SparsePattern.from_flat_indices(torch.tensor([0]), out_features, in_features)


def test_grin_error_is_a_value_error():
    with pytest.raises(ValueError):
        SparsePattern.from_flat_indices(torch.tensor([2, 1]), 3, 4)
