"""Reports of the TOFU benchmark: markdown tables, JSON, plots, for the three modes.

* The main table (:func:`write_outputs`): one row per method, TOFU's metrics, a forget-quality/utility plot.
* The learning-rate pilot (:func:`write_sweep_report`): teacher-forced numbers per rate and the chosen rates.
* The frontier benchmark: :mod:`tofu_frontier_report` (also the model-regime summary).
"""

from __future__ import annotations

import json
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from common import atomic_write, json_safe, markdown_table  # benchmarks/ is on sys.path as a script
from tofu_frontier_report import write_frontier_report
from tofu_methods import choose_learning_rates

# ------------------------------------------------------------------------------------------------ main table

TABLE_COLUMNS = (
    ("method", "method", "g"),
    ("forget_quality", "forget quality", "e"),
    ("model_utility", "model utility", "g"),
    ("forget_rouge_l_recall", "forget ROUGE-L", "g"),
    ("forget_probability", "forget prob", "g"),
    ("forget_truth_ratio", "forget TR", "g"),
    ("forget_keyword_accuracy", "kw acc", "g"),
    ("forget_keyword_confidence", "kw conf", "g"),
    ("retain_probability", "retain prob", "g"),
    ("retain_rouge_l_recall", "retain ROUGE-L", "g"),
    ("collateral", "retain lost / forget removed", "g"),
    ("privleak_mink", "privleak (MinK)", "g"),
    ("trainable_entries", "trained entries", "g"),
    ("wall_seconds", "wall s", "s"),
)
# Selection diagnostics for the mask tables: the share of the forget / retain gradient statistic (GRIN's A_f, A_r;
# sums of squared per-example gradients by default) that the selected entries hold. A random 1% mask holds ~1%.
MASK_COLUMNS = (*TABLE_COLUMNS, ("mass_forget", "forget mass", "g"), ("mass_retain", "retain mass", "e"))


def collateral(summary: Mapping[str, Any], target: Mapping[str, Any], min_drop: float = 0.05) -> float | None:
    """Retain answer probability lost per unit of forget answer probability removed, both against the target: a
    first-order trade-off that compares methods landing at different amounts of forgetting (lower is better; 0 =
    forgetting for free). None when the forget probability fell by less than ``min_drop`` (a ratio of noise)."""
    drop = target["forget_probability"] - summary["forget_probability"]
    if drop < min_drop:
        return None
    return (target["retain_probability"] - summary["retain_probability"]) / drop


def table_rows(results: list[dict[str, Any]], groups: Sequence[str]) -> list[dict[str, Any]]:
    target = next((r["summary"] for r in results if r["method"].startswith("target") and "summary" in r), None)
    rows = []
    for r in results:
        if r["group"] not in groups:
            continue
        mass = (r.get("localization") or {}).get("mass") or {}
        extra = {"mass_forget": mass.get("forget"), "mass_retain": mass.get("retain")}
        if target is not None and "summary" in r and r["group"] != "reference":
            extra["collateral"] = collateral(r["summary"], target)
        rows.append({"method": r["method"], **r.get("summary", {}), **r.get("cost", {}), **extra})
    return rows


def write_plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Left: forget quality (log) against model utility, the field's headline plot (ideal: top right). Right: forget
    ROUGE-L recall against model utility (ideal: bottom right), which still separates methods where forget
    quality saturates near 0, as it does for tiny models. One marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"reference": "*", "main": "o", "selectors": "s", "ablation": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    for r in results:
        s = r.get("summary") or {}
        mu = s.get("model_utility")
        if mu is None:
            continue
        for ax, y in zip(axes, (s.get("forget_quality"), s.get("forget_rouge_l_recall"))):
            if y is None:
                continue
            y = max(y, 1e-300)
            ax.scatter(mu, y, marker=markers.get(r["group"], "o"), s=60)
            ax.annotate(r["method"], (mu, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("forget quality (KS p-value vs retain-only model, log)")
    axes[1].set_ylabel("forget ROUGE-L recall (greedy answer vs gold)")
    for ax in axes:
        ax.set_xlabel("model utility (harmonic mean of 9 retain/real-authors/world-facts metrics)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep_plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Forget against retain answer probability, one line per parameterisation through its learning rates: the
    trade-off each can reach (ideal: bottom right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for family in dict.fromkeys(r["group"] for r in results):
        runs = sorted(
            (r for r in results if r["group"] == family and "summary" in r),
            key=lambda r: (r.get("config") or {}).get("lr") or 0,
        )
        if not runs:
            continue
        xs = [r["summary"]["retain_probability"] for r in runs]
        ys = [r["summary"]["forget_probability"] for r in runs]
        line = "" if family == "reference" else "-"  # the two reference points are not a trajectory
        ax.plot(xs, ys, marker="*" if family == "reference" else "o", linestyle=line, label=family)
        for r, x, y in zip(runs, xs, ys):
            lr = (r.get("config") or {}).get("lr")
            label = r["method"] if lr is None else f"{lr:g}"  # the legend names the family
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("retain answer probability")
    ax.set_ylabel("forget answer probability")
    ax.legend(title="learning rate rising along each line")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, stem: str) -> None:
    results = report["results"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(json_safe(report), indent=2))
    s = report["settings"]
    lines = [
        f"# TOFU {s['forget']} unlearning benchmark ({s['scale']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Total wall time {report['total_seconds']:.0f} s on {report['environment'].get('cpu_count')} CPU cores, "
        f"{report.get('workers', {}).get('count', 1)} process(es) of "
        f"{report['environment'].get('torch_threads')} torch thread(s); torch {report['environment']['torch']}, "
        f"transformers {report['environment']['transformers']}, peft {report['environment']['peft']}.",
        "",
        f"Models: {json.dumps(report.get('models', {}).get('settings', {}))}",
        "",
        f"Unlearning: {json.dumps(s['train'])}; learning rates full {s['lr_full']}, LoRA {s['lr_lora']}, "
        f"GRIN/masks {s['lr_grin']}; budget {s['density'] * 100:g}% of the linear weights; "
        f"generation cap {s.get('max_new_tokens')} tokens.",
        "",
        "forget quality: KS p-value of forget truth ratios vs the retain-only model (higher = closer to never "
        "trained; the retain model scores 1). model utility: harmonic mean over retain/real_authors/world_facts of "
        "probability, ROUGE-L and truth ratio. privleak: MinK (k=0.4) MIA forget vs holdout, relative to the "
        "retain model's AUC (0 = like the retain model; strongly negative = forget set still identifiable). "
        "kw acc/conf: keyword accuracy of the greedy answer / teacher-forced keyword-token probability on forget. "
        "wall s: localisation + training (or dampening), evaluation excluded.",
        "",
    ]
    titles = {
        "reference": "Reference models",
        "main": "Methods",
        "selectors": f"Other selectors in GRIN's machinery ({s['selector_objective']}, same budget, noise, steps)",
        "ablation": "Ablations",
    }
    for group, title in titles.items():
        rows = table_rows(results, [group])
        if rows:
            columns = MASK_COLUMNS if group in ("selectors", "ablation") else TABLE_COLUMNS
            lines += [f"## {title}", "", markdown_table(rows, columns), ""]
    failures = [r for r in results if r.get("error")]
    if failures:
        lines += ["## Failures", ""] + [f"- {r['method']}: {r['error']}" for r in failures] + [""]
    atomic_write(out / f"{stem}.md", "\n".join(lines))
    try:
        write_plot(results, out / f"{stem}.png", f"TOFU {s['forget']} ({s['scale']}): forget quality vs utility")
    except Exception as error:  # a missing matplotlib must not lose the numbers
        print(f"plot skipped: {error}", file=sys.stderr)


def combine_reports(reports: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """One report from several processes' reports (same settings, disjoint methods): the first report's settings
    and reference row, every method once (first occurrence), in the benchmark's order."""
    merged = dict(reports[0])
    rows: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report["results"]:
            rows.setdefault(row["method"], row)
    rank = {name: i for i, name in enumerate(order)}
    merged["results"] = sorted(rows.values(), key=lambda r: (r["group"] != "reference", rank.get(r["method"], -1)))
    return merged


def read_report(path: str | Path) -> dict[str, Any]:
    """A saved report, or one clear line and exit 2 when the file is missing or not a report."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"bench_tofu: cannot read report {path}: {error}") from None
    if not isinstance(report, dict) or "results" not in report:
        raise SystemExit(f"bench_tofu: {path} is not a bench_tofu report (no 'results').")
    return report


def report_mode(report: Mapping[str, Any], lr_sweep: bool = False) -> str:
    """``"frontier"``, ``"lr_sweep"`` or ``"table"``; reports written before modes were recorded are told apart by
    the pilot's grids (or the caller's ``--lr-sweep``)."""
    if report.get("mode"):
        return report["mode"]
    return "lr_sweep" if lr_sweep or "lr_grids" in report.get("settings", {}) else "table"


def write_report(report: dict[str, Any], out: Path, stem: str, lr_sweep: bool = False) -> None:
    """The JSON, markdown and plot of a report, in its mode's layout."""
    mode = report_mode(report, lr_sweep)
    if mode == "frontier":
        write_frontier_report(report, out, stem)
    elif mode == "lr_sweep":
        write_sweep_report(report, out, stem)
    else:
        write_outputs(report, out, stem)


# ------------------------------------------------------------------------------------------------ pilot


def write_sweep_report(report: dict[str, Any], out: Path, stem: str) -> None:
    forget = report["settings"]["forget"]
    report["chosen_learning_rates"] = choose_learning_rates(report["results"])
    atomic_write(out / f"{stem}.json", json.dumps(json_safe(report), indent=2))
    cols = (
        ("method", "method", "g"),
        ("forget_quality", "forget quality", "e"),
        ("forget_probability", "forget prob", "g"),
        ("forget_truth_ratio", "forget TR", "g"),
        ("retain_probability", "retain prob", "g"),
        ("retain_truth_ratio", "retain TR", "g"),
        ("collateral", "retain lost / forget removed", "g"),
        ("wall_seconds", "wall s", "s"),
    )
    rows = table_rows(report["results"], dict.fromkeys(r["group"] for r in report["results"]))
    lines = [
        f"# Learning-rate pilot, TOFU {forget} (NPO, teacher-forced evaluation only)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Total wall time {report.get('total_seconds', 0):.0f} s. "
        f"Unlearning: {json.dumps(report['settings']['train'])}.",
        "",
        "Rule, declared before the runs: per parameterisation, the learning rate with the highest forget quality "
        "among those keeping retain probability >= 0.9 x the target's (else the one keeping the most).",
        "",
        markdown_table(rows, cols),
        "",
        f"Chosen: {json.dumps(report['chosen_learning_rates'])}",
        "",
    ]
    atomic_write(out / f"{stem}.md", "\n".join(lines))
    try:
        write_sweep_plot(report["results"], out / f"{stem}.png", f"TOFU {forget}: NPO learning-rate pilot")
    except Exception as error:  # a missing matplotlib must not lose the numbers
        print(f"plot skipped: {error}", file=sys.stderr)
