"""Bad deltas are refused with a GrinError before any weight or file changes."""

from __future__ import annotations

import json
import os

import pytest
import safetensors.torch
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors.torch import load_file, save_file
from tiny_models import build, state

import grin_peft  # noqa: F401
from grin_peft import GrinConfig, GrinError

WEIGHTS = "adapter_model.safetensors"


@pytest.fixture
def delta(tmp_path):
    model = get_peft_model(
        build("llama"), GrinConfig(target_modules="all-linear", density=0.05, score="random", init_weights=False)
    )
    model.save_pretrained(tmp_path)
    return tmp_path


def rewrite(path, change):
    tensors = load_file(path / WEIGHTS)
    change(tensors)
    save_file(tensors, path / WEIGHTS)


def first_key(tensors, suffix):
    return next(k for k in sorted(tensors) if k.endswith(suffix))


def assert_untouched(base, before):
    assert not any(isinstance(m, BaseTunerLayer) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def load_expecting(path, match, base=None):
    base = base if base is not None else build("llama")
    before = state(base)
    with pytest.raises(GrinError, match=match):
        PeftModel.from_pretrained(base, path)
    assert_untouched(base, before)


def test_out_of_range_index(delta):
    def change(t):
        key = first_key(t, "grin_indices")
        t[key][-1] = 10**6

    rewrite(delta, change)
    load_expecting(delta, "out of range")


def test_duplicate_index(delta):
    def change(t):
        key = first_key(t, "grin_indices")
        t[key][1] = t[key][0]

    rewrite(delta, change)
    load_expecting(delta, "strictly increasing")


def test_nan_values(delta):
    def change(t):
        t[first_key(t, "grin_values")][0] = float("nan")

    rewrite(delta, change)
    load_expecting(delta, "NaN")


def test_wrong_index_dtype(delta):
    def change(t):
        key = first_key(t, "grin_indices")
        t[key] = t[key].float()

    rewrite(delta, change)
    load_expecting(delta, "int32 or int64")


def test_missing_tensor(delta):
    rewrite(delta, lambda t: t.pop(first_key(t, "grin_base_values")))
    load_expecting(delta, "lacks")


def test_truncated_file(delta):
    data = (delta / WEIGHTS).read_bytes()
    (delta / WEIGHTS).write_bytes(data[: len(data) // 2])
    load_expecting(delta, "truncated or corrupt")


def test_corrupt_bytes_fail_the_checksum(delta):
    data = bytearray((delta / WEIGHTS).read_bytes())
    data[-3] ^= 0xFF
    (delta / WEIGHTS).write_bytes(bytes(data))
    load_expecting(delta, "checksum|NaN|range|increasing")


def test_unknown_config_field(delta):
    config = json.loads((delta / "adapter_config.json").read_text())
    config["densty"] = 0.1
    (delta / "adapter_config.json").write_text(json.dumps(config))
    load_expecting(delta, "densty")
    with pytest.raises(GrinError, match="densty"):
        GrinConfig(densty=0.1)


def test_delta_for_another_architecture(delta):
    load_expecting(delta, "llama", base=build("gpt2"))


def test_base_with_different_weights_is_refused_unless_overridden(delta):
    load_expecting(delta, "fingerprint|differ", base=build("llama", seed=5))
    config = GrinConfig.from_pretrained(delta)
    config.fingerprint_check = "warn"
    with pytest.warns(UserWarning):
        model = PeftModel.from_pretrained(build("llama", seed=5), delta, config=config)
    assert sum(model.base_model.num_entries().values()) > 0


def test_bad_config_values_are_grin_errors():
    for kwargs in (
        {"density": 0},
        {"density": 1.5},
        {"density": 0.1, "num_entries": 3},
        {"num_entries": 0},
        {"score": "nope"},
        {"noise_std": -1},
        {"selection": "local"},
    ):
        with pytest.raises(GrinError):
            GrinConfig(**kwargs)


def test_budget_larger_than_targeted_entries():
    with pytest.raises(GrinError, match="exceeds"):
        get_peft_model(build("mlp"), GrinConfig(target_modules=["lin0"], num_entries=10**6, score="random"))


def test_target_modules_matching_nothing():
    with pytest.raises(GrinError, match="matched nothing"):
        get_peft_model(build("llama"), GrinConfig(target_modules=["no_such_module"], score="random"))


def test_saving_nan_values_is_refused_and_keeps_the_old_file(delta):
    before = (delta / WEIGHTS).read_bytes()
    model = PeftModel.from_pretrained(build("llama"), delta, is_trainable=True)
    layer = next(iter(model.base_model.grin_layers().values()))
    with torch.no_grad():
        layer.grin_values["default"][0] = float("inf")
    with pytest.raises(GrinError, match="NaN/Inf"):
        model.save_pretrained(delta)
    assert (delta / WEIGHTS).read_bytes() == before


def test_an_interrupted_save_keeps_the_previous_delta(delta, monkeypatch):
    before = (delta / WEIGHTS).read_bytes()
    model = PeftModel.from_pretrained(build("llama"), delta, is_trainable=True)
    real_save = safetensors.torch.save_file

    def crash_halfway(tensors, filename, metadata=None):
        real_save(tensors, filename, metadata=metadata)
        with open(filename, "r+b") as handle:
            handle.truncate(os.path.getsize(filename) // 2)
        raise KeyboardInterrupt("power cut")

    monkeypatch.setattr("grin_peft.delta_file.save_file", crash_halfway)
    with pytest.raises(KeyboardInterrupt):
        model.save_pretrained(delta)
    assert (delta / WEIGHTS).read_bytes() == before
    assert not [p for p in os.listdir(delta) if p.startswith(".tmp-")]
