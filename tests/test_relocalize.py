"""Specification of re-localisation: growing a GRIN delta during training.

Every ``relocalize_every`` optimizer steps the adapter is rescored at the current weights and grows by
``relocalize_grow`` x the initial budget; trained entries keep their values (and optimizer state), new ones start at
0 and train; the grown delta saves, loads, merges and reverts exactly. Runs on an untrained tiny Llama and planted
token sequences (localize_dist_worker), one torch thread.
"""

from __future__ import annotations

import copy

import pytest
import torch
from localize_dist_worker import planted_model, planted_sequences
from peft import PeftModel, get_peft_model
from tiny_models import build
from transformers import TrainerCallback

from grin_peft import GrinConfig, GrinError, revert
from grin_peft.localize.pipeline import compute_scores, current_scores
from grin_peft.localize.select import free_to_index, select_growth
from grin_peft.noise import noise_values
from grin_peft.relocalize import RelocalizeCallback, replace_in_optimizer
from grin_peft.trainer import UnlearningTrainer
from grin_peft.unlearning_args import UnlearningArguments

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def data():
    generator = torch.Generator().manual_seed(0)
    return planted_sequences(8, generator), planted_sequences(16, generator)


def grin_llama(data, **options):
    """A GRIN adapter on a fresh tiny Llama, localized on the planted data; returns (base copy, peft model)."""
    forget, retain = data
    base = planted_model(hidden=16)
    settings = dict(target_modules="all-linear", num_entries=40, noise_std=0.0, eps=0.01)
    model = get_peft_model(copy.deepcopy(base), GrinConfig(**{**settings, **options}))
    if not model.peft_config["default"].selects_at_injection:
        model.localize(forget, retain, progress=False)
    return base, model


def entries(model) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    return {
        name: (layer.grin_indices["default"].long().clone(), layer.grin_values["default"].detach().clone())
        for name, layer in model.base_model.grin_layers("default").items()
    }


def make_args(tmp_path, **kw) -> UnlearningArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        num_threads=1,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        objective="grad_diff",
    )
    settings.update(kw)
    return UnlearningArguments(**settings)


# ----------------------------------------------------------------------------------------------- the layer API


def mlp_with_random_entries() -> PeftModel:
    config = GrinConfig(target_modules=["lin0", "lin1"], score="random", density=0.1, init_weights=False)
    return get_peft_model(build("mlp"), config)


def test_grow_entries_keeps_the_existing_entries_their_values_and_base_values():
    model = mlp_with_random_entries()
    tuner = model.base_model
    inputs = torch.randn(4, 10, generator=torch.Generator().manual_seed(1))
    before = entries(model)
    out_before = model(inputs)
    old_param = tuner.grin_layers()["lin0"].grin_values["default"]
    free = [i for i in range(200) if i not in set(before["lin0"][0].tolist())]
    added = torch.tensor(free[3:9])
    grown = tuner.grow_entries("default", {"lin0": added, "lin1": torch.zeros(0, dtype=torch.long)})

    assert list(grown) == ["lin0"]  # nothing to add to lin1: left as it was
    old, new, positions = grown["lin0"]
    layer = tuner.grin_layers()["lin0"]
    assert old is old_param and new is layer.grin_values["default"] and new.requires_grad
    idx = layer.grin_indices["default"].long()
    assert torch.equal(idx, torch.sort(torch.cat([before["lin0"][0], added])).values)
    assert torch.equal(idx[positions], before["lin0"][0])
    assert torch.equal(new.detach()[positions], before["lin0"][1])
    is_new = torch.isin(idx, added)
    assert int(is_new.sum()) == 6 and bool((new.detach()[is_new] == 0).all())
    assert torch.equal(layer.grin_base_values["default"], layer.get_base_layer().weight.detach().reshape(-1)[idx])
    assert all(torch.equal(a, b) for a, b in zip(entries(model)["lin1"], before["lin1"]))
    torch.testing.assert_close(model(inputs), out_before, rtol=0, atol=1e-6)  # zeros change nothing


def test_grow_entries_refuses_bad_entries_and_changes_nothing_then():
    model = mlp_with_random_entries()
    tuner = model.base_model
    before = entries(model)
    taken = before["lin1"][0][:1]
    fine = torch.tensor([i for i in range(200) if i not in set(before["lin0"][0].tolist())][:2])
    for added, message in [
        ({"lin0": fine, "lin1": taken}, "already in adapter"),
        ({"lin0": fine, "lin1": torch.tensor([320])}, "out of range"),
        ({"lin0": fine, "lin1": torch.tensor([7, 3])}, "strictly increasing"),
        ({"lin0": fine, "nope": torch.tensor([1])}, "no GRIN layer named nope"),
    ]:
        with pytest.raises(GrinError, match=message):
            tuner.grow_entries("default", added)
        after = entries(model)
        assert all(torch.equal(after[n][i], before[n][i]) for n in before for i in (0, 1)), message
    model.merge_adapter()
    with pytest.raises(GrinError, match="unmerge"):
        tuner.grow_entries("default", {"lin0": fine})


def test_select_growth_takes_the_best_free_entries():
    scores = {"a": torch.tensor([9.0, 1, 5, 5, 0, 8]), "b": torch.tensor([7.0, 5, 2, 6])}
    numels = {"a": 6, "b": 4}
    taken = {"a": torch.tensor([0, 5]), "b": torch.tensor([3])}
    # free: a1 1, a2 5, a3 5, a4 0, b0 7, b1 5, b2 2; the best 3: b0, then the tie at 5 goes to module a, lowest index
    got = select_growth(numels, scores.__getitem__, taken, 3)
    assert {n: v.tolist() for n, v in got.items()} == {"a": [2, 3], "b": [0]}
    # per module, in proportion to free entries (a 4, b 3 of 7): a 2, b 1
    got = select_growth(numels, scores.__getitem__, taken, 3, "per_module")
    assert {n: v.tolist() for n, v in got.items()} == {"a": [2, 3], "b": [0]}
    got = select_growth(numels, scores.__getitem__, taken, 7)
    assert {n: v.tolist() for n, v in got.items()} == {"a": [1, 2, 3, 4], "b": [0, 1, 2]}
    with pytest.raises(GrinError, match="7 targeted entries are free"):
        select_growth(numels, scores.__getitem__, taken, 8)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        taken = torch.sort(torch.randperm(50, generator=generator)[: int(torch.randint(0, 50, (1,)))]).values
        free = torch.tensor([i for i in range(50) if i not in set(taken.tolist())], dtype=torch.long)
        assert torch.equal(free_to_index(torch.arange(free.numel()), taken), free)


def test_rescoring_takes_gradients_at_the_current_weights(data):
    forget, retain = data
    for score in ("gradient_ratio", "wagle"):
        base, model = grin_llama(data, score=score, init_weights=False)
        got = current_scores(model.base_model, forget, retain).scorer
        # the same score on a model whose base weights are base + delta, localized at its original weights
        merged = copy.deepcopy(model).merge_and_unload()
        reference = get_peft_model(merged, GrinConfig(target_modules="all-linear", num_entries=40, score=score))
        want = compute_scores(reference.base_model, forget, retain, progress=False).scorer
        unmerged = compute_scores(model.base_model, forget, retain, progress=False).scorer
        differs = []
        for name in model.base_model.grin_layers():
            scale = float(want.score(name).abs().max())
            torch.testing.assert_close(got.score(name), want.score(name), rtol=1e-3, atol=1e-5 * scale)
            differs.append(not torch.allclose(got.score(name), unmerged.score(name), rtol=1e-3, atol=1e-5 * scale))
        assert sum(differs) > len(differs) / 2, score  # at the original weights the scores are another matter


# ----------------------------------------------------------------------------------------------- during training


class Recorder(TrainerCallback):
    """Snapshots of the adapter and the optimizer at every step's end (before re-localisation, which runs after
    user callbacks) and at every step's beginning."""

    def __init__(self) -> None:
        self.end: dict[int, tuple] = {}
        self.begin: dict[int, tuple] = {}

    def _snapshot(self, model, optimizer):
        state = {}
        for name, layer in model.base_model.grin_layers().items():
            param = layer.grin_values["default"]
            moments = optimizer.state.get(param, {})
            state[name] = (
                layer.grin_indices["default"].long().clone(),
                param.detach().clone(),
                {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in moments.items()},
            )
        return state

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.end[state.global_step] = self._snapshot(model, optimizer)

    def on_step_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        self.begin[state.global_step] = self._snapshot(model, optimizer)


@pytest.fixture(scope="module")
def grown(data, tmp_path_factory):
    """6 steps of GradDiff with re-localisation every 2 steps by 25% of a 40-entry budget, saved."""
    forget, retain = data
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        base, model = grin_llama(data, relocalize_every=2, relocalize_grow=0.25)
        initial = entries(model)
        path = tmp_path_factory.mktemp("grown")
        recorder = Recorder()
        trainer = UnlearningTrainer(model, make_args(path, max_steps=6), forget, retain, callbacks=[recorder])
        trainer.train()
        model.save_pretrained(path / "delta")
    finally:
        torch.set_num_threads(previous)
    return base, model, trainer, recorder, initial, path / "delta"


def test_the_support_grows_at_every_nth_step_but_not_after_the_last(grown):
    _, model, trainer, recorder, _, _ = grown
    sizes = {step: sum(v[0].numel() for v in snap.values()) for step, snap in recorder.begin.items()}
    assert sizes == {0: 40, 1: 40, 2: 50, 3: 50, 4: 60, 5: 60}
    assert sum(model.base_model.num_entries().values()) == 60  # no growth after the last step (6)
    (callback,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, RelocalizeCallback)]
    assert [(r["step"], r["added"], r["entries"]) for r in callback.history] == [(2, 10, 50), (4, 10, 60)]
    assert all(0 < r["forget_mass"] <= 1 and 0 < r["retain_mass"] <= 1 for r in callback.history)


def test_growing_keeps_trained_values_and_optimizer_state_and_new_entries_start_at_zero(grown):
    _, _, _, recorder, _, _ = grown
    for step in (2, 4):
        before, after = recorder.end[step], recorder.begin[step]
        added = kept = 0
        for name, (old_idx, old_values, old_state) in before.items():
            idx, values, state = after[name]
            positions = torch.searchsorted(idx, old_idx)
            assert torch.equal(idx[positions], old_idx)  # every trained entry is still there
            assert torch.equal(values[positions], old_values)  # with its trained value
            new = torch.ones(idx.numel(), dtype=torch.bool)
            new[positions] = False
            added += int(new.sum())
            assert bool((values[new] == 0).all())
            if not old_state:  # a module that had no entries had no state: its entries start afresh
                assert old_idx.numel() == 0 and not state
                continue
            for key in ("exp_avg", "exp_avg_sq"):
                assert torch.equal(state[key][positions], old_state[key]) and bool((state[key][new] == 0).all())
            assert float(state["step"]) == float(old_state["step"]) == step
            kept += 1
        assert added == 10 and kept > 0
    # between growths nothing is added or removed
    for name, (idx, _, _) in recorder.end[3].items():
        assert torch.equal(idx, recorder.begin[2][name][0])


def test_new_entries_train_and_the_optimizer_holds_the_grown_parameters(grown):
    _, model, trainer, recorder, initial, _ = grown
    held = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    layers = model.base_model.grin_layers()
    assert all(id(layer.grin_values["default"]) in held for layer in layers.values())
    assert len(held) == len(layers)  # the replaced parameters are gone
    # entries added at step 2 started at 0 and were trained for 4 steps
    final = entries(model)
    for name, (idx, _, _) in recorder.begin[2].items():
        new = idx[~torch.isin(idx, initial[name][0])]
        values = final[name][1][torch.searchsorted(final[name][0], new)]
        assert bool((values != 0).all()), name


def test_a_grown_delta_saves_loads_merges_and_reverts_exactly(grown):
    base, model, _, _, _, path = grown
    original = {k: v.clone() for k, v in base.state_dict().items()}
    loaded = PeftModel.from_pretrained(copy.deepcopy(base), path)
    want = entries(model)
    got = entries(loaded)
    assert all(torch.equal(got[n][0], want[n][0]) and torch.equal(got[n][1], want[n][1]) for n in want)
    ids = torch.tensor([[5, 9, 13, 20, 33, 7]])
    model.eval()
    assert torch.equal(loaded(input_ids=ids).logits, model(input_ids=ids).logits)
    merged = loaded.merge_and_unload()
    assert not all(torch.equal(v, original[k]) for k, v in merged.state_dict().items())
    revert(merged, str(path))
    assert all(torch.equal(v, original[k]) for k, v in merged.state_dict().items())


def test_resuming_from_a_checkpoint_saved_after_growth_continues_exactly(data, tmp_path):
    forget, retain = data
    base, _ = grin_llama(data)
    finals = []
    for resume in (None, str(tmp_path / "out" / "checkpoint-3")):
        model = get_peft_model(
            copy.deepcopy(base),
            GrinConfig(target_modules="all-linear", num_entries=40, noise_std=0.0, eps=0.01, relocalize_every=2),
        )
        model.localize(forget, retain, progress=False)
        args = make_args(tmp_path, max_steps=6, save_strategy="steps", save_steps=3)
        UnlearningTrainer(model, args, forget, retain).train(resume_from_checkpoint=resume)
        finals.append(entries(model))
    assert sum(idx.numel() for idx, _ in finals[0].values()) == 48  # +4 at steps 2 and 4
    assert all(torch.equal(finals[0][n][i], finals[1][n][i]) for n in finals[0] for i in (0, 1))


# ----------------------------------------------------------------------------------------------- custom loops


def test_grow_in_a_custom_loop_with_noise_and_the_optimizer_state_choice(data):
    base, model = grin_llama(
        data, relocalize_every=1, relocalize_grow=0.5, relocalize_noise=True, noise_std=0.1, seed=3
    )
    forget, retain = data
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = {k: torch.tensor([x[k] for x in forget]) for k in ("input_ids", "labels")}
    model(**batch).loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    before = entries(model)
    callback = RelocalizeCallback(forget, retain)
    record = callback.grow(model, optimizer, step=5)
    assert record["added"] == 20 and record["entries"] == 60
    layers = model.base_model.grin_layers()
    for name, (idx, values) in entries(model).items():
        new = ~torch.isin(idx, before[name][0])
        weight = layers[name].get_base_layer().weight
        noise = noise_values(weight, idx[new], 0.1, "tensor_std", 3, name, purpose="relocalize:5")
        assert torch.equal(values[new], noise)
        assert torch.equal(values[~new], before[name][1])
    # with optimizer_state='reset' the grown parameters' state starts afresh; the others' goes on
    params = {name: layer.grin_values["default"] for name, layer in layers.items()}
    RelocalizeCallback(forget, retain, optimizer_state="reset").grow(model, optimizer, step=6)
    grown = {name for name, layer in layers.items() if layer.grin_values["default"] is not params[name]}
    assert grown and grown != set(layers)
    model(**batch).loss.backward()
    optimizer.step()
    steps = {name: float(optimizer.state[p.grin_values["default"]].get("step", 0)) for name, p in layers.items()}
    # modules still without entries get an empty gradient (so DDP works), hence state like the others
    assert steps == {name: 1.0 if name in grown else 2.0 for name in layers}


@pytest.mark.parametrize("score", ["random", "magnitude", "leverage_ratio", "retain_complement"])
def test_every_score_grows(data, score):
    forget, retain = data
    _, model = grin_llama(data, score=score, relocalize_every=1, relocalize_grow=0.5, init_weights=False)
    before = entries(model)
    other = copy.deepcopy(model)
    RelocalizeCallback(forget, retain).grow(model, step=1)
    RelocalizeCallback(forget, retain).grow(other, step=1 if score != "random" else 2)
    after = entries(model)
    assert sum(idx.numel() for idx, _ in after.values()) == 60
    assert all(bool(torch.isin(before[n][0], after[n][0]).all()) for n in before)
    same = all(torch.equal(after[n][0], entries(other)[n][0]) for n in after)
    assert same == (score != "random")  # a fresh random draw per step; the others are functions of the weights
    if score == "magnitude":  # the largest |w + delta| among the free entries
        layers = model.base_model.grin_layers()
        current = torch.cat([(layers[n].get_base_layer().weight.detach().reshape(-1)).abs() for n in layers])
        sizes = [layers[n].grin_numel for n in layers]
        offsets = [sum(sizes[:i]) for i in range(len(sizes))]
        old = torch.cat([before[n][0] + o for n, o in zip(layers, offsets)])
        new = torch.cat([after[n][0] + o for n, o in zip(layers, offsets)])
        current[old] = -1  # taken; deltas live only on taken entries, so elsewhere |w + delta| = |w|
        assert set(new[~torch.isin(new, old)].tolist()) == set(torch.topk(current, 20).indices.tolist())


# ----------------------------------------------------------------------------------------------- configuration


def test_invalid_relocalize_settings_are_refused_naming_the_field():
    for field, values in {
        "relocalize_every": (0, -2, 2.5, True, "2"),
        "relocalize_grow": (0, -0.1, float("nan"), float("inf"), True, "0.1"),
        "relocalize_noise": (1, "yes", None),
    }.items():
        for value in values:
            with pytest.raises(GrinError, match=field):
                GrinConfig(**{field: value})
    with pytest.raises(GrinError, match="optimizer_state"):
        RelocalizeCallback(optimizer_state="adam")
    with pytest.raises(GrinError, match="optimizer_state"):
        replace_in_optimizer(torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))]), [], state="adam")


def test_unlearning_trainer_adds_the_callback_only_when_asked_and_needs_its_data(data, tmp_path):
    forget, retain = data
    _, plain = grin_llama(data)
    trainer = UnlearningTrainer(plain, make_args(tmp_path, max_steps=1), forget, retain)
    assert not any(isinstance(c, RelocalizeCallback) for c in trainer.callback_handler.callbacks)
    _, model = grin_llama(data, relocalize_every=1)
    mine = RelocalizeCallback(forget, retain, max_batches=1)
    trainer = UnlearningTrainer(model, make_args(tmp_path, max_steps=1), forget, retain, callbacks=[mine])
    assert [c for c in trainer.callback_handler.callbacks if isinstance(c, RelocalizeCallback)] == [mine]
    # gradient ascent has no retain term, so no retain set reaches the trainer; the ratio needs one
    with pytest.raises(GrinError, match="needs retain data"):
        UnlearningTrainer(model, make_args(tmp_path, max_steps=1, objective="grad_ascent"), forget)
    _, salun = grin_llama(data, score="forget_gradient", relocalize_every=1)
    trainer = UnlearningTrainer(salun, make_args(tmp_path, max_steps=2, objective="grad_ascent"), forget)
    trainer.train()
    assert sum(salun.base_model.num_entries().values()) == 44
