"""The ledger file: `grin_ledger.json` in the model folder, human-readable, checked on every read.

It records, for a deployed model folder, which GRIN deltas are merged into its weights and in which order:

* per request: an id (never reused), a description, where its delta lives (local folder, or Hub repo + commit),
  the sha256 of its `adapter_model.safetensors`, when it was applied, and the model's fingerprint before and after
  it (for the current order of requests; a revert recomputes them);
* the original fingerprint (before any request), the current one, and the sha256 of every weight file as the
  ledger left it (`verify` compares them);
* the file of original base values (`grin_ledger/base-<sha>.safetensors`): the model's values at every entry any
  request ever touched, taken before the first request that touched it, which is what makes `revert N` exact;
* an append-only history of operations;
* `digest`: sha256 of the rest, so a hand edit, a truncated file or a deleted entry is refused in one line.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict, dataclass, field, fields
from datetime import datetime, timezone
from typing import Any

from ..delta_file import atomic_write_text
from ..errors import GrinError

LEDGER_NAME = "grin_ledger.json"
LEDGER_DIR = "grin_ledger"
FORMAT = "grin-ledger/1"


@dataclass
class DeltaSource:
    """Where a request's delta lives: a local folder, or a Hub repo at a fixed commit."""

    path: str | None = None
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None

    def describe(self) -> str:
        """One-line location for tables and error messages."""
        if self.path is not None:
            return self.path
        where = f"{self.repo_id}@{self.revision}" if self.revision else str(self.repo_id)
        return f"{where}/{self.subfolder}" if self.subfolder else where


@dataclass
class Request:
    """One applied deletion request."""

    id: int
    description: str
    delta: DeltaSource
    delta_sha256: str
    entries: int
    modules: int
    applied_at: str
    fingerprint_before: str
    fingerprint_after: str


@dataclass
class Record:
    """The whole ledger; `pending` holds the next record while an operation's files are being renamed."""

    architecture: str
    original_fingerprint: str
    model_fingerprint: str
    weights: dict[str, str]
    base_values: dict[str, Any]
    next_id: int = 1
    requests: list[Request] = field(default_factory=list)
    history: list[dict[str, Any]] = field(default_factory=list)
    pending: dict[str, Any] | None = None
    format: str = FORMAT

    def request(self, request_id: int) -> Request:
        """The applied request with this id, or a GrinError listing those that are applied."""
        for request in self.requests:
            if request.id == request_id:
                return request
        applied = ", ".join(str(r.id) for r in self.requests) or "none"
        raise GrinError(f"no applied request {request_id} in the ledger (applied: {applied}).")


def now() -> str:
    """UTC time to the second, ISO 8601: what the ledger records."""
    return datetime.now(timezone.utc).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _digest(payload: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def to_dict(record: Record) -> dict[str, Any]:
    """The JSON form, digest included."""
    payload = asdict(record)
    payload["digest"] = _digest(payload)
    return payload


def _typed(value: Any, kind: type | tuple[type, ...], where: str) -> Any:
    if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
        raise GrinError(f"{where} has the wrong type ({type(value).__name__}).")
    return value


def _exact_keys(raw: Any, cls: type, where: str) -> dict[str, Any]:
    _typed(raw, dict, where)
    names = {f.name for f in fields(cls)}
    unknown, missing = sorted(set(raw) - names), sorted(names - set(raw))
    if unknown or missing:
        raise GrinError(f"{where}: unknown field(s) {unknown}, missing field(s) {missing}.")
    return raw


def _request(raw: Any, where: str) -> Request:
    raw = dict(_exact_keys(raw, Request, where))
    source = _exact_keys(raw["delta"], DeltaSource, f"{where}.delta")
    for key, value in source.items():
        _typed(value, (str, type(None)), f"{where}.delta.{key}")
    if (source["path"] is None) == (source["repo_id"] is None):
        raise GrinError(f"{where}.delta needs exactly one of path and repo_id.")
    raw["delta"] = DeltaSource(**source)
    for key in ("id", "entries", "modules"):
        _typed(raw[key], int, f"{where}.{key}")
    for key in ("description", "delta_sha256", "applied_at", "fingerprint_before", "fingerprint_after"):
        _typed(raw[key], str, f"{where}.{key}")
    return Request(**raw)


def from_dict(raw: Any, where: str) -> Record:
    """A validated Record from parsed JSON; any inconsistency is a GrinError naming the field."""
    raw = dict(_typed(raw, dict, where))
    stored = raw.pop("digest", None)
    if stored != _digest(raw):
        raise GrinError(
            f"{where}: the ledger's digest does not match its contents (edited by hand, truncated or an entry "
            "removed); refusing to use it."
        )
    raw = dict(_exact_keys(raw, Record, where))
    if raw["format"] != FORMAT:
        raise GrinError(f"{where}: format {raw['format']!r}, this grin_peft reads {FORMAT!r}.")
    raw["requests"] = [
        _request(r, f"{where}: request #{i + 1}") for i, r in enumerate(_typed(raw["requests"], list, "requests"))
    ]
    ids = [r.id for r in raw["requests"]]
    if ids != sorted(set(ids)) or any(i < 1 or i >= raw["next_id"] for i in ids):
        raise GrinError(f"{where}: request ids {ids} are not increasing and below next_id {raw['next_id']}.")
    _typed(raw["weights"], dict, f"{where}: weights")
    _typed(raw["base_values"], dict, f"{where}: base_values")
    _typed(raw["history"], list, f"{where}: history")
    return Record(**raw)


def read(folder: str) -> Record | None:
    """The folder's ledger, or None if it has none yet."""
    filename = os.path.join(folder, LEDGER_NAME)
    if not os.path.exists(filename):
        return None
    try:
        with open(filename) as handle:
            raw = json.load(handle)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GrinError(f"{filename}: not a readable ledger ({exc}).") from exc
    return from_dict(raw, filename)


def write(folder: str, record: Record) -> None:
    """Replace the ledger atomically (temporary file + rename)."""
    atomic_write_text(json.dumps(to_dict(record), indent=2) + "\n", os.path.join(folder, LEDGER_NAME))
