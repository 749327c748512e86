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
import grin_peft.layer as layer_module
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


@pytest.fixture
def paths(monkeypatch):
    """Counts of forward calls that took the dense regime and the sparse op, on the reference path (what CUDA,
    Conv1D and hooked bases run; the CPU fast path serves every density, tests/test_fused_weight.py)."""
    monkeypatch.setattr(layer_module.GrinLayer, "grin_fused", False)
    counts = {"dense": 0, "sparse": 0}

    def counting(kind, fn):
        def wrapper(*args, **kwargs):
            counts[kind] += 1
            return fn(*args, **kwargs)

        return wrapper

    monkeypatch.setattr(layer_module, "merged_linear", counting("dense", layer_module.merged_linear))
    monkeypatch.setattr(layer_module, "sparse_delta_linear", counting("sparse", layer_module.sparse_delta_linear))
    return counts


def forward_backward(model, kind, dtype=torch.float32):
    """Output and every layer's value gradient for a fixed, non-trivial loss."""
    out = output(model, example_input(kind, dtype))
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(3)).to(dtype)
    model.zero_grad()
    (out * weights).float().sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return out.detach(), grads


@pytest.mark.parametrize("kind", KINDS)
def test_dense_regime_output_and_value_gradients_equal_the_sparse_paths(kind, paths):
    # the default noise-initialised delta (init_weights=False's unit-variance values make the tiny nets chaotic)
    sparse_model = grin_model(kind, density=0.3, dense_threshold=1.0)
    dense_model = grin_model(kind, density=0.3, dense_threshold=0.0)
    layers = len(sparse_model.base_model.grin_layers())
    sparse_out, sparse_grads = forward_backward(sparse_model, kind)
    assert paths == {"dense": 0, "sparse": layers}
    dense_out, dense_grads = forward_backward(dense_model, kind)
    assert paths == {"dense": layers, "sparse": layers}
    # float32 rounding only (summation order, W + D rounded once): within 1e-6 of each tensor's scale
    torch.testing.assert_close(dense_out, sparse_out, rtol=1e-5, atol=1e-6 * float(sparse_out.abs().max()))
    assert sparse_grads.keys() == dense_grads.keys()
    for name, grad in sparse_grads.items():
        torch.testing.assert_close(dense_grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_dense_regime_in_half_precision_trains_like_the_sparse_path(dtype, paths):
    sparse = forward_backward(grin_model("llama", dtype, density=0.3, dense_threshold=1.0), "llama", dtype)
    dense = forward_backward(grin_model("llama", dtype, density=0.3, dense_threshold=0.0), "llama", dtype)
    assert paths["dense"] > 0
    torch.testing.assert_close(dense[0], sparse[0], rtol=5e-2, atol=5e-2)
    for name, grad in sparse[1].items():  # the dense weight gradient is rounded to 16 bits before the gather
        cosine = torch.nn.functional.cosine_similarity(dense[1][name].flatten(), grad.flatten(), dim=0)
        assert cosine > 0.99, name


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_dense_regime_output_is_the_merged_models_bit_for_bit(kind, dtype, paths):
    model = grin_model(kind, dtype, density=0.3, dense_threshold=0.0)
    inputs = example_input(kind, dtype)
    with torch.no_grad():
        unmerged = output(model, inputs)
        model.merge_adapter()
        merged = output(model, inputs)
    assert paths["dense"] == len(model.base_model.grin_layers())
    torch.testing.assert_close(unmerged, merged, rtol=0, atol=0)  # same weights, same rounding, same matmul


def test_dense_threshold_picks_the_path_per_layer(paths):
    model = grin_model("mlp", dense_threshold=0.2)
    g = torch.Generator().manual_seed(0)
    selected = {"lin0": torch.randperm(200, generator=g)[:100].sort().values, "lin1": torch.arange(0, 320, 20)}
    model.base_model.set_entries("default", selected)  # lin0: 50% of 200 entries, lin1: 5% of 320
    output(model, example_input("mlp"))
    assert paths == {"dense": 1, "sparse": 1}
    model.base_model.model.lin1.grin_dense_threshold["default"] = 0.05  # 16 entries are not above 5%
    output(model, example_input("mlp"))
    assert paths == {"dense": 2, "sparse": 2}
    model.base_model.model.lin1.grin_dense_threshold["default"] = 0.0499
    output(model, example_input("mlp"))
    assert paths == {"dense": 4, "sparse": 2}


def test_defaults_stay_sparse_at_low_density_and_go_dense_at_high(paths):
    output(grin_model("llama", density=0.01), example_input("llama"))
    assert paths["dense"] == 0 and paths["sparse"] > 0
    paths["sparse"] = 0
    output(grin_model("llama", density=0.5, selection="per_module"), example_input("llama"))
    assert paths["sparse"] == 0 and paths["dense"] > 0


def test_a_hooked_base_layer_keeps_the_sparse_path_and_its_hook(paths):
    model = grin_model("mlp", density=0.5, dense_threshold=0.0)
    seen = []
    model.base_model.model.lin0.get_base_layer().register_forward_hook(lambda *args: seen.append(1))
    output(model, example_input("mlp"))
    assert seen == [1] and paths == {"dense": 1, "sparse": 1}
