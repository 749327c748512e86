"""ROUGE-L recall and its tokenisation, by the ``rouge_score`` package itself, as open-unlearning scores it.

open-unlearning builds ``rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)`` and reports
``score(ground_truth, generation)["rougeL"].recall``; :func:`rouge_l_recall` does exactly that (``stem=False`` is the
opt-in, documented difference: no Porter stemming).
"""

from __future__ import annotations

import functools

from rouge_score import rouge_scorer, tokenizers


@functools.cache
def _scorer(stem: bool) -> rouge_scorer.RougeScorer:
    return rouge_scorer.RougeScorer(["rougeL"], use_stemmer=stem)


@functools.cache
def _tokenizer(stem: bool) -> tokenizers.DefaultTokenizer:
    return tokenizers.DefaultTokenizer(use_stemmer=stem)


def rouge_tokenize(text: str, stem: bool = False) -> list[str]:
    """``rouge_score``'s tokens: lowercase, runs of anything but ``[a-z0-9]`` split; ``stem`` Porter-stems tokens of
    four or more characters (what ``use_stemmer=True`` does). The keyword metrics use the unstemmed form."""
    return _tokenizer(stem).tokenize(text)


def rouge_l_recall(prediction: str, reference: str, stem: bool = True) -> float:
    """ROUGE-L recall ``LCS(reference, prediction) / len(reference)`` on :func:`rouge_tokenize` tokens, stemmed by
    default as in open-unlearning; 0 when either side has no token."""
    return float(_scorer(stem).score(reference, prediction)["rougeL"].recall)
