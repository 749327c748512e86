"""The support of a GRIN delta: which K entries of a weight it trains, in the forms the sparse kernels read.

:class:`SparsePattern` validates sorted flat positions into the weight as stored, once, and keeps the CSR structures
of D and D^T (with the permutations to and from storage order), so a layer pays the sort once, not per step.
:mod:`grin_peft.sparse` (the reference op) and :mod:`grin_peft.fused` (the CPU fast path) read it.
"""

from __future__ import annotations

import threading

import torch

from .errors import GrinError

__all__ = ["SparsePattern"]

_INT32_MAX = 2**31 - 1


class SparsePattern:
    """Precomputed, cached structure of a sparse delta in a weight of shape [out_features, in_features].

    Building the CSR structures costs a sort over K entries; a layer builds its pattern once and reuses it every
    step, so the per-step cost is only the kernels. Instances are immutable after construction (the only mutable
    state is a per-device cache guarded by a lock), so one pattern can be shared across threads and modules.

    ``values`` always travel in storage order (the order of ``indices``). For a weight stored [out, in] that is
    already the CSR order of D; for a weight stored [in, out] (transformers' Conv1D) it is the CSR order of D^T.
    The pattern keeps the permutation to the other order, and the gradient comes back in storage order without any
    permutation, because the SDDMM runs on whichever CSR matches storage order.
    """

    __slots__ = (
        "out_features",
        "in_features",
        "transposed",
        "nnz",
        "indices",
        "d_crow",
        "d_col",
        "d_perm",
        "t_crow",
        "t_col",
        "t_perm",
        "_lock",
        "_device_cache",
    )

    def __init__(
        self,
        *,
        out_features: int,
        in_features: int,
        transposed: bool,
        indices: torch.Tensor,
        d_crow: torch.Tensor,
        d_col: torch.Tensor,
        d_perm: torch.Tensor | None,
        t_crow: torch.Tensor,
        t_col: torch.Tensor,
        t_perm: torch.Tensor | None,
    ) -> None:
        """Store prebuilt structures; use :meth:`from_flat_indices`, which validates and builds them."""
        self.out_features = out_features
        self.in_features = in_features
        self.transposed = transposed
        self.nnz = int(indices.numel())
        self.indices = indices  # int64 flat positions, storage order
        self.d_crow, self.d_col, self.d_perm = d_crow, d_col, d_perm  # CSR of D [out, in]
        self.t_crow, self.t_col, self.t_perm = t_crow, t_col, t_perm  # CSR of D^T [in, out]
        self._lock = threading.Lock()
        self._device_cache: dict[torch.device, SparsePattern] = {}

    @classmethod
    def from_flat_indices(
        cls, indices: torch.Tensor, out_features: int, in_features: int, transposed: bool = False
    ) -> SparsePattern:
        """Validate flat positions into the weight as stored and build both CSR forms on the indices' device.

        ``transposed=False``: the weight is stored [out, in] (nn.Linear), flat = r * in_features + c.
        ``transposed=True``: the weight is stored [in, out] (Conv1D), flat = c * out_features + r.
        Indices must be a 1-D int32/int64 tensor, strictly increasing, within the weight.
        """
        for name, size in (("out_features", out_features), ("in_features", in_features)):
            if isinstance(size, bool) or not isinstance(size, int) or size <= 0:
                raise GrinError(f"SparsePattern: {name} must be a positive int, got {size!r}.")
        if not isinstance(indices, torch.Tensor):
            raise GrinError(f"SparsePattern: indices must be a torch.Tensor, got {type(indices).__name__}.")
        if indices.dtype not in (torch.int32, torch.int64):
            raise GrinError(
                f"SparsePattern: indices must be int32 or int64 flat positions, got dtype {indices.dtype}."
            )
        if indices.dim() != 1:
            raise GrinError(f"SparsePattern: indices must be 1-D flat positions, got shape {tuple(indices.shape)}.")
        numel = out_features * in_features
        # a private copy: the caller's buffer may be edited in place later (load_state_dict), the pattern may not
        flat = indices.detach().to(torch.int64, copy=True).contiguous()
        if flat.numel() > 0:
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= numel:
                layout = f"[{in_features}, {out_features}]" if transposed else f"[{out_features}, {in_features}]"
                raise GrinError(
                    f"SparsePattern: index out of range [0, {numel}) for a weight stored {layout} "
                    f"(min {lo}, max {hi})."
                )
            steps = flat[1:] - flat[:-1]
            if steps.numel() > 0 and not bool((steps > 0).all()):
                bad = int(torch.nonzero(steps <= 0)[0])
                raise GrinError(
                    "SparsePattern: indices must be strictly increasing (sorted, no duplicates); "
                    f"position {bad + 1} holds {int(flat[bad + 1])} after {int(flat[bad])}."
                )

        if transposed:
            cols, rows = flat // out_features, flat % out_features
        else:
            rows, cols = flat // in_features, flat % in_features
        # int32 CSR indices when they fit: MKL (LP64) and cuSPARSE take them without a per-call conversion
        itype = torch.int32 if max(out_features, in_features, flat.numel()) <= _INT32_MAX else torch.int64

        def csr(major: torch.Tensor, minor: torch.Tensor, n_major: int, key: torch.Tensor | None):
            # storage order is already sorted by `key` when key is None
            perm = None if key is None else torch.argsort(key)
            if perm is not None:
                major, minor = major[perm], minor[perm]
            crow = torch.zeros(n_major + 1, dtype=torch.int64, device=flat.device)
            crow[1:] = torch.cumsum(torch.bincount(major, minlength=n_major), 0)
            return crow.to(itype), minor.to(itype), perm

        d_key = None if not transposed else rows * in_features + cols
        t_key = None if transposed else cols * out_features + rows
        d_crow, d_col, d_perm = csr(rows, cols, out_features, d_key)
        t_crow, t_col, t_perm = csr(cols, rows, in_features, t_key)
        return cls(
            out_features=out_features,
            in_features=in_features,
            transposed=bool(transposed),
            indices=flat,
            d_crow=d_crow,
            d_col=d_col,
            d_perm=d_perm,
            t_crow=t_crow,
            t_col=t_col,
            t_perm=t_perm,
        )

    @property
    def device(self) -> torch.device:
        return self.indices.device

    def to(self, device: torch.device | str) -> SparsePattern:
        """This pattern on ``device``; copies are cached so a layer that moves pays the transfer once."""
        device = _canonical(torch.device(device))
        if device == self.device:
            return self
        with self._lock:
            cached = self._device_cache.get(device)
            if cached is not None:
                return cached
            moved = SparsePattern(
                out_features=self.out_features,
                in_features=self.in_features,
                transposed=self.transposed,
                **{name: _move(getattr(self, name), device) for name in _TENSOR_FIELDS},
            )
            self._device_cache[device] = moved
            return moved

    def __getstate__(self) -> dict:
        # the lock and the device cache are per-process runtime state
        return {name: getattr(self, name) for name in self.__slots__ if not name.startswith("_")}

    def __setstate__(self, state: dict) -> None:
        for name, value in state.items():
            object.__setattr__(self, name, value)
        self._lock = threading.Lock()
        self._device_cache = {}

    def __copy__(self) -> SparsePattern:
        return self  # immutable: sharing is safe

    def __deepcopy__(self, memo: dict) -> SparsePattern:
        return self

    def __repr__(self) -> str:
        density = self.nnz / (self.out_features * self.in_features)
        return (
            f"SparsePattern(out_features={self.out_features}, in_features={self.in_features}, nnz={self.nnz}, "
            f"density={density:.3g}, transposed={self.transposed}, device={self.device})"
        )


_TENSOR_FIELDS = ("indices", "d_crow", "d_col", "d_perm", "t_crow", "t_col", "t_perm")


def _move(tensor: torch.Tensor | None, device: torch.device) -> torch.Tensor | None:
    return None if tensor is None else tensor.to(device)


def _canonical(device: torch.device) -> torch.device:
    """torch.device("cuda") means the current CUDA device; tensors always report an explicit index."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        return torch.device("cpu")
    return device


def _rows_cols(pattern: SparsePattern) -> tuple[torch.Tensor, torch.Tensor]:
    """Row and column of each entry of D, in storage order."""
    if pattern.transposed:
        return pattern.indices % pattern.out_features, pattern.indices // pattern.out_features
    return pattern.indices // pattern.in_features, pattern.indices % pattern.in_features
