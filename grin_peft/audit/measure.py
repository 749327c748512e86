"""What every attack measures, and how a measurement becomes a recovered fraction and a verdict.

One measurement is the forget metrics (answer probability, ROUGE-L recall and keyword accuracy of greedy answers)
on the attacked questions and the retain metrics (answer probability, ROUGE-L recall) on the retain questions, all
from :func:`grin_peft.metrics.evaluate_qa`, so an audit scores exactly as the rest of the package does.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from torch import nn

from ..data import QAFormat
from ..errors import GrinError

FORGET_METRICS = ("probability", "rouge_l_recall", "keyword_accuracy")
RETAIN_METRICS = ("probability", "rouge_l_recall")


@dataclass(frozen=True)
class Thresholds:
    """When an attack counts as recovering what unlearning removed (fractions of the removed amount).

    ``holds`` below ``partial``, "partly recovered" below ``recovered``, "recovered" from there on. ``min_gap`` is
    the smallest original-unlearned difference a recovered fraction is computed for: below it unlearning did not
    move the metric, and a ratio of two small numbers would only report noise.
    """

    partial: float = 0.1
    recovered: float = 0.5
    min_gap: float = 0.05

    def __post_init__(self) -> None:
        if not 0.0 < self.partial < self.recovered or self.min_gap <= 0:
            raise GrinError(
                f"thresholds need 0 < partial < recovered and min_gap > 0; got partial={self.partial}, "
                f"recovered={self.recovered}, min_gap={self.min_gap}."
            )

    def describe(self) -> str:
        return (
            f"< {self.partial:.0%} holds, {self.partial:.0%}-{self.recovered:.0%} partly recovered, "
            f">= {self.recovered:.0%} recovered; metrics that unlearning moved by < {self.min_gap:g} are not judged"
        )


def recovered_fraction(original: float | None, unlearned: float | None, attacked: float | None, min_gap: float = 0.05):
    """``(attacked - unlearned) / (original - unlearned)``: 0 = the attack recovered nothing, 1 = everything
    unlearning removed. None when a value is missing or unlearning moved the metric by less than ``min_gap``."""
    if original is None or unlearned is None or attacked is None:
        return None
    gap = original - unlearned
    if abs(gap) < min_gap:
        return None
    return (attacked - unlearned) / gap


def qa_items(items: Sequence[Mapping[str, Any]], what: str) -> list[dict[str, Any]]:
    """``{question, answer[, keywords, paraphrased_question]}`` copies of ``items``; refuses an empty set or an
    item without string question and answer, so bad data fails before any model runs."""
    if not items:
        raise GrinError(f"audit: the {what} set is empty.")
    out = []
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise GrinError(f"audit: {what} item {index} is a {type(item).__name__}, not a question/answer record.")
        if not isinstance(item.get("question"), str) or not isinstance(item.get("answer"), str):
            raise GrinError(f"audit: {what} item {index} needs string 'question' and 'answer'; it has {sorted(item)}.")
        keep = {"question": item["question"], "answer": item["answer"]}
        for optional in ("keywords", "paraphrased_question"):
            if optional in item:
                keep[optional] = item[optional]
        out.append(keep)
    return out


def measure(
    model: nn.Module,
    fmt: QAFormat,
    forget: Sequence[Mapping[str, Any]],
    retain: Sequence[Mapping[str, Any]] | None,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, dict[str, float | None]]:
    """``{"forget": {metric: value}, "retain": {...}}`` for one model (retain skipped when None)."""
    from ..metrics import evaluate_qa

    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": False}
    forget_summary = evaluate_qa(model, fmt, forget, **kw)["summary"]
    out = {"forget": {m: forget_summary.get(m) for m in FORGET_METRICS}}
    if retain is not None:
        retain_summary = evaluate_qa(model, fmt, retain, **kw)["summary"]
        out["retain"] = {m: retain_summary.get(m) for m in RETAIN_METRICS}
    return out


def recovered(
    original: Mapping[str, float | None],
    unlearned: Mapping[str, float | None],
    attacked: Mapping[str, float | None],
    min_gap: float,
) -> dict[str, float | None]:
    """The recovered fraction of every forget metric."""
    return {m: recovered_fraction(original.get(m), unlearned.get(m), attacked.get(m), min_gap) for m in FORGET_METRICS}


def verdict(
    name: str,
    fractions: Mapping[str, float | None],
    thresholds: Thresholds,
    came_back: str = "of what unlearning removed came back",
) -> tuple[str, str]:
    """``(label, sentence)`` for one attack from its recovered fractions: the worst (largest) defined fraction
    decides, and the sentence names it and the thresholds, so no verdict is a bare "passed"."""
    defined = {m: f for m, f in fractions.items() if f is not None}
    if not defined:
        return "not judged", (
            f"{name}: not judged - unlearning moved no forget metric by {thresholds.min_gap:g} or more on these "
            f"items (thresholds: {thresholds.describe()})."
        )
    metric, worst = max(defined.items(), key=lambda kv: kv[1])
    if worst < thresholds.partial:
        label = "holds"
    elif worst < thresholds.recovered:
        label = "partly recovered"
    else:
        label = "recovered"
    amount = f"at most {worst:.0%}" if worst > 0 else f"none (every fraction <= 0; largest {worst:.0%})"
    return label, f"{name}: {label} - {amount} {came_back} ({metric}); thresholds: {thresholds.describe()}."
