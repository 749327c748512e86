"""An unlearning ledger for a deployed model: which GRIN deltas its weights hold, in which order, undoable exactly.

A deletion request arrives, a GRIN delta is trained for it, and `Ledger(folder).apply(delta)` merges it into the
model folder's weights and records it in `grin_ledger.json` beside them. `revert(N)` removes any request N, giving
bit for bit the weights of applying the other requests in order to the original model, however their entries
overlap; `verify()` says whether the weights on disk are still what the ledger says. `grin-peft ledger ...` is the
command line for the same.
"""

from .ledger import Ledger, VerifyReport
from .record import DeltaSource, Record, Request

__all__ = ["DeltaSource", "Ledger", "Record", "Request", "VerifyReport"]
