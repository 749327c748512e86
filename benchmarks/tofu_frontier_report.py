"""The frontier benchmark's report (``bench_tofu.py --frontier``) and the model-regime summary.

Per method family and seed: the Pareto frontier of its (forget prob, retain prob) checkpoints, the figure of merit
(retain prob at ``--frontier-at`` forget prob, see :mod:`frontier`), the best single checkpoint under the target with
its full evaluation, the density table (trained entries and delta file bytes beside quality), every run's trajectory;
a plot of every frontier and of the figure of merit against density. Everything in the tables is recomputed from the
runs' points, so ``--render`` and ``--merge`` rebuild them from the JSON alone. :func:`write_regime_summary` puts the
figure of merit of every family in every model regime side by side.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import atomic_write, fmt_num, json_safe  # benchmarks/ is on sys.path as a script
from frontier import nearest_frontier_point, summarise

# ------------------------------------------------------------------------------------------------ frontier


def _mean(values: Sequence[float]) -> float | None:
    return sum(values) / len(values) if values else None


def family_points(runs: Sequence[Mapping[str, Any]], family: str, seed: Any) -> list[dict[str, Any]]:
    """Every checkpoint of a family at one seed (all its learning rates and evaluated steps), each tagged with its
    run and learning rate."""
    points = []
    for run in runs:
        if run.get("family") != family or run.get("seed") != seed or run.get("error"):
            continue
        points += [{**p, "run": run["run"], "lr": run.get("lr")} for p in run.get("points", [])]
    return points


def frontier_summary(report: Mapping[str, Any]) -> list[dict[str, Any]]:
    """Per method family (report order) and seed: the frontier, the figure of merit (``retain_at``), the best
    checkpoint with forget <= the target, the operating checkpoint (:func:`frontier.nearest_frontier_point`) and its
    full evaluation when one was run; over seeds, the mean figure of merit (None unless every seed reached the
    target); the family's trained entries and delta file bytes."""
    settings = report["settings"]
    x = settings["frontier_at"]
    runs = report.get("runs", [])
    results = report.get("results", [])
    evaluated = {(r.get("family"), r.get("seed")): r for r in results if r.get("group") == "operating"}
    order = [f["family"] for f in settings.get("families", [])]
    order += [r["family"] for r in runs if r["family"] not in order]
    out = []
    for family in dict.fromkeys(order):
        fam_runs = [r for r in runs if r["family"] == family]
        if not fam_runs:
            continue
        per_seed: dict[Any, dict[str, Any]] = {}
        for seed in sorted({r["seed"] for r in fam_runs}):
            points = family_points(runs, family, seed)
            summary = summarise(points, x)
            summary["operating"] = nearest_frontier_point(points, x)
            summary["evaluation"] = evaluated.get((family, seed))
            summary["failed_runs"] = [r["run"] for r in fam_runs if r["seed"] == seed and r.get("error")]
            per_seed[seed] = summary
        merits = [s["retain_at"] for s in per_seed.values()]
        reached = [m for m in merits if m is not None]
        first = next((r for r in fam_runs if not r.get("error")), fam_runs[0])
        out.append(
            {
                "family": family,
                "kind": first.get("kind"),
                "density": first.get("density"),
                "score": first.get("score"),
                "rates": sorted({r["lr"] for r in fam_runs if r.get("lr") is not None}),
                "trainable_entries": first.get("trainable_entries"),
                "delta_bytes": first.get("delta_bytes"),
                "delta_file": first.get("delta_file"),
                "seeds": per_seed,
                "retain_at_mean": _mean(reached) if merits and len(reached) == len(merits) else None,
                "reached_seeds": len(reached),
                "num_seeds": len(merits),
            }
        )
    return out


def _merit(value: float | None) -> str:
    return "not reached" if value is None else f"{value:.3f}"


def _mean_cell(fam: Mapping[str, Any]) -> str:
    if fam["retain_at_mean"] is not None:
        return f"{fam['retain_at_mean']:.3f}"
    return f"not reached ({fam['num_seeds'] - fam['reached_seeds']}/{fam['num_seeds']} seeds)"


def _point_cell(point: Mapping[str, Any] | None) -> str:
    if point is None:
        return "none"
    lr = point.get("lr")
    where = f"lr {lr:g}, " if lr is not None else ""
    return f"{point['retain']:.3f} ({where}{_epoch(point)}, forget {point['forget']:.3f})"


def _epoch(point: Mapping[str, Any]) -> str:
    """Where in its run a checkpoint is: its epoch, or its step where the epoch is unknown (the auto run's end)."""
    if point.get("epoch") is not None:
        return f"epoch {point['epoch']:.1f}"
    return f"step {point.get('step', '?')}"


def _bytes(value: Any) -> str:
    return "-" if value is None else f"{int(value):,}"


def frontier_tables(report: Mapping[str, Any], families: list[dict[str, Any]]) -> list[str]:
    """The frontier report's markdown sections."""
    s = report["settings"]
    x = s["frontier_at"]
    seeds = sorted({seed for fam in families for seed in fam["seeds"]}, key=str)
    lines = [
        f"## Figure of merit: retain answer probability at forget answer probability {x:g}",
        "",
        f"Per method, every checkpoint of every learning rate (evaluated at step 0 and every {s['eval_every']:g} "
        f"{s['eval_unit']}) is a point (forget prob, retain prob); the frontier is their upper-left Pareto envelope, "
        f"read at forget = {x:g} by linear interpolation between the two frontier points that bracket it "
        "(benchmarks/frontier.py). 'not reached': no checkpoint forgot that much. 'best checkpoint': the real "
        f"checkpoint with the highest retain prob among those with forget <= {x:g} (never above the interpolation). "
        "delta bytes: the adapter file as saved (adapter_model.safetensors; the whole model.safetensors for full "
        "fine-tuning).",
        "",
    ]
    head = ["method", "trained entries", "delta bytes", "learning rates"]
    head += [f"retain @ {x:g}, seed {seed}" for seed in seeds] + ["mean over seeds"]
    head += [f"best checkpoint, seed {seed}" for seed in seeds] + ["lowest forget"]
    rows = []
    for fam in families:
        cells = [fam["family"], fmt_num(fam["trainable_entries"]), _bytes(fam["delta_bytes"])]
        cells.append(", ".join(f"{lr:g}" for lr in fam["rates"]) or "its own")
        cells += [_merit(fam["seeds"][seed]["retain_at"]) if seed in fam["seeds"] else "-" for seed in seeds]
        cells.append(_mean_cell(fam))
        cells += [_point_cell(fam["seeds"][seed]["best_point"]) if seed in fam["seeds"] else "-" for seed in seeds]
        cells.append(fmt_num(min((v["min_forget"] for v in fam["seeds"].values() if v["min_forget"] is not None),
                                 default=None)))  # fmt: skip
        rows.append(cells)
    lines += [_table(head, rows), ""]
    lines += _density_section(families, s, x) + _operating_section(families, report, x)
    lines += _auto_section(families, report)
    lines += _runs_section(report)
    return lines


def _table(head: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    out += ["| " + " | ".join(map(str, row)) + " |" for row in rows]
    return "\n".join(out)


def _density_section(families: list[dict[str, Any]], s: Mapping[str, Any], x: float) -> list[str]:
    masks = [f for f in families if f["kind"] == "grin" and f["density"] is not None]
    if not masks or "," in str(s.get("objective", "")):  # one objective per table; several: the merit table only
        return []
    labels = list(dict.fromkeys(f["family"].split(" ", 2)[-1].removesuffix(" NPO") for f in masks))
    labels = [label for label in labels if "%" not in label]
    head = ["budget", "trained entries", "delta bytes"]
    head += [f"GRIN retain @ {x:g}"] + [f"{label} retain @ {x:g}" for label in labels if label != "NPO"]
    rows = []
    for fam in families:
        if fam["kind"] in ("full", "lora"):
            rows.append([fam["family"], fmt_num(fam["trainable_entries"]), _bytes(fam["delta_bytes"]),
                         _mean_cell(fam)] + ["-"] * (len(head) - 4))  # fmt: skip
    for density in dict.fromkeys(f["density"] for f in masks):
        at = [f for f in masks if f["density"] == density]
        grin = next((f for f in at if f["score"] == "gradient_ratio"), None)
        first = grin or at[0]
        cells = [f"{density * 100:g}%", fmt_num(first["trainable_entries"]), _bytes(first["delta_bytes"])]
        cells.append(_mean_cell(grin) if grin else "-")
        for label in labels:
            if label == "NPO":
                continue
            other = next((f for f in at if f["score"] != "gradient_ratio" and label in f["family"]), None)
            cells.append(_mean_cell(other) if other else "-")
        rows.append(cells)
    return [
        "## Density regime",
        "",
        f"Mean over seeds of the figure of merit; each budget has its own learning-rate grid ({_grids(s)}). GRIN and "
        "the other masks at one budget train the same number of entries (their files differ by a few header bytes: "
        "the entries per module differ). Full NPO's delta is the whole model; LoRA's its A and B matrices.",
        "",
        _table(head, rows),
        "",
    ]


def _grids(s: Mapping[str, Any]) -> str:
    grids = s.get("grids", {})
    return "; ".join(f"{name}: {', '.join(f'{lr:g}' for lr in rates)}" for name, rates in grids.items()) or "-"


OPERATING_COLUMNS = (
    ("method", "method"),
    ("seed", "seed"),
    ("meets", "forget <= target"),
    ("lr", "lr"),
    ("epoch", "epoch"),
    ("forget", "forget prob"),
    ("retain", "retain prob"),
    ("forget_quality", "forget quality"),
    ("model_utility", "model utility"),
    ("forget_rouge_l_recall", "forget ROUGE-L"),
    ("retain_rouge_l_recall", "retain ROUGE-L"),
    ("forget_keyword_accuracy", "kw acc"),
    ("privleak_mink", "privleak (MinK)"),
)


def _operating_section(families: list[dict[str, Any]], report: Mapping[str, Any], x: float) -> list[str]:
    rows = []
    for fam in families:
        for seed, summary in fam["seeds"].items():
            point = summary["operating"]
            if point is None:
                continue
            full = (summary.get("evaluation") or {}).get("summary") or {}
            cells = {
                "method": fam["family"], "seed": str(seed), "meets": "yes" if point["forget"] <= x else "no",
                "lr": "auto" if point.get("lr") is None else f"{point['lr']:g}",
                "epoch": _epoch(point).removeprefix("epoch "), "forget": point["forget"], "retain": point["retain"],
                **{key: full.get(key) for key, _ in OPERATING_COLUMNS[7:]},
            }  # fmt: skip
            rows.append([fmt_num(cells[key], "e" if key == "forget_quality" else "g") for key, _ in OPERATING_COLUMNS])
    if not rows:
        return []
    refs = [r for r in report.get("results", []) if r.get("group") == "reference"]
    ref_rows = []
    for r in refs:
        sm = r.get("summary", {})
        probs = [fmt_num(sm.get("forget_probability")), fmt_num(sm.get("retain_probability"))]
        rest = [fmt_num(sm.get(key), "e" if key == "forget_quality" else "g") for key, _ in OPERATING_COLUMNS[7:]]
        ref_rows.append([r["method"], "-", "-", "-", "-", *probs, *rest])
    utility = report["settings"].get("utility", "operating")
    note = (
        "full evaluation (generation, model utility, forget quality, privleak) of each method's operating "
        f"checkpoint: its best checkpoint with forget <= {x:g}, else (forget <= target: no) the one that forgot the "
        "most; its trainable values were kept in memory during the run and saved, so nothing was retrained."
        if utility != "none"
        else "full evaluations were switched off (--utility none): the columns after retain prob are empty."
    )
    return [
        "## Operating checkpoints",
        "",
        note,
        "",
        _table([h for _, h in OPERATING_COLUMNS], ref_rows + rows),
        "",
    ]


def _probs(state: Any) -> str:
    """``before``/``after`` of an operating point: its forget and retain probability, whatever the key names."""
    if not isinstance(state, Mapping):
        return "-" if state is None else str(state)
    forget = state.get("forget_prob", state.get("forget"))
    retain = state.get("retain_prob", state.get("retain"))
    return f"{fmt_num(forget)} / {fmt_num(retain)}"


def _auto_section(families: list[dict[str, Any]], report: Mapping[str, Any]) -> list[str]:
    auto = [f for f in families if f["kind"] == "auto"]
    if not auto:
        return []
    lines = [
        "## Controller-driven unlearn (auto)",
        "",
        "`grin_peft.unlearn(model, forget, retain, tokenizer=...)` with the other rows' batch size, seed, bf16 and "
        "threads but no learning rate, epochs, config or objective: its own operating point. forget/retain prob: "
        "this benchmark's evaluation sets after the call; target met, learning rate, steps, before/after: what the "
        "installed grin_peft's `result.operating_point` says (- where it says nothing; the whole of it is in the "
        "JSON).",
        "",
    ]
    runs = {r["run"]: r for r in report.get("runs", [])}
    rows = []
    for fam in auto:
        for seed, summary in fam["seeds"].items():
            point = summary["operating"] or {}
            record = runs.get(point.get("run"), {})
            op = record.get("operating_point")
            op = op if isinstance(op, Mapping) else {}
            rows.append(
                [str(seed), fmt_num(point.get("forget")), fmt_num(point.get("retain")),
                 fmt_num(record.get("trainable_entries")), _bytes(record.get("delta_bytes")),
                 str(op.get("target_met", "-")), fmt_num(record.get("auto_learning_rate"), "e"),
                 fmt_num(record.get("steps")), _probs(op.get("before")), _probs(op.get("after")),
                 fmt_num(record.get("wall_seconds"), "s")]
            )  # fmt: skip
    head = ["seed", "forget prob", "retain prob", "trained entries", "delta bytes", "target met", "learning rate"]
    head += ["steps", "before (forget / retain)", "after (forget / retain)", "wall s"]
    return lines + [_table(head, rows), ""]


def _runs_section(report: Mapping[str, Any]) -> list[str]:
    rows = []
    for run in report.get("runs", []):
        points = run.get("points", [])
        last = points[-1] if points else {}
        kept = run.get("kept") or {}
        rows.append(
            [run["run"], fmt_num(run.get("steps")), str(len(points)),
             fmt_num(min((p["forget"] for p in points), default=None)), fmt_num(last.get("forget")),
             fmt_num(last.get("retain")),
             "-" if not kept else f"{_epoch(kept)}: {kept['forget']:.3f} / {kept['retain']:.3f}",
             fmt_num(run.get("wall_seconds"), "s"), fmt_num(run.get("trajectory_eval_seconds"), "s"),
             run.get("error") or ""]
        )  # fmt: skip
    head = ["run", "steps", "points", "lowest forget", "final forget", "final retain", "kept (forget / retain)"]
    head += ["train s", "trajectory eval s", "error"]
    return ["## Every run", "", _table(head, rows), ""]


def write_frontier_report(report: dict[str, Any], out: Path, stem: str) -> None:
    """JSON (with the recomputed ``frontiers``), markdown and plot of a frontier report."""
    families = frontier_summary(report)
    report["frontiers"] = families
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(json_safe(report), indent=2))
    s = report["settings"]
    env = report.get("environment", {})
    regime = f", regime {s['regime']}" if s.get("regime") else ""
    lines = [
        f"# TOFU {s['forget']} frontier benchmark ({s['scale']}{regime})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Total wall time {report.get('total_seconds', 0):.0f} s on {env.get('cpu_count')} CPU cores, "
        f"{report.get('workers', {}).get('count', 1)} process(es) of {env.get('torch_threads')} torch thread(s); "
        f"torch {env.get('torch')}, transformers {env.get('transformers')}, peft {env.get('peft')}.",
        "",
        f"Models: {json.dumps(report.get('models', {}).get('settings', {}))}"
        + (
            f"; {report['models']['num_parameters']:,} parameters"
            if report.get("models", {}).get("num_parameters")
            else ""
        ),  # fmt: skip
        "",
        f"Unlearning: {s.get('objective', 'npo').upper()}, {json.dumps(s['train'])}; seeds {s['seeds']}; forget "
        f"target {s['frontier_at']:g}.",
        "",
    ]
    lines += frontier_tables(report, families)
    failures = [r for r in report.get("runs", []) + report.get("results", []) if r.get("error")]
    if failures:
        lines += ["## Failures", ""] + [f"- {r.get('run') or r.get('method')}: {r['error']}" for r in failures] + [""]
    atomic_write(out / f"{stem}.md", "\n".join(lines))
    try:
        write_frontier_plot(report, families, out / f"{stem}.png")
    except Exception as error:  # a missing matplotlib must not lose the numbers
        print(f"plot skipped: {error}", file=sys.stderr)


def write_frontier_plot(report: Mapping[str, Any], families: list[dict[str, Any]], path: Path) -> None:
    """Left: every family's frontier (forget prob on x, retain prob on y; faint dots: all its checkpoints), the
    forget target as a vertical line, the auto run and the reference/target models as stars. Right: the figure of
    merit against the budget for GRIN and the other masks, full fine-tuning and LoRA as horizontal lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = report["settings"]
    x = s["frontier_at"]
    densities = sorted({f["density"] for f in families if f["kind"] == "grin" and f["density"] is not None})
    cmap = plt.get_cmap("viridis")
    color_of = {d: cmap(i / max(1, len(densities) - 1) * 0.9) for i, d in enumerate(densities)}
    fixed = {"full": "black", "lora": "tab:brown", "auto": "tab:red"}
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(16, 7), gridspec_kw={"width_ratios": [3, 2]})
    for fam in families:
        color = fixed.get(fam["kind"]) or color_of.get(fam["density"], "gray")
        dashed = fam["kind"] == "grin" and fam["score"] != "gradient_ratio"
        for i, (seed, summary) in enumerate(fam["seeds"].items()):
            pts = [p for p in family_points(report.get("runs", []), fam["family"], seed)]
            front = summary["frontier"]
            label = fam["family"] if i == 0 else None
            if fam["kind"] == "auto":
                ax.scatter([p["forget"] for p in pts], [p["retain"] for p in pts], marker="*", s=180, color=color,
                           label=label, zorder=5)  # fmt: skip
                continue
            ax.scatter([p["forget"] for p in pts], [p["retain"] for p in pts], s=6, color=color, alpha=0.25)
            ax.plot([p["forget"] for p in front], [p["retain"] for p in front], color=color, label=label,
                    linestyle="--" if dashed else "-", alpha=1.0 if i == 0 else 0.5, marker=".")  # fmt: skip
            if summary["retain_at"] is not None:
                ax.scatter([x], [summary["retain_at"]], color=color, marker="o", s=30, zorder=4)
    for name, point in (report.get("points") or {}).items():
        if point:
            ax.scatter([point["forget"]], [point["retain"]], marker="*", s=120, color="gray", zorder=5)
            where = (point["forget"], point["retain"])
            ax.annotate(name, where, fontsize=7, xytext=(4, -8), textcoords="offset points")
    ax.axvline(x, color="red", linewidth=1, linestyle=":")
    ax.text(x, 0.02, f" forget = {x:g}", color="red", fontsize=8)
    ax.set_xlim(-0.02, 1.02)
    ax.set_ylim(-0.02, 1.02)
    ax.set_xlabel("forget answer probability (lower = more forgotten)")
    ax.set_ylabel("retain answer probability (higher = more kept)")
    ax.set_title("Frontier per method (upper-left envelope of all rates x epochs; dots: every checkpoint)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    for fam in families:
        if fam["kind"] in ("full", "lora") and fam["retain_at_mean"] is not None:
            bx.axhline(fam["retain_at_mean"], color=fixed[fam["kind"]], linestyle=":", label=fam["family"])
    for score in dict.fromkeys(f["score"] for f in families if f["kind"] == "grin"):
        rows = [f for f in families if f["kind"] == "grin" and f["score"] == score and f["density"] is not None]
        xs = [f["density"] for f in rows if f["retain_at_mean"] is not None]
        ys = [f["retain_at_mean"] for f in rows if f["retain_at_mean"] is not None]
        name = "GRIN" if score == "gradient_ratio" else f"mask {score}"
        bx.plot(xs, ys, marker="o", linestyle="-" if score == "gradient_ratio" else "--", label=name)
        missed = [f["density"] for f in rows if f["retain_at_mean"] is None]
        if missed:
            bx.scatter(missed, [0.0] * len(missed), marker="x", color="gray")
    bx.set_xscale("log")
    bx.set_ylim(-0.02, 1.02)
    bx.set_xlabel("budget (fraction of the linear weights trained)")
    bx.set_ylabel(f"retain prob at forget {x:g} (mean over seeds; x at 0: not reached)")
    bx.set_title("Figure of merit against the budget")
    bx.grid(True, which="both", alpha=0.3)
    bx.legend(fontsize=8)
    title = f"TOFU {s['forget']} ({s['scale']}{', regime ' + s['regime'] if s.get('regime') else ''})"
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_regime_summary(reports: Mapping[str, Mapping[str, Any]], out: Path, stem: str) -> None:
    """One table: the mean figure of merit of every family (rows) in every regime (columns), with each regime's
    parameter count and memorised items; and the JSON of the same."""
    summaries = {name: frontier_summary(report) for name, report in reports.items()}
    x = next(iter(reports.values()))["settings"]["frontier_at"]
    families = list(dict.fromkeys(f["family"] for fams in summaries.values() for f in fams))
    head = ["method"]
    for name, report in reports.items():
        models = report.get("models", {})
        params = models.get("num_parameters")
        items = (models.get("target") or {}).get("num_items")
        ratio = f", {params / items:,.0f} per item" if params and items else ""
        head.append(f"{name} ({fmt_num(params)} params, {fmt_num(items)} memorised items{ratio})")
    rows = []
    for family in families:
        cells = [family]
        for name in reports:
            fam = next((f for f in summaries[name] if f["family"] == family), None)
            cells.append("-" if fam is None else _mean_cell(fam))
        rows.append(cells)
    lines = [
        f"# TOFU model regimes: retain answer probability at forget answer probability {x:g}",
        "",
        "Same protocol in each regime (benchmarks/bench_tofu.py --frontier); mean over seeds of the figure of merit "
        "(retain prob at the forget target, interpolated on each method's frontier). Memorised items: the target's "
        "training set (TOFU authors kept + real_authors + world_facts).",
        "",
        _table(head, rows),
        "",
    ]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.md", "\n".join(lines))
    atomic_write(out / f"{stem}.json", json.dumps(json_safe(summaries), indent=2))
