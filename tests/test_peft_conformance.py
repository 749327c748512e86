"""GRIN as a first-class PEFT method: the checks PEFT runs on every tuner, over a table of tiny models x GRIN configs.

Written after PEFT's own test matrix (tests/test_custom_models.py, tests/test_decoder_models.py, tests/test_config.py
in huggingface/peft), not copied from it. Where GRIN deliberately differs from PEFT's conventions (noise written at
creation, refusal of a config or delta made for another base, no pickled saves) the test says so and checks the
setting that gives PEFT's behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from gloo_ranks import run_ranks
from peft import LoraConfig, PeftConfig, PeftModel, get_peft_model
from tiny_models import build, example_input, output, state

from grin_peft import GrinConfig, GrinError, GrinLayer
from grin_peft.integrity import write_manifest

HERE = os.path.dirname(os.path.abspath(__file__))

# (model kind, GrinConfig fields): plain MLP, MLP + modules_to_save, Llama all-linear (the default target) and regex,
# GPT-2 Conv1D at a density that takes the dense regime, OPT with an absolute budget; random and magnitude scores,
# global and per-module budgets
CASES = [
    ("mlp", {"target_modules": ["lin0", "lin1"], "density": 0.1, "score": "random"}),
    ("mlp", {"target_modules": ["lin0"], "modules_to_save": ["lin2"], "density": 0.2, "score": "magnitude"}),
    ("llama", {"density": 0.05, "score": "random"}),
    (
        "llama",
        {"target_modules": r".*\.mlp\..*_proj", "density": 0.02, "score": "magnitude", "selection": "per_module"},
    ),
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "density": 0.3, "score": "random"}),
    ("opt", {"target_modules": "all-linear", "num_entries": 40, "score": "random"}),
]
IDS = ["mlp", "mlp-modules_to_save", "llama-default", "llama-regex-per_module", "gpt2-conv1d-dense", "opt-num_entries"]


@pytest.fixture(autouse=True)
def _one_thread(one_thread):
    yield


@pytest.fixture(params=CASES, ids=IDS)
def case(request):
    return request.param


def grin(kind: str, fields: dict, base=None, **overrides) -> PeftModel:
    return get_peft_model(base if base is not None else build(kind), GrinConfig(**{**fields, **overrides}))


def entries(model: PeftModel, adapter: str = "default") -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (layer.grin_indices[adapter].long().clone(), layer.grin_values[adapter].detach().clone())
        for name, layer in model.base_model.grin_layers(adapter).items()
    }


def total_entries(model: PeftModel, adapter: str = "default") -> int:
    return sum(model.base_model.num_entries(adapter).values())


# ---------------------------------------------------------------- forward, disable, the PEFT-way identity setting
def test_forward_changes_the_output_and_disabling_restores_the_base_exactly(case):
    kind, fields = case
    inputs = example_input(kind)
    expected = output(build(kind), inputs)
    model = grin(kind, fields)
    assert total_entries(model) > 0
    assert not torch.allclose(output(model, inputs), expected)  # GRIN writes noise into the delta at creation
    with model.disable_adapter():
        torch.testing.assert_close(output(model, inputs), expected, rtol=0, atol=0)
    assert not torch.allclose(output(model, inputs), expected)


def test_noise_std_zero_is_the_peft_way_identity_adapter_at_init(case):
    kind, fields = case
    inputs = example_input(kind)
    model = grin(kind, fields, noise_std=0.0)
    assert total_entries(model) > 0
    torch.testing.assert_close(output(model, inputs), output(build(kind), inputs), rtol=0, atol=0)


# ---------------------------------------------------------------- save / load
def test_save_load_round_trip_is_exact_and_records_the_drawn_seed(case, tmp_path):
    kind, fields = case
    model = grin(kind, fields)
    inputs = example_input(kind)
    expected = output(model, inputs)
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert isinstance(saved["seed"], int) and saved["seed"] == model.peft_config["default"].seed
    loaded = PeftModel.from_pretrained(build(kind), tmp_path)
    for name, (idx, values) in entries(model).items():
        other = loaded.base_model.model.get_submodule(name)
        assert torch.equal(other.grin_indices["default"].long(), idx), name
        assert torch.equal(other.grin_values["default"], values), name
    torch.testing.assert_close(output(loaded, inputs), expected, rtol=0, atol=0)
    assert not any(p.requires_grad for p in loaded.parameters())  # PEFT loads for inference by default
    trainable = PeftModel.from_pretrained(build(kind), tmp_path, is_trainable=True)
    names = {n for n, p in trainable.named_parameters() if p.requires_grad}
    assert names == {n for n, p in model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize("call", ["keyword", "positional"])
def test_a_pickled_save_is_refused_before_anything_is_written(call, tmp_path):
    model = grin("mlp", CASES[0][1])
    target = tmp_path / "delta"
    with pytest.raises(GrinError, match="safe_serialization=False"):
        if call == "keyword":
            model.save_pretrained(target, safe_serialization=False)
        else:
            model.save_pretrained(target, False)
    assert not target.exists()
    with pytest.raises(GrinError, match="pickle"):
        model.save_pretrained(target, safe_serialization=False, selected_adapters=["default"])
    assert not target.exists()


def test_a_pickled_delta_is_never_unpickled(tmp_path, monkeypatch):
    model = grin("mlp", CASES[0][1])
    model.save_pretrained(tmp_path)
    tensors = {k: v for k, v in model.state_dict().items() if ".grin_" in k}
    torch.save(tensors, tmp_path / "adapter_model.bin")  # what PEFT writes for safe_serialization=False
    os.remove(tmp_path / "adapter_model.safetensors")

    def no_unpickling(*args, **kwargs):
        raise AssertionError("torch.load was called on a delta")

    monkeypatch.setattr(torch, "load", no_unpickling)
    base = build("mlp")
    before = state(base)
    with pytest.raises(GrinError, match="no adapter_model.safetensors"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not any(isinstance(m, GrinLayer) for m in base.modules())
    assert all(torch.equal(v, before[k]) for k, v in base.state_dict().items())


def test_lora_still_saves_pickles_when_asked(tmp_path):
    model = get_peft_model(build("mlp"), LoraConfig(target_modules=["lin0"]))
    model.save_pretrained(tmp_path, safe_serialization=False)
    assert (tmp_path / "adapter_model.bin").exists()


# ---------------------------------------------------------------- merge / unmerge
def test_merge_matches_the_adapter_and_unmerge_restores_the_base_exactly(case):
    kind, fields = case
    base_state = state(build(kind))
    model = grin(kind, fields)
    inputs = example_input(kind)
    expected = output(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), expected, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()
    assert all(
        torch.equal(v, base_state[k]) for k, v in model.base_model.model.state_dict().items() if k in base_state
    )
    merged = model.merge_and_unload()
    assert not any(isinstance(m, GrinLayer) for m in merged.modules())
    torch.testing.assert_close(output(merged, inputs), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("safe_merge", [False, True])
def test_nan_refusal_at_merge_uses_peft_message_and_merges_nothing(safe_merge):
    base_state = state(build("llama"))
    model = grin("llama", CASES[2][1])
    layer = list(model.base_model.grin_layers().values())[-1]
    with torch.no_grad():
        layer.grin_values["default"][0] = float("nan")
    with pytest.raises(
        ValueError, match="NaNs detected in the merged weights. The adapter default seems to be broken"
    ):
        model.merge_adapter(safe_merge=safe_merge)
    assert not any(layer.merged for layer in model.base_model.grin_layers().values())
    for name, grin_layer in model.base_model.grin_layers().items():
        assert torch.equal(grin_layer.get_base_layer().weight, base_state[f"{name}.weight"]), name


# ---------------------------------------------------------------- add_adapter, torch's RNG, config reuse
def test_add_adapter_selects_entries_with_the_same_budget_and_different_draws(case):
    kind, fields = case
    config = GrinConfig(**fields)
    model = get_peft_model(build(kind), config)
    model.add_adapter("other", config)
    assert total_entries(model, "other") == total_entries(model, "default") > 0
    assert model.peft_config["other"].base_model_fingerprint == model.peft_config["default"].base_model_fingerprint
    assert model.peft_config["other"].seed != model.peft_config["default"].seed
    first, second = entries(model, "default"), entries(model, "other")
    assert first.keys() == second.keys()
    differs = [not (torch.equal(first[n][0], second[n][0]) and torch.equal(first[n][1], second[n][1])) for n in first]
    assert any(differs)
    # only the active adapter trains; the added one is frozen until activated
    assert all(not p.requires_grad for n, p in model.named_parameters() if ".other" in n)
    model.set_adapter("other")
    assert any(p.requires_grad for n, p in model.named_parameters() if ".other" in n)


def test_a_selection_that_fails_leaves_the_model_as_it_was():
    base = build("mlp")
    before = state(base)
    too_many = {"target_modules": ["lin0"], "num_entries": 10**6, "score": "random"}
    with pytest.raises(GrinError, match="exceeds"):
        get_peft_model(base, GrinConfig(**too_many))
    assert not any(isinstance(m, GrinLayer) for m in base.modules())
    assert state(base).keys() == before.keys()
    model = grin("mlp", CASES[0][1])
    names = set(model.state_dict())
    with pytest.raises(GrinError, match="exceeds"):
        model.add_adapter("other", GrinConfig(**too_many))
    assert "other" not in model.peft_config and set(model.state_dict()) == names


def test_torch_manual_seed_reproduces_an_adapter_and_an_explicit_seed_ignores_torch():
    fields = CASES[2][1]
    torch.manual_seed(7)
    first = entries(grin("llama", fields))
    torch.manual_seed(7)
    again = entries(grin("llama", fields))
    assert all(torch.equal(first[n][0], again[n][0]) and torch.equal(first[n][1], again[n][1]) for n in first)
    torch.manual_seed(1)
    fixed = entries(grin("llama", fields, seed=3))
    torch.manual_seed(2)
    fixed_again = entries(grin("llama", fields, seed=3))
    assert all(torch.equal(fixed[n][0], fixed_again[n][0]) for n in fixed)


def test_a_config_is_never_mutated_and_can_be_reused_for_other_models(case):
    kind, fields = case
    config = GrinConfig(**fields)
    pristine = dataclasses.asdict(config)
    one = get_peft_model(build(kind), config)
    other_base = get_peft_model(build(kind, seed=5), config)
    same_base = get_peft_model(build(kind), config)
    changed = {k for k, v in dataclasses.asdict(config).items() if v != pristine[k]}
    assert changed <= {"base_model_name_or_path", "revision"}  # what get_peft_model itself writes, as for LoRA
    assert config.base_model_fingerprint is None and config.seed is None
    assert total_entries(one) == total_entries(other_base) == total_entries(same_base) > 0


def test_a_config_copied_from_another_base_is_refused_unless_its_fingerprint_is_cleared():
    model = grin("llama", CASES[2][1])
    made_for_this_base = model.peft_config["default"]
    with pytest.raises(GrinError, match="fingerprint mismatch"):  # GRIN's fingerprint refusal
        get_peft_model(build("llama", seed=5), made_for_this_base)
    fresh = dataclasses.replace(made_for_this_base, base_model_fingerprint=None)  # the PEFT way: a new adapter
    assert total_entries(get_peft_model(build("llama", seed=5), fresh)) > 0
    again = get_peft_model(build("llama"), made_for_this_base)  # the same base: a new adapter with the same draw
    assert all(torch.equal(again_idx, entries(model)[n][0]) for n, (again_idx, _) in entries(again).items())


# ---------------------------------------------------------------- several adapters: active together, delete
def test_multiple_active_adapters_add_their_deltas(case):
    kind, fields = case
    model = grin(kind, fields)
    # PEFT allows one active modules_to_save copy per module (for every method), so the second adapter has none
    model.add_adapter("other", GrinConfig(**{**fields, "modules_to_save": None}))
    model.base_model.set_adapter(["default", "other"])
    for name, layer in model.base_model.grin_layers().items():
        x = torch.randn(3, layer.in_features, generator=torch.Generator().manual_seed(0))
        expected = layer.base_layer(x)
        for adapter in ("default", "other"):
            expected = expected + x @ _dense_out_in(layer, adapter).T
        torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5, msg=name)
    inputs = example_input(kind)
    both = output(model, inputs)
    model.merge_adapter()
    torch.testing.assert_close(output(model, inputs), both, rtol=1e-5, atol=1e-5)
    model.unmerge_adapter()


def _dense_out_in(layer: GrinLayer, adapter: str) -> torch.Tensor:
    """The adapter's delta as an [out, in] matrix, whatever the layout the weight is stored in (Conv1D: [in, out])."""
    delta = layer.get_delta_weight(adapter)
    return delta.T if layer.fan_in_fan_out else delta


def test_delete_adapter_removes_every_trace_and_keeps_the_other(case):
    kind, fields = case
    model = grin(kind, fields)
    inputs = example_input(kind)
    expected = output(model, inputs)
    model.add_adapter("other", GrinConfig(**fields))
    model.delete_adapter("other")
    assert "other" not in model.peft_config
    assert not any(".other" in key for key in model.state_dict())
    torch.testing.assert_close(output(model, inputs), expected, rtol=0, atol=0)


# ---------------------------------------------------------------- training
def test_training_updates_exactly_the_adapters_parameters(case):
    kind, fields = case
    model = grin(kind, fields)
    model.train()
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".grin_values.default" in n or ".modules_to_save.default." in n for n in trainable), (
        trainable
    )
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
    for _ in range(2):
        out = output(model, example_input(kind))
        optimizer.zero_grad()
        out.float().pow(2).mean().backward()
        # every trainable parameter is in the graph, also the empty values of a module the budget left without entries
        assert all(p.grad is not None for n, p in model.named_parameters() if n in trainable)
        optimizer.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed == {n for n in trainable if before[n].numel()}


def test_a_module_left_without_entries_gets_a_zero_gradient_and_changes_nothing():
    fields = {"target_modules": ["lin0", "lin1"], "num_entries": 1, "score": "magnitude"}
    model = grin("mlp", fields)
    counts = model.base_model.num_entries()
    assert sorted(counts.values()) == [0, 1]
    empty = model.base_model.model.get_submodule(next(name for name, count in counts.items() if count == 0))
    inputs = example_input("mlp")
    with torch.no_grad():
        expected = output(model, inputs)
    out = output(model, inputs)
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.sum().backward()
    assert empty.grin_values["default"].grad is not None and empty.grin_values["default"].grad.numel() == 0
    # entries arriving later (localize, re-localisation) train like any others
    model.base_model.set_entries("default", {name: torch.tensor([0, 3]) for name in counts})
    assert empty.grin_values["default"].requires_grad


def test_ddp_trains_with_a_module_that_got_no_entries(tmp_path):
    run_ranks("peft_ddp_worker.py", tmp_path, threads=1)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert sorted(ranks[0]["entries"].values()) == [0, 1]
    assert sorted(ranks[0]["trainable"].values()) == [0, 1]  # the empty values stay trainable and get a gradient
    initial = entries(grin("mlp", {"target_modules": ["lin0", "lin1"], "num_entries": 1, "score": "magnitude"}))
    for name, values in ranks[0]["values"].items():
        assert torch.equal(values, ranks[1]["values"][name]), name  # gradients were averaged across the ranks
        if values.numel():
            assert not torch.equal(values, initial[name][1]), name


# ---------------------------------------------------------------- dtype autocast
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_adapter_dtype_on_and_off(dtype, tmp_path):
    fields = CASES[2][1]
    inputs = example_input("llama", dtype)
    default = get_peft_model(build("llama", dtype), GrinConfig(**fields))
    kept = get_peft_model(build("llama", dtype), GrinConfig(**fields), autocast_adapter_dtype=False)
    kept.add_adapter("other", GrinConfig(**fields), autocast_adapter_dtype=False)
    default.add_adapter("other", GrinConfig(**fields))
    for model, values_dtype in ((default, torch.float32), (kept, dtype)):
        for layer in model.base_model.grin_layers().values():
            for adapter in ("default", "other"):
                assert layer.grin_values[adapter].dtype == values_dtype
                assert layer.grin_base_values[adapter].dtype == dtype  # the weight's exact entries
        out = output(model, inputs)
        assert out.dtype == dtype and bool(torch.isfinite(out).all())
    kept.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(build("llama", dtype), tmp_path, autocast_adapter_dtype=False)
    for name, layer in kept.base_model.grin_layers().items():
        assert torch.equal(
            loaded.base_model.model.get_submodule(name).grin_values["default"], layer.grin_values["default"]
        )
    torch.testing.assert_close(output(loaded, inputs), output(kept, inputs), rtol=0, atol=0)
    kept.base_model.model.train()
    output(kept, inputs).float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for n, p in kept.named_parameters() if p.requires_grad)


# ---------------------------------------------------------------- layers_to_transform
@pytest.mark.parametrize(
    "targets", [None, "all-linear", r".*\.(q_proj|v_proj|down_proj)", ["q_proj", "v_proj", "down_proj"]]
)
@pytest.mark.parametrize("layers", [0, [1], [0, 1]])
def test_layers_to_transform_applies_to_every_form_of_target_modules(targets, layers):
    model = grin(
        "llama", {"target_modules": targets, "layers_to_transform": layers, "density": 0.05, "score": "random"}
    )
    wanted = {layers} if isinstance(layers, int) else set(layers)
    wrapped = {name for name, m in model.base_model.model.named_modules() if isinstance(m, GrinLayer)}
    assert wrapped and {int(name.split(".layers.")[1].split(".")[0]) for name in wrapped} == wanted
    assert total_entries(model) > 0


def test_layers_pattern_names_the_layer_stack():
    model = grin(
        "gpt2", {"target_modules": ["c_attn"], "layers_to_transform": 1, "layers_pattern": "h", "density": 0.05}
    )
    wrapped = [name for name, m in model.base_model.model.named_modules() if isinstance(m, GrinLayer)]
    assert wrapped == ["transformer.h.1.attn.c_attn"]


# ---------------------------------------------------------------- configs: unknown keys, unknown kwargs, other types
def test_unknown_keys_in_a_saved_config_warn_and_are_ignored(tmp_path):
    model = grin("mlp", CASES[0][1])
    model.save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "added_in_a_newer_grin_peft": [1, 2]}))
    write_manifest(tmp_path)  # a newer grin_peft's save: its manifest covers the config it wrote
    with pytest.warns(UserWarning, match="added_in_a_newer_grin_peft"):
        loaded = PeftModel.from_pretrained(build("mlp"), tmp_path)
    inputs = example_input("mlp")
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=0, atol=0)


def test_known_keys_and_peft_type_stay_strict(tmp_path):
    grin("mlp", CASES[0][1]).save_pretrained(tmp_path)
    path = tmp_path / "adapter_config.json"
    raw = json.loads(path.read_text())
    path.write_text(json.dumps({**raw, "density": 7}))
    with pytest.raises(GrinError, match="density"):
        PeftModel.from_pretrained(build("mlp"), tmp_path)
    with pytest.raises(GrinError, match="peft_type"):
        GrinConfig.check_kwargs(**{**raw, "peft_type": "grin"})


def test_grin_key_check_leaves_other_methods_configs_alone(tmp_path):
    LoraConfig(target_modules=["lin0"], r=4).save_pretrained(tmp_path)
    raw = json.loads((tmp_path / "adapter_config.json").read_text())
    assert GrinConfig.check_kwargs(**raw) == raw
    loaded = GrinConfig.from_pretrained(tmp_path)
    assert isinstance(loaded, LoraConfig) and loaded.r == 4
    assert not hasattr(loaded, "_grin_source")


def test_unknown_keyword_arguments_raise_type_error():
    with pytest.raises(TypeError, match="unexpected keyword argument 'rank'"):
        GrinConfig(rank=8)
    with pytest.raises(GrinError):
        GrinConfig(rank=8)
    with pytest.warns(UserWarning, match="rank"):  # PEFT's own forward-compatibility path catches it as TypeError
        config = PeftConfig.from_peft_type(peft_type="GRIN", density=0.5, rank=8)
    assert isinstance(config, GrinConfig) and config.density == 0.5


# ---------------------------------------------------------------- importing grin_peft changes nothing for LoRA
LORA_SCRIPT = """
import hashlib, os, sys, tempfile
sys.path.insert(0, {tests!r})
import torch
if {with_grin!r}:
    import grin_peft
from peft import LoraConfig, PeftModel, get_peft_model
from tiny_models import build, example_input, output

def digest(tensors):
    h = hashlib.sha256()
    for key in sorted(tensors):
        h.update(key.encode()); h.update(tensors[key].detach().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()

torch.manual_seed(0)
config = LoraConfig(target_modules="all-linear", r=4, init_lora_weights=False)
model = get_peft_model(build("llama"), config)
inputs = example_input("llama")
lines = [digest(model.state_dict()), digest({{"out": output(model, inputs)}})]
with tempfile.TemporaryDirectory() as tmp:
    model.save_pretrained(tmp)
    lines.append(hashlib.sha256(open(os.path.join(tmp, "adapter_model.safetensors"), "rb").read()).hexdigest())
    lines.append(",".join(sorted(os.listdir(tmp))))
    loaded = PeftModel.from_pretrained(build("llama"), tmp)
    lines.append(digest({{"out": output(loaded, inputs)}}))
    model.add_adapter("second", config)
    model.merge_adapter()
    lines.append(digest({{"out": output(model, inputs)}}))
print("\\n".join(lines))
"""


def test_importing_grin_peft_changes_nothing_for_lora():
    runs = []
    for with_grin in (False, True):
        script = LORA_SCRIPT.format(tests=HERE, with_grin=with_grin)
        env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.path.dirname(HERE)}
        done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(done.stdout.split())
    assert len(runs[0]) == 6 and runs[0] == runs[1]
