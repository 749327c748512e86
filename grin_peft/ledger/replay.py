"""Requests as weight arithmetic: read a request's delta, check it against a model, and replay requests exactly.

A merged GRIN delta writes `new = (old.float() + value.float()).to(dtype)` at its entries, as `merge_and_unload`
does. The value at an entry after requests r1..rk is therefore a function of the entry's original value and of
the deltas of the requests that touch it, in order; entries no request touches keep their original values. So the
ledger keeps the original values of every entry any request touched (the *originals*), and the model after any
list of requests is: originals at those entries, then each request's arithmetic in order. That is what `revert`
writes, bit for bit, whatever the overlaps.
"""

from __future__ import annotations

import hashlib
import os
import re
from dataclasses import dataclass

import torch
from torch import nn

from ..config import GrinConfig
from ..delta_file import (
    WEIGHTS_NAME,
    ModuleDelta,
    decode_entries,
    group_modules,
    read_config_dict,
    read_tensors,
    resolve_file,
)
from ..errors import GrinError
from ..fingerprint import architecture, fingerprint
from .record import DeltaSource

Entries = dict[str, tuple[torch.Tensor, torch.Tensor]]  # weight key -> (sorted flat indices, values)


@dataclass
class RequestDelta:
    """A request's delta as read from its source, with the digest of the file the values came from."""

    source: DeltaSource
    sha256: str
    modules: dict[str, ModuleDelta]
    base_fingerprint: str | None
    base_architecture: str | None
    forget_description: str | None

    def bind(self, model: nn.Module) -> Entries:
        """Per weight key ("<module>.weight"), the delta's sorted flat indices and values, checked against `model`:
        the module exists, has a floating-point weight, the entries are valid for it and every value is finite."""
        bound = {}
        for name, delta in self.modules.items():
            try:
                weight = getattr(model.get_submodule(name), "weight", None)
            except AttributeError:
                weight = None
            if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
                raise GrinError(
                    f"{self.source.describe()}: {name}: no floating-point weight of that name in this model "
                    f"({architecture(model)}); the delta was made for another architecture."
                )
            indices = decode_entries(name, delta, weight.numel()).long()
            if not bool(torch.isfinite(delta.values.float()).all()):
                raise GrinError(f"{self.source.describe()}: {name}: NaN/Inf delta values.")
            bound[f"{name}.weight"] = (indices, delta.values)
        return bound


def _hub_commit(path: str) -> str | None:
    """The commit a file downloaded by huggingface_hub came from (its cache path holds snapshots/<commit>/)."""
    match = re.search(r"[/\\]snapshots[/\\]([0-9a-f]{40})[/\\]", path)
    return match.group(1) if match else None


def file_sha256(filename: str) -> str:
    """sha256 of a file's bytes, read in 16 MiB blocks."""
    digest = hashlib.sha256()
    with open(filename, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def resolve_source(delta: str, revision: str | None = None, subfolder: str | None = None) -> DeltaSource:
    """A local delta folder (recorded by absolute path) or a Hub repo pinned to the commit it resolves to now."""
    if os.path.isdir(delta):
        return DeltaSource(path=os.path.abspath(os.path.join(delta, subfolder) if subfolder else delta))
    filename = resolve_file(delta, WEIGHTS_NAME, subfolder, **({"revision": revision} if revision else {}))
    return DeltaSource(repo_id=delta, revision=_hub_commit(filename) or revision, subfolder=subfolder)


def read_delta(source: DeltaSource, expected_sha256: str | None = None) -> RequestDelta:
    """Read and check a request's delta: GRIN, checksum verified, GRIN tensors only, and (for a recorded request)
    byte-identical to the file the ledger recorded."""
    where, hub = (source.path, {}) if source.path else (source.repo_id, {"revision": source.revision})
    hub = {k: v for k, v in hub.items() if v}
    raw = read_config_dict(where, None if source.path else source.subfolder, **hub)
    if raw.get("peft_type") != "GRIN":
        raise GrinError(f"{source.describe()}: not a GRIN delta (peft_type={raw.get('peft_type')!r}).")
    config = GrinConfig.from_peft_type(**GrinConfig.check_kwargs(**raw))
    filename = resolve_file(where, WEIGHTS_NAME, None if source.path else source.subfolder, **hub)
    sha = file_sha256(filename)
    if expected_sha256 is not None and sha != expected_sha256:
        raise GrinError(
            f"{source.describe()}: the delta's {WEIGHTS_NAME} changed since it was applied (sha256 {sha[:12]}, the "
            f"ledger recorded {expected_sha256[:12]})."
        )
    modules, others = group_modules(read_tensors(filename))
    if others:
        raise GrinError(
            f"{source.describe()}: {sorted(others)[0]}: the ledger applies sparse GRIN tensors only, not "
            "modules_to_save copies."
        )
    if not modules:
        raise GrinError(f"{source.describe()}: the delta holds no GRIN entries.")
    return RequestDelta(
        source, sha, modules, config.base_model_fingerprint, config.base_model_architecture, config.forget_description
    )


def weight_of(model: nn.Module, key: str) -> torch.Tensor:
    """The model's tensor for a weight key such as "model.layers.0.mlp.up_proj.weight"."""
    return model.get_parameter(key)


def extend_originals(model: nn.Module, originals: Entries, delta: Entries) -> Entries:
    """Originals grown by the delta's entries that no earlier request touched, with the model's values there now
    (which are original: only requests change ledger entries, and the caller checked the weights are the ledger's)."""
    out = dict(originals)
    for key, (idx, _) in delta.items():
        flat = weight_of(model, key).detach().reshape(-1)
        known, known_values = originals.get(key, (torch.zeros(0, dtype=torch.long), flat[:0].cpu()))
        new = idx[~torch.isin(idx, known)]
        merged = torch.cat([known, new])
        order = torch.argsort(merged)
        values = torch.cat([known_values, flat[new.to(flat.device)].cpu()])
        out[key] = (merged[order], values[order])
    return out


def step(state: dict[str, torch.Tensor], originals: Entries, delta: Entries) -> dict[str, torch.Tensor]:
    """The values at the originals' entries after merging one more delta: merge_and_unload's arithmetic."""
    out = dict(state)
    for key, (idx, values) in delta.items():
        known = originals[key][0]
        pos = torch.searchsorted(known, idx)
        current = out[key].clone()
        current[pos] = (current[pos].float() + values.float()).to(current.dtype)
        out[key] = current
    return out


def replay(originals: Entries, deltas: list[Entries]) -> list[dict[str, torch.Tensor]]:
    """States (values at the originals' entries) of the original model, then after each delta in order."""
    states = [{key: values.clone() for key, (_, values) in originals.items()}]
    for delta in deltas:
        states.append(step(states[-1], originals, delta))
    return states


def fingerprint_of(model: nn.Module, originals: Entries, state: dict[str, torch.Tensor]) -> str:
    """The model's fingerprint if its ledger entries held `state` (no weight is written)."""
    return fingerprint(model, {key: (originals[key][0], state[key]) for key in state})


def write_state(model: nn.Module, originals: Entries, state: dict[str, torch.Tensor]) -> None:
    """Put `state` into the model's weights at the originals' entries."""
    with torch.no_grad():
        for key, values in state.items():
            weight = weight_of(model, key)
            weight.data.view(-1)[originals[key][0].to(weight.device)] = values.to(weight.device)


def differing_entries(model: nn.Module, originals: Entries, state: dict[str, torch.Tensor]) -> dict[str, int]:
    """Per weight key, how many ledger entries of the model differ from `state` (bit for bit)."""
    out = {}
    for key, values in state.items():
        if not values.numel():
            continue
        current = weight_of(model, key).detach().reshape(-1)[originals[key][0]].cpu()
        same = current.view(torch.uint8).reshape(current.numel(), -1) == values.view(torch.uint8).reshape(
            values.numel(), -1
        )
        count = int((~same.all(1)).sum())
        if count:
            out[key] = count
    return out


def uncovered(originals: Entries, delta: Entries) -> str | None:
    """The first weight key where a delta has entries without a recorded original value (None: all covered)."""
    for key, (idx, _) in delta.items():
        if key not in originals or not bool(torch.isin(idx, originals[key][0]).all()):
            return key
    return None
