"""A fingerprint of the base weights a delta was made for, so it is never silently applied to another model.

Two modes, recorded in the fingerprint itself so a loader recomputes the same kind:

* ``full:<sha256>`` (the default when the base holds at most `FULL_MAX_BYTES`, 16 GiB): every byte of every
  parameter and persistent buffer, streamed tensor by tensor, no copy on the CPU, at sha256's speed (1e9 bf16
  entries, 2 GB: 3.4 s on one shared CPU core, BENCHMARKS.md §7). It detects any change to any base weight.
* ``sampled:<sha256>`` (larger bases): names, shapes, dtypes and `SAMPLES_PER_TENSOR` evenly spaced values per
  tensor. It tells apart different checkpoints, fine-tunes and dtypes, but misses sparse edits: it caught 10 of 200
  single-entry edits of 256 x 256 weights (BENCHMARKS.md §7). A bare ``<sha256>`` (deltas from before the full
  mode) is a sampled fingerprint.

Either way a delta also records the exact base values at its own entries, which `load` and `revert` compare bit for
bit; the fingerprint covers everything else.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .bnb_layout import canonical_4bit
from .errors import GrinError

SAMPLES_PER_TENSOR = 4096
FULL_MAX_BYTES = 16 * 2**30  # 8B bf16 parameters: 8-27 s at the measured 0.6-2 GB/s; above it, sampled
MODES = ("full", "sampled")
CHUNK_BYTES = 1 << 26  # GPU tensors are copied to the CPU in pieces of this size
SHAPES_KEY = "grin_base_shapes"  # safetensors metadata: the adapted modules' base weight shapes


def base_parameters(model: nn.Module, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Parameters of the base model under their original names, looking through PEFT wrappers."""
    for name, param in model.named_parameters(recurse=False):
        canonical = canonical_4bit(param)
        yield prefix + name, param if canonical is None else canonical[0]
    for name, param in model.named_buffers(recurse=False):
        if name not in model._non_persistent_buffers_set:
            yield prefix + name, param
    for child_name, child in model.named_children():
        if isinstance(child, BaseTunerLayer):
            yield from base_parameters(child.get_base_layer(), f"{prefix}{child_name}.")
        elif isinstance(child, AuxiliaryTrainingWrapper):
            yield from base_parameters(child.original_module, f"{prefix}{child_name}.")
        else:
            yield from base_parameters(child, f"{prefix}{child_name}.")


def sample_positions(numel: int) -> torch.Tensor:
    """Evenly spaced flat positions, always including the first and last entry."""
    if numel <= SAMPLES_PER_TENSOR:
        return torch.arange(numel)
    return torch.linspace(0, numel - 1, SAMPLES_PER_TENSOR).round().long()


def default_mode(model: nn.Module) -> str:
    """ "full" unless the base is larger than `FULL_MAX_BYTES`, where hashing every byte costs tens of seconds."""
    total = sum(t.numel() * t.element_size() for _, t in base_parameters(model))
    return "full" if total <= FULL_MAX_BYTES else "sampled"


def mode_of(recorded: str) -> str:
    """The mode a recorded fingerprint was computed in (a bare digest is a sampled one, from before the full mode)."""
    mode, sep, _ = recorded.partition(":")
    return mode if sep and mode in MODES else "sampled"


def _with_overrides(flat: torch.Tensor, override: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    if override is None or not override[0].numel():
        return flat
    idx, values = override
    flat = flat.clone()
    flat[idx.long().to(flat.device)] = values.to(device=flat.device, dtype=flat.dtype)
    return flat


def _update_full(digest, flat: torch.Tensor) -> None:
    """Every byte of `flat`, streamed: CPU tensors without a copy, others in `CHUNK_BYTES` pieces."""
    if not flat.numel():
        return
    step = max(1, CHUNK_BYTES // flat.element_size())
    for piece in flat.split(step) if flat.device.type != "cpu" else (flat,):
        digest.update(piece.cpu().contiguous().view(torch.uint8).numpy())


def _update_sampled(digest, flat: torch.Tensor, override: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    positions = sample_positions(flat.numel())
    sample = flat[positions.to(flat.device)].cpu().clone()
    if override is not None and override[0].numel():
        idx, values = override[0].long().cpu(), override[1]
        where = torch.searchsorted(idx, positions).clamp(max=idx.numel() - 1)
        hit = idx[where] == positions
        sample[hit] = values.cpu().to(sample.dtype)[where[hit]]
    digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")


def fingerprint(
    model: nn.Module,
    overrides: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None,
    mode: str | None = None,
) -> str:
    """The base's fingerprint in `mode` ("full", "sampled"; default: `default_mode`), as ``<mode>:<sha256>``.

    `overrides` (name -> sorted flat indices, values) substitutes entries, which lets `revert` fingerprint the base
    that a merged model would become.
    """
    mode = mode or default_mode(model)
    if mode not in MODES:
        raise ValueError(f"fingerprint mode {mode!r} is not one of {', '.join(MODES)}.")
    overrides = overrides or {}
    digest = hashlib.sha256()
    for name, tensor in sorted(base_parameters(model), key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        if mode == "full":
            _update_full(digest, _with_overrides(flat, overrides.get(name)))
        else:
            _update_sampled(digest, flat, overrides.get(name))
    return f"{mode}:{digest.hexdigest()}"


def matches(
    model: nn.Module, recorded: str, overrides: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None
) -> bool:
    """Whether `model` (with `overrides`) has the recorded fingerprint, recomputed in the recorded mode."""
    mode = mode_of(recorded)
    computed = fingerprint(model, overrides, mode)
    return computed == recorded or computed.partition(":")[2] == recorded  # a bare digest: the sampled mode


def base_shape(module: nn.Module) -> tuple[int, ...] | None:
    """The stored shape of a linear layer's base weight (Conv1D stores (in, out)); None for anything else.

    Read from the layer's features, so quantized (packed) weights report their logical shape without dequantizing.
    """
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    if type(module).__name__ == "Conv1D":
        return tuple(module.weight.shape)
    features = (getattr(module, "out_features", None), getattr(module, "in_features", None))
    if all(isinstance(n, int) for n in features):
        return features
    return None


def adapted_shapes(peft_model: nn.Module) -> dict[str, list[int]]:
    """Module name -> base weight shape for every module GRIN adapts: saved with the delta (`SHAPES_KEY`)."""
    layers = peft_model.base_model.grin_layers()
    return {name: list(shape) for name, layer in sorted(layers.items()) if (shape := base_shape(layer)) is not None}


def check_shapes(model: nn.Module, metadata: dict[str, str] | None) -> None:
    """Refuse a base whose adapted weights have other shapes than the base the delta was made for, saying which:
    positions in a weight of another shape address other entries, whatever the fingerprint policy."""
    recorded = json.loads(metadata[SHAPES_KEY]) if metadata and SHAPES_KEY in metadata else {}
    differing = []
    for name, shape in sorted(recorded.items()):
        try:
            here = base_shape(model.get_submodule(name))
        except AttributeError:
            here = None
        if here is not None and list(here) != list(shape):
            differing.append(f"{name} is {tuple(here)} here, {tuple(shape)} in the delta's base")
    if differing:
        more = f" (and {len(differing) - 1} more modules)" if len(differing) > 1 else ""
        raise GrinError(
            f"this base's weights have other shapes than the base the delta was made for: {differing[0]}{more}; "
            "it is another model size or variant, and the delta cannot apply to it."
        )


def architecture(model: nn.Module) -> str:
    """model_type and class name: enough to tell a Llama delta from a GPT-2 one in an error message."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or "custom"
    return f"{model_type}:{type(model).__name__}"
