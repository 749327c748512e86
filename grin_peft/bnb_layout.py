"""bitsandbytes repacks 4-bit weights for its CPU inference kernel after an eval forward; GRIN needs the canonical
layout to dequantize, merge and fingerprint them."""

from __future__ import annotations

from torch import nn


def canonical_4bit_layout(module: nn.Module) -> None:
    """Undo bitsandbytes' CPU packing of a Linear4bit weight in place (bnb does the same before saving)."""
    weight = getattr(module, "weight", None)
    state = getattr(weight, "quant_state", None)
    if state is None or not getattr(state, "packing_format_for_cpu", False):
        return
    from bitsandbytes.functional import _convert_weight_packed_for_cpu_inverse

    weight.data, weight.quant_state = _convert_weight_packed_for_cpu_inverse(weight.data, state)
