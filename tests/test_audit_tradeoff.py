"""benchmarks/audit_tradeoff.py: SAM runs read against the plain runs' recovery curve at equal retain."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))
tradeoff = pytest.importorskip("audit_tradeoff")


def run(name, retain, forget_rec, related_rec, *, rho=0.0, seed=0, lr=1e-2, splits=(), forget=0.15):
    """A bench_audit result with the two relearning rows; ``splits``: (items, seed, forget_rec, related_rec)."""

    def report(f, r):
        rows = [
            {
                "attack": "relearning",
                "variant": "forget data: full",
                "recovered": {"probability": f},
                "attacked": {"probability": 0.1 + f},
            },
            {
                "attack": "relearning",
                "variant": "related data: full",
                "recovered": {"probability": r},
                "attacked": {"probability": 0.1 + r},
            },
        ]
        unlearned = {"forget": {"probability": forget}, "retain": {"probability": retain}}
        return {"rows": rows, "baseline": {"unlearned": unlearned}}

    return {
        "method": name,
        "config": {"lr": lr, "sam_rho": rho, "seed": seed, "epochs": 5.0},
        "report": report(forget_rec, related_rec),
        "relearn_splits": [{"items": i, "seed": s, "report": report(f, r)} for i, s, f, r in splits],
    }


def test_the_plain_curve_is_interpolated_between_the_runs_that_bracket_the_retain():
    plain = [tradeoff.point(run("G", r, f, 0.1)) for r, f in ((0.8, 0.40), (0.6, 0.20), (0.4, 0.10))]
    assert tradeoff.plain_at(plain, 0.7) == pytest.approx(0.30)
    assert tradeoff.plain_at(plain, 0.5) == pytest.approx(0.15)
    assert tradeoff.plain_at(plain, 0.6) == pytest.approx(0.20)  # a run's own value at an exact match
    assert tradeoff.plain_at(plain, 0.9) is None  # never extrapolated
    assert tradeoff.plain_at(plain, 0.3) is None
    assert tradeoff.plain_at(plain[:1], 0.8) == pytest.approx(0.40)


def test_a_split_is_read_from_its_own_runs_only():
    plain = [
        tradeoff.point(run("G", 0.8, 0.4, 0.1, splits=[(40, 1, 0.5, 0.2)])),
        tradeoff.point(run("G", 0.6, 0.2, 0.1, splits=[(40, 1, 0.3, 0.2)])),
        tradeoff.point(run("G", 0.4, 0.1, 0.1)),  # no split 40:1: the curve for it ends at 0.6
    ]
    assert tradeoff.plain_at(plain, 0.7, "forget", "40:1") == pytest.approx(0.4)
    assert tradeoff.plain_at(plain, 0.5, "forget", "40:1") is None
    assert tradeoff.plain_at(plain, 0.5, "forget") == pytest.approx(0.15)


def test_runs_group_by_method_and_seed_whatever_their_lr_or_radius():
    results = [
        run("GRIN 1% NPO", 0.7, 0.3, 0.3),
        run("GRIN 1% NPO, lr x2", 0.5, 0.2, 0.2, lr=2e-2),
        run("GRIN 1% NPO + SAM rho=1", 0.6, 0.1, 0.1, rho=1.0),
        run("GRIN 1% NPO, seed 1", 0.6, 0.3, 0.3, seed=1),
    ]
    grouped = tradeoff.groups(results)
    assert sorted(grouped) == [("GRIN 1% NPO", 0), ("GRIN 1% NPO", 1)]
    assert [p["retain"] for p in grouped[("GRIN 1% NPO", 0)]] == [0.7, 0.6, 0.5]  # most retain first


def test_the_table_shows_the_sam_run_against_the_plain_curve_in_points():
    results = [
        run("G", 0.7, 0.30, 0.30, forget=0.2),
        run("G, lr x2", 0.5, 0.20, 0.10, lr=2e-2, forget=0.1),
        run("G + SAM rho=1", 0.6, 0.10, 0.25, rho=1.0, forget=0.125),
        run("G + SAM rho=3", 0.3, 0.05, 0.05, rho=3.0),
    ]
    table = tradeoff.render_tradeoff(results)
    sam = next(line for line in table.splitlines() if line.startswith("| SAM rho=1 "))
    assert "| 10% (0.200) | 25% (-15 pts) | 25% (0.350) | 20% (+5 pts) |" in sam
    assert sam.endswith("| 0.550 |")  # plain frontier (0.1, 0.5) - (0.2, 0.7) read at the SAM run's forget 0.125
    assert "outside the plain runs" in next(line for line in table.splitlines() if "rho=3" in line)


def test_no_table_without_a_sam_run_and_two_plain_runs_to_compare_it_with():
    assert tradeoff.render_tradeoff([run("G", 0.7, 0.3, 0.3), run("G + SAM rho=1", 0.6, 0.1, 0.1, rho=1.0)]) == ""
    assert tradeoff.render_tradeoff([run("G", 0.7, 0.3, 0.3), run("G, lr x2", 0.5, 0.2, 0.2)]) == ""


def test_the_plot_is_written(tmp_path):
    results = [run("G", 0.7, 0.3, 0.3), run("G, lr x2", 0.5, 0.2, 0.1), run("G + SAM rho=1", 0.6, 0.1, 0.2, rho=1)]
    tradeoff.plot_tradeoff(results, tmp_path / "t.png")
    assert (tmp_path / "t.png").stat().st_size > 1000
