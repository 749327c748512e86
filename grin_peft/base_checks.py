"""Checking a saved GRIN delta against the base model it is about to change, before any weight is touched.

A delta's entries are flat positions into particular base weights, and its values are a change to those exact
weights: on another base (another checkpoint, a fine-tune, the same model already edited) they would silently edit
unrelated entries, and PEFT's state-dict load would copy any stray tensor in the file over a base weight. So a delta
is checked before injection (recorded fingerprint and architecture, the base values at its entries, its
modules_to_save copies) and again when PEFT hands its tensors to the tuner. A base mismatch is refused, warned about
or ignored at the level the loader chose (`grin_peft.loading`), never at one the file names; a stray tensor is always
refused.
"""

from __future__ import annotations

import warnings

import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils.other import AuxiliaryTrainingWrapper
from peft.utils.quantization_utils import resolve_quantization_backend
from torch import nn

from .bnb_layout import dequantize
from .config import GrinConfig
from .delta_file import PEFT_PREFIX, group_modules, validate_modules
from .errors import GrinError, remedy
from .fingerprint import matches


def _base_weight_of(model: nn.Module, name: str) -> torch.Tensor | None:
    """The base weight of module `name` in a raw or PEFT-wrapped model, or None if there is no such linear layer."""
    try:
        module = model.get_submodule(name)
    except AttributeError:
        return None
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    backend = resolve_quantization_backend(module)
    if backend is not None:
        return dequantize(module, backend)
    weight = getattr(module, "weight", None)
    return weight if isinstance(weight, torch.Tensor) and weight.dim() == 2 else None


def _is_quantized(model: nn.Module, name: str) -> bool:
    module = model.get_submodule(name)
    if isinstance(module, BaseTunerLayer):
        module = module.get_base_layer()
    return resolve_quantization_backend(module) is not None


def apply_fingerprint_policy(level: str, problem: str, always_warn: bool = False) -> None:
    """Refuse, warn about or ignore a base mismatch at the loader's chosen `level` (see `grin_peft.loading`); the
    level never comes from the delta's own config, which an attacker controls."""
    if level == "error":
        how = remedy(
            "PeftModel.from_pretrained(..., grin_fingerprint_check='warn'), inside "
            "`with grin_peft.fingerprint_check('warn'):`, or with GRIN_FINGERPRINT_CHECK=warn",
            "--fingerprint-check warn",
        )
        raise GrinError(f"{problem} Refusing to apply the delta; if you are sure, load it with {how}.")
    if level == "warn" or always_warn:
        warnings.warn(problem, UserWarning, stacklevel=3)


def _modules_to_save_tensors(model: nn.Module, config: GrinConfig) -> dict[str, torch.Tensor]:
    """The tensors a delta must hold for the modules_to_save its config declares, by saved key, matched the way
    PEFT wraps them (module name ends with a declared name)."""
    names = config.modules_to_save or []
    expected = {}
    for name, module in model.named_modules():
        if name and any(name.endswith(target) for target in names):
            for key, tensor in module.state_dict().items():
                expected[f"{PEFT_PREFIX}{name}.{key}"] = tensor
    return expected


def check_other_tensors(others: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """The non-GRIN tensors of a delta must be exactly the declared modules_to_save copies, with their shapes and
    finite floating values: anything else could overwrite a base weight when PEFT loads the state dict."""
    extra = sorted(set(others) - set(expected))
    if extra:
        more = f" (and {len(extra) - 1} more)" if len(extra) > 1 else ""
        raise GrinError(
            f"{extra[0]}{more}: the delta file holds a tensor that is neither a GRIN tensor of an adapted module nor "
            "a modules_to_save copy its config declares; refusing a file that could overwrite base weights."
        )
    missing = sorted(set(expected) - set(others))
    if missing:
        raise GrinError(f"{missing[0]}: the delta file lacks this modules_to_save tensor its config declares.")
    for key, tensor in others.items():
        want = expected[key]
        if tuple(tensor.shape) != tuple(want.shape):
            raise GrinError(f"{key}: shape {tuple(tensor.shape)} in the delta, {tuple(want.shape)} in the model.")
        if want.dtype.is_floating_point and (not tensor.dtype.is_floating_point or tensor.dtype.itemsize < 2):
            raise GrinError(f"{key}: dtype {tensor.dtype} in the delta for a {want.dtype} tensor.")
        if tensor.dtype.is_floating_point and not bool(torch.isfinite(tensor.float()).all()):
            raise GrinError(f"{key}: the delta file holds NaN or Inf values.")


def loaded_modules_to_save(model: nn.Module, adapter_name: str) -> dict[str, torch.Tensor]:
    """The load keys PEFT maps a delta's modules_to_save tensors to, with the tensors they will be copied into."""
    expected = {}
    for name, module in model.named_modules():
        if isinstance(module, AuxiliaryTrainingWrapper) and hasattr(module, "adapter_state_dict_load_map"):
            copy_of = getattr(module, "modules_to_save", {})
            if adapter_name not in copy_of:
                continue
            targets = copy_of[adapter_name].state_dict()
            for load_key in module.adapter_state_dict_load_map(adapter_name).values():
                local = load_key.removeprefix(f"modules_to_save.{adapter_name}.")
                if local in targets:
                    expected[f"{name}.{load_key}"] = targets[local]
    return expected


def check_base(model: nn.Module, config: GrinConfig, arch: str, level: str) -> None:
    """Whether `model` is the base the config's recorded fingerprint and architecture name, applied at `level`:
    a delta's values are a change to one particular set of weights."""
    if config.base_model_fingerprint is None:
        apply_fingerprint_policy(
            level,
            "The delta records no base_model_fingerprint, so nothing says which base it was made for.",
            always_warn=True,
        )
    elif config.base_model_architecture and config.base_model_architecture != arch:
        apply_fingerprint_policy(
            level, f"The delta was made for a {config.base_model_architecture} model, this base is {arch}."
        )
    elif not matches(model, config.base_model_fingerprint):
        apply_fingerprint_policy(
            level, "The base model's weights differ from those the delta was made for (fingerprint mismatch)."
        )


def check_delta(model: nn.Module, config: GrinConfig, tensors: dict[str, torch.Tensor], arch: str, level: str) -> None:
    """A delta file's tensors against the base they are about to be injected into: only GRIN tensors and declared
    modules_to_save copies (anything else could overwrite a base weight), every module valid for its weight, and the
    recorded base values equal to this base's at the delta's entries (else it was made for another base; `level`)."""
    modules, others = group_modules(tensors)
    check_other_tensors(others, _modules_to_save_tensors(model, config))
    _, differing = validate_modules(
        modules, lambda name: _base_weight_of(model, name), arch, lambda name: _is_quantized(model, name)
    )
    if differing:
        apply_fingerprint_policy(
            level,
            f"The base weights differ at the delta's entries in {len(differing)} "
            f"module(s), e.g. {differing[0]}: the delta was made for another base.",
        )
