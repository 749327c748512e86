"""A frozen linear layer and its sparse GRIN delta in one autograd node: ``y = x W^T + b + x D^T`` on the CPU.

The reference path (:func:`grin_peft.sparse.sparse_delta_linear` next to the base layer) is exact but pays fixed
costs that dwarf the sparse work at low density: a separate ``result + delta`` pass, a second ``grad_x`` that autograd
then adds to the base layer's, and transposed copies of the activations in forward *and* again in backward. With a
frozen base weight one custom function can do the whole layer:

* the base part is the frozen layer's own work, unchanged (``F.linear`` forward, ``grad_y @ W`` backward; no weight
  gradient, and ``x`` itself is not kept);
* the delta is added in place into the base output in forward and into ``grad_x`` in backward;
* the kernel is picked by entry count. Few entries (``gather``): ``index_select`` / ``index_add_`` on the token-major
  activations, ~tokens x K work and no transposes; forward keeps only the K gathered input columns. More entries
  (``csr``): MKL's CSR kernels on token-contiguous operands, as in :mod:`grin_peft.sparse`, but the transposed input
  made in forward is kept for the backward's SDDMM instead of being made again (float32/float64 inputs, where it
  costs the memory the reference spends on keeping x).

Numerics: the ``csr`` kernel adds exactly what the reference adds (the same kernels, and a + b = b + a), so it agrees
with the reference bit for bit; ``gather`` sums the same products in another order (float rounding only). Used by
:class:`grin_peft.layer.GrinLayer` for a plain ``nn.Linear`` with frozen weight and bias, one active sparse adapter,
no autocast, on the CPU; everything else (CUDA, Conv1D, quantized or hooked bases, several adapters) keeps the
reference path.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable

from .errors import GrinError
from .sparse import SparsePattern, _compute_dtype, _csr, _rows_cols

__all__ = ["GATHER_ENTRIES_PER_FEATURE", "KERNELS", "fused_sparse_linear", "use_gather"]

# gather up to K = (in + out) * this: below, its tokens x K gathers cost less than the ~4 transposed token-major
# passes the CSR kernels need. Set from single-layer trials on 768/2112-wide layers, 512 tokens; in whole steps
# (BENCHMARKS.md §2.1) 0.1% density on 1024-wide layers (K = 0.51 x (in + out)) was no faster than the reference
# path, so it may be high for wider layers
GATHER_ENTRIES_PER_FEATURE = 0.75


def use_gather(pattern: SparsePattern, dtype: torch.dtype) -> bool:
    """Whether the gather kernel serves this delta: few entries, and an input dtype it can add in directly."""
    small = pattern.nnz <= GATHER_ENTRIES_PER_FEATURE * (pattern.in_features + pattern.out_features)
    return small and dtype in (torch.float32, torch.float64)


def _transposed(x2d: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """[tokens, features] -> contiguous [features, tokens] in ``dtype`` (converted first: torch's fast blocked kernel
    only covers same-dtype transposing copies)."""
    if x2d.dtype != dtype:
        x2d = x2d.to(dtype)
    out = torch.empty((x2d.shape[1], x2d.shape[0]), dtype=dtype, device=x2d.device)
    out.copy_(x2d.t())
    return out


def _add_transposed(dst: torch.Tensor, src_t: torch.Tensor) -> None:
    """dst [tokens, features] += src_t^T, rounded to dst's dtype first (as the reference's separate delta is).

    A same-dtype transposing copy has torch's fast blocked kernel; adding a transposed view directly does not.
    """
    staged = torch.empty(dst.shape, dtype=dst.dtype, device=dst.device)
    if src_t.dtype != dst.dtype:
        src_t = src_t.to(dst.dtype)
    staged.copy_(src_t.t())
    dst.add_(staged)


class _FusedSparseLinear(torch.autograd.Function):
    """x [..., in] -> F.linear(x, weight, bias) + x @ D^T; gradients for x and values (weight and bias frozen)."""

    @staticmethod
    def forward(ctx, x, values, weight, bias, pattern: SparsePattern, gather: bool):
        need_x_grad, need_values_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.pattern, ctx.gather, ctx.x_dtype, ctx.values_dtype = pattern, gather, x.dtype, values.dtype
        y = F.linear(x, weight, bias)
        y2d, x2d = y.view(-1, pattern.out_features), x.reshape(-1, pattern.in_features)
        saved = None
        if gather:
            ctx.rows, ctx.cols = _rows_cols(pattern)
        if x2d.shape[0] > 0:
            if gather:
                taken = x2d.index_select(1, ctx.cols)  # [tokens, K], storage order
                y2d.index_add_(1, ctx.rows, taken * values.to(x.dtype))
                # keep whichever is smaller: never more activation memory than the reference path (which keeps x)
                ctx.kept_taken = pattern.nnz <= pattern.in_features
                saved = taken if ctx.kept_taken else x2d
            else:
                cdt = _compute_dtype(x.dtype)
                d_values = values.to(cdt)
                if pattern.d_perm is not None:
                    d_values = d_values[pattern.d_perm]
                d = _csr(pattern.d_crow, pattern.d_col, d_values, (pattern.out_features, pattern.in_features))
                x_t = _transposed(x2d, cdt)
                _add_transposed(y2d, torch.mm(d, x_t))
                # the transposed input serves the backward's SDDMM when it costs no more memory than x (float32/64)
                ctx.kept_transposed = x.dtype == cdt
                saved = x_t if ctx.kept_transposed else x2d
        ctx.save_for_backward(
            saved if need_values_grad else None, values if need_x_grad else None, weight if need_x_grad else None
        )
        ctx.x_shape = x.shape
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, grad_y):
        saved, values, weight = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need_x_grad, need_values_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        gy = grad_y.reshape(-1, pattern.out_features)
        grad_x = grad_values = None
        if need_x_grad:
            grad_x = torch.mm(gy, weight)
        n_tokens = gy.shape[0]
        if ctx.gather:
            if n_tokens == 0:
                grad_values = torch.zeros(pattern.nnz, dtype=ctx.values_dtype, device=gy.device)
            else:
                picked = gy.index_select(1, ctx.rows)  # [tokens, K]
                if need_x_grad:
                    grad_x.index_add_(1, ctx.cols, picked * values.to(gy.dtype))
                if need_values_grad:
                    taken = saved if ctx.kept_taken else saved.index_select(1, ctx.cols)
                    grad_values = (picked * taken).sum(0)
        else:
            cdt = _compute_dtype(gy.dtype)
            if n_tokens == 0:
                grad_values = torch.zeros(pattern.nnz, dtype=cdt, device=gy.device)
            else:
                gy_t = _transposed(gy, cdt)
                if need_x_grad:
                    t_values = values.to(cdt)
                    if pattern.t_perm is not None:
                        t_values = t_values[pattern.t_perm]
                    d_t = _csr(pattern.t_crow, pattern.t_col, t_values, (pattern.in_features, pattern.out_features))
                    _add_transposed(grad_x, torch.mm(d_t, gy_t))
                if need_values_grad:
                    acc = torch.zeros(pattern.nnz, dtype=cdt, device=gy.device)
                    sampled = _csr(pattern.d_crow, pattern.d_col, acc, (pattern.out_features, pattern.in_features))
                    x_t = saved if ctx.kept_transposed else _transposed(saved, cdt)
                    torch.sparse.sampled_addmm(sampled, gy_t, x_t.t(), beta=0, out=sampled)
                    grad_values = sampled.values()
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)
        if grad_values is not None:
            grad_values = grad_values.to(ctx.values_dtype)
        return grad_x, grad_values, None, None, None, None


KERNELS = ("gather", "csr")


def fused_sparse_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    values: torch.Tensor,
    pattern: SparsePattern,
    kernel: str | None = None,
) -> torch.Tensor:
    """``F.linear(x, weight, bias) + sparse_delta_linear(x, values, pattern)`` as one op, for a frozen ``weight``
    stored [out, in] (and frozen ``bias``) on the CPU. ``kernel``: 'gather', 'csr', or None to choose by
    :func:`use_gather` (benchmarks and tests force one)."""
    if kernel not in (None, *KERNELS):
        raise GrinError(f"fused_sparse_linear: kernel must be one of {', '.join(KERNELS)} or None, got {kernel!r}.")
    if weight.requires_grad or (bias is not None and bias.requires_grad):
        raise GrinError("fused_sparse_linear: the base weight and bias must be frozen (they get no gradient here).")
    if pattern.transposed or x.device.type != "cpu":
        raise GrinError("fused_sparse_linear: only [out, in] weights on the CPU (others take the reference path).")
    if x.shape[-1] != pattern.in_features or values.numel() != pattern.nnz or values.dim() != 1:
        raise GrinError(
            f"fused_sparse_linear: x [..., {pattern.in_features}] and {pattern.nnz} values expected, got "
            f"{tuple(x.shape)} and {tuple(values.shape)}."
        )
    if kernel == "gather" and x.dtype not in (torch.float32, torch.float64):
        raise GrinError(f"fused_sparse_linear: the gather kernel needs float32/float64 inputs, got {x.dtype}.")
    gather = use_gather(pattern, x.dtype) if kernel is None else kernel == "gather"
    return _FusedSparseLinear.apply(x, values, weight, bias, pattern, gather)
