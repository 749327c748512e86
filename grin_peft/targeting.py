"""Which modules a GRIN adapter targets: PEFT's matching, with ``layers_to_transform`` applied to every form of
``target_modules``.

PEFT applies ``layers_to_transform`` only when ``target_modules`` is a list of name suffixes; with a regex, with
``"all-linear"`` (expanded to full module names) or with GRIN's default ``None`` (= ``"all-linear"``) it would be
ignored silently, and LoRA refuses a regex with it. GRIN applies the filter in every case, with PEFT's own rule for
finding a module's layer index.
"""

from __future__ import annotations

import re
from typing import Any

from peft.tuners.tuners_utils import check_target_module_exists


def layer_index(key: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the layer stack entry that module ``key`` lies in, found as PEFT finds it: the first numbered
    segment after ``layers_pattern`` (any name when None), or None outside any numbered layer."""
    if not layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", key)
    else:
        match = None
        for pattern in [layers_pattern] if isinstance(layers_pattern, str) else layers_pattern:
            match = re.match(rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", key)
            if match is not None:
                break
    return None if match is None else int(match.group("idx"))


def target_module_exists(config: Any, key: str) -> Any:
    """PEFT's match of ``key`` against ``config``, then kept only inside ``layers_to_transform`` (0 included)."""
    found = check_target_module_exists(config, key)
    layers = getattr(config, "layers_to_transform", None)
    if not found or layers is None or layers == []:  # no match, an excluded module (falsy), or no filter
        return found
    index = layer_index(key, getattr(config, "layers_pattern", None))
    wanted = [layers] if isinstance(layers, int) else layers
    return index is not None and index in wanted
