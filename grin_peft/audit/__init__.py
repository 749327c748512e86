"""`grin-peft audit`: does the forgetting hold? Published attacks on unlearned models, as one call.

* :mod:`.quantization`: bitsandbytes 8-bit, NF4 and FP4 copies; the change per module against the 4-bit bin width.
* :mod:`.relearning`: a little fine-tuning on part of the forget set, or on data without it.
* :mod:`.prompts`: paraphrased questions and a jailbreak-style answer prefix.
* :mod:`.membership`: MinK/MinK++/LOSS/ZLib membership inference against holdout data.
* :mod:`.measure`: the metrics, the recovered fraction and the verdicts; :mod:`.report`: markdown, JSON, plot.
* :mod:`.mitigation`: a measured defence for sparse deltas against 4-bit quantization.
"""

from .core import ATTACKS, audit
from .measure import Thresholds, recovered_fraction
from .mitigation import floor_to_bin_width
from .relearning import RelearnSettings
from .report import AuditReport

__all__ = [
    "ATTACKS",
    "AuditReport",
    "RelearnSettings",
    "Thresholds",
    "audit",
    "floor_to_bin_width",
    "recovered_fraction",
]
