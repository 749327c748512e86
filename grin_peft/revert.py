"""Exact undo of a merged GRIN delta: put back the recorded base values, bit for bit."""

from __future__ import annotations

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from torch import nn

from .config import GrinConfig
from .delta_file import (
    PEFT_PREFIX,
    WEIGHTS_NAME,
    decode_entries,
    group_modules,
    parse_config,
    read_config_bytes,
    read_delta_file,
    resolve_file,
)
from .errors import GrinError, remedy
from .fingerprint import architecture, matches
from .loading import check_delta_folder


def revert(
    merged_model: nn.Module,
    path_or_repo_id: str,
    *,
    subfolder: str | None = None,
    force: bool = False,
    expected_sha256: str | None = None,
    **hub_kwargs,
) -> nn.Module:
    """Restore every base weight entry a merged delta changed, exactly, and return the (same) model.

    Everything is checked before the first weight is written: the delta must be GRIN, match the model's modules,
    and be present in the merged weights (merged value == base + delta, rounded once as `merge` does). With
    `force=True` a model that does not contain the delta, or whose fingerprint differs, is reverted anyway. With
    `expected_sha256` the delta must be the one with that digest (`grin_peft.integrity`).
    """
    if any(isinstance(m, BaseTunerLayer) for m in merged_model.modules()):
        raise GrinError("revert expects a plain model from merge_and_unload(); this one still has adapter layers.")
    config_file, config_bytes = read_config_bytes(path_or_repo_id, subfolder, **hub_kwargs)
    raw = parse_config(config_file, config_bytes)
    if raw.get("peft_type") != "GRIN":
        raise GrinError(f"{path_or_repo_id}: not a GRIN delta (peft_type={raw.get('peft_type')!r}).")
    config = GrinConfig.from_peft_type(**GrinConfig.check_kwargs(**raw))
    read = read_delta_file(resolve_file(path_or_repo_id, WEIGHTS_NAME, subfolder, **hub_kwargs))
    check_delta_folder(str(path_or_repo_id), subfolder, hub_kwargs, config_bytes, read.sha256, expected_sha256)
    tensors = read.tensors
    modules, others = group_modules(tensors)
    declared = config.modules_to_save or []
    for key in sorted(others):
        path = key.removeprefix(PEFT_PREFIX).rpartition(".")[0]
        if not key.startswith(PEFT_PREFIX) or not any(path.endswith(name) for name in declared):
            raise GrinError(
                f"{key}: the delta file holds a tensor that is neither a GRIN tensor nor a modules_to_save copy its "
                "config declares; refusing it."
            )
    arch = architecture(merged_model)
    if config.base_model_architecture and config.base_model_architecture != arch and not force:
        raise GrinError(f"the delta was made for a {config.base_model_architecture} model, this one is {arch}.")

    writes = []
    overrides = {}
    for name, delta in modules.items():
        try:
            module = merged_model.get_submodule(name)
        except AttributeError:
            raise GrinError(f"{name}: the delta adapts a module this model ({arch}) does not have.") from None
        weight = getattr(module, "weight", None)
        if not isinstance(weight, torch.Tensor) or not weight.dtype.is_floating_point:
            raise GrinError(
                f"{name}: no floating-point weight to revert (quantized bases cannot be reverted "
                "exactly; revert a full-precision copy)."
            )
        idx = decode_entries(name, delta, weight.numel()).long()
        base = delta.base_values.to(weight.dtype)
        if not torch.equal(base.to(delta.base_values.dtype), delta.base_values):
            raise GrinError(f"{name}: recorded base values are not representable in {weight.dtype}.")
        current = weight.detach().reshape(-1)[idx.to(weight.device)].cpu()
        expected = (base.float() + delta.values.float()).to(weight.dtype)
        if not force and not torch.equal(current, expected):
            raise GrinError(
                f"{name}: the model does not contain this delta merged (already reverted, merged with "
                f"other deltas on the same entries, or a different delta). Pass {remedy('force=True', '--force')} to "
                "overwrite anyway."
            )
        writes.append((weight, idx, base))
        overrides[f"{name}.weight"] = (idx, base)
    if config.base_model_fingerprint and not force:
        if not matches(merged_model, config.base_model_fingerprint, overrides):
            raise GrinError(
                "after revert the model would not match the base the delta was made for (fingerprint "
                f"mismatch). Pass {remedy('force=True', '--force')} to revert anyway."
            )
    with torch.no_grad():
        for weight, idx, base in writes:
            weight.data.view(-1)[idx.to(weight.device)] = base.to(weight.device)
    return merged_model
