"""A frozen linear layer and its sparse GRIN delta in one autograd node: ``y = x (W + D)^T + b`` on the CPU.

The reference path (:func:`grin_peft.sparse.sparse_delta_linear` next to the base layer) pays three sparse passes
over the activations per layer and step (``x D^T`` forward, ``grad_y D`` backward, the SDDMM for the values'
gradient) plus a separate ``result + delta`` pass and transposed copies of the activations. Here the delta is
**written into the frozen weight for the duration of each matmul**: the K entries the delta touches are saved,
overwritten with exactly what :meth:`GrinLayer.merge` writes (``(w + value)`` in at least float32, rounded once to
the weight's dtype), the frozen layer's own GEMM runs (``F.linear`` forward, ``grad_y @ W`` backward), and the saved
entries are copied back, bit for bit, in a ``finally``. Forward and ``grad_x`` then cost the frozen layer's GEMMs
plus a read and two writes of K scattered weight entries; only the values' gradient needs sparse work,
``grad_D[r, c] = sum_n grad_y[n, r] x[n, c]`` at the K entries, with a kernel picked by entry count (measured,
``benchmarks/bench_sparse_op.py``, BENCHMARKS.md §3):

* ``gather`` (K <= ``GATHER_ENTRIES_PER_FEATURE`` x (in + out), a lower limit for 16-bit inputs): backward gathers
  the K columns of ``grad_y`` and of x and takes one dot product per entry;
* ``csr`` (up to ``DENSE_FRACTION`` of the weight, less for 16-bit inputs): backward transposes x and ``grad_y`` and
  runs MKL's SDDMM (``sampled_addmm``) on the delta's CSR pattern;
* ``dense`` (above): the dense weight gradient ``grad_y^T x`` (one GEMM), gathered at the entries. At those
  densities the dense regime's merged copy of the weight (:mod:`grin_peft.dense`) was 4-11% faster per layer
  (writing 25-50% of the entries in and out twice per step costs more than one sequential copy), but it keeps a
  copy of every layer's weight until backward; this path keeps none.

For the values' gradient forward keeps x itself (layers that read one input share it, as on the reference path), or,
for a few entries on a wide input, only their K input columns; never a copy of the weight.

Numerics: the output and ``grad_x`` are the merged model's, bit for bit (the same as
:func:`grin_peft.dense.merged_linear`); the ``dense`` kernel's values gradient is ``merged_linear``'s too, ``gather``
and ``csr`` sum the same products in other orders (float rounding). Against the reference path (base output plus a
separately computed delta) the output differs by rounding: in float32 a few ulps, in 16-bit weights by the merge's
rounding of ``w + value`` to the weight's dtype, which is what a merged, deployed model computes.

The weight is written through ``weight.data`` (outside autograd's version counting; the restore is exact), one
layer at a time under a process-wide lock, so two threads running the same model cannot save each other's written
entries as the originals. Anything else that reads the weight *during* that window sees the delta in it: another
process sharing the weight's memory (:class:`grin_peft.layer.GrinLayer` keeps shared-memory weights on the
reference path) or a thread reading it outside a GRIN layer. Tied and shared weights, gradient checkpointing
(forward recomputed in backward) and exceptions inside the matmul all leave the weight as it was
(``tests/test_fused_weight.py``). Used by :class:`grin_peft.layer.GrinLayer` for a plain ``nn.Linear`` with frozen
weight and bias, one active adapter, no autocast, on the CPU, at every density; everything else (CUDA, Conv1D,
quantized or hooked bases, several adapters) keeps the reference path.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import GrinError
from .sparse import _compute_dtype, _csr
from .sparse_pattern import SparsePattern, _rows_cols

__all__ = [
    "DENSE_FRACTION",
    "DENSE_FRACTION_16BIT",
    "GATHER_ENTRIES_PER_FEATURE",
    "GATHER_ENTRIES_PER_FEATURE_16BIT",
    "KERNELS",
    "fused_sparse_linear",
    "pick_kernel",
]

KERNELS = ("gather", "csr", "dense")
# gather up to K = (in + out) * this, SDDMM above: whole layer forward+backward, 512 tokens, six 768-2816 wide shapes
# (benchmarks/results/fused_threshold.md): gather 0-7% faster up to 0.56, a tie (0.96-1.01) at 0.75-0.77, csr 1-10%
# faster from 1.0 up
GATHER_ENTRIES_PER_FEATURE = 0.75
# 16-bit inputs: the gathered columns are converted to float32 for the dot products; bf16 crossover at ~0.2 on three
# 768/2112-wide shapes (gather 0.83-0.93x csr up to 0.11, 0.97-1.04x at 0.15-0.23, 1.10-1.20x from 0.38; BENCHMARKS §3)
GATHER_ENTRIES_PER_FEATURE_16BIT = 0.2
# the gather kernel keeps its K input columns instead of x only when they are at most 1/TAKEN_SHARE of it: up to
# this many layers read one input (q/k/v and more), and they share x
TAKEN_SHARE = 4
# the dense weight gradient (one GEMM, independent of K) beats the SDDMM from ~25% of the entries (paired 0.97 and
# 1.06 at 25%, 0.83 and 0.84 at 50% on 768x2112 and 2816x1024; BENCHMARKS §3)
DENSE_FRACTION = 0.25
# 16-bit inputs: the bf16 GEMM is cheap and the SDDMM runs on float32 copies; crossover at ~4% (paired 1.09-1.12 at 2%,
# 0.95-0.99 at 5%, 0.79-0.80 at 10% on 768x2112 and 2112x768; BENCHMARKS §3)
DENSE_FRACTION_16BIT = 0.04

# one written-in window at a time in the process: two threads writing into one weight would each save the other's
# delta as the original
_WRITE_LOCK = threading.Lock()


def pick_kernel(pattern: SparsePattern, dtype: torch.dtype = torch.float32) -> str:
    """The values-gradient kernel for a delta of this many entries on this layer, for inputs of ``dtype`` (see the
    module docstring)."""
    wide = dtype in (torch.float32, torch.float64)
    per_feature = GATHER_ENTRIES_PER_FEATURE if wide else GATHER_ENTRIES_PER_FEATURE_16BIT
    if pattern.nnz <= per_feature * (pattern.in_features + pattern.out_features):
        return "gather"
    if pattern.nnz > (DENSE_FRACTION if wide else DENSE_FRACTION_16BIT) * pattern.in_features * pattern.out_features:
        return "dense"
    return "csr"


@contextlib.contextmanager
def _written_in(weight: torch.Tensor, indices: torch.Tensor, values: torch.Tensor) -> Iterator[torch.Tensor]:
    """The frozen weight with the delta merged in, for the duration of the block; restored bit for bit after it,
    also when the block raises."""
    flat = weight.data.view(-1)
    compute = torch.promote_types(flat.dtype, torch.float32)
    with _WRITE_LOCK:
        original = flat.index_select(0, indices)
        try:
            flat.index_copy_(0, indices, (original.to(compute) + values.to(compute)).to(flat.dtype))
            yield weight.data
        finally:
            flat.index_copy_(0, indices, original)


def _transposed(x2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, features] -> contiguous [features, tokens] in ``dtype`` (converted first: torch's fast blocked kernel
    only covers same-dtype transposing copies)."""
    if x2d.dtype != dtype:
        x2d = x2d.to(dtype)
    out = torch.empty((x2d.shape[1], x2d.shape[0]), dtype=dtype, device=x2d.device)
    out.copy_(x2d.t())
    return out


class _FusedSparseLinear(torch.autograd.Function):
    """x [..., in] -> F.linear(x, W + D, bias); gradients for x and values (weight and bias frozen)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, pattern: SparsePattern, kernel: str):
        need_values_grad = ctx.needs_input_grad[1]
        with _written_in(weight, pattern.indices, values) as merged:
            y = F.linear(x, merged, bias)
        # the weight itself, not a saved tensor: saved-tensor hooks (offloading, checkpointing) must not copy it
        ctx.weight, ctx.pattern, ctx.kernel = weight, pattern, kernel
        ctx.x_shape, ctx.values_dtype = x.shape, values.dtype
        saved = None
        if need_values_grad:
            x2d = x.reshape(-1, pattern.in_features)
            # keep x itself: layers that read one input (q/k/v, gate/up) then share one tensor, as on the reference
            # path; a private copy per layer (the transposed input) held more in whole models (BENCHMARKS.md §2.1).
            # The gather kernel keeps its K input columns instead only when they are a small part of x
            if kernel == "gather":
                ctx.rows, ctx.cols = _rows_cols(pattern)
                ctx.kept_taken = pattern.nnz * TAKEN_SHARE <= pattern.in_features
            saved = x2d.index_select(1, ctx.cols) if kernel == "gather" and ctx.kept_taken else x2d
        ctx.save_for_backward(saved, values)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        saved, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need_x_grad, need_values_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy = grad_y.reshape(-1, pattern.out_features)
        grad_x = grad_values = None
        if need_x_grad:
            with _written_in(ctx.weight, pattern.indices, values) as merged:
                grad_x = torch.mm(gy, merged).view(ctx.x_shape)
        if need_values_grad:
            grad_values = _values_grad(ctx, gy, saved, pattern).to(ctx.values_dtype)
        return grad_x, grad_values, None, None, None, None


def _values_grad(ctx, gy: torch.Tensor, saved: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """grad_D at the K entries, ``sum_n grad_y[n, r] x[n, c]``, by the kernel forward picked."""
    if gy.shape[0] == 0:
        return torch.zeros(pattern.nnz, dtype=torch.float32, device=gy.device)
    if ctx.kernel == "gather":
        picked = gy.index_select(1, ctx.rows)  # [tokens, K]
        taken = saved if ctx.kept_taken else saved.index_select(1, ctx.cols)
        cdt = _compute_dtype(gy.dtype)
        return torch.linalg.vecdot(picked.to(cdt), taken.to(cdt), dim=0)
    if ctx.kernel == "csr":
        cdt = _compute_dtype(gy.dtype)
        gy_t = _transposed(gy, cdt)
        x_t = _transposed(saved, cdt)
        acc = torch.zeros(pattern.nnz, dtype=cdt, device=gy.device)
        sampled = _csr(pattern.d_crow, pattern.d_col, acc, (pattern.out_features, pattern.in_features))
        torch.sparse.sampled_addmm(sampled, gy_t, x_t.t(), beta=0, out=sampled)
        return sampled.values()
    # dense: the weight gradient as the merged layer's own backward forms it, gathered at the entries
    return torch.mm(gy.t(), saved).view(-1).index_select(0, pattern.indices)


def fused_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    pattern: SparsePattern,
    kernel: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, W + D, bias)`` with D the sparse delta, for a frozen ``weight`` stored [out, in] (and frozen
    ``bias``) on the CPU: the merged layer's output without a copy of the weight. ``kernel``: 'gather', 'csr',
    'dense', or None to choose by :func:`pick_kernel` (benchmarks and tests force one)."""
    if kernel not in (None, *KERNELS):
        raise GrinError(f"fused_sparse_linear: kernel must be one of {', '.join(KERNELS)} or None, got {kernel!r}.")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise GrinError("fused_sparse_linear: the base weight and bias must be frozen (they get no gradient here).")
    if pattern.transposed or x.device.type != "cpu" or weight.device.type != "cpu":
        raise GrinError("fused_sparse_linear: only [out, in] weights on the CPU (others take the reference path).")
    if tuple(weight.shape) != (pattern.out_features, pattern.in_features) or not weight.is_contiguous():
        raise GrinError(
            f"fused_sparse_linear: a contiguous [{pattern.out_features}, {pattern.in_features}] weight expected, got "
            f"{tuple(weight.shape)}."
        )
    if x.shape[-1] != pattern.in_features or values.numel() != pattern.nnz or values.dim() != 1:
        raise GrinError(
            f"fused_sparse_linear: x [..., {pattern.in_features}] and {pattern.nnz} values expected, got "
            f"{tuple(x.shape)} and {tuple(values.shape)}."
        )
    return _FusedSparseLinear.apply(x, values, weight, bias, pattern, kernel or pick_kernel(pattern, x.dtype))
