"""The sparse delta op behind GRIN adapters: ``y = x @ D^T`` with D sparse, never formed densely.

A GRIN adapter trains only K entries of a weight delta D of shape [out_features, in_features]. Materialising D (or
its dense gradient) would cost tokens x out x in work and an out x in allocation per layer and step, as much as the
frozen layer itself, so this module keeps D in CSR form and does all work in proportion to tokens x K:

* forward:        y^T = D @ x^T                      (CSR @ dense, MKL on CPU, cuSPARSE on CUDA)
* grad wrt x:     grad_x^T = D^T @ grad_y^T          (the same kernel on a precomputed CSR of D^T)
* grad wrt D:     grad_D[r, c] = sum_n grad_y[n, r] * x[n, c] on the K entries only (SDDMM, ``sampled_addmm``)

Why this layout, measured on this project's 2-core CPU machine (tokens=2048, ``benchmarks/bench_sparse_op.py``): the
sparse kernels themselves are cheap; what costs is moving the dense activations. The CSR kernels run fastest on
token-contiguous ([features, tokens]) operands. MKL's column-major mode needs no transposes but its kernel is 2-5x
slower, which made a whole step no faster at density <= 1e-3 and ~1.2x slower at 1e-2. Gather/index_add kernels
(tokens x K strided passes) only kept up at K ~ 100 and made a step 1.4-1.8x slower at 1e-3 and 7x at 1e-2.
Transposing whole [tokens, features] activations at once was slower than in token blocks (each fresh multi-MiB
buffer page-faults, and fewer of the copies stay cached), so on CPU tokens go in blocks of ~1M elements; on CUDA one
block holds all tokens. A full forward+backward through base + delta then costs ~1.2-1.3x the frozen layer's own on a
2048x5504 layer and ~1.3-1.4x on 1024x1024 at density 1e-4..1e-2 (LoRA r=8: 1.1x / 1.25-1.3x; a dense scattered
delta: 1.5x), ~1.7x at 5e-2.

Above a few percent density one dense matmul with the delta merged into a copy of the weight is faster; layers switch
to that (:mod:`grin_peft.dense`) above ``GrinConfig.dense_threshold``. On the CPU, GRIN layers over a frozen
``nn.Linear`` use :mod:`grin_peft.fused` instead of this op next to the base layer (the delta written into the weight
for each matmul: the merged layer's numbers, one sparse pass instead of three); this op is the reference, and what
CUDA, Conv1D, quantized and hooked bases run.

The CPU sparse kernels have no float16/bfloat16 versions, so 16-bit inputs are computed in float32 (converted
block by block next to the transposing copies) and the result is rounded to the input's dtype.

D's structure (its CSR index arrays, built once per layer) is a :class:`grin_peft.sparse_pattern.SparsePattern`.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator

import torch
from torch.autograd.function import once_differentiable

from .errors import GrinError
from .sparse_pattern import SparsePattern, _rows_cols

__all__ = ["sparse_delta_dense", "sparse_delta_linear"]

# torch warns once per process that CSR support is "beta" (the subset used here is stable since torch 2.0): use up
# that one warning here rather than surprise users mid-training
with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    torch.sparse_csr_tensor(
        torch.zeros(2, dtype=torch.int64), torch.zeros(0, dtype=torch.int64), torch.zeros(0), (1, 1)
    )

# CPU token block: B * max(in, out) ~ 1M elements (4 MiB in float32). Smaller blocks were at best ~5% faster on an
# idle machine but each block costs a few thread-pool fork/joins, which get very slow when the CPU is oversubscribed
_CPU_BLOCK_ELEMENTS = 1 << 20
_CPU_MIN_BLOCK, _CPU_MAX_BLOCK = 16, 4096
# index (gather/scatter) fallback: cap on the tokens x entries intermediate, in elements
_INDEX_CHUNK_ELEMENTS = 1 << 22


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Sparse kernels (CPU MKL, CPU sampled_addmm, CUDA sampled_addmm) only cover float32/float64."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def _use_csr_kernels(device: torch.device) -> bool:
    """CSR matmul and sampled_addmm exist on CPU and CUDA; other backends take the gather/index_add fallback."""
    return device.type in ("cpu", "cuda")


def _autocast_available(device_type: str) -> bool:
    if hasattr(torch.amp, "is_autocast_available"):  # torch >= 2.4
        return torch.amp.is_autocast_available(device_type)
    return device_type in ("cpu", "cuda")


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast would run a linear layer in on this device, or None outside autocast."""
    if not _autocast_available(device_type):
        return None
    if hasattr(torch, "get_autocast_dtype"):  # torch >= 2.4
        return torch.get_autocast_dtype(device_type) if torch.is_autocast_enabled(device_type) else None
    if device_type == "cpu":
        return torch.get_autocast_cpu_dtype() if torch.is_autocast_cpu_enabled() else None
    return torch.get_autocast_gpu_dtype() if torch.is_autocast_enabled() else None


def _no_autocast(device_type: str) -> contextlib.AbstractContextManager:
    """Autocast would recast our float32 operands (addmm is on its lower-precision list) and break sparse kernels."""
    if _autocast_available(device_type):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()


def _token_blocks(n_tokens: int, pattern: SparsePattern, device: torch.device) -> Iterator[tuple[int, int]]:
    """Token ranges processed together: ~_CPU_BLOCK_ELEMENTS per transposed copy on CPU, all tokens elsewhere."""
    if device.type == "cpu":
        ideal = _CPU_BLOCK_ELEMENTS / max(pattern.in_features, pattern.out_features)
        block = 2 ** round(math.log2(ideal))
        block = min(max(block, _CPU_MIN_BLOCK), _CPU_MAX_BLOCK)
    else:
        block = max(n_tokens, 1)
    for start in range(0, n_tokens, block):
        yield start, min(start + block, n_tokens)


class _Scratch:
    """Buffers reused across the token blocks of one call.

    A fresh multi-MiB CPU allocation page-faults on first touch, and glibc hands big freed blocks back to the OS, so
    allocating per block cost more than the copies themselves. Per call, not global: nothing is shared across threads.
    """

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self._buffers: dict[tuple, torch.Tensor] = {}

    def get(self, name: str, rows: int, cols: int, dtype: torch.dtype) -> torch.Tensor:
        key = (name, rows, cols, dtype)
        buffer = self._buffers.get(key)
        if buffer is None:
            buffer = self._buffers[key] = torch.empty((rows, cols), dtype=dtype, device=self.device)
        return buffer


def _transposed_copy(src: torch.Tensor, dtype: torch.dtype, scratch: _Scratch, name: str) -> torch.Tensor:
    """[tokens, features] block -> contiguous [features, tokens] in ``dtype`` (a scratch buffer).

    torch has a fast cache-blocked kernel only for same-dtype 2-D transposing copies; a converting one takes the
    generic path, ~3x slower on CPU, so 16-bit blocks are converted first, contiguously.
    """
    if src.dtype != dtype:
        src = scratch.get(name + ".converted", src.shape[0], src.shape[1], dtype).copy_(src)
    out = scratch.get(name, src.shape[1], src.shape[0], dtype)
    out.copy_(src.t())
    return out


def _copy_transposed_into(dst: torch.Tensor, src_t: torch.Tensor, scratch: _Scratch, name: str) -> None:
    """dst [tokens, features] (contiguous rows) <- src_t [features, tokens]^T, converting as _transposed_copy does."""
    if src_t.dtype != dst.dtype:
        src_t = scratch.get(name, src_t.shape[0], src_t.shape[1], dst.dtype).copy_(src_t)
    dst.copy_(src_t.t())


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    return torch.sparse_csr_tensor(crow, col, values, size, check_invariants=False)


class _SparseDeltaLinear(torch.autograd.Function):
    """x2d [N, in] -> x2d @ D^T [N, out]; gradients for x2d and values, never for the pattern."""

    @staticmethod
    def forward(ctx, x2d: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
        need_x_grad, need_values_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        ctx.pattern = pattern
        # x is only needed for the values' gradient, values only for x's: save no more than backward uses
        ctx.save_for_backward(x2d if need_values_grad else None, values if need_x_grad else None)
        ctx.x_dtype, ctx.values_dtype = x2d.dtype, values.dtype
        with _no_autocast(x2d.device.type):
            if _use_csr_kernels(x2d.device):
                return _csr_forward(x2d, values, pattern)
            return _index_forward(x2d, values, pattern)

    @staticmethod
    @once_differentiable  # the sparse kernels have no derivatives of their own: refuse double backward loudly
    def backward(ctx, grad_y: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor | None, None]:
        x2d, values = ctx.saved_tensors
        pattern: SparsePattern = ctx.pattern
        need_x_grad, need_values_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        with _no_autocast(grad_y.device.type):
            if _use_csr_kernels(grad_y.device):
                grad_x, grad_values = _csr_backward(grad_y, x2d, values, pattern, need_x_grad, need_values_grad)
            else:
                grad_x, grad_values = _index_backward(grad_y, x2d, values, pattern, need_x_grad, need_values_grad)
        if grad_x is not None:
            grad_x = grad_x.to(ctx.x_dtype)
        if grad_values is not None:
            grad_values = grad_values.to(ctx.values_dtype)
        return grad_x, grad_values, None


def _csr_forward(x2d: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    n_tokens = x2d.shape[0]
    y = torch.empty((n_tokens, pattern.out_features), dtype=x2d.dtype, device=x2d.device)
    if pattern.nnz == 0 or n_tokens == 0:
        return y.zero_()
    cdt = _compute_dtype(x2d.dtype)
    d_values = values.to(cdt)
    if pattern.d_perm is not None:
        d_values = d_values[pattern.d_perm]
    d = _csr(pattern.d_crow, pattern.d_col, d_values, (pattern.out_features, pattern.in_features))
    scratch = _Scratch(x2d.device)
    for start, stop in _token_blocks(n_tokens, pattern, x2d.device):
        x_t = _transposed_copy(x2d[start:stop], cdt, scratch, "x_t")
        y_t = scratch.get("y_t", pattern.out_features, stop - start, cdt)
        # beta=0 ignores y_t's stale contents (documented for addmm: NaN/Inf there do not propagate)
        torch.addmm(y_t, d, x_t, beta=0, out=y_t)
        _copy_transposed_into(y[start:stop], y_t, scratch, "y_t.converted")
    return y


def _csr_backward(
    grad_y: torch.Tensor,
    x2d: torch.Tensor | None,
    values: torch.Tensor | None,
    pattern: SparsePattern,
    need_x_grad: bool,
    need_values_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    n_tokens, device = grad_y.shape[0], grad_y.device
    cdt = _compute_dtype(grad_y.dtype)
    grad_x = grad_values = None
    if need_x_grad:  # in the input's dtype: the block copies below convert on the way
        grad_x = torch.empty((n_tokens, pattern.in_features), dtype=grad_y.dtype, device=device)
    if pattern.nnz == 0 or n_tokens == 0:
        if grad_x is not None:
            grad_x.zero_()
        if need_values_grad:
            grad_values = torch.zeros(pattern.nnz, dtype=cdt, device=device)
        return grad_x, grad_values

    if need_x_grad:
        t_values = values.to(cdt)
        if pattern.t_perm is not None:
            t_values = t_values[pattern.t_perm]
        d_t = _csr(pattern.t_crow, pattern.t_col, t_values, (pattern.in_features, pattern.out_features))
    if need_values_grad:
        # accumulate the SDDMM in the CSR whose order is storage order, so the gradient needs no permutation
        acc = torch.zeros(pattern.nnz, dtype=cdt, device=device)
        if pattern.transposed:
            sampled = _csr(pattern.t_crow, pattern.t_col, acc, (pattern.in_features, pattern.out_features))
        else:
            sampled = _csr(pattern.d_crow, pattern.d_col, acc, (pattern.out_features, pattern.in_features))

    scratch = _Scratch(device)
    for start, stop in _token_blocks(n_tokens, pattern, device):
        gy_t = _transposed_copy(grad_y[start:stop], cdt, scratch, "gy_t")  # [out, b]
        if need_x_grad:
            gx_t = scratch.get("gx_t", pattern.in_features, stop - start, cdt)
            torch.addmm(gx_t, d_t, gy_t, beta=0, out=gx_t)
            _copy_transposed_into(grad_x[start:stop], gx_t, scratch, "gx_t.converted")
        if need_values_grad:
            x_t = _transposed_copy(x2d[start:stop], cdt, scratch, "x_t")  # [in, b]
            # sampled_addmm wants both operands token-contiguous: mat1 rows and mat2 columns
            if pattern.transposed:
                torch.sparse.sampled_addmm(sampled, x_t, gy_t.t(), out=sampled)
            else:
                torch.sparse.sampled_addmm(sampled, gy_t, x_t.t(), out=sampled)
    if need_values_grad:
        grad_values = sampled.values()
    return grad_x, grad_values


def _entry_chunks(n_tokens: int, nnz: int) -> Iterator[tuple[int, int]]:
    step = max(1, _INDEX_CHUNK_ELEMENTS // max(n_tokens, 1))
    for start in range(0, nnz, step):
        yield start, min(start + step, nnz)


def _index_forward(x2d: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """Gather/index_add fallback for backends without CSR kernels (tokens x K work, bounded intermediates)."""
    cdt = _compute_dtype(x2d.dtype)
    y = torch.zeros((x2d.shape[0], pattern.out_features), dtype=cdt, device=x2d.device)
    rows, cols = _rows_cols(pattern)
    v = values.to(cdt)
    for a, b in _entry_chunks(x2d.shape[0], pattern.nnz):
        y.index_add_(1, rows[a:b], x2d.index_select(1, cols[a:b]).to(cdt) * v[a:b])
    return y.to(x2d.dtype)


def _index_backward(
    grad_y: torch.Tensor,
    x2d: torch.Tensor | None,
    values: torch.Tensor | None,
    pattern: SparsePattern,
    need_x_grad: bool,
    need_values_grad: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    cdt = _compute_dtype(grad_y.dtype)
    rows, cols = _rows_cols(pattern)
    grad_x = grad_values = None
    if need_x_grad:
        grad_x = torch.zeros((grad_y.shape[0], pattern.in_features), dtype=cdt, device=grad_y.device)
        v = values.to(cdt)
    if need_values_grad:
        grad_values = torch.empty(pattern.nnz, dtype=cdt, device=grad_y.device)
    for a, b in _entry_chunks(grad_y.shape[0], pattern.nnz):
        gy = grad_y.index_select(1, rows[a:b]).to(cdt)
        if need_x_grad:
            grad_x.index_add_(1, cols[a:b], gy * v[a:b])
        if need_values_grad:
            grad_values[a:b] = (gy * x2d.index_select(1, cols[a:b]).to(cdt)).sum(0)
    return grad_x, grad_values


def sparse_delta_linear(x: torch.Tensor, values: torch.Tensor, pattern: SparsePattern) -> torch.Tensor:
    """x @ D^T for the sparse D given by (``values``, ``pattern``), in work proportional to tokens x K.

    x: [..., in_features], any leading dims and strides. values: [nnz] in storage order, trainable, any float dtype
    (it may differ from x's). The result has x's dtype and shape [..., out_features]; the gradient to values comes
    back in values' dtype. Under autocast the input is cast to the autocast dtype first, like a linear layer's.
    """
    if not isinstance(pattern, SparsePattern):
        raise GrinError(f"sparse_delta_linear: pattern must be a SparsePattern, got {type(pattern).__name__}.")
    if not isinstance(x, torch.Tensor) or not isinstance(values, torch.Tensor):
        raise GrinError("sparse_delta_linear: x and values must be torch tensors.")
    if x.dim() == 0 or x.shape[-1] != pattern.in_features:
        raise GrinError(
            f"sparse_delta_linear: x must have shape [..., {pattern.in_features}] (in_features), got {tuple(x.shape)}."
        )
    if values.dim() != 1 or values.numel() != pattern.nnz:
        raise GrinError(
            f"sparse_delta_linear: values must be 1-D with {pattern.nnz} entries (the pattern's nnz), "
            f"got shape {tuple(values.shape)}."
        )
    if not x.is_floating_point() or not values.is_floating_point():
        raise GrinError(f"sparse_delta_linear: x and values must be floating point, got {x.dtype} and {values.dtype}.")
    if x.device != values.device:
        raise GrinError(f"sparse_delta_linear: x is on {x.device} but values are on {values.device}.")
    autocast_dtype = _autocast_dtype(x.device.type)
    if autocast_dtype is not None:
        x = x.to(autocast_dtype)
    pattern = pattern.to(x.device)
    if x.dim() == 2:
        return _SparseDeltaLinear.apply(x, values, pattern)
    y = _SparseDeltaLinear.apply(x.reshape(-1, pattern.in_features), values, pattern)
    return y.reshape(*x.shape[:-1], pattern.out_features)


def sparse_delta_dense(values: torch.Tensor, pattern: SparsePattern, dtype: torch.dtype | None = None) -> torch.Tensor:
    """The delta as a dense tensor in the weight's storage layout ([out, in], or [in, out] when transposed).

    For merging into the base weight and for debugging only: this is the out x in allocation that training avoids.
    Differentiable with respect to values.
    """
    if not isinstance(pattern, SparsePattern):
        raise GrinError(f"sparse_delta_dense: pattern must be a SparsePattern, got {type(pattern).__name__}.")
    if not isinstance(values, torch.Tensor) or values.dim() != 1 or values.numel() != pattern.nnz:
        shape = tuple(values.shape) if isinstance(values, torch.Tensor) else type(values).__name__
        raise GrinError(f"sparse_delta_dense: values must be 1-D with {pattern.nnz} entries, got {shape}.")
    dtype = values.dtype if dtype is None else dtype
    pattern = pattern.to(values.device)
    flat = torch.zeros(pattern.out_features * pattern.in_features, dtype=dtype, device=values.device)
    flat = flat.scatter(0, pattern.indices, values.to(dtype))
    if pattern.transposed:
        return flat.view(pattern.in_features, pattern.out_features)
    return flat.view(pattern.out_features, pattern.in_features)
