"""A fingerprint of the base weights a delta was made for, so it is never silently applied to another model.

Hashing every byte of a 7B model costs tens of seconds, so the fingerprint hashes each parameter's name, shape,
dtype and a fixed, evenly spaced sample of up to `SAMPLES_PER_TENSOR` of its values. That tells apart different
checkpoints, fine-tunes and dtypes with overwhelming probability; a delta also records the exact base values at
its own entries, which `load` and `revert` compare bit for bit.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterator

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from torch import nn

from .bnb_layout import canonical_4bit

SAMPLES_PER_TENSOR = 4096


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


def fingerprint(model: nn.Module, overrides: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None) -> str:
    """sha256 over the sampled base weights; `overrides` (name -> sorted flat indices, values) substitutes entries,
    which lets `revert` fingerprint the base that a merged model would become."""
    overrides = overrides or {}
    digest = hashlib.sha256()
    for name, tensor in sorted(base_parameters(model), key=lambda item: item[0]):
        digest.update(f"{name}|{tuple(tensor.shape)}|{tensor.dtype}".encode())
        flat = tensor.detach().reshape(-1)
        positions = sample_positions(flat.numel())
        sample = flat[positions.to(flat.device)].cpu().clone()
        if name in overrides:
            idx, values = overrides[name]
            idx = idx.long().cpu()
            if idx.numel():
                where = torch.searchsorted(idx, positions).clamp(max=idx.numel() - 1)
                hit = idx[where] == positions
                sample[hit] = values.cpu().to(sample.dtype)[where[hit]]
        digest.update(sample.view(torch.uint8).numpy().tobytes() if sample.numel() else b"")
    return digest.hexdigest()


def architecture(model: nn.Module) -> str:
    """model_type and class name: enough to tell a Llama delta from a GPT-2 one in an error message."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None) or "custom"
    return f"{model_type}:{type(model).__name__}"
