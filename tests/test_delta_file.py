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
from grin_peft.integrity import write_manifest

# crafted files are written without a checksum; the loader warns about that, which these tests do not check
pytestmark = pytest.mark.filterwarnings("ignore:.*without a grin_sha256 checksum:UserWarning")

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


def reseal(path):
    """Rewrite the manifest for the edited files, as anyone editing a delta can: the checks below it must hold."""
    if (path / WEIGHTS).exists():
        write_manifest(path)
    else:
        (path / "grin.sha256").unlink()


def rewrite(path, change, keep_checksum=False):
    tensors = load_file(path / WEIGHTS)
    with safe_open(path / WEIGHTS, framework="pt") as handle:
        metadata = handle.metadata()
    change(tensors)
    save_file(tensors, path / WEIGHTS, metadata=metadata if keep_checksum else None)
    reseal(path)


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


def test_unknown_config_field_warns_and_is_ignored(delta):
    # forward compatibility, as in PEFT: a field from a newer grin_peft (or a typo) is named in a warning
    config = json.loads((delta / "adapter_config.json").read_text())
    config["densty"] = 0.1
    (delta / "adapter_config.json").write_text(json.dumps(config))
    reseal(delta)
    with pytest.warns(UserWarning, match="densty"):
        PeftModel.from_pretrained(build("llama"), delta)
    with pytest.raises(GrinError, match="densty"):  # in code, an unknown keyword is an error (also a TypeError)
        GrinConfig(densty=0.1)


def test_delta_for_another_architecture(delta):
    load_expecting(delta, "llama", base=build("gpt2"))


def test_base_with_different_weights_is_refused_unless_overridden(delta):
    load_expecting(delta, "fingerprint|differ", base=build("llama", seed=5))
    with pytest.warns(UserWarning):
        model = PeftModel.from_pretrained(build("llama", seed=5), delta, grin_fingerprint_check="warn")
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


# ---------------------------------------------------------------- hardening: attacks on the loader (issue 11)
def sign(path, change):
    """Rewrite the delta as an attacker would: changed, with a valid checksum for the new content."""
    from grin_peft.delta_file import atomic_save_file

    tensors = load_file(path / WEIGHTS)
    change(tensors)
    atomic_save_file(tensors, str(path / WEIGHTS))
    reseal(path)


def edit_config(path, change):
    config = json.loads((path / "adapter_config.json").read_text())
    change(config)
    (path / "adapter_config.json").write_text(json.dumps(config))
    reseal(path)


@pytest.mark.parametrize(
    "key",
    [
        "base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight",
        "base_model.model.model.layers.0.self_attn.q_proj.weight",
        "base_model.model.lm_head.weight",
        "base_model.model.model.embed_tokens.weight",
    ],
)
def test_an_extra_tensor_cannot_overwrite_a_base_weight(delta, key):
    base = build("llama")
    shape = base.get_submodule(
        key.removeprefix("base_model.model.").removesuffix(".weight").replace(".base_layer", "")
    ).weight.shape
    sign(delta, lambda t: t.update({key: torch.full(shape, 7.0)}))
    load_expecting(delta, "neither a GRIN tensor of an adapted module nor a modules_to_save copy", base)


def test_fifty_thousand_junk_tensors_are_refused(delta):
    sign(delta, lambda t: t.update({f"junk.{i}": torch.zeros(1) for i in range(50_000)}))
    load_expecting(delta, r"junk\.\d+ \(and 49999 more\): the delta file holds a tensor")


def test_declared_modules_to_save_still_load_and_undeclared_copies_do_not(tmp_path):
    config = GrinConfig(target_modules="all-linear", density=0.01, score="random", modules_to_save=["lm_head"])
    model = get_peft_model(build("llama"), config)
    with torch.no_grad():
        model.base_model.model.lm_head.modules_to_save["default"].weight.add_(1.0)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path)
    inputs = example_input("llama")
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=0, atol=0)
    edit_config(tmp_path, lambda c: c.update(modules_to_save=None))
    load_expecting(tmp_path, "base_model.model.lm_head.weight: the delta file holds a tensor")


def test_a_missing_or_misshapen_modules_to_save_tensor_leaves_the_model_as_it_was(tmp_path):
    config = GrinConfig(target_modules="all-linear", density=0.01, score="random", modules_to_save=["lm_head"])
    get_peft_model(build("llama"), config).save_pretrained(tmp_path)
    saved = load_file(tmp_path / WEIGHTS)
    sign(tmp_path, lambda t: t.pop("base_model.model.lm_head.weight"))
    load_expecting(tmp_path, "lacks this modules_to_save tensor")
    sign(
        tmp_path, lambda t: t.update({"base_model.model.lm_head.weight": saved["base_model.model.lm_head.weight"][:5]})
    )
    load_expecting(tmp_path, r"lm_head.weight: shape \(5, 32\) in the delta")


def test_a_failure_after_wrapping_restores_the_callers_model(delta, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("disk on fire")

    monkeypatch.setattr("peft.utils.save_and_load._find_mismatched_keys", broken)
    base = build("llama")
    types = [type(m) for m in base.modules()]
    load_expecting(delta, "disk on fire", base)
    assert [type(m) for m in base.modules()] == types and not hasattr(base, "peft_config")


def test_without_a_fingerprint_the_delta_is_refused_unless_the_loader_opts_in(delta):
    edit_config(delta, lambda c: (c.pop("base_model_fingerprint"), c.pop("base_model_architecture")))
    load_expecting(delta, "records no base_model_fingerprint")
    load_expecting(delta, "records no base_model_fingerprint", base=build("llama", seed=5))
    with pytest.warns(UserWarning, match="no base_model_fingerprint"):
        model = PeftModel.from_pretrained(build("llama"), delta, grin_fingerprint_check="off")
    assert sum(model.base_model.num_entries().values()) > 0


def test_without_a_fingerprint_the_checksum_is_still_verified(delta):
    edit_config(delta, lambda c: c.pop("base_model_fingerprint"))

    def corrupt(t):
        t[first_key(t, "grin_values")][0] = 2.28e38

    rewrite(delta, corrupt, keep_checksum=True)
    with grin_peft.fingerprint_check("warn"):
        load_expecting(delta, "checksum mismatch")


def test_without_a_fingerprint_a_differing_base_is_never_silent(delta):
    edit_config(delta, lambda c: c.pop("base_model_fingerprint"))
    load_expecting(delta, "records no base_model_fingerprint", base=build("llama", seed=5))
    with pytest.warns(UserWarning) as record:
        PeftModel.from_pretrained(build("llama", seed=5), delta, grin_fingerprint_check="warn")
    messages = " ".join(str(w.message) for w in record)
    assert "no base_model_fingerprint" in messages and "base weights differ at the delta's entries" in messages


def test_a_pickle_is_never_read(delta):
    tensors = load_file(delta / WEIGHTS)
    os.remove(delta / WEIGHTS)
    torch.save(tensors, delta / "adapter_model.bin")
    edit_config(delta, lambda c: c.pop("base_model_fingerprint"))
    with grin_peft.fingerprint_check("off"):
        load_expecting(delta, "no adapter_model.safetensors")


def test_the_file_cannot_switch_the_base_check_off(delta):
    edit_config(delta, lambda c: c.update(fingerprint_check="off"))
    with pytest.warns(UserWarning, match="fingerprint_check='off'; ignored"):
        load_expecting(delta, "fingerprint mismatch", base=build("llama", seed=5))


def test_the_opt_in_is_never_written_into_a_resaved_delta(delta, tmp_path):
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        model = PeftModel.from_pretrained(build("llama", seed=5), delta, grin_fingerprint_check="warn")
    model.save_pretrained(tmp_path / "again")
    assert "fingerprint_check" not in json.loads((tmp_path / "again" / "adapter_config.json").read_text())
    load_expecting(tmp_path / "again", "fingerprint mismatch", base=build("llama", seed=7))
    with pytest.raises(GrinError, match="no longer a config field"):
        GrinConfig.from_pretrained(delta).fingerprint_check = "warn"


def test_the_level_comes_from_the_caller_argument_context_or_environment(delta, monkeypatch):
    load_expecting(delta, "fingerprint mismatch", base=build("llama", seed=5))
    monkeypatch.setenv("GRIN_FINGERPRINT_CHECK", "warn")
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        PeftModel.from_pretrained(build("llama", seed=5), delta)
    with grin_peft.fingerprint_check("error"):
        load_expecting(delta, "fingerprint mismatch", base=build("llama", seed=5))
    with pytest.warns(UserWarning, match="fingerprint mismatch"):  # the config= path of the README
        PeftModel.from_pretrained(
            build("llama", seed=5), delta, config=GrinConfig.from_pretrained(delta), grin_fingerprint_check="warn"
        )
    monkeypatch.setenv("GRIN_FINGERPRINT_CHECK", "maybe")
    load_expecting(delta, "GRIN_FINGERPRINT_CHECK='maybe' is not one of", base=build("llama", seed=5))


@pytest.mark.parametrize("pattern", ["(.*.*)*X", "(a+)+$", "(x|.*)*y", "(a|aa)+$", ".*.*.*.*.*X", "a" * 600])
def test_a_pathological_target_modules_regex_is_refused_quickly(delta, pattern):
    import time

    edit_config(delta, lambda c: c.update(target_modules=pattern))
    start = time.monotonic()
    load_expecting(delta, "target_modules")
    assert time.monotonic() - start < 30


def test_ordinary_module_regexes_still_pass():
    for pattern in (r".*\.(q_proj|v_proj)$", r"model\.layers\.\d+\.self_attn\..*", "lin0", r".*(attn|mlp).*"):
        GrinConfig(target_modules=pattern)


def test_the_delta_is_read_once_and_what_was_verified_is_what_loads(delta, monkeypatch):
    original = load_file(delta / WEIGHTS)
    real_check = grin_peft.model.check_delta

    def check_then_swap(*args):  # the file changes between the check and the load
        real_check(*args)
        sign(delta, lambda t: [v.mul_(3) for k, v in t.items() if k.endswith("grin_values")])

    monkeypatch.setattr(grin_peft.model, "check_delta", check_then_swap)
    loaded = PeftModel.from_pretrained(build("llama"), delta)
    for name, layer in loaded.base_model.grin_layers().items():
        assert torch.equal(layer.grin_values["default"], original[f"base_model.model.{name}.grin_values"]), name


@pytest.mark.parametrize(
    ("change", "match"),
    [
        (lambda c: c.update(peft_type="grin"), "peft_type='grin'"),
        (lambda c: c.pop("peft_type"), "no peft_type"),
        (lambda c: c.clear(), "no peft_type"),
        (lambda c: c.update(eps_quantile="x"), "eps_quantile='x'"),
        (lambda c: c.update(target_modules=5), "target_modules=5"),
        (lambda c: c.update(layers_to_transform="0"), "layers_to_transform='0'"),
    ],
)
def test_bad_config_fields_are_grin_errors_naming_the_field(delta, change, match):
    edit_config(delta, change)
    load_expecting(delta, match)


def test_a_config_that_is_not_a_json_object_is_a_grin_error(delta):
    (delta / "adapter_config.json").write_text("[1, 2]")
    reseal(delta)
    load_expecting(delta, "must be a JSON object, got list")


def test_float8_values_are_grin_errors(delta):
    sign(
        delta,
        lambda t: t.update({first_key(t, "grin_values"): t[first_key(t, "grin_values")].to(torch.float8_e4m3fn)}),
    )
    load_expecting(delta, "GRIN values must be float16, bfloat16, float32 or float64")
    with pytest.raises(GrinError, match="eps_quantile"):
        GrinConfig(eps_quantile="x")
    with pytest.raises(GrinError, match="target_modules"):
        GrinConfig(target_modules=5)


def test_load_adapter_onto_a_loaded_model_gets_the_same_checks(delta, tmp_path):
    model = PeftModel.from_pretrained(build("llama"), delta)
    save_delta(tmp_path / "other", 0.01, build("llama", seed=5))
    before, types = state(model), [type(m) for m in model.modules()]
    with pytest.raises(GrinError, match="fingerprint mismatch"):
        model.load_adapter(tmp_path / "other", "other")
    sign(delta, lambda t: t.update({"base_model.model.lm_head.weight": torch.full((97, 32), 7.0)}))
    with pytest.raises(GrinError, match="lm_head.weight: the delta file holds a tensor"):
        model.load_adapter(delta, "again")
    assert sorted(model.peft_config) == ["default"] and [type(m) for m in model.modules()] == types
    assert state(model).keys() == before.keys()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    with pytest.warns(UserWarning, match="fingerprint mismatch"):
        model.load_adapter(tmp_path / "other", "other", grin_fingerprint_check="warn")
    assert sorted(model.peft_config) == ["default", "other"]


def test_a_delta_without_its_checksum_loads_with_a_warning(delta):
    rewrite(delta, lambda t: None)  # same tensors, metadata dropped
    with pytest.warns(UserWarning, match="without a grin_sha256 checksum"):
        PeftModel.from_pretrained(build("llama"), delta)


def test_revert_refuses_a_delta_with_an_extra_tensor_before_writing(delta):
    merged = PeftModel.from_pretrained(build("llama"), delta).merge_and_unload()
    before = state(merged)
    sign(delta, lambda t: t.update({"base_model.model.lm_head.weight": torch.zeros(97, 32)}))
    with pytest.raises(GrinError, match="lm_head.weight: the delta file holds a tensor"):
        grin_peft.revert(merged, str(delta))
    assert all(torch.equal(v, before[k]) for k, v in merged.state_dict().items())
