"""`grin-peft audit`: does the forgetting hold? Published attacks on unlearned models, as one call.

* :mod:`.quantization`: bitsandbytes 8-bit, NF4 and FP4 copies; the change per module against the 4-bit bin width.
* :mod:`.relearning`: a little fine-tuning on part of the forget set, or on data without it.
* :mod:`.prompts`: paraphrased questions and a jailbreak-style answer prefix.
* :mod:`.membership`: MinK/MinK++/LOSS/ZLib membership inference against holdout data.
* :mod:`.measure`: the metrics, the recovered fraction and the verdicts; :mod:`.report`: markdown, JSON, plot.
* :mod:`.mitigation`: a measured defence for sparse deltas against 4-bit quantization.
"""

from importlib import import_module
from typing import Any

from .names import ATTACKS, MODES

# imported on first use, so `grin-peft --help` (which registers the audit's parser) stays light
_LAZY = {
    "audit": "core",
    "Thresholds": "measure",
    "recovered_fraction": "measure",
    "floor_to_bin_width": "mitigation",
    "RelearnSettings": "relearning",
    "AuditReport": "report",
}

__all__ = ["ATTACKS", "MODES", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'grin_peft.audit' has no attribute {name!r}")
