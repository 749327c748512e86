"""An unlearning ledger for a deployed model: which GRIN deltas its weights hold, in which order, undoable exactly.

A deletion request arrives, a GRIN delta is trained for it, and `Ledger(folder).apply(delta)` merges it into the
model folder's weights and records it in `grin_ledger.json` beside them. `revert(N)` removes any request N, giving
bit for bit the weights of applying the other requests in order to the original model, however their entries
overlap; `verify()` says whether the weights on disk are still what the ledger says. `grin-peft ledger ...` is the
command line for the same.
"""

from importlib import import_module
from typing import Any

# imported on first use, so `grin-peft --help` (which registers the ledger's parser) stays light
_LAZY = {
    "Ledger": "ledger",
    "VerifyReport": "ledger",
    "DeltaSource": "record",
    "Record": "record",
    "Request": "record",
}

__all__ = list(_LAZY)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'grin_peft.ledger' has no attribute {name!r}")
