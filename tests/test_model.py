"""The GRIN tuner as a first-class PEFT method: injection, forward, save/load, merge, adapters, training."""

from __future__ import annotations

import os

import pytest
import torch
from peft import AutoPeftModelForCausalLM, PeftModel, get_peft_model
from peft.utils.peft_types import PeftType
from safetensors.torch import load_file
from tiny_models import build, example_input, output, state

import grin_peft
from grin_peft import GrinConfig, GrinError, GrinLayer

KINDS = ["mlp", "llama", "gpt2", "opt"]


def make_config(kind: str, **kwargs) -> GrinConfig:
    defaults = dict(
        target_modules=["lin0", "lin1"] if kind == "mlp" else "all-linear", density=0.05, score="random", seed=0
    )
    defaults.update(kwargs)
    return GrinConfig(**defaults)


def grin_model(kind: str, dtype=torch.float32, **kwargs):
    return get_peft_model(build(kind, dtype), make_config(kind, **kwargs))


def test_import_registers_grin_once():
    import importlib

    importlib.reload(grin_peft.registration)
    grin_peft.register()
    assert PeftType("GRIN") is grin_peft.GRIN_PEFT_TYPE
    assert list(PeftType).count(grin_peft.GRIN_PEFT_TYPE) == 1


@pytest.mark.parametrize("kind", KINDS)
def test_only_grin_values_are_trainable(kind):
    model = grin_model(kind)
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable and all(".grin_values." in n for n in trainable)
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == sum(
        model.base_model.num_entries().values()
    )


@pytest.mark.parametrize("kind", KINDS)
def test_zero_delta_or_disabled_adapter_equals_base(kind):
    base = build(kind)
    inputs = example_input(kind)
    expected = output(base, inputs)
    model = get_peft_model(base, make_config(kind, noise_std=0.0))
    torch.testing.assert_close(output(model, inputs), expected, rtol=0, atol=0)
    model = grin_model(kind, init_weights=False)
    assert not torch.allclose(output(model, inputs), expected)
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), expected, rtol=0, atol=0)


def test_budget_is_global_by_default_and_counts_differ_per_module():
    model = grin_model("llama", density=0.02)
    counts = model.base_model.num_entries()
    targeted = sum(layer.grin_numel for layer in model.base_model.grin_layers().values())
    assert sum(counts.values()) == round(0.02 * targeted)
    assert len(set(counts.values())) > 1


def test_per_module_selection_gives_every_module_the_same_density():
    model = grin_model("llama", density=0.02, selection="per_module")
    for name, layer in model.base_model.grin_layers().items():
        assert abs(layer.grin_num_entries("default") - 0.02 * layer.grin_numel) <= 1, name


def test_num_entries_budget_and_magnitude_score():
    model = grin_model("mlp", density=None, num_entries=7, score="magnitude")
    layers = model.base_model.grin_layers()
    assert sum(model.base_model.num_entries().values()) == 7
    chosen = torch.cat(
        [
            layer.get_base_layer().weight.detach().reshape(-1)[layer.grin_indices["default"].long()]
            for layer in layers.values()
        ]
    ).abs()
    everything = torch.cat([layer.get_base_layer().weight.detach().reshape(-1) for layer in layers.values()]).abs()
    assert chosen.min() >= torch.topk(everything, 7).values.min()


def test_same_seed_same_selection_other_seed_differs():
    def idx(model):
        return torch.cat([layer.grin_indices["default"].long() for layer in model.base_model.grin_layers().values()])

    assert torch.equal(idx(grin_model("llama", seed=3)), idx(grin_model("llama", seed=3)))
    assert not torch.equal(idx(grin_model("llama", seed=3)), idx(grin_model("llama", seed=4)))


def test_indices_are_int32_saved_buffers_and_file_is_compact(tmp_path):
    model = grin_model("llama", density=0.01)  # low density: the index form (test_delta_file covers the bitmask)
    model.save_pretrained(tmp_path)
    tensors = load_file(tmp_path / "adapter_model.safetensors")
    entries = sum(model.base_model.num_entries().values())
    assert {k.rsplit(".", 1)[1] for k in tensors} == {"grin_indices", "grin_values", "grin_base_values"}
    assert all(t.dtype == torch.int32 for k, t in tensors.items() if k.endswith("grin_indices"))
    assert sum(t.numel() for t in tensors.values()) == 3 * entries
    assert os.path.getsize(tmp_path / "adapter_model.safetensors") < 12 * entries + 16_384


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_save_load_round_trip_is_exact(kind, dtype, tmp_path):
    model = grin_model(kind, dtype, init_weights=False)
    inputs = example_input(kind, dtype)
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build(kind, dtype), tmp_path)
    for name, layer in model.base_model.grin_layers().items():
        other = loaded.base_model.model.get_submodule(name)
        assert torch.equal(layer.grin_indices["default"], other.grin_indices["default"])
        assert torch.equal(layer.grin_values["default"], other.grin_values["default"])
    torch.testing.assert_close(output(loaded, inputs), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_merge_matches_adapter_and_unmerge_and_unload_are_exact(kind, dtype):
    base_state = state(build(kind, dtype))
    model = grin_model(kind, dtype, init_weights=False)
    inputs = example_input(kind, dtype)
    expected = output(model, inputs)
    model.merge_adapter()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(output(model, inputs), expected, rtol=tol, atol=tol)
    model.unmerge_adapter()
    for name, layer in model.base_model.grin_layers().items():
        assert torch.equal(layer.get_base_layer().weight, base_state[f"{name}.weight"])
    unloaded = model.unload()
    assert all(torch.equal(v, base_state[k]) for k, v in unloaded.state_dict().items())


def test_merge_and_unload_returns_plain_model_with_delta():
    model = grin_model("llama", init_weights=False)
    inputs = example_input("llama")
    expected = output(model, inputs)
    merged = model.merge_and_unload()
    assert not any(isinstance(m, GrinLayer) for m in merged.modules())
    torch.testing.assert_close(output(merged, inputs), expected, rtol=1e-5, atol=1e-5)


def test_safe_merge_refuses_nan_and_leaves_every_weight_untouched():
    base_state = state(build("llama"))
    model = grin_model("llama", init_weights=False)
    last = list(model.base_model.grin_layers().values())[-1]
    with torch.no_grad():
        last.grin_values["default"][0] = float("nan")
    with pytest.raises(GrinError, match="NaN"):
        model.merge_adapter(safe_merge=True)
    with pytest.raises(GrinError, match="NaN"):
        model.merge_and_unload(safe_merge=True)
    assert not any(layer.merged for layer in model.base_model.grin_layers().values())
    for name, layer in model.base_model.grin_layers().items():
        assert torch.equal(layer.get_base_layer().weight, base_state[f"{name}.weight"])


def test_several_adapters_set_delete_and_weighted_sum():
    model = grin_model("llama", init_weights=False, seed=0)
    model.add_adapter("other", make_config("llama", init_weights=False, seed=1))
    inputs = example_input("llama")
    first = output(model, inputs)
    model.set_adapter("other")
    second = output(model, inputs)
    assert not torch.allclose(first, second)
    model.base_model.add_weighted_adapter(["default", "other"], [1.0, 1.0], "sum")
    for name, layer in model.base_model.grin_layers().items():
        dense = layer.get_delta_weight("default") + layer.get_delta_weight("other")
        torch.testing.assert_close(layer.get_delta_weight("sum"), dense)
        union = torch.unique(torch.cat([layer.grin_indices[a].long() for a in ("default", "other")]))
        assert torch.equal(layer.grin_indices["sum"].long(), union), name
    with pytest.warns(UserWarning, match="now deleted"):  # PEFT falls back to the first adapter
        model.delete_adapter("other")
    assert "other" not in model.peft_config and model.active_adapter == "default"
    assert all("other" not in layer.grin_values for layer in model.base_model.grin_layers().values())
    with pytest.raises(GrinError):
        model.base_model.add_weighted_adapter(["default", "missing"], [1.0, 1.0], "bad")


def test_an_optimizer_step_changes_only_grin_values():
    model = grin_model("llama")
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    values = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids = example_input("llama")["input_ids"]
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    for n, p in model.named_parameters():
        if n in frozen:
            assert torch.equal(p, frozen[n]), n
    assert any(not torch.equal(p, values[n]) for n, p in model.named_parameters() if n in values)


def test_auto_peft_model_loads_base_and_delta(tmp_path):
    base = build("llama")
    base.save_pretrained(tmp_path / "base")
    model = get_peft_model(base, make_config("llama", init_weights=False))
    model.peft_config["default"].base_model_name_or_path = str(tmp_path / "base")
    model.save_pretrained(tmp_path / "delta")
    loaded = AutoPeftModelForCausalLM.from_pretrained(tmp_path / "delta")
    inputs = example_input("llama")
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=1e-6, atol=1e-6)


def test_gradient_ratio_score_waits_for_localize():
    model = get_peft_model(build("llama"), GrinConfig(target_modules="all-linear"))
    assert sum(model.base_model.num_entries().values()) == 0
    inputs = example_input("llama")
    torch.testing.assert_close(output(model, inputs), output(build("llama"), inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- high density: dense regime and bitmask files
@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("density", [0.25, 0.5])
def test_high_density_round_trip_merge_unmerge_and_unload_are_exact(kind, dtype, density, tmp_path):
    base_state = state(build(kind, dtype))
    model = grin_model(kind, dtype, density=density, init_weights=False)
    inputs = example_input(kind, dtype)
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    assert any(k.endswith("grin_mask") for k in load_file(tmp_path / "adapter_model.safetensors"))
    loaded = PeftModel.from_pretrained(build(kind, dtype), tmp_path)
    for name, layer in model.base_model.grin_layers().items():
        other = loaded.base_model.model.get_submodule(name)
        assert torch.equal(layer.grin_indices["default"], other.grin_indices["default"]), name
        assert torch.equal(layer.grin_values["default"], other.grin_values["default"]), name
        assert torch.equal(layer.grin_base_values["default"], other.grin_base_values["default"]), name
    torch.testing.assert_close(output(loaded, inputs), expected, rtol=0, atol=0)
    loaded.merge_adapter()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(output(loaded, inputs), expected, rtol=tol, atol=tol)
    loaded.unmerge_adapter()
    for name, layer in loaded.base_model.grin_layers().items():
        assert torch.equal(layer.get_base_layer().weight, base_state[f"{name}.weight"]), name
    unloaded = loaded.unload()
    assert all(torch.equal(v, base_state[k]) for k, v in unloaded.state_dict().items())
