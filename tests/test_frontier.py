"""The frontier maths of the TOFU benchmark (benchmarks/frontier.py), on hand-made points."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from frontier import (  # noqa: E402
    best_point_at_most,
    better_operating_point,
    nearest_frontier_point,
    pareto_frontier,
    retain_at,
    summarise,
)


def pts(*pairs):
    return [{"forget": f, "retain": r, "id": i} for i, (f, r) in enumerate(pairs)]


def test_frontier_keeps_the_upper_left_envelope_sorted_by_forget():
    points = pts((0.9, 0.95), (0.5, 0.8), (0.6, 0.7), (0.1, 0.3), (0.1, 0.4), (0.3, 0.8), (0.99, 0.99))
    frontier = pareto_frontier(points)
    assert [(p["forget"], p["retain"]) for p in frontier] == [(0.1, 0.4), (0.3, 0.8), (0.9, 0.95), (0.99, 0.99)]
    # (0.5, 0.8) is dominated by (0.3, 0.8): same retain, more forgetting
    assert all(a["retain"] < b["retain"] and a["forget"] < b["forget"] for a, b in zip(frontier, frontier[1:]))


def test_frontier_ignores_missing_and_nan_points_and_keeps_the_first_duplicate():
    points = [{"forget": 0.2, "retain": 0.5, "id": "a"}, {"forget": 0.2, "retain": 0.5, "id": "b"}]
    points += [{"forget": float("nan"), "retain": 0.9}, {"forget": None, "retain": 1.0}]
    assert [p["id"] for p in pareto_frontier(points)] == ["a"]
    assert pareto_frontier([]) == []


def test_retain_at_interpolates_linearly_between_the_bracketing_points():
    frontier = pareto_frontier(pts((0.1, 0.4), (0.3, 0.8), (0.9, 0.95)))
    assert retain_at(frontier, 0.2) == pytest.approx(0.6)  # halfway from (0.1, 0.4) to (0.3, 0.8)
    assert retain_at(frontier, 0.25) == pytest.approx(0.7)
    assert retain_at(frontier, 0.3) == pytest.approx(0.8)  # exactly on a point
    assert retain_at(frontier, 0.1) == pytest.approx(0.4)
    assert retain_at(frontier, 0.95) == pytest.approx(0.95)  # beyond the last point: its retain


def test_retain_at_is_not_reached_when_nothing_forgot_enough():
    frontier = pareto_frontier(pts((0.35, 0.9), (0.99, 0.99)))
    assert retain_at(frontier, 0.2) is None
    assert retain_at([], 0.2) is None
    assert summarise(pts((0.35, 0.9)), 0.2)["retain_at"] is None


def test_interpolation_uses_the_envelope_not_dominated_points():
    # (0.15, 0.2) is dominated by (0.1, 0.5): the bracket is (0.1, 0.5)-(0.4, 0.8), not (0.15, 0.2)-(0.4, 0.8)
    frontier = pareto_frontier(pts((0.1, 0.5), (0.15, 0.2), (0.4, 0.8)))
    assert retain_at(frontier, 0.2) == pytest.approx(0.5 + 0.3 * (0.1 / 0.3))


def test_best_point_and_operating_point():
    points = pts((0.1, 0.4), (0.18, 0.7), (0.25, 0.9), (0.19, 0.6))
    assert best_point_at_most(points, 0.2)["id"] == 1
    assert nearest_frontier_point(points, 0.2)["id"] == 1
    far = pts((0.5, 0.9), (0.3, 0.2), (0.3, 0.5))
    assert best_point_at_most(far, 0.2) is None
    assert nearest_frontier_point(far, 0.2)["id"] == 2  # the most forgetting, then the most retained
    assert nearest_frontier_point([], 0.2) is None
    # the staircase value never exceeds the interpolated one
    summary = summarise(points, 0.2)
    assert summary["best_point"]["retain"] <= summary["retain_at"]
    assert summary["min_forget"] == 0.1 and summary["num_points"] == 4


def test_a_run_keeps_the_checkpoint_the_method_rule_would_pick():
    run = pts((0.99, 0.99), (0.6, 0.9), (0.3, 0.7), (0.15, 0.6), (0.05, 0.65), (0.1, 0.3))
    kept = None
    for point in run:
        if better_operating_point(point, kept, 0.2):
            kept = point
    assert kept is nearest_frontier_point(run, 0.2) and kept["id"] == 4
    assert not better_operating_point(dict(kept), kept, 0.2)  # a tie keeps the current one
