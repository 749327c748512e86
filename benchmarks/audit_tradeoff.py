"""Does sharpness-aware unlearning buy robustness at equal retain, or only move along the plain trade-off?

Every GRIN run of ``bench_audit.py`` is a point: where unlearning left it (retain answer probability, forget answer
probability) and what the relearning attack brought back (the recovered fraction of forget probability, after
fine-tuning on forget items and on retain items only). The plain runs of one method and seed, at several learning
rates, trace the plain trade-off of recovery against retain; a SAM run is compared with that curve read at the SAM
run's own retain probability (:func:`plain_at`, linear interpolation between the two plain runs that bracket it;
None outside their range, never extrapolated). A SAM run below the curve buys robustness at equal retain; on it,
SAM only moved the operating point.

Pure Python, no torch: unit-tested on hand-made points (``tests/test_audit_tradeoff.py``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from frontier import pareto_frontier, retain_at

SOURCES = ("forget", "related")  # relearning on forget items, on retain items only


def _row(report: Mapping[str, Any], source: str) -> Mapping[str, Any] | None:
    return next((r for r in report["rows"] if r["attack"] == "relearning" and r["variant"].startswith(source)), None)


def _recovered(report: Mapping[str, Any], source: str) -> float | None:
    row = _row(report, source)
    return None if row is None else row["recovered"]["probability"]


def _attacked(report: Mapping[str, Any], source: str) -> float | None:
    row = _row(report, source)
    return None if row is None else row["attacked"]["probability"]


def point(result: Mapping[str, Any]) -> dict[str, Any] | None:
    """A run as a point (None for a run the relearning attack did not judge): its group (method, unlearning
    seed), knobs (lr, retain weight, SAM radius, epochs), operating point and recovered fractions, also those of
    the extra relearning splits."""
    report, config = result["report"], result.get("config", {})
    recovered = {source: _recovered(report, source) for source in SOURCES}
    if all(value is None for value in recovered.values()):
        return None
    splits = {
        f"{s['items']}:{s['seed']}": {source: _recovered(s["report"], source) for source in SOURCES}
        for s in result.get("relearn_splits", [])
    }
    unlearned = report["baseline"]["unlearned"]
    return {
        "method": result["method"],
        "group": result["method"].split(" + ")[0].split(", ")[0],
        "seed": config.get("seed", 0),
        "lr": config.get("lr"),
        "rho": config.get("sam_rho", 0.0) or 0.0,
        "epochs": config.get("epochs"),
        "retain_weight": config.get("retain_weight"),
        "forget": unlearned["forget"]["probability"],
        "retain": unlearned["retain"]["probability"],
        "recovered": recovered,
        "attacked": {source: _attacked(report, source) for source in SOURCES},
        "splits": splits,
    }


def plain_at(plain: Sequence[Mapping[str, Any]], retain: float, key: str = "forget", split: str | None = None):
    """The plain runs' recovered fraction (relearning on ``key`` data, on the main split or ``split``) read at
    retain probability ``retain``: linear interpolation between the two plain runs whose retain brackets it, the
    run's own value at an exact match; None when no two plain runs bracket it (never extrapolated)."""
    values = []
    for p in plain:
        rec = p["recovered"] if split is None else p["splits"].get(split, {})
        if rec.get(key) is not None:
            values.append((p["retain"], rec[key]))
    values.sort()
    for (r_low, v_low), (r_high, v_high) in zip(values, values[1:]):
        if r_low <= retain <= r_high:
            return v_low if r_high == r_low else v_low + (v_high - v_low) * (retain - r_low) / (r_high - r_low)
    return next((v for r, v in values if r == retain), None)


def groups(results: Sequence[Mapping[str, Any]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    """Points by (method, unlearning seed), each group sorted from the most to the least retain kept."""
    out: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for result in results:
        p = point(result)
        if p is not None:
            out.setdefault((p["group"], p["seed"]), []).append(p)
    return {k: sorted(v, key=lambda p: -p["retain"]) for k, v in out.items()}


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


def render_tradeoff(results: Sequence[Mapping[str, Any]]) -> str:
    """A markdown table per (method, seed) with at least one SAM and two plain runs: each run's operating point and
    recovered fractions (main split: the attacked model's forget probability in brackets); a SAM row also shows
    the plain curve at its retain and the difference (negative: SAM lets less come back than a plain run that kept
    as much retain), and the plain runs' forget/retain frontier read at its forget probability (what a plain run
    that forgot as much kept: ``frontier.retain_at``; blank when no plain run forgot that much)."""
    blocks = []
    for (group, seed), points in groups(results).items():
        plain = [p for p in points if not p["rho"]]
        if len(plain) < 2 or len(plain) == len(points):
            continue
        split_names = sorted({s for p in points for s in p["splits"]})
        head = ["run", "lr", "retain weight", "epochs", "forget prob u", "retain prob u", "relearn forget"]
        head += ["plain at this retain"]
        head += ["relearn retain", "plain at this retain"]
        for name in split_names:
            head += [f"relearn forget, split {name}", "plain at this retain", f"relearn retain, split {name}"]
        head.append("plain retain at this forget")
        frontier = pareto_frontier(plain)
        lines = [f"{group}, seed {seed}:", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for p in points:
            label = f"SAM rho={p['rho']:g}" if p["rho"] else "plain"
            weight = 1 if p["retain_weight"] is None else p["retain_weight"]
            cells = [label, f"{p['lr']:g}", f"{weight:g}", f"{p['epochs']:g}", f"{p['forget']:.3f}"]
            cells.append(f"{p['retain']:.3f}")
            for source in SOURCES:
                attacked = p["attacked"][source]
                prob = "" if attacked is None else f" ({attacked:.3f})"
                cells += [_pct(p["recovered"][source]) + prob, _versus(p, plain, source, None)]
            for name in split_names:
                rec = p["splits"].get(name, {})
                cells += [_pct(rec.get("forget")), _versus(p, plain, "forget", name), _pct(rec.get("related"))]
            at_forget = retain_at(frontier, p["forget"]) if p["rho"] else None
            cells.append("" if at_forget is None else f"{at_forget:.3f}")
            lines.append("| " + " | ".join(cells) + " |")
        blocks.append("\n".join(lines) + "\n")
    return "\n".join(blocks)


def _versus(p: Mapping[str, Any], plain: Sequence[Mapping[str, Any]], source: str, split: str | None) -> str:
    """For a SAM run: the plain curve at its retain and SAM's difference in points; blank for a plain run."""
    if not p["rho"]:
        return ""
    own = p["recovered"][source] if split is None else p["splits"].get(split, {}).get(source)
    curve = plain_at(plain, p["retain"], source, split)
    if curve is None or own is None:
        return "outside the plain runs"
    return f"{curve:.0%} ({(own - curve) * 100:+.0f} pts)"


def plot_tradeoff(results: Sequence[Mapping[str, Any]], path: Path) -> None:
    """Recovered fraction against retain probability, a panel per method and attack: plain runs joined per seed,
    SAM runs as labelled markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    by_group = groups(results)
    names = sorted({g for g, _ in by_group})
    fig, axes = plt.subplots(2, len(names), figsize=(5.5 * len(names), 8), squeeze=False)
    markers = {0: "o", 1: "s", 2: "^"}
    for col, name in enumerate(names):
        for row, source in enumerate(SOURCES):
            ax = axes[row][col]
            for (group, seed), points in by_group.items():
                if group != name:
                    continue
                plain = [p for p in points if not p["rho"] and p["recovered"][source] is not None]
                color = f"C{seed}"
                ax.plot([p["retain"] for p in plain], [p["recovered"][source] for p in plain], "-", color=color,
                        marker=markers.get(seed, "o"), label=f"plain, seed {seed}")  # fmt: skip
                for p in points:
                    if p["rho"] and p["recovered"][source] is not None:
                        ax.plot(p["retain"], p["recovered"][source], "*", color=color, markersize=12)
                        ax.annotate(f"rho {p['rho']:g}", (p["retain"], p["recovered"][source]), fontsize=7)
            what = "forget items" if source == "forget" else "retain items only"
            ax.set_title(f"{name.split(' (')[0]}: relearning on {what}", fontsize=9)
            ax.set_ylim(bottom=min(0.0, ax.get_ylim()[0]))
            ax.set_xlabel("retain answer probability after unlearning")
            ax.set_ylabel("recovered fraction of forget probability")
            ax.legend(fontsize=7, title="stars: SAM", title_fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
