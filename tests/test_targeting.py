"""Which modules a GRIN adapter targets: PEFT's layer-index rule, applied to every form of target_modules."""

from __future__ import annotations

import pytest

from grin_peft import GrinConfig
from grin_peft.targeting import layer_index, target_module_exists


@pytest.mark.parametrize(
    ("key", "pattern", "index"),
    [
        ("model.layers.3.self_attn.q_proj", None, 3),
        ("model.layers.1.mlp.experts.0.down_proj", None, 1),  # the first number, not an expert's index
        ("transformer.h.0.attn.c_attn", "h", 0),
        ("transformer.h.0.attn.c_attn", ["blocks", "h"], 0),
        ("transformer.h.0.attn.c_attn", "layers", None),
        ("lm_head", None, None),
    ],
)
def test_layer_index_follows_peft(key, pattern, index):
    assert layer_index(key, pattern) == index


def test_target_module_exists_filters_every_target_form():
    key = "model.layers.1.self_attn.q_proj"
    for targets in (r".*q_proj", ["q_proj"], {key}):
        assert target_module_exists(GrinConfig(target_modules=targets, layers_to_transform=[1]), key)
        assert not target_module_exists(GrinConfig(target_modules=targets, layers_to_transform=0), key)
        assert target_module_exists(GrinConfig(target_modules=targets), key)
    # a module outside any numbered layer is not in any of the requested layers
    assert not target_module_exists(GrinConfig(target_modules=["lm_head"], layers_to_transform=0), "lm_head")
    excluded = GrinConfig(target_modules=["q_proj"], exclude_modules=["q_proj"], layers_to_transform=1)
    assert not target_module_exists(excluded, key)
