"""Reading and checking a saved GRIN delta, so a bad file is refused before any weight changes.

A delta file holds, per adapted module, its entries (flat positions into the base weight as stored), `grin_values`
(the delta, in entry order) and `grin_base_values` (the base weight's values there, for exact revert). Keys follow
PEFT's layout: `base_model.model.<module path>.grin_<name>`.

The entries are stored in whichever of two forms is smaller for that module, never both:

* `grin_indices`: int32 (int64 for weights over 2**31 entries) strictly increasing flat positions, 4 bytes an entry;
* `grin_mask`: a packed bitmask, uint8, ceil(numel / 8) bytes; flat position i is bit (i % 8) of byte i // 8, least
  significant bit first (numpy's `packbits(bitorder="little")`); bits past numel are zero.

The mask is smaller above 1/32 = 3.1% density (int32). Files from before the mask form hold only `grin_indices`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import struct
import tempfile
import warnings
from collections.abc import Callable
from contextvars import ContextVar
from dataclasses import dataclass

import safetensors.torch
import torch
from safetensors.torch import save_file

from .atomic_folder import apply_umask
from .errors import GrinError
from .layer import VALUE_DTYPES, index_dtype, validate_entries

WEIGHTS_NAME = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."
ENTRY_FORMS = ("grin_indices", "grin_mask")
SUFFIXES = (*ENTRY_FORMS, "grin_values", "grin_base_values")
CHECKSUM_KEY = "grin_sha256"
SAVE_METADATA: ContextVar[dict[str, str] | None] = ContextVar("grin_save_metadata", default=None)  # set by a save


@dataclass
class ModuleDelta:
    """One module's delta as stored: its entries in one of the two forms, the values and the base values."""

    values: torch.Tensor
    base_values: torch.Tensor
    indices: torch.Tensor | None = None
    mask: torch.Tensor | None = None


def mask_bytes(numel: int) -> int:
    """Length of the packed bitmask of a weight with `numel` entries."""
    return math.ceil(numel / 8)


def pack_mask(indices: torch.Tensor, numel: int) -> torch.Tensor:
    """Flat positions -> the packed little-endian bitmask (uint8, ceil(numel / 8) bytes) described above."""
    bits = torch.zeros(mask_bytes(numel) * 8, dtype=torch.uint8, device=indices.device)
    bits[indices.long()] = 1
    weights = torch.tensor([1 << b for b in range(8)], dtype=torch.uint8, device=indices.device)
    return (bits.view(-1, 8) * weights).sum(1, dtype=torch.uint8)


def encode_entries(indices: torch.Tensor, numel: int) -> tuple[str, torch.Tensor]:
    """The smaller stored form of a module's entries: ("grin_indices", indices) or ("grin_mask", bitmask).

    Ties keep the index form, which every version of the loader reads.
    """
    if mask_bytes(numel) < indices.numel() * indices.element_size():
        return "grin_mask", pack_mask(indices, numel)
    return "grin_indices", indices


def _unpack_mask(name: str, mask: torch.Tensor, numel: int, num_values: int) -> torch.Tensor:
    """Bitmask -> flat positions, refusing any mask that is not exactly the packed form of `num_values` entries."""
    if mask.dtype != torch.uint8:
        raise GrinError(f"{name}: grin_mask must be a packed uint8 bitmask, got dtype {mask.dtype}.")
    if mask.dim() != 1 or mask.numel() != mask_bytes(numel):
        raise GrinError(
            f"{name}: grin_mask must be 1-D with ceil({numel} / 8) = {mask_bytes(numel)} bytes for this weight, "
            f"got shape {tuple(mask.shape)}."
        )
    shifts = torch.arange(8, dtype=torch.uint8, device=mask.device)
    bits = ((mask.unsqueeze(1) >> shifts) & 1).reshape(-1)
    if bool(bits[numel:].any()):
        raise GrinError(f"{name}: grin_mask has bits set past the weight's {numel} entries.")
    indices = bits.nonzero().squeeze(1)  # ascending: strictly increasing by construction
    if indices.numel() != num_values:
        raise GrinError(f"{name}: grin_mask marks {indices.numel()} entries but there are {num_values} values.")
    return indices.to(index_dtype(numel))


def decode_entries(name: str, delta: ModuleDelta, numel: int) -> torch.Tensor:
    """The flat positions of a stored module delta, validated with its values and base values for a weight of
    `numel` entries: every reader (load, pre-injection check, revert) goes through this one decoder."""
    if delta.mask is not None:
        indices = _unpack_mask(name, delta.mask, numel, delta.values.numel())
    else:
        indices = delta.indices
    validate_entries(name, indices, delta.values, numel)
    base = delta.base_values
    if base.dim() != 1 or base.numel() != indices.numel() or base.dtype not in VALUE_DTYPES:
        raise GrinError(
            f"{name}: grin_base_values must be a 1-D float16/bfloat16/float32/float64 tensor with one value per "
            "entry, got "
            f"{base.dtype} {tuple(base.shape)}."
        )
    return indices


def with_indices(state_dict: dict[str, torch.Tensor], entries: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict with every module's bitmask replaced by its decoded `grin_indices`, the form layers hold."""
    out = {}
    for key, tensor in state_dict.items():
        if key.endswith(".grin_mask"):
            module = key.removesuffix(".grin_mask")
            out[f"{module}.grin_indices"] = entries[module.removeprefix(PEFT_PREFIX)]
        else:
            out[key] = tensor
    return out


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
        metadata.update(SAVE_METADATA.get() or {})
        metadata[CHECKSUM_KEY] = checksum(tensors)
    directory = os.path.dirname(os.path.abspath(filename))
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=directory)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        apply_umask(tmp)
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
        apply_umask(tmp)
        with os.fdopen(fd, "w") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, filename)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


FILE_SUFFIXES = (".json", ".jsonl", ".txt", ".csv", ".parquet", ".safetensors", ".bin")  # files, never Hub ids
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[A-Za-z0-9][\w.-]*)?$")


def looks_local(path_or_repo_id: str) -> bool:
    """Whether a name can only mean a local path: it is not a Hub id (`name` or `owner/name`), or it starts with a
    folder that exists here (`runs/delta` when `runs/` exists). Such a name never triggers a Hub lookup."""
    text = str(path_or_repo_id)
    if not _HUB_ID.match(text) or ".." in text or "--" in text or text.endswith(FILE_SUFFIXES):
        return True
    return "/" in text and os.path.isdir(text.split("/", 1)[0])


def resolve_file(
    path_or_repo_id: str, filename: str, subfolder: str | None = None, optional: bool = False, **hub_kwargs
) -> str | None:
    """A local path, or the file downloaded from the Hub (honours HF_ENDPOINT, HF_HUB_OFFLINE, revision, token).

    A name that can only be a local path and does not exist fails at once ("no such file or directory"); only Hub
    ids are looked up. With `optional`, a file the folder or repo does not have gives None.
    """
    local_dir = os.path.join(path_or_repo_id, subfolder) if subfolder else path_or_repo_id
    local = os.path.join(local_dir, filename)
    if os.path.isfile(local):
        return local
    if os.path.isdir(local_dir):
        if optional:
            return None
        raise GrinError(f"{local_dir}: no {filename} in this directory.")
    if os.path.exists(local_dir) or looks_local(path_or_repo_id):
        what = "is a file, not a directory" if os.path.exists(local_dir) else "no such file or directory"
        raise GrinError(f"{local_dir}: {what} (and not a Hub repo id).")
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return hf_hub_download(path_or_repo_id, filename, subfolder=subfolder, **hub_kwargs)
    except (EntryNotFoundError, LocalEntryNotFoundError) as exc:
        if optional:
            return None
        raise GrinError(
            f"cannot fetch {filename} from '{path_or_repo_id}': not in the repo (or, offline, not cached)."
        ) from exc
    except Exception as exc:  # the hub client raises many types; the user needs one message
        raise GrinError(f"cannot fetch {filename} from '{path_or_repo_id}': {exc}") from exc


@dataclass
class DeltaRead:
    """One read of a delta file: its tensors, the sha256 of the bytes they were parsed from, and its metadata."""

    tensors: dict[str, torch.Tensor]
    sha256: str
    metadata: dict[str, str]


def _metadata(data: bytes) -> dict[str, str]:
    """The `__metadata__` of a safetensors header (an 8-byte length, then JSON)."""
    (length,) = struct.unpack("<Q", data[:8])
    metadata = json.loads(data[8 : 8 + length]).get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("__metadata__ is not an object")
    return metadata


def read_delta_file(filename: str) -> DeltaRead:
    """Read a safetensors file once: hash those bytes, parse those bytes, verify the checksum on what was parsed.

    Corrupt or truncated files give GrinError; the tensors are exactly the bytes the sha256 covers.
    """
    try:
        with open(filename, "rb") as handle:
            data = handle.read()
        metadata = _metadata(data)
        tensors = safetensors.torch.load(data)
    except Exception as exc:
        raise GrinError(f"{filename}: not a readable safetensors file (truncated or corrupt): {exc}") from exc
    digest = hashlib.sha256(data).hexdigest()
    del data
    expected = metadata.get(CHECKSUM_KEY)
    if expected is None and any(key.endswith(SUFFIXES) for key in tensors):
        warnings.warn(
            f"{filename}: a GRIN delta without a {CHECKSUM_KEY} checksum (not written by grin_peft's save); "
            "corruption that still parses cannot be detected.",
            UserWarning,
            stacklevel=2,
        )
    if expected is not None and checksum(tensors) != expected:
        raise GrinError(f"{filename}: checksum mismatch, the file is corrupt.")
    return DeltaRead(tensors, digest, metadata)


def read_tensors(filename: str) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors file, read once, with its checksum verified (see `read_delta_file`)."""
    return read_delta_file(filename).tensors


def read_config_dict(path_or_repo_id: str, subfolder: str | None = None, **hub_kwargs) -> dict:
    """The raw adapter_config.json, with a clear error when it is missing or not JSON."""
    return parse_config(*read_config_bytes(path_or_repo_id, subfolder, **hub_kwargs))


def read_config_bytes(path_or_repo_id: str, subfolder: str | None = None, **hub_kwargs) -> tuple[str, bytes]:
    """Where adapter_config.json was found and its bytes, read once (they are hashed for the manifest)."""
    filename = resolve_file(path_or_repo_id, "adapter_config.json", subfolder, **hub_kwargs)
    try:
        with open(filename, "rb") as handle:
            return filename, handle.read()
    except OSError as exc:
        raise GrinError(f"{filename}: not a readable adapter config: {exc}") from exc


def parse_config(filename: str, data: bytes) -> dict:
    """A config's bytes as a JSON object, or a GrinError naming the file."""
    try:
        raw = json.loads(data.decode())
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GrinError(f"{filename}: not a readable adapter config: {exc}") from exc
    if not isinstance(raw, dict):
        raise GrinError(f"{filename}: an adapter config must be a JSON object, got {type(raw).__name__}.")
    return raw


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
        if all(form in found for form in ENTRY_FORMS):
            raise GrinError(f"{module}: the delta file holds both grin_indices and grin_mask; one form per module.")
        missing = [s for s in ("grin_values", "grin_base_values") if s not in found]
        if not any(form in found for form in ENTRY_FORMS):
            missing.insert(0, "grin_indices (or grin_mask)")
        if missing:
            raise GrinError(f"{module}: the delta file lacks tensor(s) {', '.join(missing)}.")
        modules[module] = ModuleDelta(
            found["grin_values"], found["grin_base_values"], found.get("grin_indices"), found.get("grin_mask")
        )
    return modules, others


def validate_modules(
    modules: dict[str, ModuleDelta],
    weight_of: Callable[[str], torch.Tensor | None],
    describe_base: str,
    approximate: Callable[[str], bool] = lambda name: False,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Check every module's delta against the base weights; returns each module's decoded entries and the modules
    whose base values differ.

    Structural problems (unknown module, bad entries, NaN values, wrong dtypes) raise GrinError; differing base
    values are returned so the caller can apply the fingerprint policy. Modules for which `approximate` is true
    (dequantized bitsandbytes weights, whose float values depend on bnb's layout) skip the exact value checks.
    """
    entries, differing = {}, []
    for name, delta in modules.items():
        weight = weight_of(name)
        if weight is None:
            raise GrinError(
                f"{name}: the delta adapts a module this base model ({describe_base}) does not have; "
                "it was made for another architecture."
            )
        indices = entries[name] = decode_entries(name, delta, weight.numel())
        base = delta.base_values
        if approximate(name):
            continue
        if weight.dtype.is_floating_point and not torch.equal(base.to(weight.dtype).to(base.dtype), base):
            raise GrinError(
                f"{name}: grin_base_values are not representable in the base weight's dtype "
                f"{weight.dtype}; the delta was made for a base of another dtype."
            )
        if weight.dtype.is_floating_point and indices.numel():
            current = weight.detach().reshape(-1)[indices.long().to(weight.device)].cpu()
            if not torch.equal(current, base.to(weight.dtype)):
                differing.append(name)
    return entries, differing
