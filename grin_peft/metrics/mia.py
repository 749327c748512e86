"""Membership inference (MIA) against a holdout set: LOSS, ZLib, MinK and MinK++ scores, AUC and privleak.

Definitions are open-unlearning's (``src/evals/metrics/mia``): every score is loss-like (high = looks unseen);
LOSS is the mean NLL over all labelled tokens and ZLib divides it by the zlib size of the decoded label text;
MinK and MinK++ use the labelled positions minus the last one (:meth:`~.passes.AnswerScores.without_last`), and
score 0 when that leaves none.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import torch
from scipy.stats import rankdata
from torch import nn

from ..errors import GrinError
from .passes import AnswerScores, Items, TokenizerLike, finite_array, label_text, require, score_answers

MIA_ATTACKS = ("loss", "zlib", "mink", "mink++")


def roc_auc(positive: Sequence[float], negative: Sequence[float]) -> float:
    """ROC-AUC = P(positive score > negative score), ties counting 1/2 (Mann-Whitney U on average ranks)."""
    pos, neg = finite_array(positive, "positive scores"), finite_array(negative, "negative scores")
    ranks = rankdata(np.concatenate([pos, neg]))
    return float((ranks[: len(pos)].sum() - len(pos) * (len(pos) + 1) / 2) / (len(pos) * len(neg)))


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """MIA AUC in open-unlearning's convention: scores are loss-like (high = looks unseen), holdout is the positive
    class, so 1.0 = the forget set looks fully memorised, 0.5 = indistinguishable from never-seen data."""
    return roc_auc(holdout_scores, forget_scores)


def privleak(auc: float, reference_auc: float = 0.5) -> float:
    """MUSE's privacy leakage ``((1 - AUC) - (1 - AUC_ref)) / ((1 - AUC_ref) + 1e-10) * 100``, open-unlearning's form.

    ``AUC_ref`` comes from a retain-only model (0.5, i.e. no leak, when none is at hand). 0 = like the reference;
    strongly negative = forget data still identifiable (under-unlearning); positive = over-unlearning.
    """
    if not 0.0 <= auc <= 1.0 or not 0.0 <= reference_auc <= 1.0:
        raise GrinError(f"AUCs must lie in [0, 1]; got auc={auc}, reference_auc={reference_auc}.")
    ref = 1.0 - reference_auc
    return ((1.0 - auc) - ref) / (ref + 1e-10) * 100.0


def _check_k(k: float) -> None:
    if not 0.0 < k <= 1.0:
        raise GrinError(f"MinK fraction k must lie in (0, 1]; got {k}.")


def _bottom_k_mean(values: np.ndarray, k: float) -> float:
    count = max(1, int(len(values) * k))
    return float(np.mean(np.sort(values)[:count]))


def mink_score(logprobs: torch.Tensor, k: float = 0.4) -> float:
    """Min-K% Prob (Shi et al. 2024): ``-mean`` of the lowest ``max(1, int(k * n))`` token log-probs (loss-like);
    0 for no tokens, as open-unlearning returns."""
    _check_k(k)
    values = logprobs.float().cpu().numpy()
    return 0.0 if values.size == 0 else -_bottom_k_mean(values, k)


def mink_plus_plus_score(
    logprobs: torch.Tensor, vocab_mean: torch.Tensor, vocab_var: torch.Tensor, k: float = 0.4
) -> float:
    """Min-K%++ (Zhang et al. 2024): MinK on ``(log p(x_t) - mu_t) / sigma_t``, where ``mu_t`` and ``sigma_t^2`` are
    the mean and variance of ``log p`` under the model's own next-token distribution (variance clamped at 1e-6);
    0 for no tokens."""
    _check_k(k)
    if logprobs.numel() == 0:
        return 0.0
    z = (logprobs.float() - vocab_mean.float()) / vocab_var.float().clamp_min(1e-6).sqrt()
    return -_bottom_k_mean(z.cpu().numpy(), k)


def zlib_score(nll: float, text: str) -> float:
    """ZLib attack (Carlini et al. 2021): mean token NLL divided by the zlib-compressed byte length of ``text``
    (open-unlearning: the decoded label text, :func:`~.passes.label_text`)."""
    return float(nll) / len(zlib.compress(text.encode("utf-8")))


def attack_scores(tokenizer: TokenizerLike, scores: Sequence[AnswerScores], k: float) -> dict[str, list[float]]:
    """Every attack's per-item score from one teacher-forced pass with ``vocab_stats``."""
    trimmed = [s.without_last() for s in scores]
    return {
        "loss": [s.nll for s in scores],
        "zlib": [zlib_score(s.nll, label_text(tokenizer, s)) for s in scores],
        "mink": [mink_score(t.logprobs, k) for t in trimmed],
        "mink++": [mink_plus_plus_score(t.logprobs, t.vocab_mean, t.vocab_var, k) for t in trimmed],
    }


def mia_scores(
    model: nn.Module,
    tokenizer: TokenizerLike,
    items: Items,
    *,
    k: float = 0.4,
    batch_size: int = 8,
    progress: bool = True,
) -> dict[str, list[float]]:
    """Per-item LOSS, ZLib, MinK and MinK++ scores of each answer given its question (all loss-like)."""
    require(items, ("question", "answer"), "mia_scores")
    _check_k(k)
    scores = score_answers(
        model,
        tokenizer,
        [item["question"] for item in items],
        [item["answer"] for item in items],
        batch_size=batch_size,
        vocab_stats=True,
        progress=progress,
        desc="MIA scores",
    )
    return attack_scores(tokenizer, scores, k)


def evaluate_mia(
    model: nn.Module,
    tokenizer: TokenizerLike,
    forget_items: Items,
    holdout_items: Items,
    *,
    k: float = 0.4,
    reference_auc: float | Mapping[str, float] | None = None,
    batch_size: int = 8,
    progress: bool = True,
    forget_scores: Mapping[str, Sequence[float]] | None = None,
) -> dict[str, Any]:
    """AUC (forget vs holdout, :func:`mia_auc`) and privleak for each attack in :data:`MIA_ATTACKS`.

    ``reference_auc`` is the retain-only model's AUC (one number, or one per attack); 0.5 when not given.
    ``forget_scores`` reuses already computed forget-set scores (``evaluate_qa(..., mia_k=k)`` has them).
    """
    kw = {"k": k, "batch_size": batch_size, "progress": progress}
    forget = forget_scores or mia_scores(model, tokenizer, forget_items, **kw)
    holdout = mia_scores(model, tokenizer, holdout_items, **kw)
    auc = {attack: mia_auc(forget[attack], holdout[attack]) for attack in MIA_ATTACKS}
    refs = reference_auc if isinstance(reference_auc, Mapping) else dict.fromkeys(MIA_ATTACKS, reference_auc)
    leak = {attack: privleak(auc[attack], 0.5 if refs.get(attack) is None else refs[attack]) for attack in MIA_ATTACKS}
    return {"auc": auc, "privleak": leak, "scores": {"forget": dict(forget), "holdout": holdout}}
