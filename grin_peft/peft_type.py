"""The "GRIN" member of PEFT's `PeftType` enum, in a module that imports nothing of grin_peft.

Config, registration and everything else import the constant from here, so no import cycle runs through
registration (config -> registration -> hub/model -> localize -> config).
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
