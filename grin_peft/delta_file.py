"""Reading and checking a saved GRIN delta, so a bad file is refused before any weight changes.

A delta file holds, per adapted module, `grin_indices` (flat positions into the base weight as stored),
`grin_values` (the delta) and `grin_base_values` (the base weight's values there, for exact revert). Keys follow
PEFT's layout: `base_model.model.<module path>.grin_<name>`.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import GrinError
from .layer import validate_entries

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
SUFFIXES = ("grin_indices", "grin_values", "grin_base_values")
CHECKSUM_KEY = "grin_sha256"


@dataclass
class ModuleDelta:
    """The three tensors of one module's delta."""

    indices: torch.Tensor
    values: torch.Tensor
    base_values: torch.Tensor


def checksum(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: detects corruption that still parses as safetensors."""
    digest = hashlib.sha256()
    for key in sorted(tensors):
        tensor = tensors[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        if tensor.numel():
            digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def atomic_save_file(tensors: dict[str, torch.Tensor], filename: str, metadata: dict[str, str] | None = None) -> None:
    """safetensors' save_file, but written to a temporary file and renamed: an interrupted save leaves the old file.

    GRIN deltas also get a checksum in the metadata, verified on load.
    """
    metadata = dict(metadata or {})
    if any(key.endswith(SUFFIXES) for key in tensors):
        metadata[CHECKSUM_KEY] = checksum(tensors)
    directory = os.path.dirname(os.path.abspath(filename))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def atomic_write_text(text: str, filename: str) -> None:
    """Write a small text file (the adapter config) by rename, like the weights."""
    directory = os.path.dirname(os.path.abspath(filename))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    try:
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def resolve_file(path_or_repo_id: str, filename: str, subfolder: str | None = None, **hub_kwargs) -> str:
    """A local path, or the file downloaded from the Hub (honours HF_ENDPOINT, revision, token)."""
    local_dir = os.path.join(path_or_repo_id, subfolder) if subfolder else path_or_repo_id
    local = os.path.join(local_dir, filename)
    if os.path.isfile(local):
        return local
    if os.path.isdir(local_dir):
        raise GrinError(f"{local_dir}: no {filename} in this directory.")
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(path_or_repo_id, filename, subfolder=subfolder, **hub_kwargs)
    except Exception as exc:  # the hub client raises many types; the user needs one message
        raise GrinError(f"cannot fetch {filename} from '{path_or_repo_id}': {exc}") from exc


def read_tensors(filename: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, with its checksum verified; corrupt or truncated files give GrinError."""
    try:
        with safe_open(filename, framework="pt", device="cpu") as handle:
            metadata = handle.metadata() or {}
            tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    except Exception as exc:
        raise GrinError(f"{filename}: not a readable safetensors file (truncated or corrupt): {exc}") from exc
    expected = metadata.get(CHECKSUM_KEY)
    if expected is not None and checksum(tensors) != expected:
        raise GrinError(f"{filename}: checksum mismatch, the file is corrupt.")
    return tensors


def read_config_dict(path_or_repo_id: str, subfolder: str | None = None, **hub_kwargs) -> dict:
    """The raw adapter_config.json, with a clear error when it is missing or not JSON."""
    filename = resolve_file(path_or_repo_id, "adapter_config.json", subfolder, **hub_kwargs)
    try:
        with open(filename) as handle:
            return json.load(handle)
    except (OSError, json.JSONDecodeError) as exc:
        raise GrinError(f"{filename}: not a readable adapter config: {exc}") from exc


def group_modules(tensors: dict[str, torch.Tensor]) -> tuple[dict[str, ModuleDelta], dict[str, torch.Tensor]]:
    """Split a delta state dict into per-module GRIN deltas and everything else (e.g. modules_to_save)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    others = {}
    for key, tensor in tensors.items():
        module, _, suffix = key.rpartition(".")
        if suffix in SUFFIXES:
            parts.setdefault(module.removeprefix(PEFT_PREFIX), {})[suffix] = tensor
        else:
            others[key] = tensor
    modules = {}
    for module, found in sorted(parts.items()):
        missing = [s for s in SUFFIXES if s not in found]
        if missing:
            raise GrinError(f"{module}: the delta file lacks tensor(s) {', '.join(missing)}.")
        modules[module] = ModuleDelta(found["grin_indices"], found["grin_values"], found["grin_base_values"])
    return modules, others


def validate_modules(
    modules: dict[str, ModuleDelta],
    weight_of: Callable[[str], torch.Tensor | None],
    describe_base: str,
    approximate: Callable[[str], bool] = lambda name: False,
) -> list[str]:
    """Check every module's delta against the base weights; returns the modules whose base values differ.

    Structural problems (unknown module, bad indices, NaN values, wrong dtypes) raise GrinError; differing base
    values are returned so the caller can apply the fingerprint policy. Modules for which `approximate` is true
    (dequantized bitsandbytes weights, whose float values depend on bnb's layout) skip the exact value checks.
    """
    differing = []
    for name, delta in modules.items():
        weight = weight_of(name)
        if weight is None:
            raise GrinError(
                f"{name}: the delta adapts a module this base model ({describe_base}) does not have; "
                "it was made for another architecture."
            )
        validate_entries(name, delta.indices, delta.values, weight.numel())
        base = delta.base_values
        if base.dim() != 1 or base.numel() != delta.indices.numel() or not base.dtype.is_floating_point:
            raise GrinError(
                f"{name}: grin_base_values must be a 1-D float tensor with one value per index, got "
                f"{base.dtype} {tuple(base.shape)}."
            )
        if approximate(name):
            continue
        if weight.dtype.is_floating_point and not torch.equal(base.to(weight.dtype).to(base.dtype), base):
            raise GrinError(
                f"{name}: grin_base_values are not representable in the base weight's dtype "
                f"{weight.dtype}; the delta was made for a base of another dtype."
            )
        if weight.dtype.is_floating_point and delta.indices.numel():
            current = weight.detach().reshape(-1)[delta.indices.long().to(weight.device)].cpu()
            if not torch.equal(current, base.to(weight.dtype)):
                differing.append(name)
    return differing
