"""The dense regime of a GRIN delta: one matmul with the delta written into a copy of the weight.

The sparse op (:mod:`grin_peft.sparse`) costs work in proportion to tokens x K plus copies of the activations, so it
wins at low density and loses at high density to plain dense BLAS: above a crossover density a layer is faster
computing ``x @ (W + D)^T`` with ``W + D`` formed densely (one out x in copy per step). Adding a separate
``x @ D^T`` to the frozen layer's output instead takes two more matmuls and was slower at every density measured
(``benchmarks/bench_sparse_op.py``, ``benchmarks/results/density_regime.md``).

The merged weight is built exactly as a merge writes it, ``(w.float() + value)`` rounded once to the weight's dtype,
so in the dense regime the adapter's output is the merged model's output. The values' gradient is the dense weight
gradient gathered at the delta's entries. The merged copy stays alive until backward (the linear layer saves it),
which is the memory the sparse op exists to avoid at low density.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .errors import GrinError

__all__ = ["merged_weight", "merged_linear"]


def merged_weight(weight: torch.Tensor, deltas: list[tuple[torch.Tensor, torch.Tensor]]) -> torch.Tensor:
    """A fresh copy of ``weight`` with each (values, flat indices) delta added at its entries, in the weight's dtype.

    Entries are added in at least float32 and rounded once to the weight's dtype, like ``GrinLayer.merge``, so the
    result equals the merged weight bit for bit. Differentiable with respect to the values (and to ``weight`` should
    it require grad). Indices must be unique within each delta (they are: GRIN validates them strictly increasing).
    """
    compute = torch.promote_types(weight.dtype, torch.float32)
    flat = weight.reshape(-1).to(compute, copy=True)
    for values, indices in deltas:
        if values.dim() != 1 or indices.dim() != 1 or values.numel() != indices.numel():
            raise GrinError(
                f"merged_weight: values and indices must be 1-D of equal length, got {tuple(values.shape)} and "
                f"{tuple(indices.shape)}."
            )
        flat.index_add_(0, indices, values.to(compute))  # one add per entry: old + value, as merge computes
    return flat.to(weight.dtype).view(weight.shape)


def merged_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    deltas: list[tuple[torch.Tensor, torch.Tensor]],
    transposed: bool = False,
) -> torch.Tensor:
    """``x @ (W + D)^T + bias``: the frozen linear layer with its deltas merged for this call only.

    ``weight`` is stored [out, in] (nn.Linear) or, with ``transposed``, [in, out] (transformers' Conv1D); the flat
    indices address it as stored. Same dtype rules as the frozen layer's own forward (and autocast applies alike).
    """
    merged = merged_weight(weight, deltas)
    return F.linear(x, merged.t() if transposed else merged, bias)
