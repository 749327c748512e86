"""Specification of the automatic operating point (`grin_peft.operating_point`, the default of `unlearn` and of
`grin-peft unlearn`): it stops at the forget target above the held-out retain floor, keeps the best state by its
rule, refuses what cannot be reached before training, says when a target was missed, and never trains (or
localises) on the held-out retain slice.
"""

from __future__ import annotations

import copy
import json
import warnings

import numpy as np
import pytest
import torch
from torch import nn

from grin_peft import GrinConfig
from grin_peft.cli import main
from grin_peft.errors import GrinError
from grin_peft.operating_point import OperatingPoint, split_heldout
from grin_peft.operating_point.search import _Search
from grin_peft.paired_data import PairedCollator
from grin_peft.pipeline import unlearn
from grin_peft.synthetic import write_jsonl

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TRAIN = dict(num_threads=1, use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4, report_to=[])


# --------------------------------------------------------------------------------------------- settings


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"forget_target": 0.0}, "cannot be reached"),
        ({"forget_target": 1.0}, "cannot be reached"),
        ({"retain_floor": 0.0}, "retain_floor"),
        ({"retain_floor": 1.5}, "retain_floor"),
        ({"heldout_fraction": 1.0}, "heldout_fraction"),
        ({"lr_grid": (1e-2, 1e-3)}, "ascending"),
        ({"lr_grid": ()}, "ascending"),
        ({"probe_steps": 0}, "probe_steps"),
        ({"max_epochs": 0}, "max_epochs"),
        ({"eval_every": 0}, "eval_every"),
        ({"repair_epochs": -1}, "repair_epochs"),
    ],
)
def test_settings_that_cannot_work_are_refused(kwargs, message):
    with pytest.raises(GrinError, match=message):
        OperatingPoint(**kwargs)


def test_relative_target_is_a_share_of_the_start():
    assert OperatingPoint(forget_target=0.25, relative=True).target(0.8) == pytest.approx(0.2)
    assert OperatingPoint(forget_target=0.25).target(0.8) == 0.25


def test_heldout_split_is_seeded_disjoint_and_complete():
    items = [{"id": i} for i in range(50)]
    train, held = split_heldout(items, OperatingPoint(seed=3))
    assert len(held) == 5 and len(train) == 45
    assert {x["id"] for x in train} | {x["id"] for x in held} == set(range(50))
    assert not {x["id"] for x in train} & {x["id"] for x in held}
    assert split_heldout(items, OperatingPoint(seed=3)) == (train, held)
    assert split_heldout(items, OperatingPoint(seed=4))[1] != held
    assert len(split_heldout(items * 100, OperatingPoint(max_heldout=7))[1]) == 7
    with pytest.raises(GrinError, match="at least 2 retain items"):
        split_heldout(items[:1], OperatingPoint())


# --------------------------------------------------------------------------------------------- the rules


class ScriptedTrainer:
    """Stands in for UnlearningTrainer in the decision rules: answer NLLs follow a script."""

    def __init__(self, values: dict[str, float]):
        self.values = values

    def answer_nll(self, examples):
        return np.full(len(examples), -np.log(self.values[examples[0]["set"]]))


def scripted_search(**point) -> _Search:
    model = nn.Linear(2, 2)
    forget = [{"set": "forget"}] * 4
    heldout = [{"set": "heldout"}] * 4
    search = _Search(model, None, OperatingPoint(**point), forget, heldout, steps_per_epoch=10, log=lambda m: None)
    search.segments.append({"lr": 1e-2, "start_step": 0, "end_step": None, "outcome": None})
    return search


def observe(search: _Search, step: int, forget: float, heldout: float) -> str:
    search.steps_done = step
    with torch.no_grad():
        search.model.weight.fill_(step)  # a distinct state per step, to check which one is kept
    return search.observe(ScriptedTrainer({"forget": forget, "heldout": heldout}), 1e-2, target=0.2, floor=0.8)


def test_after_the_target_training_goes_on_while_heldout_improves_then_keeps_the_best():
    search = scripted_search(patience=2)
    assert observe(search, 5, forget=0.5, heldout=0.95) == "continue"
    assert observe(search, 10, forget=0.18, heldout=0.85) == "continue"  # target met
    assert observe(search, 15, forget=0.10, heldout=0.90) == "continue"  # better: new best
    assert observe(search, 20, forget=0.09, heldout=0.88) == "continue"  # 1 without improvement
    assert observe(search, 25, forget=0.09, heldout=0.87) == "done"  # patience 2 used up
    assert search.best[0].step == 15
    assert float(search.best[1]["weight"][0, 0]) == 15.0


def test_below_the_floor_a_run_gets_repair_epochs_to_climb_back_then_rolls_back():
    search = scripted_search(repair_epochs=1)  # 10 steps per epoch: 10 steps below the floor allowed
    assert observe(search, 5, forget=0.5, heldout=0.9) == "continue"
    assert observe(search, 10, forget=0.3, heldout=0.7) == "continue"  # the dip began after step 5
    assert observe(search, 15, forget=0.25, heldout=0.82) == "continue"  # repaired: the window closes
    assert observe(search, 20, forget=0.22, heldout=0.5) == "continue"  # a new dip from step 15
    assert observe(search, 25, forget=0.21, heldout=0.6) == "continue"  # 10 steps: still inside
    assert observe(search, 30, forget=0.21, heldout=0.7) == "rollback"  # 15 steps below the floor
    assert search.fallback[0].step == 15  # the lowest forget above the floor is where a rollback goes
    assert float(search.fallback[1]["weight"][0, 0]) == 15.0


def test_a_drop_then_repair_within_the_window_reaches_the_target():
    search = scripted_search(repair_epochs=4)  # NPO's shape on TOFU (BENCHMARKS.md 6.2): collapse, then repair
    assert observe(search, 5, forget=0.8, heldout=0.95) == "continue"
    for step, (forget, heldout) in zip(range(10, 45, 5), [(0.1, 0.3), (0.12, 0.45), (0.15, 0.6), (0.14, 0.7),
                                                          (0.13, 0.75), (0.12, 0.78), (0.12, 0.79)]):  # fmt: skip
        assert observe(search, step, forget=forget, heldout=heldout) == "continue"
    assert observe(search, 45, forget=0.12, heldout=0.85) == "continue"  # 40 steps below, then the target
    assert search.best[0].step == 45


def test_a_pace_too_slow_for_the_budget_asks_for_a_larger_rate():
    search = scripted_search(max_epochs=2)  # 20 steps of budget
    assert observe(search, 5, forget=0.90, heldout=0.95) == "continue"
    assert observe(search, 10, forget=0.89, heldout=0.95) == "faster"  # 0.002/step, needs 0.69 in 10 steps
    search = scripted_search(max_epochs=2, lr_grid=(1e-2,))
    observe(search, 5, forget=0.90, heldout=0.95)
    assert observe(search, 10, forget=0.89, heldout=0.95) == "continue"  # no larger rate to go to


def test_a_rollback_on_a_path_far_too_costly_for_the_target_ends_the_search():
    before = {"forget_prob": 0.99, "heldout_retain_prob": 0.99}  # target 0.2, floor 0.8: 0.24 retain per unit
    search = scripted_search()
    observe(search, 5, forget=0.7, heldout=0.81)  # paid 0.18 / 0.29 = 0.62 > 2 x 0.24
    assert search.hopeless(before, target=0.2, floor=0.8) and search.gave_up
    search = scripted_search()
    observe(search, 5, forget=0.5, heldout=0.95)  # paid 0.04 / 0.49 = 0.08
    assert not search.hopeless(before, target=0.2, floor=0.8)
    assert not scripted_search().hopeless(before, target=0.2, floor=0.8)  # nothing to judge yet


def test_a_path_that_has_hardly_forgotten_is_never_judged_hopeless():
    before = {"forget_prob": 0.99, "heldout_retain_prob": 0.99}  # needs 0.79: a quarter is 0.1975
    search = scripted_search()
    observe(search, 5, forget=0.85, heldout=0.81)  # removed 0.14: paid 1.3 per unit, but too little evidence
    assert not search.hopeless(before, target=0.2, floor=0.8) and not search.gave_up


@pytest.mark.parametrize(
    "config, point, expected",
    [
        (None, OperatingPoint(), [1e-3, 5e-3, 2.5e-2, 0.125, 0.5]),
        (GrinConfig(), OperatingPoint(max_density=0.05, density_growth=10), [1e-3, 1e-2, 0.05]),
        (GrinConfig(density=1e-3), OperatingPoint(), [None]),  # explicit: kept as given
        (GrinConfig(num_entries=10), OperatingPoint(), [None]),
        (None, OperatingPoint(max_density=None), [None]),
        (None, None, [None]),  # fixed schedule
    ],
)
def test_density_attempts_grow_only_a_default_budget(config, point, expected):
    from grin_peft.pipeline import _density_schedule

    assert _density_schedule(nn.Linear(2, 2), config, point) == pytest.approx(expected)


# --------------------------------------------------------------------------------------------- end to end


def test_unlearn_by_default_stops_at_the_target_and_reports_it(memorised):
    ds, tok = memorised.dataset, memorised.tokenizer
    result = unlearn(
        copy.deepcopy(memorised.model), ds.forget, ds.retain, tokenizer=tok, config=GrinConfig(density=5e-2), **TRAIN
    )
    record = result.operating_point
    assert result.target_met is True
    assert result.after["forget_prob"] <= record["target_forget_prob"] == 0.2
    assert result.after["heldout_retain_prob"] >= record["floor_heldout_retain_prob"]
    assert record["floor_heldout_retain_prob"] == pytest.approx(0.85 * result.before["heldout_retain_prob"])
    assert result.before["forget_prob"] > 0.9
    assert record["steps_run"] < record["budget_steps"]  # it stopped, not the budget
    assert record["gradient_accumulation_steps"] == 2  # effective batch min(32, 10 forget items) // 4 per device
    chosen = [p for p in record["probes"] if p["chosen"]]
    assert len(chosen) == 1 and record["segments"][0]["lr"] == chosen[0]["lr"]
    kept = [e for e in record["evaluations"] if e["step"] == record["steps"] and e["lr"] == record["learning_rate"]]
    assert kept and kept[0]["meets_target"] and kept[0]["above_floor"]
    assert kept[0]["heldout"] == max(e["heldout"] for e in record["evaluations"] if e["meets_target"])
    json.dumps(result.summary())  # JSON-ready


def test_heldout_retain_is_never_trained_or_localised_on(memorised, monkeypatch):
    ds, tok = memorised.dataset, memorised.tokenizer
    seen: list[tuple[int, ...]] = []
    collate = PairedCollator.__call__

    def spy(self, features):
        seen.extend(tuple(f["retain"]["input_ids"]) for f in features if "retain" in f)
        return collate(self, features)

    monkeypatch.setattr(PairedCollator, "__call__", spy)
    localised: list[tuple[int, ...]] = []
    from grin_peft.model import GrinModel

    localize = GrinModel.localize

    def spy_localize(self, forget, retain=None, *args, **kwargs):
        localised.extend(tuple(x["input_ids"]) for x in retain)
        return localize(self, forget, retain, *args, **kwargs)

    monkeypatch.setattr(GrinModel, "localize", spy_localize)
    point = OperatingPoint(max_epochs=2, heldout_fraction=0.2)
    warnings.filterwarnings("ignore", message="the unlearning target was not reached")  # a short budget: not the point
    result = unlearn(
        copy.deepcopy(memorised.model),
        ds.forget,
        ds.retain,
        tokenizer=tok,
        config=GrinConfig(density=5e-2),
        operating_point=point,
        verbose=False,
        **TRAIN,
    )
    _, heldout = split_heldout(ds.retain, point)
    held_ids = {tuple(tok.encode(x["question"])[:3]) for x in heldout}  # sanity: a real, non-empty held-out set
    assert len(heldout) == result.operating_point["num_heldout"] == 18 and held_ids
    encoded_held = {tuple(result.trainer.qa_format.encode(x["question"], x["answer"])["input_ids"]) for x in heldout}
    assert seen and localised
    assert not encoded_held & set(seen)
    assert not encoded_held & set(localised)


def test_fixed_schedule_switches_the_controller_off_and_conflicts_are_refused(memorised):
    ds, tok = memorised.dataset, memorised.tokenizer
    result = unlearn(
        copy.deepcopy(memorised.model),
        ds.forget,
        ds.retain,
        tokenizer=tok,
        config=GrinConfig(density=1e-2),
        learning_rate=5e-2,
        num_train_epochs=1,
        verbose=False,
        **TRAIN,
    )
    assert result.operating_point is None and result.target_met is None
    assert result.before["forget_prob"] > result.after["forget_prob"]
    with pytest.raises(GrinError, match="operating_point chooses the learning rate"):
        unlearn(copy.deepcopy(memorised.model), ds.forget, ds.retain, tokenizer=tok, operating_point=True,
                learning_rate=1e-2, **TRAIN)  # fmt: skip
    config = GrinConfig(density=0.01, score="random")  # a score that reads no retain data
    without_retain = unlearn(
        copy.deepcopy(memorised.model), ds.forget, None, tokenizer=tok, config=config, objective="grad_ascent",
        learning_rate=1e-2, num_train_epochs=1, **TRAIN,
    )  # fmt: skip
    assert set(without_retain.before) == set(without_retain.after) == {"forget_prob"}
    with pytest.raises(GrinError, match="cannot roll back"):
        unlearn(copy.deepcopy(memorised.model), ds.forget, ds.retain, tokenizer=tok,
                config=GrinConfig(density=0.01, relocalize_every=2), **TRAIN)  # fmt: skip
    with pytest.raises(GrinError, match="needs retain data"):
        unlearn(copy.deepcopy(memorised.model), ds.forget, None, tokenizer=tok, objective="grad_ascent", **TRAIN)


# --------------------------------------------------------------------------------------------- command line


@pytest.fixture(scope="module")
def saved(memorised, tmp_path_factory):
    root = tmp_path_factory.mktemp("auto_cli")
    memorised.model.save_pretrained(root / "model")
    memorised.tokenizer.save_pretrained(root / "model")
    write_jsonl(memorised.dataset.forget, root / "forget.jsonl")
    write_jsonl(memorised.dataset.retain, root / "retain.jsonl")
    return root


def cli(capsys, saved, output, *extra):
    argv = ["unlearn", "--model", saved / "model", "--forget", saved / "forget.jsonl", "--retain"]
    code = main([str(a) for a in [*argv, saved / "retain.jsonl", "--output", output, "--batch-size", "4", *extra]])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cli_default_meets_the_target_prints_before_after_and_records_every_decision(saved, capsys, tmp_path):
    code, out, err = cli(capsys, saved, tmp_path / "delta", "--density", "0.05")
    assert code == 0, err
    assert "| forget answer probability |" in out and "| held-out retain answer probability |" in out
    assert "target met" in out
    summary = json.loads((tmp_path / "delta" / "unlearn_summary.json").read_text())
    assert summary["target_met"] is True and summary["mode"] == "automatic operating point"
    assert summary["after"]["forget_prob"] <= 0.2 and summary["operating_point"]["probes"]
    card = (tmp_path / "delta" / "README.md").read_text()
    assert "forget answer probability: " in card and "**met**" in card


def test_cli_unreachable_target_is_one_line_before_training_and_writes_nothing(saved, capsys, tmp_path):
    code, out, err = cli(capsys, saved, tmp_path / "delta", "--forget-target", "0")
    assert code == 1 and "cannot be reached" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "delta").exists()
    code, _, err = cli(capsys, saved, tmp_path / "delta", "--forget-target", "abc")
    assert code == 1 and "not a number" in err
    code, _, err = cli(capsys, saved, tmp_path / "delta", "--lr", "1e-2", "--forget-target", "0.2")
    assert code == 1 and "fix the schedule" in err


def test_cli_missed_target_exits_non_zero_unless_partial_is_allowed(saved, capsys, tmp_path):
    missed = ("--density", "0.001", "--forget-target", "1%", "--max-epochs", "1")
    code, out, err = cli(capsys, saved, tmp_path / "delta", *missed)
    errors = [line for line in err.splitlines() if "error:" in line]  # stderr also carries progress bars
    assert code == 1 and len(errors) == 1 and "target was not reached" in errors[0]
    assert "NOT met" in out  # the numbers are shown even when nothing is written
    assert not (tmp_path / "delta").exists()
    code, out, err = cli(capsys, saved, tmp_path / "partial", *missed, "--allow-partial")
    assert code == 0, err
    assert "TARGET NOT MET" in out
    summary = json.loads((tmp_path / "partial" / "unlearn_summary.json").read_text())
    assert summary["target_met"] is False
    assert "**NOT met**" in (tmp_path / "partial" / "README.md").read_text()
