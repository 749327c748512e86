"""Loading a GRIN delta safely through PEFT's own entry points.

* The fingerprint check level is the caller's choice at load time, never the file's: the keyword
  ``PeftModel.from_pretrained(..., grin_fingerprint_check="warn")`` (also on ``load_adapter``), the context manager
  :func:`fingerprint_check`, or the environment variable ``GRIN_FINGERPRINT_CHECK``, in that order; default
  ``"error"``.
* The delta file is read once (safetensors only, never a pickle), its checksum verified, and that same read is what
  PEFT loads. Its config and weights must be the pair its manifest (`grin.sha256`) lists, and, with
  ``expected_sha256=`` (``from_pretrained``, ``load_adapter``), their digest must be the pinned one
  (:mod:`grin_peft.integrity` says what each protects against).
* A load that fails for any reason leaves the caller's model as it was: unwrapped, every weight untouched.

`install()` wraps ``PeftModel.from_pretrained``, ``PeftModel.load_adapter`` and the ``load_peft_weights`` they call;
adapters of other PEFT types go through unchanged.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
from collections.abc import Iterator
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any

import torch

from . import integrity
from .errors import GrinError

FINGERPRINT_ENV = "GRIN_FINGERPRINT_CHECK"
FINGERPRINT_CHECKS = ("error", "warn", "off")
LOAD_KEYWORD = "grin_fingerprint_check"
PIN_KEYWORD = "expected_sha256"
IGNORED_CONFIG_FIELDS = ("inference_mode", "revision")  # set by PEFT's loader from the call, not from the file
HUB_KEYS = ("revision", "token", "cache_dir", "use_auth_token", "local_files_only", "force_download")

_LEVEL: ContextVar[str | None] = ContextVar("grin_fingerprint_check", default=None)


@dataclass
class LoadScope:
    """One `from_pretrained`/`load_adapter` call: where the delta comes from and what the loader has seen."""

    model_id: str
    adapter_name: str
    subfolder: str | None
    hub_kwargs: dict[str, Any]
    level: str | None
    expected_sha256: str | None = None
    config_read: tuple[str, bytes] | None = None  # adapter_config.json as read (and hashed) by the pre-check
    digest: str | None = None  # the delta digest of what was loaded
    metadata: dict[str, str] | None = None  # the delta file's safetensors metadata
    tensors: dict[str, torch.Tensor] | None = None  # read and verified once by the pre-injection check
    tuner: Any = None  # the GrinModel that injected the adapter, to unwrap on failure
    grin: bool = False
    claimed: bool = False


_SCOPE: ContextVar[LoadScope | None] = ContextVar("grin_load_scope", default=None)


def check_level(value: object, where: str) -> str:
    """A valid check level, or a GrinError naming where the bad value came from."""
    if value not in FINGERPRINT_CHECKS:
        raise GrinError(f"{where}={value!r} is not one of {', '.join(FINGERPRINT_CHECKS)}.")
    return str(value)


@contextlib.contextmanager
def fingerprint_check(level: str) -> Iterator[None]:
    """Within the block, a delta made for another base is refused ("error"), loaded with a warning ("warn") or
    loaded silently ("off"); a delta without a fingerprint loads only at "warn"/"off", always with a warning.

    The level is the loader's decision, so it lives here and not in the (possibly downloaded) adapter config.
    """
    token = _LEVEL.set(check_level(level, "fingerprint_check"))
    try:
        yield
    finally:
        _LEVEL.reset(token)


def resolve_level(explicit: str | None = None) -> str:
    """The check level in force: an explicit argument, then the current load's keyword, then the context manager,
    then $GRIN_FINGERPRINT_CHECK, else "error"."""
    if explicit is not None:
        return check_level(explicit, "fingerprint_check")
    scope = _SCOPE.get()
    if scope is not None and scope.level is not None:
        return scope.level
    if _LEVEL.get() is not None:
        return _LEVEL.get()
    env = os.environ.get(FINGERPRINT_ENV)
    if env:
        return check_level(env.strip().lower(), f"${FINGERPRINT_ENV}")
    return "error"


def claim_scope(adapter_name: str) -> LoadScope | None:
    """The active load of `adapter_name`, claimed by the tuner that injects it (None for a new adapter)."""
    scope = _SCOPE.get()
    if scope is None or scope.adapter_name != adapter_name or scope.claimed:
        return None
    scope.claimed = True
    return scope


def _hub_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    return {k: kwargs[k] for k in HUB_KEYS if kwargs.get(k) is not None}


def _precheck_config(model_id: Any, kwargs: dict[str, Any]) -> tuple[str, bytes]:
    """Read the config once (its bytes are hashed later) and refuse one whose peft_type is a misspelt GRIN or absent
    with a GrinError, before PEFT's KeyError. A missing local folder fails here, before any Hub lookup."""
    from .delta_file import parse_config, read_config_bytes

    config_read = read_config_bytes(str(model_id), kwargs.get("subfolder"), **_hub_kwargs(kwargs))
    raw = parse_config(*config_read)
    peft_type = raw.get("peft_type")
    if peft_type is None:
        raise GrinError(f"{model_id}: adapter_config.json has no peft_type field (a GRIN delta has 'GRIN').")
    if isinstance(peft_type, str) and peft_type != "GRIN" and peft_type.strip().upper() == "GRIN":
        raise GrinError(f"{model_id}: adapter_config.json has peft_type={peft_type!r}; a GRIN delta has 'GRIN'.")
    if not isinstance(peft_type, str):
        raise GrinError(f"{model_id}: adapter_config.json has peft_type={peft_type!r}, not a string.")
    return config_read


def _restore(scope: LoadScope, model: Any, had_peft_config: bool) -> None:
    """Undo whatever a failed load did to the caller's model."""
    from .model import GrinModel

    if scope.tuner is not None:
        GrinModel._discard_adapter(scope.tuner, scope.adapter_name)
    if model is not None and not had_peft_config and hasattr(model, "peft_config"):
        with contextlib.suppress(AttributeError):
            del model.peft_config


def _apply_key_mapping(tensors: dict[str, torch.Tensor], key_mapping: dict[str, str] | None) -> dict:
    """PEFT's `load_peft_weights` key mapping (transformers' checkpoint conversion), applied to our read."""
    if not key_mapping:
        return tensors
    out = {}
    for key, value in tensors.items():
        prefix = "base_model.model." if key.startswith("base_model.model.") else "base_model."
        if not key.startswith(prefix):
            raise GrinError(f"{key}: not a PEFT key (no base_model. prefix).")
        key = key.removeprefix(prefix)
        for pattern, replacement in key_mapping.items():
            key_new, replaced = re.subn(pattern, replacement, key)
            if replaced:
                key = key_new
                break
        out[prefix + key] = value
    return out


def read_delta(scope: LoadScope, config: Any = None) -> dict[str, torch.Tensor]:
    """The delta's tensors for this load: the verified read made before injection, or one made now.

    A read made now is checked as one unit with the config: the config PEFT parsed must be the bytes that were
    hashed, both files must match the folder's manifest, and their digest the caller's pin.
    """
    from .delta_file import WEIGHTS_NAME, read_config_bytes, read_delta_file, resolve_file

    if scope.tensors is not None:
        return scope.tensors
    where = scope.model_id + (f"/{scope.subfolder}" if scope.subfolder else "")
    read = read_delta_file(resolve_file(scope.model_id, WEIGHTS_NAME, scope.subfolder, **scope.hub_kwargs))
    config_file, config_bytes = scope.config_read or read_config_bytes(
        scope.model_id, scope.subfolder, **scope.hub_kwargs
    )
    if config is not None and scope.config_read is not None:  # PEFT parsed the file itself (no config= given)
        _check_same_config(config, config_file, config_bytes, where)
    scope.metadata = read.metadata
    scope.digest = check_delta_folder(
        scope.model_id, scope.subfolder, scope.hub_kwargs, config_bytes, read.sha256, scope.expected_sha256
    )
    return read.tensors


def check_delta_folder(
    model_id: str,
    subfolder: str | None,
    hub_kwargs: dict[str, Any],
    config_bytes: bytes,
    weights_sha: str,
    expected_sha256: str | None,
) -> str:
    """Check the config and weights as read against the folder's manifest (when it has one) and the caller's pin;
    returns their delta digest."""
    from .delta_file import resolve_file

    where = model_id + (f"/{subfolder}" if subfolder else "")
    config_sha = integrity.sha256_hex(config_bytes)
    manifest = resolve_file(model_id, integrity.MANIFEST_NAME, subfolder, optional=True, **hub_kwargs)
    if manifest is not None:
        with open(manifest, errors="replace") as handle:
            entries = integrity.parse_manifest(handle.read(), where)
        integrity.check_manifest(entries, config_sha, weights_sha, where)
    digest = integrity.delta_digest(config_sha, weights_sha)
    if expected_sha256 is not None:
        integrity.check_pinned(integrity.normalize_expected(expected_sha256, PIN_KEYWORD), digest, where)
    return digest


def _check_same_config(config: Any, filename: str, data: bytes, where: str) -> None:
    """The config PEFT built must be the one in the bytes that were hashed (the file can change between reads)."""
    import warnings

    from .config import GrinConfig
    from .delta_file import parse_config

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # retired fields were already warned about on PEFT's read
        hashed = GrinConfig.from_peft_type(**GrinConfig.check_kwargs(**parse_config(filename, data))).to_dict()
    loaded = config.to_dict()
    differing = sorted(
        key
        for key in set(hashed) | set(loaded)
        if key not in IGNORED_CONFIG_FIELDS and _plain(hashed.get(key)) != _plain(loaded.get(key))
    )
    if differing:
        raise GrinError(
            f"{where}: adapter_config.json changed while the delta was being loaded ({', '.join(differing)}); "
            "load again."
        )


def _plain(value: Any) -> Any:
    return sorted(value) if isinstance(value, (set, frozenset)) else value


def install() -> None:
    """Wrap PEFT's loading entry points once (idempotent); non-GRIN adapters behave exactly as before."""
    import peft.peft_model as peft_model_module

    if getattr(peft_model_module, "_grin_loading_installed", False):
        return
    PeftModel = peft_model_module.PeftModel
    original_from_pretrained = PeftModel.from_pretrained.__func__
    original_load_adapter = PeftModel.load_adapter
    original_load_weights = peft_model_module.load_peft_weights

    @functools.wraps(original_from_pretrained)
    def from_pretrained(cls, model, model_id, *args, **kwargs):
        level = kwargs.pop(LOAD_KEYWORD, None)
        if level is not None:
            level = check_level(level, LOAD_KEYWORD)
        pinned = kwargs.pop(PIN_KEYWORD, None)
        if pinned is not None:
            pinned = integrity.normalize_expected(pinned, PIN_KEYWORD)
        adapter_name = args[0] if args else kwargs.get("adapter_name", "default")
        config = args[2] if len(args) > 2 else kwargs.get("config")
        config_read = _precheck_config(model_id, kwargs) if config is None else None
        scope = LoadScope(
            str(model_id), adapter_name, kwargs.get("subfolder"), _hub_kwargs(kwargs), level, pinned, config_read
        )
        had_peft_config = hasattr(model, "peft_config")
        token = _SCOPE.set(scope)
        try:
            return original_from_pretrained(cls, model, model_id, *args, **kwargs)
        except BaseException as exc:
            if scope.grin:
                _restore(scope, model, had_peft_config)
                if not isinstance(exc, (GrinError, KeyboardInterrupt)) and isinstance(exc, Exception):
                    raise GrinError(f"{model_id}: the GRIN delta could not be loaded: {exc}") from exc
            raise
        finally:
            _SCOPE.reset(token)

    @functools.wraps(original_load_adapter)
    def load_adapter(self, model_id, adapter_name, *args, **kwargs):
        level = kwargs.pop(LOAD_KEYWORD, None)
        pinned = kwargs.pop(PIN_KEYWORD, None)
        outer = _SCOPE.get()
        if outer is not None and outer.adapter_name == adapter_name and outer.model_id == str(model_id):
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)  # inside from_pretrained
        if level is not None:
            level = check_level(level, LOAD_KEYWORD)
        if pinned is not None:
            pinned = integrity.normalize_expected(pinned, PIN_KEYWORD)
        existed = adapter_name in self.peft_config
        config_read = None if existed else _precheck_config(model_id, kwargs)
        scope = LoadScope(
            str(model_id), adapter_name, kwargs.get("subfolder"), _hub_kwargs(kwargs), level, pinned, config_read
        )
        from .config import GrinConfig

        if existed and isinstance(self.peft_config[adapter_name], GrinConfig):
            scope.grin, scope.claimed = True, True
        token = _SCOPE.set(scope)
        try:
            return original_load_adapter(self, model_id, adapter_name, *args, **kwargs)
        except BaseException as exc:
            if scope.grin and not existed:
                _restore(scope, None, True)
            if scope.grin and not isinstance(exc, GrinError) and isinstance(exc, Exception):
                raise GrinError(f"{model_id}: the GRIN delta could not be loaded: {exc}") from exc
            raise
        finally:
            _SCOPE.reset(token)

    @functools.wraps(original_load_weights)
    def load_peft_weights(model_id, device=None, key_mapping=None, **hf_hub_download_kwargs):
        scope = _SCOPE.get()
        if scope is None or not scope.grin:
            return original_load_weights(model_id, device=device, key_mapping=key_mapping, **hf_hub_download_kwargs)
        tensors = read_delta(scope)
        scope.tensors = None
        if device is not None and str(device) not in ("cpu", "mps"):
            tensors = {k: v.to(device) for k, v in tensors.items()}
        return _apply_key_mapping(tensors, key_mapping)

    PeftModel.from_pretrained = classmethod(from_pretrained)
    PeftModel.load_adapter = load_adapter
    peft_model_module.load_peft_weights = load_peft_weights
    peft_model_module._grin_loading_installed = True
