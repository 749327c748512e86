"""Make "GRIN" a PEFT method: extend PEFT's closed `PeftType` enum, then register config and tuner.

PEFT has no plugin discovery, so `import grin_peft` must run before `PeftModel.from_pretrained` meets
`"peft_type": "GRIN"`. Importing twice, or in a process where another copy already registered GRIN, is harmless.
"""

from __future__ import annotations

from peft.utils.peft_types import PeftType

GRIN_NAME = "grin"


def _extend_peft_type(name: str) -> PeftType:
    """Add `name` to the `str`-valued enum the way `enum` itself builds members, once."""
    existing = PeftType._member_map_.get(name)
    if existing is not None:
        return existing
    member = str.__new__(PeftType, name)
    member._name_ = name
    member._value_ = name
    member.__objclass__ = PeftType
    member.__init__(name)
    # setattr before the member map so the enum's guard against reassigning members does not fire
    type.__setattr__(PeftType, name, member)
    PeftType._member_map_[name] = member
    PeftType._value2member_map_[name] = member
    PeftType._member_names_.append(name)
    return member


GRIN_PEFT_TYPE = _extend_peft_type(GRIN_NAME.upper())


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
