"""The ledger's files on disk: the model's weight files (patched tensor by tensor), the originals file and the lock.

Weight files are rewritten only where a request changed a tensor, to a temporary file beside the original that an
operation renames into place once everything is ready (see `Ledger` for the commit protocol). Every other tensor,
the metadata and every other file of the model folder are left byte for byte as they were.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
import time
from collections.abc import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from ..delta_file import atomic_save_file, read_tensors
from ..errors import GrinError
from .record import LEDGER_DIR
from .replay import Entries, file_sha256

LOCK_NAME = ".grin_ledger.lock"
INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"


def weight_files(folder: str) -> list[str]:
    """The model's safetensors weight files (names relative to the folder): one file, or the shards of an index."""
    index = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index):
        try:
            with open(index) as handle:
                shards = sorted(set(json.load(handle)["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
            raise GrinError(f"{index}: not a readable safetensors index ({exc}).") from exc
        return shards
    if os.path.isfile(os.path.join(folder, SINGLE_NAME)):
        return [SINGLE_NAME]
    raise GrinError(
        f"{folder}: no {SINGLE_NAME} or {INDEX_NAME}; the ledger works on a model folder saved as safetensors "
        "(save_pretrained)."
    )


def digests(folder: str) -> dict[str, str]:
    """sha256 of every weight file, by name; a missing shard is a GrinError."""
    out = {}
    for name in weight_files(folder):
        path = os.path.join(folder, name)
        if not os.path.isfile(path):
            raise GrinError(f"{path}: a weight file the model folder lists is missing.")
        out[name] = file_sha256(path)
    return out


def key_files(folder: str, keys: list[str]) -> dict[str, str]:
    """Which weight file holds each tensor key; a key in none of them is a GrinError."""
    where = {}
    for name in weight_files(folder):
        with safe_open(os.path.join(folder, name), framework="pt") as handle:
            where.update({key: name for key in handle.keys()})
    missing = [key for key in keys if key not in where]
    if missing:
        raise GrinError(
            f"{missing[0]}: no tensor of that name in the model's weight files (tied or renamed weights cannot be "
            "ledgered)."
        )
    return {key: where[key] for key in keys}


def write_patched(folder: str, name: str, updates: dict[str, torch.Tensor]) -> str:
    """A temporary copy of weight file `name` with `updates` replacing tensors of the same dtype and shape; returns
    its path (the caller renames it into place or removes it)."""
    path = os.path.join(folder, name)
    with safe_open(path, framework="pt") as handle:
        metadata = handle.metadata()
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
    for key, tensor in updates.items():
        old = tensors[key]
        if old.dtype != tensor.dtype or old.shape != tensor.shape:
            raise GrinError(
                f"{key}: the loaded model holds {tensor.dtype} {tuple(tensor.shape)}, the file {old.dtype} "
                f"{tuple(old.shape)}; refusing to change the stored dtype."
            )
        tensors[key] = tensor.detach().cpu().contiguous()
    fd, tmp = tempfile.mkstemp(prefix=f".{name}.", suffix=".grin-tmp", dir=folder)
    os.close(fd)
    try:
        save_file(tensors, tmp, metadata=metadata)
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
    except BaseException:
        os.remove(tmp)
        raise
    return tmp


def originals_name(sha: str) -> str:
    """Where originals with this content digest live, relative to the model folder (content-addressed, so a new
    file never overwrites the one the committed ledger points to)."""
    return os.path.join(LEDGER_DIR, f"base-{sha[:16]}.safetensors")


def save_originals(folder: str, originals: Entries) -> dict[str, object]:
    """Write the originals file (if this content is not there already); returns the ledger's base_values field."""
    tensors = {}
    for key, (idx, values) in originals.items():
        tensors[f"{key}.indices"] = idx.contiguous()
        tensors[f"{key}.values"] = values.contiguous()
    os.makedirs(os.path.join(folder, LEDGER_DIR), exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".base-", suffix=".safetensors", dir=os.path.join(folder, LEDGER_DIR))
    os.close(fd)
    try:
        atomic_save_file(tensors, tmp)
        sha = file_sha256(tmp)
        os.replace(tmp, os.path.join(folder, originals_name(sha)))
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)
    entries = sum(int(idx.numel()) for idx, _ in originals.values())
    return {"file": originals_name(sha), "sha256": sha, "entries": entries}


def load_originals(folder: str, info: dict[str, object]) -> Entries:
    """The originals the ledger points to, refused if the file is missing or not byte-identical."""
    if not info:
        return {}
    path = os.path.join(folder, str(info.get("file")))
    if not os.path.isfile(path):
        raise GrinError(f"{path}: the ledger's original base values are missing; revert and verify need them.")
    if file_sha256(path) != info.get("sha256"):
        raise GrinError(f"{path}: the ledger's original base values changed on disk (sha256 mismatch).")
    tensors = read_tensors(path)
    out = {}
    for key in sorted(k.removesuffix(".indices") for k in tensors if k.endswith(".indices")):
        out[key] = (tensors[f"{key}.indices"].long(), tensors[f"{key}.values"])
    return out


def remove_unused_originals(folder: str, keep: str | None) -> None:
    """Delete originals files other than the one the committed ledger points to."""
    directory = os.path.join(folder, LEDGER_DIR)
    if not os.path.isdir(directory):
        return
    for name in os.listdir(directory):
        if name.startswith("base-") and os.path.join(LEDGER_DIR, name) != keep:
            os.remove(os.path.join(directory, name))


@contextlib.contextmanager
def locked(folder: str, timeout: float | None = None, shared: bool = False) -> Iterator[None]:
    """Hold the folder's ledger lock (flock on `.grin_ledger.lock`): exclusive for apply/revert, shared for
    show/verify, so no two operations interleave and no reader sees a half-done one. Waits up to `timeout` seconds
    (None: as long as it takes)."""
    import fcntl  # POSIX only: imported here so that the rest of grin_peft (and its CLI) still loads elsewhere

    if not os.path.isdir(folder):
        raise GrinError(f"{folder}: no such model folder.")
    path = os.path.join(folder, LOCK_NAME)
    try:
        handle = open(path, "a+")
    except OSError as exc:
        if shared:  # a read-only folder can still be shown and verified
            yield
            return
        raise GrinError(f"{path}: cannot create the ledger lock ({exc}).") from exc
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    deadline = None if timeout is None else time.monotonic() + timeout
    try:
        while True:
            try:
                fcntl.flock(handle.fileno(), mode | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if deadline is not None and time.monotonic() >= deadline:
                    raise GrinError(
                        f"{folder}: another ledger operation holds the lock (waited {timeout:g}s); try again later."
                    ) from None
                time.sleep(0.05)
        yield
    finally:
        handle.close()  # closing releases the lock
