"""Quantization attack (Zhang et al., ICLR 2025): reload the unlearned model with bitsandbytes 8-bit, 4-bit NF4 or
4-bit FP4 layers and see whether the forgotten answers come back.

A 4-bit layer stores each block of 64 weights as one scale (the block's absolute maximum) times one of 16 levels;
a change smaller than the gap between the levels it falls between usually rounds back to the original level.
:func:`change_vs_bin_width` measures that per module: the size of the unlearning change relative to the local
4-bit bin width, and the share of changed entries whose 4-bit copy keeps at least half of the change.
"""

from __future__ import annotations

import copy
import tempfile
from typing import Any

import torch
from torch import nn

from ..errors import GrinError
from .names import MODES

BLOCKSIZE = 64  # bitsandbytes' default 4-bit block


def _bnb() -> Any:
    try:
        import bitsandbytes.functional as functional
    except ImportError:
        raise GrinError("the quantization attack needs bitsandbytes: pip install bitsandbytes.") from None
    return functional


def plain_model(model: nn.Module) -> nn.Module:
    """A merged, adapter-free copy of ``model`` (GRIN or LoRA adapters merged in; a plain model copied)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        return copy.deepcopy(model).merge_and_unload()
    return copy.deepcopy(model)


def quantize(model: nn.Module, mode: str) -> nn.Module:
    """``model`` (adapters merged) reloaded through transformers with bitsandbytes layers of ``mode``, as a user
    loading it with ``BitsAndBytesConfig`` would get it (``lm_head`` stays in full precision, as transformers
    keeps it). Compute dtype = the model's own dtype. Raises GrinError for a model that cannot be quantized."""
    from transformers import BitsAndBytesConfig, PreTrainedModel
    from transformers.utils import logging as hf_logging

    if mode not in MODES:
        raise GrinError(f"unknown quantization mode {mode!r}; choose from {list(MODES)}.")
    _bnb()
    merged = plain_model(model)
    if not isinstance(merged, PreTrainedModel):
        raise GrinError(
            f"a {type(merged).__name__} cannot be quantized: the attack reloads a transformers PreTrainedModel "
            "with bitsandbytes layers."
        )
    dtype, device = next(merged.parameters()).dtype, next(merged.parameters()).device
    placement = {"device_map": {"": device}} if device.type == "cuda" else {}  # CUDA kernels where the model is
    if mode == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True)
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=mode, bnb_4bit_compute_dtype=dtype)
    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # a save and a load per mode: their bars would bury the audit's lines
    with tempfile.TemporaryDirectory() as work:
        try:
            merged.save_pretrained(work)
            quantized = type(merged).from_pretrained(work, quantization_config=config, dtype=dtype, **placement)
        except Exception as exc:  # any refusal of transformers or bitsandbytes is this model's failure
            first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise GrinError(f"the model cannot be quantized to {mode} with bitsandbytes: {first}") from exc
        finally:
            if bars:
                hf_logging.enable_progress_bar()
    if not quantized_modules(quantized):
        raise GrinError(f"the model cannot be quantized to {mode}: bitsandbytes replaced none of its layers.")
    try:  # some layouts load but fail at the first forward (CPU 4-bit needs rows a multiple of the block)
        with torch.no_grad():
            quantized(input_ids=torch.zeros((1, 2), dtype=torch.long, device=quantized.device))
    except Exception as exc:
        first = str(exc).splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise GrinError(f"the model cannot run quantized to {mode} with bitsandbytes: {first}") from exc
    return quantized.eval()


def quantized_modules(model: nn.Module) -> list[str]:
    """Names of the bitsandbytes linear layers in ``model``."""
    import bitsandbytes as bnb

    kinds = (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)
    return [name for name, module in model.named_modules() if isinstance(module, kinds)]


def _roundtrip(weight: torch.Tensor, quant_type: str) -> torch.Tensor:
    functional = _bnb()
    codes, state = functional.quantize_4bit(weight.float().contiguous(), blocksize=BLOCKSIZE, quant_type=quant_type)
    return functional.dequantize_4bit(codes, state).view_as(weight)


def bin_width(weight: torch.Tensor, quant_type: str = "nf4") -> torch.Tensor:
    """Per entry, the gap between the two 4-bit levels its value falls between, times its block's scale: the
    smallest change that is sure to move it to another level when it sits at a level."""
    functional = _bnb()
    levels = functional.get_4bit_type(quant_type, device="cpu").float().sort().values.unique()
    flat = weight.detach().float().reshape(-1).cpu()
    pad = (-flat.numel()) % BLOCKSIZE
    blocks = torch.nn.functional.pad(flat, (0, pad)).view(-1, BLOCKSIZE)
    scale = blocks.abs().amax(dim=1, keepdim=True).clamp_min(torch.finfo(torch.float32).tiny)
    position = torch.bucketize(blocks / scale, levels).clamp(1, len(levels) - 1)
    gap = levels[position] - levels[position - 1]
    return (gap * scale).reshape(-1)[: flat.numel()].view(weight.shape)


def _kept(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor, changed: torch.Tensor, qt: str) -> float:
    """Share of changed entries whose 4-bit copy keeps at least half of the change, in its direction (a block
    scale nudged by a changed maximum shifts every entry a little; that is not the change surviving)."""
    kept_delta = (_roundtrip(after, qt) - _roundtrip(before, qt))[changed]
    wanted = delta[changed]
    survived = (torch.sign(kept_delta) == torch.sign(wanted)) & (kept_delta.abs() >= 0.5 * wanted.abs())
    return float(survived.float().mean())


def _projection_kept(before: torch.Tensor, after: torch.Tensor, delta: torch.Tensor, qt: str) -> float:
    """How much of the change, as a whole, the 4-bit copies keep: ``<Q(after) - Q(before), delta> / |delta|^2``.
    1 when rounding keeps it on average (entries that cross a level carry a whole bin and make up for those that
    round back), 0 when the two 4-bit copies agree along it."""
    kept_delta = _roundtrip(after, qt) - _roundtrip(before, qt)
    return float((kept_delta * delta).sum() / (delta * delta).sum())


def change_vs_bin_width(original: nn.Module, unlearned: nn.Module, modules: list[str]) -> list[dict[str, Any]]:
    """Per module in ``modules`` (names shared by both plain models): entries the unlearning changed, the mean,
    median and 90th percentile of |change| / NF4 bin width at the original entry, the share of changed entries
    below half a bin, the share whose NF4 and FP4 copies keep at least half of the change (:func:`_kept`), and
    the share of the change as a whole that they keep (:func:`_projection_kept`; ``change_sq``, the squared
    norm of the change, weights it across modules)."""
    rows = []
    for name in modules:
        before = original.get_submodule(name).weight.detach().float().cpu()
        after = unlearned.get_submodule(name).weight.detach().float().cpu()
        if before.shape != after.shape:
            raise GrinError(f"module {name}: original weight {tuple(before.shape)} vs unlearned {tuple(after.shape)}.")
        delta = after - before
        changed = delta != 0
        count = int(changed.sum())
        row: dict[str, Any] = {"module": name, "entries": before.numel(), "changed": count}
        if count:
            ratio = (delta.abs() / bin_width(before, "nf4"))[changed]
            row.update(
                mean_change_over_bin=float(ratio.mean()),
                median_change_over_bin=float(ratio.median()),
                p90_change_over_bin=float(torch.quantile(ratio, 0.9)),
                below_half_bin=float((ratio < 0.5).float().mean()),
                **{f"kept_by_{qt}": _kept(before, after, delta, changed, qt) for qt in ("nf4", "fp4")},
                **{f"projection_kept_{qt}": _projection_kept(before, after, delta, qt) for qt in ("nf4", "fp4")},
                change_sq=float((delta * delta).sum()),
            )
        rows.append(row)
    return rows
