"""TOFU's question-answering metrics, as open-unlearning defines them (``src/evals/metrics/memorization.py``,
``privacy.py``, ``utility.py`` at its main branch), and the entry points :func:`evaluate_qa` and :func:`evaluate_tofu`.

Parity notes (each checked against an independent transcription of open-unlearning's formulas in the tests):

* probability, truth ratio and normalised probability use the mean NLL over every labelled token (EOS included);
  exact memorisation and extraction strength drop the last labelled position, as open-unlearning's token-wise pass.
* truth ratio is ``P_wrong / (P_correct + 1e-10)`` with ``P = exp(-mean NLL)`` averaged in log space over the
  perturbed (and, when several, the paraphrased) answers; both aggregations add open-unlearning's 1e-10 guards, so
  underflow gives a number, not an error.
* ROUGE-L recall is ``rouge_score``'s, stemmed, against the decoded label text.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, Literal

import numpy as np
import torch
from scipy.stats import hmean, ks_2samp
from torch import nn

from ..data import as_format
from ..errors import GrinError
from .keywords import extract_keywords, keyword_accuracy, keyword_confidence
from .mia import MIA_ATTACKS, attack_scores, evaluate_mia
from .passes import (
    Items,
    TokenizerLike,
    alternatives,
    finite_array,
    generate_answers,
    grouped_nll,
    label_text,
    mean_defined,
    require,
    score_answers,
)
from .rouge import rouge_l_recall

# open-unlearning's model utility: probability, ROUGE-L recall and truth ratio on three non-forget splits; on
# real_authors/world_facts the probability is normalised against the perturbed answers.
MODEL_UTILITY_KEYS = (
    "retain_probability",
    "retain_rouge_l_recall",
    "retain_truth_ratio",
    "real_authors_probability_normalized",
    "real_authors_rouge_l_recall",
    "real_authors_truth_ratio",
    "world_facts_probability_normalized",
    "world_facts_rouge_l_recall",
    "world_facts_truth_ratio",
)
TOFU_SPLITS = ("forget", "retain", "real_authors", "world_facts", "holdout")
_EPS = 1e-10  # open-unlearning's guard in every ratio


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean of non-negative numbers (``scipy.stats.hmean``, as open-unlearning's model utility); 0 when
    any is 0, so one collapsed metric sinks model utility."""
    array = finite_array(values, "harmonic_mean input")
    if np.any(array < 0):
        raise GrinError(f"harmonic_mean needs non-negative values; got {array.tolist()}.")
    return 0.0 if np.any(array == 0) else float(hmean(array))


def truth_ratios(correct_nll: Sequence[float], wrong_nll: Sequence[Sequence[float]]) -> list[float]:
    """Per-item truth ratio ``exp(-mean_j wrong_j) / (exp(-correct) + 1e-10)`` from mean token NLLs.

    ``wrong_nll`` holds each item's perturbed answers' NLLs (averaged before exponentiating, i.e. a geometric mean
    of probabilities); ``correct_nll`` the paraphrase's (or the mean over several paraphrases). An answer the
    model finds impossible (``exp`` underflowing to 0) gives a large finite ratio, as in open-unlearning.
    """
    if len(correct_nll) != len(wrong_nll):
        raise GrinError(f"{len(correct_nll)} correct answers but {len(wrong_nll)} lists of perturbed answers.")
    for index, wrong in enumerate(wrong_nll):
        if len(wrong) == 0:
            raise GrinError(f"Item {index} has no perturbed answer, so its truth ratio is undefined.")
    correct = finite_array(correct_nll, "correct-answer NLLs")
    wrong_mean = np.array([float(np.mean(finite_array(w, "perturbed-answer NLLs"))) for w in wrong_nll])
    return (np.exp(-wrong_mean) / (np.exp(-correct) + _EPS)).tolist()


def aggregate_truth_ratio(ratios: Sequence[float], form: Literal["forget", "retain"]) -> float:
    """open-unlearning's two summaries of per-item truth ratios (both higher = better).

    * ``forget`` (``closer_to_1_better``): ``mean(min(TR, 1/(TR + 1e-10)))`` - best (1) when true and false answers
      are equally likely.
    * ``retain`` (``true_better``): ``mean(max(0, 1 - TR))`` - best (1) when the true answer is far likelier.
    """
    array = finite_array(ratios, "truth ratios")
    if np.any(array < 0):
        raise GrinError("Truth ratios cannot be negative.")
    if form == "forget":
        return float(np.mean(np.minimum(array, 1.0 / (array + _EPS))))
    if form == "retain":
        return float(np.mean(np.maximum(0.0, 1.0 - array)))
    raise GrinError(f"Truth-ratio form must be 'forget' or 'retain'; got {form!r}.")


def normalized_probability(correct_nll: float, wrong_nll: Sequence[float]) -> float:
    """``p_true / (p_true + sum_j p_wrong_j + 1e-10)`` with ``p = exp(-mean token NLL)``: TOFU's real_authors and
    world_facts probability (open-unlearning's ``probability_w_options``); 0 when every answer underflows."""
    p_true = float(np.exp(-correct_nll))
    return p_true / (p_true + float(np.sum(np.exp(-np.asarray(wrong_nll, dtype=np.float64)))) + _EPS)


def forget_quality(ratios: Sequence[float], reference_ratios: Sequence[float]) -> float:
    """KS-test p-value (``scipy.stats.ks_2samp``, two-sided) between the per-item forget truth ratios of the
    unlearned model and of a reference model trained without the forget set. High = indistinguishable."""
    return float(ks_2samp(finite_array(ratios, "truth ratios"), finite_array(reference_ratios, "reference")).pvalue)


def exact_memorization(hits: torch.Tensor) -> float | None:
    """Exact memorisation (Tirumala et al. 2022): the fraction of positions where the teacher-forced argmax equals
    the gold token. open-unlearning passes the labelled positions minus the last (EOS) one, as
    :func:`evaluate_qa` does; None for no positions (open-unlearning's None, skipped by the mean)."""
    return None if hits.numel() == 0 else float(hits.float().mean())


def extraction_strength(hits: torch.Tensor) -> float:
    """Extraction strength (Carlini et al. 2021), open-unlearning's loop: ``ES = 1 - k/n`` for the smallest
    ``k < n`` such that, teacher-forced on the first ``k`` gold tokens, the argmax reproduces every remaining one.

    When no such ``k`` exists (the last position is missed) the loop ends at ``k = n - 1``, so ES is ``1/n``, not
    0; no positions score 0. Pass the labelled positions minus the last, as :func:`evaluate_qa` does.
    """
    n = hits.numel()
    if n == 0:
        return 0.0
    misses = torch.nonzero(~hits.bool()).flatten()
    k = 0 if misses.numel() == 0 else min(int(misses[-1]) + 1, n - 1)
    return 1.0 - k / n


def _correct_and_wrong(
    model: nn.Module, tokenizer: TokenizerLike, items: Items, correct_key: str, wrong_key: str, **kw: Any
) -> tuple[list[float], list[list[float]]]:
    """Mean NLL of the correct answer(s) (averaged over several, as open-unlearning) and of each perturbed one."""
    questions = [item["question"] for item in items]
    correct = [alternatives(item, correct_key, i) for i, item in enumerate(items)]
    wrong = [alternatives(item, wrong_key, i) for i, item in enumerate(items)]
    correct_nll = [float(np.mean(g)) for g in grouped_nll(model, tokenizer, questions, correct, **kw)]
    return correct_nll, grouped_nll(model, tokenizer, questions, wrong, **kw)


def truth_ratio(
    model: nn.Module,
    tokenizer: TokenizerLike,
    items: Items,
    *,
    correct_key: str | None = None,
    wrong_key: str = "perturbed_answer",
    batch_size: int = 8,
    progress: bool = True,
) -> list[float]:
    """Per-item truth ratios (see :func:`truth_ratios`) of ``items[wrong_key]`` against ``items[correct_key]``.

    ``correct_key`` defaults to ``paraphrased_answer`` when present (TOFU forget/retain) and ``answer`` otherwise
    (real_authors/world_facts), as in open-unlearning; a list there is averaged over its answers.
    """
    key = correct_key or ("paraphrased_answer" if items and "paraphrased_answer" in items[0] else "answer")
    require(items, ("question", key, wrong_key), "truth_ratio")
    kw = {"batch_size": batch_size, "progress": progress, "desc": "Truth ratio"}
    return truth_ratios(*_correct_and_wrong(model, tokenizer, items, key, wrong_key, **kw))


def evaluate_qa(
    model: nn.Module,
    tokenizer: TokenizerLike,
    items: Items,
    *,
    truth_ratio_form: Literal["forget", "retain"] = "retain",
    generate: bool = True,
    max_new_tokens: int = 200,
    mia_k: float | None = None,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """Evaluate a QA split; returns ``{"summary": {name: float}, "per_item": {name: list}, "generations": list}``.

    Always (one teacher-forced pass): ``probability`` (mean of exp(-mean answer NLL)), ``nll``,
    ``exact_memorization``, ``extraction_strength`` and ``keyword_confidence``. With ``generate``: greedy answers,
    ``rouge_l_recall`` (against the decoded label text) and ``keyword_accuracy``. When items carry
    ``perturbed_answer``: ``truth_ratio`` (aggregated in ``truth_ratio_form``; the correct side is the
    ``paraphrased_answer`` when given, averaged when a list) and ``probability_normalized`` (answer against perturbed
    answers). With ``mia_k``: per-item MIA scores in ``per_item["mia"]``, for :func:`~.mia.evaluate_mia`.

    Keywords are ``item["keywords"]`` when given, else :func:`~.keywords.extract_keywords` of the answer and
    question. Summary means skip items where a metric is undefined (None); a metric undefined everywhere is None.
    """
    require(items, ("question", "answer"), "evaluate_qa")
    fmt = as_format(tokenizer)
    questions = [item["question"] for item in items]
    keywords = [
        list(item["keywords"]) if "keywords" in item else extract_keywords(item["answer"], item["question"])
        for item in items
    ]
    kw = {"batch_size": batch_size, "progress": progress}
    answers = [item["answer"] for item in items]
    scores = score_answers(model, fmt, questions, answers, vocab_stats=mia_k is not None, desc="Answer NLL", **kw)
    trimmed = [s.without_last() for s in scores]
    per_item: dict[str, Any] = {
        "probability": [s.probability for s in scores],
        "nll": [s.nll for s in scores],
        "exact_memorization": [exact_memorization(t.hits) for t in trimmed],
        "extraction_strength": [extraction_strength(t.hits) for t in trimmed],
        "keywords": keywords,
        "keyword_confidence": [keyword_confidence(fmt, s, kws) for s, kws in zip(scores, keywords)],
    }
    generations: list[str] = []
    if generate:
        generations = generate_answers(model, fmt, questions, max_new_tokens=max_new_tokens, **kw)
        references = [label_text(fmt, s).strip() for s in scores]
        per_item["rouge_l_recall"] = [rouge_l_recall(g, r) for g, r in zip(generations, references)]
        per_item["keyword_accuracy"] = [keyword_accuracy(g, kws) for g, kws in zip(generations, keywords)]
    if "perturbed_answer" in items[0]:
        require(items, ("perturbed_answer",), "evaluate_qa")
        if "paraphrased_answer" in items[0]:
            require(items, ("paraphrased_answer",), "evaluate_qa")
            keys = ("paraphrased_answer", "perturbed_answer")
            correct_nll, wrong_nll = _correct_and_wrong(model, fmt, items, *keys, **kw)
        else:  # the answer itself is the correct side (real_authors, world_facts), already scored
            wrong = [alternatives(item, "perturbed_answer", i) for i, item in enumerate(items)]
            correct_nll, wrong_nll = per_item["nll"], grouped_nll(model, fmt, questions, wrong, **kw)
        per_item["truth_ratio"] = truth_ratios(correct_nll, wrong_nll)
        per_item["probability_normalized"] = [normalized_probability(n, w) for n, w in zip(per_item["nll"], wrong_nll)]
    if mia_k is not None:
        per_item["mia"] = attack_scores(fmt, scores, mia_k)
    summary = {
        name: mean_defined(values)
        for name, values in per_item.items()
        if name not in ("keywords", "mia", "truth_ratio")
    }
    if "truth_ratio" in per_item:
        summary["truth_ratio"] = aggregate_truth_ratio(per_item["truth_ratio"], truth_ratio_form)
    return {"summary": summary, "per_item": per_item, "generations": generations}


def evaluate_tofu(
    model: nn.Module,
    tokenizer: TokenizerLike,
    splits: Mapping[str, Items],
    reference_truth_ratios: Sequence[float] | None = None,
    *,
    reference_mia_auc: float | Mapping[str, float] | None = None,
    mia_k: float = 0.4,
    max_new_tokens: int = 200,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, Any]:
    """TOFU's evaluation table for whichever of forget/retain/real_authors/world_facts/holdout are given.

    ``splits`` maps those names to items (see ``data.load_tofu_eval_splits``: the ``*_perturbed`` variants, so truth
    ratios can be computed). Summary keys are ``{split}_{metric}`` for every :func:`evaluate_qa` summary metric
    (the forget truth ratio in its forget form, the others in their retain form), plus:

    * ``forget_quality``: KS p-value against ``reference_truth_ratios`` (a retain-only model's per-item forget truth
      ratios, i.e. its ``per_item["forget"]["truth_ratio"]``); None without a reference.
    * ``model_utility``: harmonic mean of :data:`MODEL_UTILITY_KEYS` when retain, real_authors and world_facts are
      all present.
    * ``mia_{attack}_auc`` and ``privleak_{attack}`` when forget and holdout are present.

    Returns ``{"summary", "per_item": {split: ...}, "generations": {split: ...}}``.
    """
    unknown = set(splits) - set(TOFU_SPLITS)
    if unknown:
        raise GrinError(f"Unknown TOFU split name(s) {sorted(unknown)}; expected some of {list(TOFU_SPLITS)}.")
    summary: dict[str, float | None] = {}
    per_item: dict[str, Any] = {}
    generations: dict[str, list[str]] = {}
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size, "progress": progress}
    for name in TOFU_SPLITS[:4]:
        if name not in splits:
            continue
        is_forget = name == "forget"
        result = evaluate_qa(
            model,
            tokenizer,
            splits[name],
            truth_ratio_form="forget" if is_forget else "retain",
            mia_k=mia_k if is_forget and "holdout" in splits else None,
            **kw,
        )
        summary.update({f"{name}_{metric}": value for metric, value in result["summary"].items()})
        per_item[name], generations[name] = result["per_item"], result["generations"]
    if "forget" in splits:
        ratios = per_item["forget"].get("truth_ratio")
        fq = None
        if reference_truth_ratios is not None:
            if ratios is None:
                raise GrinError("forget_quality needs truth ratios: give the forget split's perturbed variant.")
            fq = forget_quality(ratios, reference_truth_ratios)
        summary["forget_quality"] = fq
    if all(name in splits for name in ("retain", "real_authors", "world_facts")):
        missing = [key for key in MODEL_UTILITY_KEYS if summary.get(key) is None]
        if missing:
            raise GrinError(f"model_utility needs {missing}: give the *_perturbed variants of those splits.")
        summary["model_utility"] = harmonic_mean([summary[key] for key in MODEL_UTILITY_KEYS])
    if "forget" in splits and "holdout" in splits:
        mia = evaluate_mia(
            model,
            tokenizer,
            splits["forget"],
            splits["holdout"],
            k=mia_k,
            reference_auc=reference_mia_auc,
            batch_size=batch_size,
            progress=progress,
            forget_scores=per_item["forget"]["mia"],
        )
        for attack in MIA_ATTACKS:
            summary[f"mia_{attack}_auc"] = mia["auc"][attack]
            summary[f"privleak_{attack}"] = mia["privleak"][attack]
        per_item["holdout"] = {"mia": mia["scores"]["holdout"]}
    return {"summary": summary, "per_item": per_item, "generations": generations}
