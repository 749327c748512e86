"""Forget/retain frontiers and the benchmark's figure of merit: retain answer probability at a forget target.

A checkpoint is a point ``(forget, retain)``: its forget and retain answer probability (lower forget is better,
higher retain is better). A method's checkpoints are every evaluation along every one of its training runs (all
learning rates, all evaluated epochs); none is privileged, so a method is not judged at one hand-picked rate.

* :func:`pareto_frontier` keeps the checkpoints no other checkpoint beats on both axes (the upper-left envelope in a
  plot of forget on x against retain on y): sorted by forget ascending, retain is then strictly increasing.
* :func:`retain_at` is the figure of merit: the frontier read at forget probability ``x`` (0.2 in the benchmark).
  With the frontier points ``(f_1, r_1) .. (f_n, r_n)``, ``f_1 < .. < f_n`` and ``r_1 < .. < r_n``:

  - ``x < f_1``: **not reached** (None): no checkpoint forgot that much;
  - ``f_i <= x < f_{i+1}``: ``r_i + (r_{i+1} - r_i) * (x - f_i) / (f_{i+1} - f_i)``, linear interpolation between
    the two frontier points that bracket ``x`` (``x == f_i`` gives ``r_i`` exactly);
  - ``x >= f_n``: ``r_n`` (the frontier's best-retaining point already forgets at least that much).

  The interpolated value is a reading of the envelope, not a checkpoint anyone holds; :func:`best_point_at_most`
  gives the best real checkpoint with forget <= ``x`` (the staircase value, never above the interpolation).
* :func:`nearest_frontier_point` is the checkpoint the benchmark evaluates fully (generation, model utility): the
  best real checkpoint with forget <= ``x`` (on the frontier this is the point nearest ``x`` from below), or, when
  no checkpoint reaches ``x``, the one that forgot the most.

Pure Python, no torch: unit-tested on hand-made points (``tests/test_frontier.py``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

Point = Mapping[str, Any]  # at least {"forget": float, "retain": float}; other keys travel along


def _finite(point: Point) -> bool:
    f, r = point.get("forget"), point.get("retain")
    return isinstance(f, int | float) and isinstance(r, int | float) and f == f and r == r


def pareto_frontier(points: Iterable[Point]) -> list[Point]:
    """The non-dominated points, sorted by forget ascending (retain then strictly increasing).

    A point is dropped when another has forget <= its forget and retain >= its retain (one of them strictly);
    of exact duplicates the first is kept. Points with a missing or NaN coordinate are ignored.
    """
    ordered = sorted((p for p in points if _finite(p)), key=lambda p: (p["forget"], -p["retain"]))
    frontier: list[Point] = []
    for point in ordered:
        if not frontier or point["retain"] > frontier[-1]["retain"]:
            frontier.append(point)
    return frontier


def retain_at(frontier: Sequence[Point], x: float) -> float | None:
    """Retain probability of the frontier at forget probability ``x`` (see the module docstring); None when the
    frontier never reaches ``x``. ``frontier`` must come from :func:`pareto_frontier` (sorted, increasing)."""
    if not frontier or x < frontier[0]["forget"]:
        return None
    for low, high in zip(frontier, frontier[1:]):
        if low["forget"] <= x < high["forget"]:
            share = (x - low["forget"]) / (high["forget"] - low["forget"])
            return low["retain"] + share * (high["retain"] - low["retain"])
    return frontier[-1]["retain"]


def best_point_at_most(points: Iterable[Point], x: float) -> Point | None:
    """The checkpoint with the highest retain among those with forget <= ``x`` (ties: the lower forget, then the
    first); None when none forgot that much."""
    best: Point | None = None
    for point in points:
        if not _finite(point) or point["forget"] > x:
            continue
        if best is None or (point["retain"], -point["forget"]) > (best["retain"], -best["forget"]):
            best = point
    return best


def nearest_frontier_point(points: Iterable[Point], x: float) -> Point | None:
    """The checkpoint worth a full evaluation: :func:`best_point_at_most` ``x``, else the one with the lowest
    forget (ties: the higher retain); None without points."""
    points = [p for p in points if _finite(p)]
    best = best_point_at_most(points, x)
    if best is not None or not points:
        return best
    return min(points, key=lambda p: (p["forget"], -p["retain"]))


def better_operating_point(candidate: Point, current: Point | None, x: float) -> bool:
    """Whether ``candidate`` should replace ``current`` as a run's kept checkpoint, by :func:`nearest_frontier_point`'s
    rule. Applied along a run it keeps that run's answer, and the method's answer is among its runs' kept ones."""
    if current is None:
        return _finite(candidate)
    return nearest_frontier_point([current, candidate], x) is candidate and candidate is not current


def summarise(points: Sequence[Point], x: float) -> dict[str, Any]:
    """Everything the report says about one method's checkpoints at forget target ``x``."""
    frontier = pareto_frontier(points)
    return {
        "frontier": [dict(p) for p in frontier],
        "retain_at": retain_at(frontier, x),
        "best_point": None if (best := best_point_at_most(points, x)) is None else dict(best),
        "min_forget": min((p["forget"] for p in points if _finite(p)), default=None),
        "num_points": len(points),
    }
