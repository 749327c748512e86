"""GRIN tuner layers: a frozen linear layer plus a sparse delta whose values are the only trainable parameters.

On the CPU a frozen ``nn.Linear`` with one active adapter takes the fused fast path (:mod:`grin_peft.fused`: the
delta written into the frozen weight for the duration of each matmul, the merged layer's output, at any density).
Everything else takes, per adapter, the sparse op (:mod:`grin_peft.sparse`) at low density or the dense regime
(:mod:`grin_peft.dense`, the delta merged into a temporary copy of the weight) above the adapter's `dense_threshold`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from peft.tuners._buffer_dict import BufferDict
from peft.tuners.tuners_utils import BaseTunerLayer, check_adapters_to_merge
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from .bnb_layout import dequantize
from .dense import merged_linear
from .errors import GrinError
from .fused import fused_sparse_linear
from .sparse import _autocast_dtype, sparse_delta_dense, sparse_delta_linear
from .sparse_pattern import SparsePattern

INT32_MAX = torch.iinfo(torch.int32).max


def index_dtype(numel: int) -> torch.dtype:
    """int32 indices halve the file size; only weights with more than 2**31 entries need int64."""
    return torch.int32 if numel <= INT32_MAX else torch.int64


# dtypes a delta's values and base values may have (float8 types cannot even be checked for NaN)
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def validate_entries(module_name: str, indices: torch.Tensor, values: torch.Tensor, numel: int) -> None:
    """Refuse indices and values that would corrupt a weight, naming the module, before anything is written."""
    if indices.dim() != 1 or values.dim() != 1:
        raise GrinError(
            f"{module_name}: GRIN indices and values must be 1-D, got {tuple(indices.shape)} and "
            f"{tuple(values.shape)}."
        )
    if indices.dtype not in (torch.int32, torch.int64):
        raise GrinError(f"{module_name}: GRIN indices must be int32 or int64, got {indices.dtype}.")
    if values.dtype not in VALUE_DTYPES:
        raise GrinError(
            f"{module_name}: GRIN values must be float16, bfloat16, float32 or float64, got {values.dtype}."
        )
    if indices.numel() != values.numel():
        raise GrinError(f"{module_name}: {indices.numel()} indices but {values.numel()} values.")
    if indices.numel() == 0:
        return
    idx = indices.long()
    if int(idx.min()) < 0 or int(idx.max()) >= numel:
        raise GrinError(
            f"{module_name}: GRIN index out of range [0, {numel}) (min {int(idx.min())}, max {int(idx.max())})."
        )
    if idx.numel() > 1 and not bool((idx[1:] > idx[:-1]).all()):
        raise GrinError(f"{module_name}: GRIN indices must be strictly increasing (duplicate or unsorted entries).")
    if not bool(torch.isfinite(values).all()):
        raise GrinError(f"{module_name}: GRIN values contain NaN or Inf.")


def _bnb_state(base: nn.Module) -> Any:
    """8-bit layers keep quantization statistics outside the weight; snapshot them with it."""
    state = getattr(base, "state", None)
    return None if state is None else (getattr(state, "CB", None), getattr(state, "SCB", None))


def _restore_bnb_state(base: nn.Module, snapshot: Any) -> None:
    if snapshot is not None:
        base.state.CB, base.state.SCB = snapshot


def _relative_error(merged: torch.Tensor, intended: torch.Tensor, plan: list) -> float:
    """||merged - (base + delta)|| / ||delta|| over the whole weight: how much of the delta requantization lost."""
    delta = torch.cat([(p[3].float() - p[2].float()) for p in plan])
    error = (merged.float() - intended.float()).norm()
    return float(error / delta.norm().clamp_min(1e-12))


class GrinLayer(BaseTunerLayer):
    """State shared by all GRIN layers: per adapter, flat indices into the base weight as stored, trainable values,
    and the base weight's original values at those indices (what an exact revert of a merge needs)."""

    adapter_layer_names = ("grin_values",)
    # False sends every forward through the reference path (benchmarks and tests compare the two)
    grin_fused = True
    other_param_names = ("grin_indices", "grin_base_values", "grin_dense_threshold")

    def __init__(self, base_layer: nn.Module, **kwargs: Any) -> None:
        self.base_layer = base_layer
        self.grin_values = nn.ParameterDict({})
        self.grin_indices = BufferDict(persistent=True)
        self.grin_base_values = BufferDict(persistent=True)
        self.grin_dense_threshold: dict[str, float] = {}
        self._grin_patterns: dict[str, tuple[tuple, SparsePattern]] = {}
        self._grin_premerge: dict[str, torch.Tensor] = {}
        self._grin_premerge_quantized: dict[str, tuple[nn.Parameter, Any]] = {}
        self._disable_adapters = False
        self.merged_adapters = []
        base = self.get_base_layer()
        # bitsandbytes 8-bit/4-bit bases: weights are read and written through PEFT's generic backend
        self.grin_quantization = resolve_quantization_backend(base)
        if type(base).__name__ == "Conv1D":
            self.in_features, self.out_features = base.weight.shape
        else:
            self.in_features, self.out_features = base.in_features, base.out_features

    @property
    def grin_numel(self) -> int:
        """Number of entries of the base weight: the index space of this layer."""
        return self.in_features * self.out_features

    def _grin_weight(self) -> torch.Tensor:
        """The base weight as a float tensor whose flat view the indices address (dequantized for bnb bases)."""
        base = self.get_base_layer()
        if self.grin_quantization is not None:
            return dequantize(base, self.grin_quantization)
        weight = base.weight
        if not weight.is_contiguous():
            raise GrinError(f"{type(self).__name__}: GRIN needs a contiguous base weight.")
        return weight

    def update_layer(self, adapter_name: str, config: Any, **kwargs: Any) -> None:
        """Create an empty adapter; selection fills it in (at injection for data-free scores, else in localize)."""
        weight = self._grin_weight()
        idx_dtype = index_dtype(self.grin_numel)
        self.grin_indices[adapter_name] = torch.zeros(0, dtype=idx_dtype, device=weight.device)
        self.grin_base_values[adapter_name] = torch.zeros(0, dtype=weight.dtype, device=weight.device)
        self.grin_values[adapter_name] = nn.Parameter(torch.zeros(0, dtype=torch.float32, device=weight.device))
        self.grin_dense_threshold[adapter_name] = float(config.dense_threshold)
        self.set_adapter(self.active_adapters, inference_mode=getattr(config, "inference_mode", False))

    def grin_num_entries(self, adapter_name: str) -> int:
        """How many weight entries this adapter trains here."""
        return self.grin_values[adapter_name].numel() if adapter_name in self.grin_values else 0

    def cast_grin_values(self, adapter_name: str, autocast: bool) -> None:
        """The adapter's values in float32 for 16-bit bases (`autocast`, PEFT's default) or in the base weight's
        dtype (PEFT's `autocast_adapter_dtype=False`); a float32 or float64 base keeps float32 values."""
        param = self.grin_values[adapter_name]
        dtype = self._grin_weight().dtype
        dtype = torch.float32 if autocast or dtype not in (torch.float16, torch.bfloat16) else dtype
        if param.dtype != dtype:
            self.grin_values[adapter_name] = nn.Parameter(param.detach().to(dtype), requires_grad=param.requires_grad)

    def set_grin_entries(
        self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None = None, module_name: str = ""
    ) -> None:
        """Point the adapter at new entries: record the base values there and make `values` the trainable delta (in
        the dtype the adapter's values already have, see `cast_grin_values`)."""
        if adapter_name in self.merged_adapters:
            raise GrinError(
                f"{module_name or type(self).__name__}: unmerge adapter '{adapter_name}' before changing its entries."
            )
        weight = self._grin_weight()
        indices = indices.to(device=weight.device)
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=weight.device)
        validate_entries(module_name or type(self).__name__, indices, values, self.grin_numel)
        old = self.grin_values.get(adapter_name)
        dtype = old.dtype if old is not None else torch.float32
        requires_grad = old.requires_grad if old is not None else True
        self.grin_indices[adapter_name] = indices.to(index_dtype(self.grin_numel))
        self.grin_base_values[adapter_name] = weight.detach().reshape(-1)[indices.long()].clone()
        self.grin_values[adapter_name] = nn.Parameter(
            values.detach().to(device=weight.device, dtype=dtype).clone(), requires_grad=requires_grad
        )
        self._grin_patterns.pop(adapter_name, None)

    def resize_grin_entries(self, adapter_name: str, num_entries: int, base_dtype: torch.dtype) -> None:
        """Give the adapter buffers of a saved delta's sizes so PEFT's `load_state_dict` can fill them."""
        device = self._grin_weight().device
        self.grin_indices[adapter_name] = torch.zeros(num_entries, dtype=index_dtype(self.grin_numel), device=device)
        self.grin_base_values[adapter_name] = torch.zeros(num_entries, dtype=base_dtype, device=device)
        requires_grad = self.grin_values[adapter_name].requires_grad
        self.grin_values[adapter_name] = nn.Parameter(
            torch.zeros(num_entries, dtype=self.grin_values[adapter_name].dtype, device=device),
            requires_grad=requires_grad,
        )
        self._grin_patterns.pop(adapter_name, None)

    def _grin_pattern(self, adapter_name: str) -> SparsePattern:
        """The CSR structure of an adapter's delta, rebuilt only when its indices change."""
        indices = self.grin_indices[adapter_name]
        key = (indices.data_ptr(), indices._version, indices.numel(), indices.device)
        cached = self._grin_patterns.get(adapter_name)
        if cached is not None and cached[0] == key:
            return cached[1]
        pattern = SparsePattern.from_flat_indices(
            indices, self.out_features, self.in_features, transposed=self._grin_transposed
        )
        self._grin_patterns[adapter_name] = (key, pattern)
        return pattern

    @property
    def _grin_transposed(self) -> bool:
        """Conv1D stores its weight (in, out): flat indices address that layout."""
        return getattr(self, "fan_in_fan_out", False)

    def get_delta_weight(self, adapter_name: str) -> torch.Tensor:
        """Dense delta in the base weight's layout, for PEFT APIs that expect one (never used in training)."""
        weight = self._grin_weight()
        return sparse_delta_dense(self.grin_values[adapter_name], self._grin_pattern(adapter_name), weight.dtype)

    def grin_merge_plan(
        self, adapter_names: list[str], safe_merge: bool, module_name: str = ""
    ) -> list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Compute what a merge would write, and refuse it, before touching the weight, if anything is non-finite."""
        weight = self._grin_weight()
        flat = weight.detach().reshape(-1)
        name = module_name or type(self).__name__
        merged_so_far: list[tuple[torch.Tensor, torch.Tensor]] = []
        plan = []
        for adapter in adapter_names:
            if adapter not in self.grin_values or self.grin_values[adapter].numel() == 0:
                continue
            values = self.grin_values[adapter].detach()
            if not bool(torch.isfinite(values).all()):
                raise GrinError(
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken ({name}: NaN/Inf "
                    "values; nothing was merged)."
                )
            idx = self.grin_indices[adapter].long()
            old = flat[idx].clone()
            # adapters merged together may overlap: later ones build on earlier ones' results
            for other_idx, other_new in merged_so_far:
                pos = torch.searchsorted(other_idx, idx).clamp(max=other_idx.numel() - 1)
                hit = other_idx[pos] == idx
                old[hit] = other_new[pos[hit]]
            # at least float32, float64 stays float64 (what the fused path and the dense regime compute)
            compute = torch.promote_types(weight.dtype, torch.float32)
            new = (old.to(compute) + values.to(compute)).to(weight.dtype)
            if safe_merge and not bool(torch.isfinite(new).all()):
                raise GrinError(
                    f"NaNs detected in the merged weights. The adapter {adapter} seems to be broken ({name}: the "
                    "merge would produce NaN/Inf weights; nothing was merged)."
                )
            merged_so_far.append((idx, new))
            plan.append((adapter, idx, old, new))
        return plan

    def grin_apply_merge(
        self, plan: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]], adapter_names: list[str]
    ) -> None:
        """Write a validated merge plan; keep the replaced values so unmerge restores them bit for bit."""
        if self.grin_quantization is not None and plan:
            self._grin_merge_quantized(plan)
        else:
            flat = self._grin_weight().data.view(-1)
            for adapter, idx, old, new in plan:
                flat[idx] = new
                self._grin_premerge[adapter] = old
        self.merged_adapters.extend(a for a in adapter_names if a in self.grin_values)

    def _grin_merge_quantized(self, plan: list[tuple[str, torch.Tensor, torch.Tensor, torch.Tensor]]) -> None:
        """Dequantize, add, requantize; keep the original quantized weight so unmerge is exact."""
        base = self.get_base_layer()
        dense = self._grin_weight().clone()
        flat = dense.view(-1)
        for _, idx, _, new in plan:
            flat[idx] = new
        self._grin_premerge_quantized[plan[0][0]] = (base.weight, _bnb_state(base))
        self.grin_quantization.set_base_weight(self, dense)
        self.grin_last_merge_error = _relative_error(self._grin_weight().reshape(-1), flat, plan)

    def merge(self, safe_merge: bool = False, adapter_names: list[str] | None = None) -> None:
        """Add the deltas into the base weight (one rounding per entry), exactly undoable by `unmerge`."""
        adapter_names = check_adapters_to_merge(self, adapter_names)
        if not adapter_names:
            return
        self.grin_apply_merge(self.grin_merge_plan(adapter_names, safe_merge), adapter_names)

    def unmerge(self) -> None:
        """Restore the exact values the merges replaced, most recent merge first."""
        if not self.merged:
            warnings.warn("Already unmerged. Nothing to do.", stacklevel=2)
            return
        flat = self._grin_weight().data.view(-1)
        while self.merged_adapters:
            adapter = self.merged_adapters.pop()
            if adapter not in self.grin_values or self.grin_values[adapter].numel() == 0:
                continue
            if adapter in self._grin_premerge_quantized:
                base = self.get_base_layer()
                base.weight, state = self._grin_premerge_quantized.pop(adapter)
                _restore_bnb_state(base, state)
                continue
            if self.grin_quantization is not None:
                continue  # merged together with an earlier adapter: restored with it
            idx = self.grin_indices[adapter].long()
            old = self._grin_premerge.pop(adapter, None)
            if old is None:  # merged before this object existed: subtract (exact only up to rounding)
                compute = torch.promote_types(flat.dtype, torch.float32)
                old = (flat[idx].to(compute) - self.grin_values[adapter].detach().to(compute)).to(flat.dtype)
            flat[idx] = old

    def _grin_is_dense(self, adapter_name: str) -> bool:
        """Whether this adapter's density here is above its dense_threshold (then one dense matmul is faster)."""
        entries = self.grin_values[adapter_name].numel()
        return entries > 0 and entries > self.grin_dense_threshold[adapter_name] * self.grin_numel

    def _grin_can_merge_on_the_fly(self, args: tuple, kwargs: dict) -> bool:
        """The dense regime replaces the base layer's forward, so only for a plain, unhooked float layer (accelerate's
        offloading hooks replace `forward` on the instance; they keep the sparse path)."""
        base = self.get_base_layer()
        plain = type(base).forward is nn.Linear.forward or type(base).__name__ == "Conv1D"
        hooked = bool(base._forward_hooks or base._forward_pre_hooks) or "forward" in vars(base)
        return plain and not hooked and not args and not kwargs and self.grin_quantization is None

    def _grin_can_fuse(self, x: torch.Tensor) -> bool:
        """Whether the one-node fast path (:mod:`grin_peft.fused`) computes this layer: a frozen nn.Linear on the
        CPU, input in the weight's dtype, no autocast (it would recast the base matmul), a weight in this process's
        own memory (the fast path writes the delta into it for the duration of a matmul; another process sharing
        it would see that); else the reference path."""
        base = self.get_base_layer()
        weight, bias = base.weight, base.bias
        return (
            self.grin_fused
            and isinstance(base, nn.Linear)
            and not self._grin_transposed
            and x.device.type == "cpu"
            and x.dtype == weight.dtype
            and not weight.requires_grad
            and (bias is None or not bias.requires_grad)
            and weight.is_contiguous()
            and not weight.is_shared()
            and _autocast_dtype("cpu") is None
        )

    def grin_forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Base output plus each active adapter's delta: on the fused path at any density; elsewhere sparse below
        dense_threshold, merged into a copy above."""
        if self.disable_adapters:
            if self.merged:
                self.unmerge()
            return self.base_layer(x, *args, **kwargs)
        if self.merged:
            return self.base_layer(x, *args, **kwargs)
        active = [a for a in self.active_adapters if a in self.grin_values and self.grin_values[a].numel()]
        plain = self._grin_can_merge_on_the_fly(args, kwargs)
        if plain and len(active) == 1 and self._grin_can_fuse(x):
            base = self.get_base_layer()
            result = fused_sparse_linear(
                x, base.weight, base.bias, self.grin_values[active[0]], self._grin_pattern(active[0])
            )
            return self._grin_join_empty(result)
        dense = [a for a in active if self._grin_is_dense(a)] if plain else []
        if dense:
            base = self.get_base_layer()
            deltas = [(self.grin_values[a], self.grin_indices[a]) for a in dense]
            result = merged_linear(x, base.weight, base.bias, deltas, transposed=self._grin_transposed)
        else:
            result = self.base_layer(x, *args, **kwargs)
            if self.grin_quantization is not None:
                result = self.grin_quantization.maybe_clone_base_result(result)
        for adapter in active:
            if adapter not in dense:
                delta = sparse_delta_linear(x.to(result.dtype), self.grin_values[adapter], self._grin_pattern(adapter))
                result = result + delta
        return self._grin_join_empty(result)

    def _grin_join_empty(self, result: torch.Tensor) -> torch.Tensor:
        """Add 0 from each active adapter that has no entries here but trainable (empty) values, so they get a
        (zero, empty) gradient: a trainable Parameter without one stops DDP at the next step ("Expected to have
        finished reduction") and fails PEFT's training checks. Only while training; one elementwise add each."""
        if not torch.is_grad_enabled():
            return result
        for adapter in self.active_adapters:
            values = self.grin_values[adapter] if adapter in self.grin_values else None
            if values is not None and values.numel() == 0 and values.requires_grad:
                result = result + values.sum().to(result.dtype)
        return result

    def grow_grin_entries(
        self, adapter_name: str, indices: torch.Tensor, values: torch.Tensor | None = None, module_name: str = ""
    ) -> torch.Tensor:
        """Add entries to an adapter, keeping the existing ones with their values (re-localisation).

        ``indices`` are new flat positions (sorted, none already in the adapter), ``values`` their initial values
        (default 0). The grown delta replaces ``grin_values[adapter_name]`` by a new Parameter (an optimizer must be
        pointed at it). Returns where the existing entries now sit in the grown delta, to move optimizer state.
        """
        name = module_name or type(self).__name__
        old_idx = self.grin_indices[adapter_name].long()
        old_values = self.grin_values[adapter_name].detach()
        indices = indices.to(old_idx.device).long()
        if values is None:
            values = torch.zeros(indices.numel(), dtype=torch.float32, device=old_idx.device)
        validate_entries(name, indices, values, self.grin_numel)
        if bool(torch.isin(indices, old_idx).any()):
            raise GrinError(f"{name}: some entries to add are already in adapter '{adapter_name}'.")
        union, order = torch.sort(torch.cat([old_idx, indices]))
        grown = torch.cat([old_values.float(), values.to(old_idx.device).float()])[order]
        self.set_grin_entries(adapter_name, union, grown, module_name=module_name)
        positions = torch.empty_like(order)
        positions[order] = torch.arange(order.numel(), device=order.device)
        return positions[: old_idx.numel()]


class Linear(nn.Module, GrinLayer):
    """GRIN on `torch.nn.Linear` and on transformers' `Conv1D` (GPT-2), whose weight is stored transposed."""

    def __init__(self, base_layer: nn.Module, adapter_name: str, config: Any, **kwargs: Any) -> None:
        super().__init__()
        GrinLayer.__init__(self, base_layer, **kwargs)
        self.fan_in_fan_out = type(base_layer).__name__ == "Conv1D"
        self._active_adapter = adapter_name
        self.update_layer(adapter_name, config)

    def forward(self, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.grin_forward(x, *args, **kwargs)

    def __repr__(self) -> str:
        return "grin." + super().__repr__()
