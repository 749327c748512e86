"""grin_peft: GRIN unlearning as a Hugging Face PEFT method.

`import grin_peft` registers the "GRIN" PEFT type, so `get_peft_model`, `PeftModel.from_pretrained` and
`AutoPeftModelForCausalLM.from_pretrained` work with GRIN deltas. The training side (`UnlearningTrainer`,
`unlearn`) is imported on first use, because transformers' Trainer is slow to import.
"""

from importlib import import_module
from typing import Any

from .audit import audit  # the function; grin_peft.audit the package is the same name
from .config import GrinConfig
from .errors import GrinError
from .layer import GrinLayer
from .loading import fingerprint_check
from .model import GrinModel
from .quantized import merge_dequantized, merge_quantized
from .registration import GRIN_PEFT_TYPE, register
from .revert import revert

register()

_LAZY = {
    "UnlearningTrainer": "trainer",
    "UnlearningArguments": "unlearning_args",
    "unlearn": "pipeline",
    "OperatingPoint": "operating_point",
    "UnlearnResult": "pipeline",
    "LocalizationReport": "localize.report",
    "fila_initialize": "fila",
    "Ledger": "ledger",
}

__all__ = [
    "GRIN_PEFT_TYPE",
    "GrinConfig",
    "GrinError",
    "GrinLayer",
    "GrinModel",
    "audit",
    "fingerprint_check",
    "merge_dequantized",
    "merge_quantized",
    "revert",
    *_LAZY,
]
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'grin_peft' has no attribute {name!r}")
