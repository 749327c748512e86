"""The delta file: both entry forms, and bad deltas refused with a GrinError before any weight or file changes."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import safetensors.torch
import torch
from peft import PeftModel, get_peft_model
from peft.tuners.tuners_utils import BaseTunerLayer
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from tiny_models import build, example_input, output, state
from torch import nn

import grin_peft
from grin_peft import GrinConfig, GrinError
from grin_peft.delta_file import pack_mask

WEIGHTS = "adapter_model.safetensors"


def save_delta(path, density, model=None, target_modules="all-linear"):
    model = model if model is not None else build("llama")
    config = GrinConfig(target_modules=target_modules, density=density, score="random", init_weights=False)
    peft_model = get_peft_model(model, config)
    peft_model.save_pretrained(path)
    return peft_model


@pytest.fixture
def delta(tmp_path):
    """Low density: every module stores its entries as an index list."""
    save_delta(tmp_path, 0.01)
    assert not any(k.endswith("grin_mask") for k in load_file(tmp_path / WEIGHTS))
    return tmp_path


@pytest.fixture
def mask_delta(tmp_path):
    """High density: every module stores its entries as a bitmask."""
    save_delta(tmp_path, 0.5)
    assert not any(k.endswith("grin_indices") for k in load_file(tmp_path / WEIGHTS))
    return tmp_path


class Odd(nn.Module):
    """One layer of 7 x 5 = 35 entries: its 5-byte mask has 5 bits past the weight."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.lin = nn.Linear(7, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x)


def rewrite(path, change, keep_checksum=False):
    tensors = load_file(path / WEIGHTS)
    with safe_open(path / WEIGHTS, framework="pt") as handle:
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata=metadata if keep_checksum else None)


def unpack(mask, numel):
    """numpy's little-endian unpacking: an oracle independent of grin_peft's decoder."""
    bits = np.unpackbits(mask.numpy(), bitorder="little")[:numel]
    return torch.from_numpy(np.flatnonzero(bits)).to(torch.int32)


def as_index_file(tensors, numels):
    """Rewrite every bitmask as the index list a version without the mask form would have written."""
    for key in [k for k in tensors if k.endswith(".grin_mask")]:
        module = key.removesuffix(".grin_mask")
        tensors[f"{module}.grin_indices"] = unpack(tensors.pop(key), numels[module])


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
        {"dense_threshold": -0.1},
        {"dense_threshold": 1.5},
        {"dense_threshold": True},
        {"dense_threshold": "0.5"},
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


# ---------------------------------------------------------------- the two entry forms
def numels_of(model):
    return {f"base_model.model.{name}": layer.grin_numel for name, layer in model.base_model.grin_layers().items()}


def test_the_mask_is_numpys_little_endian_packing():
    numel = 37
    indices = torch.tensor([0, 1, 8, 15, 30, 36], dtype=torch.int32)
    bits = np.zeros(numel, dtype=bool)
    bits[indices.numpy()] = True
    assert np.array_equal(pack_mask(indices, numel).numpy(), np.packbits(bits, bitorder="little"))


def test_each_module_stores_the_smaller_form(tmp_path):
    low = save_delta(tmp_path / "low", 0.01)
    high = save_delta(tmp_path / "high", 0.5)
    low_keys = {k.rsplit(".", 1)[1] for k in load_file(tmp_path / "low" / WEIGHTS)}
    high_tensors = load_file(tmp_path / "high" / WEIGHTS)
    assert low_keys == {"grin_indices", "grin_values", "grin_base_values"}
    assert {k.rsplit(".", 1)[1] for k in high_tensors} == {"grin_mask", "grin_values", "grin_base_values"}
    for key, numel in numels_of(high).items():
        assert high_tensors[f"{key}.grin_mask"].dtype == torch.uint8
        assert high_tensors[f"{key}.grin_mask"].numel() == (numel + 7) // 8
    assert sum(low.base_model.num_entries().values()) > 0


def test_a_high_density_file_is_smaller_than_its_index_form(tmp_path):
    model = save_delta(tmp_path, 0.5)
    mask_size = os.path.getsize(tmp_path / WEIGHTS)
    rewrite(tmp_path, lambda t: as_index_file(t, numels_of(model)))
    index_size = os.path.getsize(tmp_path / WEIGHTS)
    entries, numel = sum(model.base_model.num_entries().values()), sum(numels_of(model).values())
    assert index_size - mask_size >= 4 * entries - numel / 8 - 1024  # 4 bytes an entry vs 1 bit a weight entry


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_an_index_only_file_at_high_density_still_loads(dtype, tmp_path):
    model = save_delta(tmp_path, 0.5, build("llama", dtype))
    rewrite(tmp_path, lambda t: as_index_file(t, numels_of(model)))
    assert any(k.endswith("grin_indices") for k in load_file(tmp_path / WEIGHTS))
    loaded = PeftModel.from_pretrained(build("llama", dtype), tmp_path)
    for name, layer in model.base_model.grin_layers().items():
        other = loaded.base_model.model.get_submodule(name)
        assert torch.equal(layer.grin_indices["default"], other.grin_indices["default"]), name
        assert torch.equal(layer.grin_values["default"], other.grin_values["default"]), name
    inputs = example_input("llama")
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=0, atol=0)


def first_mask(t):
    return first_key(t, "grin_mask")


def test_mask_of_the_wrong_length(mask_delta):
    rewrite(
        mask_delta,
        lambda t: t.update({first_mask(t): torch.cat([t[first_mask(t)], torch.zeros(1, dtype=torch.uint8)])}),
    )
    load_expecting(mask_delta, r"grin_mask must be 1-D with ceil\(\d+ / 8\) = \d+ bytes")


def test_mask_of_the_wrong_dtype(mask_delta):
    rewrite(mask_delta, lambda t: t.update({first_mask(t): t[first_mask(t)].to(torch.int16)}))
    load_expecting(mask_delta, "packed uint8 bitmask, got dtype torch.int16")


def test_mask_with_a_bit_past_the_weight(tmp_path):
    save_delta(tmp_path, 0.5, Odd(), target_modules=["lin"])

    def change(t):
        key = first_mask(t)
        assert t[key].numel() == 5
        t[key][-1] |= 0x80  # bit 39 of a 35-entry weight

    rewrite(tmp_path, change)
    before = state(Odd())
    base = Odd()
    with pytest.raises(GrinError, match="lin: grin_mask has bits set past the weight's 35 entries"):
        PeftModel.from_pretrained(base, tmp_path)
    assert_untouched(base, before)


def test_mask_whose_popcount_differs_from_the_values(mask_delta):
    def change(t):
        key = first_mask(t)
        byte = int((t[key] != 0xFF).nonzero()[0])  # a byte with a clear bit (every bit lies within the weight)
        value = int(t[key][byte])
        t[key][byte] = value | (1 << next(b for b in range(8) if not value >> b & 1))

    rewrite(mask_delta, change)
    load_expecting(mask_delta, r"grin_mask marks \d+ entries but there are \d+ values")


def test_a_module_with_both_forms(mask_delta):
    model = build("llama")

    def change(t):
        key = first_mask(t)
        module = key.removesuffix(".grin_mask")
        t[f"{module}.grin_indices"] = unpack(
            t[key], model.get_submodule(module.removeprefix("base_model.model.")).weight.numel()
        )

    rewrite(mask_delta, change)
    load_expecting(mask_delta, "both grin_indices and grin_mask")


def test_the_checksum_covers_the_mask(mask_delta):
    def change(t):
        key = first_mask(t)
        t[key][0] ^= 0x01

    rewrite(mask_delta, change, keep_checksum=True)
    load_expecting(mask_delta, "checksum mismatch")


def test_revert_refuses_a_corrupt_mask_before_writing(mask_delta):
    merged = PeftModel.from_pretrained(build("llama"), mask_delta).merge_and_unload()
    before = state(merged)
    rewrite(mask_delta, lambda t: t.update({first_mask(t): t[first_mask(t)][:-1].clone()}))
    with pytest.raises(GrinError, match="grin_mask must be 1-D"):
        grin_peft.revert(merged, str(mask_delta))
    assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())
