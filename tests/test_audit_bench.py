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
