"""The audit's report: one markdown table (plus verdict lines, membership and per-module tables), the same numbers
as JSON, and a plot of every attack's recovered fractions."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .measure import FORGET_METRICS, Thresholds, verdict

SHORT = {"probability": "prob", "rouge_l_recall": "ROUGE-L", "keyword_accuracy": "keyword acc"}
MODULE_ROWS = 12  # the markdown lists the modules with the most changed entries; the JSON has all


def _num(value: float | None, spec: str = ".3f") -> str:
    return "-" if value is None else format(value, spec)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{value:.0%}"


@dataclass
class AuditReport:
    """Everything one audit measured. ``rows``: one per attack variant (forget metrics of the original, of the
    unlearned model and under attack, recovered fractions, retain metrics before/after, verdict);
    ``module_changes``: the unlearning change per quantized module against the 4-bit bin width; ``membership``:
    MIA AUCs; ``verdicts``: one sentence per attack."""

    name: str
    thresholds: Thresholds
    baseline: dict[str, Any]
    settings: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, Any]] = field(default_factory=list)
    module_changes: list[dict[str, Any]] = field(default_factory=list)
    membership: list[dict[str, Any]] = field(default_factory=list)
    membership_verdict: str | None = None
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def verdicts(self) -> list[str]:
        """One sentence per attack, each naming its thresholds."""
        lines = [row["verdict"] for row in self.rows]
        return lines + ([self.membership_verdict] if self.membership_verdict else [])

    def add_membership_verdict(self) -> None:
        """The membership verdict: the share of the original's membership signal left, worst attack deciding."""
        fractions = {row["attack"]: row["signal_left"] for row in self.membership}
        came_back = (
            "of the original's membership signal is left (negative: forget items now look less familiar than holdout)"
        )
        _, sentence = verdict("membership inference vs holdout", fractions, self.thresholds, came_back)
        self.membership_verdict = sentence

    def to_dict(self) -> dict[str, Any]:
        """Every number, JSON-ready."""
        return {
            "name": self.name,
            "thresholds": vars(self.thresholds),
            "settings": self.settings,
            "baseline": self.baseline,
            "rows": self.rows,
            "module_changes": self.module_changes,
            "membership": self.membership,
            "verdicts": self.verdicts,
            "notes": self.notes,
            "seconds": self.seconds,
        }

    def to_markdown(self) -> str:
        """The report as markdown: the attack table, verdicts, membership and the per-module change table."""
        base = self.baseline
        lines = [
            f"# Unlearning audit: {self.name}",
            "",
            f"Forget metrics as original / unlearned / attacked, then the recovered fraction (attacked - unlearned) / "
            f"(original - unlearned). Plain evaluation: forget prob {_num(base['original']['forget']['probability'])}"
            f" -> {_num(base['unlearned']['forget']['probability'])}, retain prob "
            f"{_num(base['original']['retain']['probability'])} -> {_num(base['unlearned']['retain']['probability'])}"
            " (original -> unlearned).",
            "",
        ]
        header = ["attack", "variant", "items"]
        for metric in FORGET_METRICS:
            header += [f"forget {SHORT[metric]} o / u / a", "recovered"]
        header += ["retain prob u -> a", "verdict"]
        lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for row in self.rows:
            cells = [row["attack"], row["variant"], str(row["items"])]
            for metric in FORGET_METRICS:
                values = " / ".join(_num(row[k].get(metric)) for k in ("original", "unlearned", "attacked"))
                cells += [values, _pct(row["recovered"][metric])]
            after = (row["retain_attacked"] or {}).get("probability")
            cells += [f"{_num(row['retain_unlearned'].get('probability'))} -> {_num(after)}", row["verdict_label"]]
            lines.append("| " + " | ".join(cells) + " |")
        lines += ["", "Verdicts:", "", *[f"- {v}" for v in self.verdicts], *[f"- {n}" for n in self.notes]]
        if self.membership:
            lines += [
                "",
                "Membership inference (forget vs holdout; AUC 0.5 = indistinguishable):",
                "",
                "| attack | AUC original | AUC unlearned | privleak unlearned | signal left |",
                "|---|---|---|---|---|",
            ]
            for row in self.membership:
                lines.append(
                    f"| {row['attack']} | {row['auc_original']:.3f} | {row['auc_unlearned']:.3f} | "
                    f"{row['privleak_unlearned']:.1f} | {_pct(row['signal_left'])} |"
                )
        if self.module_changes:
            changed = sorted(self.module_changes, key=lambda r: -r["changed"])
            lines += [
                "",
                "Unlearning change per quantized module against the NF4 bin width (the gap between the two 4-bit "
                "levels a weight falls between, times its block scale); 'kept' = changed entries whose 4-bit copy "
                "keeps at least half of the change; 'whole' = how much of the change, projected on it, the NF4 copy "
                "keeps (entries that cross a level carry a whole bin: ~100% means rounding keeps the change on "
                f"average). The {min(MODULE_ROWS, len(changed))} modules with the most changed entries (all in the "
                "JSON):",
                "",
                "| module | changed / entries | median |change|/bin | p90 | below half a bin | kept by NF4 "
                "| kept by FP4 | whole (NF4) |",
                "|---|---|---|---|---|---|---|---|",
            ]
            for row in changed[:MODULE_ROWS]:
                lines.append(
                    f"| {row['module']} | {row['changed']:,} / {row['entries']:,} | "
                    f"{_num(row.get('median_change_over_bin'), '.3g')} | {_num(row.get('p90_change_over_bin'), '.3g')}"
                    f" | {_pct(row.get('below_half_bin'))} | {_pct(row.get('kept_by_nf4'))} | "
                    f"{_pct(row.get('kept_by_fp4'))} | {_pct(row.get('projection_kept_nf4'))} |"
                )
        return "\n".join(lines) + "\n"

    def plot(self, path: str | Path) -> None:
        """Bars of every attack's recovered fractions with the verdict thresholds drawn in."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        labels = [f"{r['attack']}\n{r['variant'][:28]}" for r in self.rows]
        fig, ax = plt.subplots(figsize=(max(6.0, 1.4 * len(labels) + 2), 4.5))
        width = 0.8 / len(FORGET_METRICS)
        for i, metric in enumerate(FORGET_METRICS):
            values = [r["recovered"][metric] for r in self.rows]
            xs = [j + (i - 1) * width for j in range(len(self.rows))]
            ax.bar(xs, [0.0 if v is None else v for v in values], width, label=f"forget {SHORT[metric]}")
        for level in (self.thresholds.partial, self.thresholds.recovered):
            ax.axhline(level, color="grey", linestyle="--", linewidth=0.8)
        ax.axhline(0.0, color="black", linewidth=0.6)
        ax.set_xticks(range(len(labels)), labels, fontsize=7)
        ax.set_ylabel("recovered fraction")
        ax.set_title(f"Unlearning audit: {self.name} (dashed: verdict thresholds)")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(path, dpi=120)
        plt.close(fig)

    def save(self, directory: str | Path) -> dict[str, Path]:
        """Write ``audit.md``, ``audit.json`` and ``audit.png`` into ``directory`` (created if needed)."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": out / "audit.md", "json": out / "audit.json", "plot": out / "audit.png"}
        paths["markdown"].write_text(self.to_markdown(), encoding="utf-8")
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2, default=str), encoding="utf-8")
        self.plot(paths["plot"])
        return paths
