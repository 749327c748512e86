"""Merging GRIN deltas into quantized (bitsandbytes) bases, honestly: measure what requantization loses.

A 4-bit block shares one scale, so adding a small sparse delta and requantizing can round much of it away.
`merge_quantized` merges in place and reports how much survived; `merge_dequantized` gives a full-precision model
instead, where nothing is lost.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from .errors import GrinError
from .layer import GrinLayer


@dataclass
class QuantizedMergeReport:
    """How faithfully the merged quantized model reproduces the adapter model."""

    relative_error: dict[str, float] = field(default_factory=dict)
    max_logit_diff: float | None = None

    @property
    def worst_relative_error(self) -> float:
        return max(self.relative_error.values(), default=0.0)


def _logits(model: nn.Module, probe: dict) -> torch.Tensor:
    with torch.no_grad():
        out = model(**probe)
    return (out if isinstance(out, torch.Tensor) else out.logits).float()


def merge_quantized(
    peft_model, probe: dict | None = None, adapter_names: list[str] | None = None, warn_above: float = 0.05
) -> QuantizedMergeReport:
    """Merge into the quantized weights (in place) and measure the loss.

    relative_error per module is ||dequant(requant(W + D)) - (W + D)|| / ||D||; with a `probe` batch also the max
    absolute logit difference between the adapter model and the merged one. Warns above `warn_above` relative error
    (or any logit change above 1e-2) and points to `merge_dequantized`.
    """
    layers = {n: m for n, m in peft_model.base_model.grin_layers().items() if m.grin_quantization is not None}
    if not layers:
        raise GrinError("merge_quantized: this model has no quantized GRIN layers; use merge_adapter().")
    before = _logits(peft_model, probe) if probe is not None else None
    peft_model.base_model.merge_adapter(adapter_names)
    report = QuantizedMergeReport({n: getattr(m, "grin_last_merge_error", 0.0) for n, m in layers.items()})
    if before is not None:
        report.max_logit_diff = float((_logits(peft_model, probe) - before).abs().max())
    if report.worst_relative_error > warn_above or (report.max_logit_diff or 0.0) > 1e-2:
        warnings.warn(
            f"Requantization lost part of the GRIN delta (worst relative error {report.worst_relative_error:.3g}"
            + (f", max logit difference {report.max_logit_diff:.3g}" if report.max_logit_diff is not None else "")
            + "): the merged model no longer behaves exactly like the adapter model. "
            "grin_peft.merge_dequantized(model) merges into a full-precision copy instead.",
            stacklevel=2,
        )
    return report


def merge_dequantized(peft_model, dtype: torch.dtype = torch.bfloat16) -> nn.Module:
    """A plain full-precision model: every quantized linear layer is dequantized and the deltas added exactly.

    Like `merge_and_unload`, this consumes the PeftModel. The result has no quantization config and saves as an
    ordinary transformers model.
    """
    tuner = peft_model.base_model
    replacements = {}
    for name, module in tuner.model.named_modules():
        if isinstance(module, GrinLayer):
            weight = module._grin_weight().detach().float().clone()
            flat = weight.view(-1)
            for adapter in module.active_adapters:
                if adapter in module.grin_values and module.grin_values[adapter].numel():
                    idx = module.grin_indices[adapter].long()
                    flat[idx] = flat[idx] + module.grin_values[adapter].detach().float()
            replacements[name] = (module.get_base_layer(), weight)
    model = tuner.unload()
    for name, module in list(model.named_modules()):
        if isinstance(module, BaseTunerLayer):
            continue
        backend = resolve_quantization_backend(module)
        if name in replacements or backend is not None:
            weight = replacements[name][1] if name in replacements else backend.get_base_weight(module).float()
            linear = nn.Linear(
                module.in_features,
                module.out_features,
                bias=module.bias is not None,
                dtype=dtype,
                device=weight.device,
            )
            with torch.no_grad():
                linear.weight.copy_(weight.to(dtype))
                if module.bias is not None:
                    linear.bias.copy_(module.bias.detach().to(dtype))
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    for param in model.parameters():
        if param.dtype.is_floating_point and param.dtype != dtype:
            param.data = param.data.to(dtype)
    config = getattr(model, "config", None)
    if config is not None and hasattr(config, "quantization_config"):
        del config.quantization_config
    for attr in ("is_quantized", "is_loaded_in_4bit", "is_loaded_in_8bit"):
        if hasattr(model, attr):
            setattr(model, attr, False)
    if hasattr(model, "hf_quantizer"):
        model.hf_quantizer = None
    return model
