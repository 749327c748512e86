"""Make "GRIN" a PEFT method: register config and tuner for the `PeftType` member `peft_type` adds.

PEFT has no plugin discovery, so `import grin_peft` must run before `PeftModel.from_pretrained` meets
`"peft_type": "GRIN"`. Importing twice, or in a process where another copy already registered GRIN, is harmless.
"""

from __future__ import annotations

from .peft_type import GRIN_NAME, GRIN_PEFT_TYPE

__all__ = ["GRIN_PEFT_TYPE", "register"]


def register() -> None:
    """Register GrinConfig and GrinModel with PEFT's mappings unless that already happened."""
    from peft.mapping import PEFT_TYPE_TO_TUNER_MAPPING
    from peft.utils import register_peft_method

    from . import hub, loading, saving
    from .config import GrinConfig
    from .model import GrinModel

    hub.install()
    loading.install()
    saving.install()
    if GRIN_PEFT_TYPE in PEFT_TYPE_TO_TUNER_MAPPING:
        return
    register_peft_method(name=GRIN_NAME, config_cls=GrinConfig, model_cls=GrinModel, prefix="grin_")
