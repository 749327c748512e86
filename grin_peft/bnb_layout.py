"""bitsandbytes repacks 4-bit weights for its CPU inference kernel after an eval forward; GRIN reads them in the
canonical layout, from copies, so that reading never changes the model (the repacking's inverse rounds absmax)."""

from __future__ import annotations

import torch
from torch import nn


def canonical_4bit(weight: torch.Tensor) -> tuple[torch.Tensor, object] | None:
    """(codes, quant_state) of a Params4bit in bnb's canonical layout, or None if `weight` is not 4-bit."""
    state = getattr(weight, "quant_state", None)
    if state is None:
        return None
    if not getattr(state, "packing_format_for_cpu", False):
        return weight.data, state
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    return _convert_weight_packed_for_cpu_inverse(weight.data.clone(), _copy_state(state))


def _copy_state(state: object) -> object:
    import copy

    return copy.copy(state)


def dequantize(module: nn.Module, backend) -> torch.Tensor:
    """The float weight of a quantized linear layer, without touching the layer."""
    canonical = canonical_4bit(module.weight)
    if canonical is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(*canonical)
    return backend.get_base_weight(module)
