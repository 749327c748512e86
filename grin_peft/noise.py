"""Gaussian noise written into the delta after selection: part of the delta, so it is saved, shared and reverted."""

from __future__ import annotations

import zlib

import torch

from .errors import GrinError


def module_generator(seed: int, module_name: str, purpose: str) -> torch.Generator:
    """A CPU generator whose stream depends only on (seed, module, purpose), not on iteration order or threads."""
    key = zlib.crc32(f"{purpose}:{module_name}".encode())
    generator = torch.Generator(device="cpu")
    generator.manual_seed((int(seed) * 1_000_003 + key) % (2**63 - 1))
    return generator


def noise_values(
    weight: torch.Tensor,
    indices: torch.Tensor,
    std: float,
    scale: str,
    seed: int,
    module_name: str,
    purpose: str = "noise",
) -> torch.Tensor:
    """Noise for the selected entries of one weight, in float32.

    scale='absolute': N(0, std^2); 'weight': std * |w_i| * N(0, 1) per entry; 'tensor_std': std * std(W) * N(0, 1).
    ``purpose`` names the random stream (re-localisation draws a fresh one per growth step).
    """
    n = indices.numel()
    if std == 0 or n == 0:
        return torch.zeros(n, dtype=torch.float32)
    standard = torch.randn(n, generator=module_generator(seed, module_name, purpose), dtype=torch.float32)
    if scale == "absolute":
        factor = torch.tensor(float(std))
    elif scale == "weight":
        factor = std * weight.detach().reshape(-1)[indices.to(weight.device).long()].float().abs().cpu()
    elif scale == "tensor_std":
        factor = std * weight.detach().float().std().cpu()
    else:
        raise GrinError(f"noise_scale={scale!r} is not one of absolute, weight, tensor_std.")
    return standard * factor
