"""`grin_peft.revert`: the exact undo of a merged delta, and its refusals."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import build, state

import grin_peft
from grin_peft import GrinConfig, GrinError

KINDS_DTYPES = [
    (kind, dtype) for kind in ("llama", "gpt2") for dtype in (torch.float32, torch.bfloat16, torch.float16)
]


def saved_delta(kind, dtype, path, density=0.05, **kwargs):
    config = GrinConfig(target_modules="all-linear", density=density, score="random", init_weights=False, **kwargs)
    model = get_peft_model(build(kind, dtype), config)
    model.save_pretrained(path)
    return path


@pytest.mark.parametrize("density", [0.01, 0.25, 0.5])  # index form; bitmask form
@pytest.mark.parametrize(("kind", "dtype"), KINDS_DTYPES)
def test_revert_restores_every_base_tensor_bit_for_bit(kind, dtype, density, tmp_path):
    original = state(build(kind, dtype))
    delta = saved_delta(kind, dtype, tmp_path, density)
    merged = PeftModel.from_pretrained(build(kind, dtype), delta).merge_and_unload()
    assert any(not torch.equal(v, original[k]) for k, v in merged.state_dict().items())
    reverted = grin_peft.revert(merged, str(delta))
    for key, value in reverted.state_dict().items():
        assert torch.equal(value, original[key]), key


def test_revert_twice_is_refused_and_changes_nothing(tmp_path):
    delta = saved_delta("llama", torch.bfloat16, tmp_path)
    merged = PeftModel.from_pretrained(build("llama", torch.bfloat16), delta).merge_and_unload()
    grin_peft.revert(merged, str(delta))
    before = state(merged)
    with pytest.raises(GrinError, match="does not contain this delta"):
        grin_peft.revert(merged, str(delta))
    assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())


def test_revert_refuses_another_architecture_and_a_peft_model(tmp_path):
    delta = saved_delta("llama", torch.float32, tmp_path)
    gpt2 = build("gpt2")
    before = state(gpt2)
    with pytest.raises(GrinError, match="llama"):
        grin_peft.revert(gpt2, str(delta))
    assert all(torch.equal(v, before[k]) for k, v in gpt2.state_dict().items())
    with pytest.raises(GrinError, match="merge_and_unload"):
        grin_peft.revert(PeftModel.from_pretrained(build("llama"), delta), str(delta))


def test_revert_refuses_a_differently_trained_base_unless_forced(tmp_path):
    delta = saved_delta("llama", torch.float32, tmp_path)
    merged = PeftModel.from_pretrained(build("llama"), delta).merge_and_unload()
    with torch.no_grad():
        merged.model.embed_tokens.weight[0, 0] += 1.0  # some other fine-tune happened since
    before = state(merged)
    with pytest.raises(GrinError, match="fingerprint"):
        grin_peft.revert(merged, str(delta))
    assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())
    grin_peft.revert(merged, str(delta), force=True)


def test_revert_of_a_missing_delta_is_a_clear_error(tmp_path):
    with pytest.raises(GrinError, match="adapter_config.json"):
        grin_peft.revert(build("llama"), str(tmp_path))
