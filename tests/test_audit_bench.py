"""benchmarks/bench_audit.py's own arithmetic: the table cells, the exact per-module aggregates and the merge."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
bench_audit = pytest.importorskip("bench_audit")


def row(attack, variant, probability, rouge):
    return {"attack": attack, "variant": variant,
            "recovered": {"probability": probability, "rouge_l_recall": rouge, "keyword_accuracy": None}}  # fmt: skip


def result(method, changes):
    forget = {"probability": 0.9, "rouge_l_recall": 1.0, "keyword_accuracy": 1.0}
    both = {"forget": forget, "retain": forget}
    return {
        "method": method,
        "report": {
            "baseline": {"original": both, "unlearned": both},
            "rows": [row("quantization", "nf4", 0.02, 0.3), row("relearning", "forget data: full", None, None)],
            "membership": [{"attack": "mink", "auc_original": 1.0, "auc_unlearned": 0.75}],
            "module_changes": changes,
        },
    }  # fmt: skip


def test_cells_show_the_probability_fraction_and_the_worst_metric():
    assert bench_audit._cell(row("q", "nf4", 0.02, 0.3)) == "2% (30%)"
    assert bench_audit._cell(row("q", "nf4", None, None)) == "not judged"
    assert bench_audit._cell(None) == "n/a"


def test_module_summary_weights_each_module_by_its_changed_entries():
    changes = [
        {"changed": 100, "below_half_bin": 1.0, "kept_by_nf4": 0.1, "kept_by_fp4": 0.2, "median_change_over_bin": 0.1},
        {"changed": 300, "below_half_bin": 0.0, "kept_by_nf4": 0.9, "kept_by_fp4": 0.6, "median_change_over_bin": 3.0},
        {"changed": 0, "entries": 10},
    ]
    summary = bench_audit._module_summary(changes)
    assert summary["changed"] == 400
    assert summary["below_half_bin"] == pytest.approx(0.25)
    assert summary["kept_by_nf4"] == pytest.approx((10 + 270) / 400)
    assert summary["kept_by_fp4"] == pytest.approx((20 + 180) / 400)
    assert bench_audit._module_summary([{"changed": 0}])["kept_by_nf4"] is None


def test_merge_orders_methods_and_puts_each_floored_row_after_its_own(tmp_path):
    grin = bench_audit.METHODS[3].name
    parts = [
        {"command": "a", "results": [result(f"{grin} + bin-width floor x1", []), result(grin, [])]},
        {"command": "b", "results": [result(bench_audit.METHODS[0].name, [])]},
    ]
    paths = []
    for i, part in enumerate(parts):
        paths.append(tmp_path / f"p{i}.json")
        paths[-1].write_text(json.dumps(part))
    bench_audit.main(["--merge", *map(str, paths), "--out", str(tmp_path), "--stem", "merged"])
    merged = json.loads((tmp_path / "merged.json").read_text())
    assert [r["method"] for r in merged["results"]] == [
        bench_audit.METHODS[0].name, grin, f"{grin} + bin-width floor x1"
    ]  # fmt: skip
    assert [p["command"] for p in merged["parts"]] == ["a", "b"]
    table = (tmp_path / "merged.md").read_text()
    assert "| 2% (30%) |" in table and "1.000 -> 0.750" in table


def test_module_summary_weights_the_change_kept_as_a_whole_by_each_modules_squared_change():
    base = {"below_half_bin": 1.0, "kept_by_nf4": 0.5, "kept_by_fp4": 0.5, "median_change_over_bin": 0.1}
    changes = [
        {**base, "changed": 10, "mean_change_over_bin": 0.2, "change_sq": 1.0,
         "projection_kept_nf4": 0.0, "projection_kept_fp4": 1.0},
        {**base, "changed": 30, "mean_change_over_bin": 0.6, "change_sq": 3.0,
         "projection_kept_nf4": 1.0, "projection_kept_fp4": 0.5},
    ]  # fmt: skip
    summary = bench_audit._module_summary(changes)
    assert summary["mean_change_over_bin"] == pytest.approx((2 + 18) / 40)  # per changed entry
    assert summary["projection_kept_nf4"] == pytest.approx(0.75)
    assert summary["projection_kept_fp4"] == pytest.approx((1 + 1.5) / 4)
    assert "projection_kept_nf4" not in bench_audit._module_summary([{**base, "changed": 5}])  # older rows


def test_moved_towards_scales_the_whole_change_and_leaves_both_models_alone():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=32, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=True)  # fmt: skip
    torch.manual_seed(0)
    target, model = LlamaForCausalLM(config), LlamaForCausalLM(config)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for alpha in (0.0, 0.25, 1.0):
        moved = bench_audit.moved_towards(model, target, alpha).state_dict()
        for key, value in target.state_dict().items():
            torch.testing.assert_close(moved[key], value + alpha * (before[key] - value))  # tied: scaled once
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_relearning_table_gives_the_operating_point_and_the_absolute_probabilities():
    def relearn_row(source, attacked, fraction):
        probabilities = {"original": 0.9, "unlearned": 0.1, "attacked": attacked}
        out = row("relearning", f"{source} data: full", fraction, fraction)
        return {**out, **{key: {"probability": value} for key, value in probabilities.items()}}

    res = result("GRIN 1% + SAM rho=1", [])
    res["config"], res["train_seconds"] = {"epochs": 5.0}, 12.4
    res["report"]["baseline"]["unlearned"] = {"forget": {"probability": 0.2}, "retain": {"probability": 0.6}}
    res["report"]["rows"] = [relearn_row("forget", 0.3, 0.25), relearn_row("related", 0.5, 0.5)]
    table = bench_audit.render_relearning([res, result("quantized only", [])])
    assert table.splitlines()[2] == (
        "| GRIN 1% + SAM rho=1 | 5.0 | 0.200 | 0.600 | 0.900 / 0.100 -> 0.300 | 25% (25%) "
        "| 0.100 -> 0.500 | 50% (50%) | 12 |"
    )
    assert len(table.splitlines()) == 3  # a run without the relearning attack has no row
    assert bench_audit.render_relearning([result("quantized only", [])]) == ""


def test_each_grin_row_runs_once_per_learning_rate_factor_retain_weight_and_radius():
    grin, full = bench_audit.METHODS[3], bench_audit.METHODS[0]
    runs = bench_audit.with_sharpness(grin, [0.0, 1.0], 1, [1.0, 2.0], [None, 0.5])
    assert [(m.name.removeprefix(grin.name), m.lr, overrides) for m, overrides in runs] == [
        (", seed 1", grin.lr, {}),
        (", seed 1 + SAM rho=1", grin.lr, {"sam_rho": 1.0}),
        (", seed 1, retain weight 0.5", grin.lr, {"retain_weight": 0.5}),
        (", seed 1, retain weight 0.5 + SAM rho=1", grin.lr, {"sam_rho": 1.0, "retain_weight": 0.5}),
        (", seed 1, lr x2", 2 * grin.lr, {}),
        (", seed 1, lr x2 + SAM rho=1", 2 * grin.lr, {"sam_rho": 1.0}),
        (", seed 1, lr x2, retain weight 0.5", 2 * grin.lr, {"retain_weight": 0.5}),
        (", seed 1, lr x2, retain weight 0.5 + SAM rho=1", 2 * grin.lr, {"sam_rho": 1.0, "retain_weight": 0.5}),
    ]
    assert all(m.grin["seed"] == 1 and m.grin["density"] == grin.grin["density"] for m, _ in runs)
    assert [(m.lr, o) for m, o in bench_audit.with_sharpness(full, [0.0, 1.0], 0, [2.0], [0.5])] == [(full.lr, {})]


def test_relearning_splits_are_items_and_seed_on_the_base_settings():
    base = bench_audit.RelearnSettings(items=40, steps=50, lr=1e-3)
    splits = bench_audit.parse_splits(["10:0", "40:1"], base)
    assert [(s.items, s.seed, s.steps, s.lr) for s in splits] == [(10, 0, 50, 1e-3), (40, 1, 50, 1e-3)]
    with pytest.raises(SystemExit, match="ITEMS:SEED"):
        bench_audit.parse_splits(["40"], base)
