"""What a delta's digests protect against, and the manifest that binds its config to its weights.

* The **checksum** (`grin_sha256` in the safetensors metadata, always verified) detects corruption: a flipped bit, a
  truncated download. Anyone can recompute it, so it says nothing about who made the file.
* The **manifest** (`grin.sha256`, written by every save; `sha256sum -c grin.sha256` checks it by hand) lists the
  sha256 of `adapter_config.json` and `adapter_model.safetensors`. A loader refuses a pair that does not match it:
  a config from one save with the weights of another (a concurrent save, a partial copy or sync).
* The **delta digest** is the sha256 of that manifest (`sha256sum grin.sha256`): one value for config and weights
  together, printed by `save`/`push` and recorded in the model card. Pinning it at load
  (``PeftModel.from_pretrained(base, repo, expected_sha256=...)``, ``grin-peft ... --expected-sha256``) detects
  tampering, *if* the digest reached you by a channel the attacker does not control (the author's release notes,
  your own records); a digest read from the same repo (its card) only detects corruption again.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path

from .errors import GrinError

MANIFEST_NAME = "grin.sha256"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
_LINE = re.compile(r"^([0-9a-f]{64}) [ *](\S+)$")


def sha256_hex(data: bytes) -> str:
    """The sha256 of `data`, as hex."""
    return hashlib.sha256(data).hexdigest()


def manifest_text(config_sha: str, weights_sha: str) -> str:
    """The manifest of one delta, in `sha256sum`'s format (sorted by name)."""
    return f"{config_sha}  {CONFIG_NAME}\n{weights_sha}  {WEIGHTS_NAME}\n"


def delta_digest(config_sha: str, weights_sha: str) -> str:
    """The delta's digest: the sha256 of its manifest, i.e. of both files' hashes together."""
    return sha256_hex(manifest_text(config_sha, weights_sha).encode())


def write_manifest(folder: Path) -> str:
    """Write `grin.sha256` for the delta saved in `folder`; returns the delta digest."""
    config_sha = sha256_hex((folder / CONFIG_NAME).read_bytes())
    weights_sha = sha256_hex((folder / WEIGHTS_NAME).read_bytes())
    (folder / MANIFEST_NAME).write_text(manifest_text(config_sha, weights_sha))
    return delta_digest(config_sha, weights_sha)


def parse_manifest(text: str, where: str) -> dict[str, str]:
    """File name -> sha256 from a manifest; a malformed one is refused (it could hide a mismatch)."""
    entries = {}
    for line in text.splitlines():
        match = _LINE.match(line.strip())
        if not match:
            raise GrinError(f"{where}: {MANIFEST_NAME} has a malformed line {line[:80]!r}.")
        entries[match.group(2).lstrip("*")] = match.group(1)
    return entries


def check_manifest(entries: dict[str, str], config_sha: str, weights_sha: str, where: str) -> None:
    """Refuse a config and weights that are not the pair the manifest lists."""
    pairs = ((CONFIG_NAME, config_sha), (WEIGHTS_NAME, weights_sha))
    stale = [name for name, sha in pairs if entries.get(name) != sha]
    if stale:
        raise GrinError(
            f"{where}: {' and '.join(stale)} {'does' if len(stale) == 1 else 'do'} not match {MANIFEST_NAME}: the "
            "config and the weights come from different saves (a save ran while this load read the folder, or the "
            "folder was partly copied or edited). Load again; if it persists, save the delta again."
        )


def normalize_expected(value: object, where: str) -> str:
    """A pinned digest as 64 lowercase hex characters (an optional 'sha256:' prefix is accepted)."""
    text = str(value).strip().lower().removeprefix("sha256:")
    if not re.fullmatch(r"[0-9a-f]{64}", text):
        raise GrinError(f"{where}={value!r} is not a sha256 digest (64 hex characters).")
    return text


def check_pinned(expected: str, actual: str, where: str) -> None:
    """Refuse a delta whose digest is not the one the caller pinned."""
    if actual != expected:
        raise GrinError(
            f"{where}: the delta's sha256 is {actual}, not the pinned {expected}: it is not the delta you pinned "
            "(tampered with, or another version)."
        )
