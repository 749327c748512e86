"""Saving GRIN adapters only in a form grin_peft can load back.

``PeftModel.save_pretrained(..., safe_serialization=False)`` writes ``adapter_model.bin``, a pickle. grin_peft never
unpickles a delta (a pickle can run any code when loaded, and deltas are shared on the Hub), so such a file could
never be loaded back: the request is refused before anything is written. Adapters of other PEFT methods save as
before.
"""

from __future__ import annotations

import functools
import inspect
from typing import Any

from .errors import GrinError


def refuse_pickle(model: Any, selected_adapters: list[str] | None, safe_serialization: bool) -> None:
    """GrinError when a save would write a GRIN adapter as a pickle; nothing is written then."""
    from .config import GrinConfig

    if safe_serialization:
        return
    names = selected_adapters if selected_adapters is not None else list(model.peft_config)
    grin = [name for name in names if isinstance(model.peft_config.get(name), GrinConfig)]
    if grin:
        raise GrinError(
            f"save_pretrained(safe_serialization=False) would write GRIN adapter '{grin[0]}' as a pickle "
            "(adapter_model.bin), which grin_peft never loads (unpickling runs arbitrary code); save with "
            "safe_serialization=True (the default)."
        )


def install() -> None:
    """Wrap ``PeftModel.save_pretrained`` once (idempotent); it only adds the check above."""
    import peft.peft_model as peft_model_module

    if getattr(peft_model_module, "_grin_saving_installed", False):
        return
    original = peft_model_module.PeftModel.save_pretrained
    signature = inspect.signature(original)

    @functools.wraps(original)
    def save_pretrained(self, *args, **kwargs):
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        refuse_pickle(self, bound.arguments["selected_adapters"], bound.arguments["safe_serialization"])
        return original(self, *args, **kwargs)

    peft_model_module.PeftModel.save_pretrained = save_pretrained
    peft_model_module._grin_saving_installed = True
