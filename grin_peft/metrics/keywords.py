"""Keyword metrics: does the model still produce (or find likely) the content words of a gold answer?

Not an open-unlearning metric; defined here. Keywords are compared as unstemmed :func:`~.rouge.rouge_tokenize`
tokens. An item without any keyword token (say, punctuation only) has no keyword score (None), which the summary
means skip, as open-unlearning skips undefined per-item scores.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from os.path import commonprefix

import torch
from transformers import PreTrainedTokenizerBase

from ..data import as_format
from .passes import AnswerScores, TokenizerLike
from .rouge import rouge_tokenize

# English function words (NLTK's list plus question words and contraction fragments left by ROUGE tokenisation).
STOPWORDS = frozenset(
    """a about above after again against all also am an and any are aren as at be because been before being below
    between both but by can could couldn d did didn do does doesn doing don down during each few for from further
    had hadn has hasn have haven having he her here hers herself him himself his how i if in into is isn it its
    itself just ll m ma me might mightn more most must mustn my myself needn no nor not now o of off on once only or
    other our ours ourselves out over own re s same shall shan she should shouldn so some such t than that the their
    theirs them themselves then there these they this those through to too under until up upon us ve very was wasn
    we were weren what when where which while who whom whose why will with won would wouldn y you your yours
    yourself yourselves""".split()
)


def _keyword_tokens(keywords: Sequence[str]) -> set[str]:
    return {token for keyword in keywords for token in rouge_tokenize(keyword)}


def extract_keywords(
    answer: str, question: str | None = None, stopwords: frozenset[str] | set[str] = STOPWORDS
) -> list[str]:
    """Keywords of a gold answer: its :func:`rouge_tokenize` tokens minus stopwords and minus words of the question.

    Words already in the question say nothing about whether the model knows the answer ("the author's full name
    is ..." for "What is the full name of the author ..."), so only new content words count. When that leaves
    nothing, the stopword-free tokens are used, then all tokens. Order of first appearance, no duplicates.
    """
    tokens = rouge_tokenize(answer)
    question_words = set(rouge_tokenize(question)) if question else set()
    content = [t for t in tokens if t not in stopwords]
    for candidates in ([t for t in content if t not in question_words], content, tokens):
        if candidates:
            return list(dict.fromkeys(candidates))
    return []


def keyword_accuracy(generation: str, keywords: Sequence[str]) -> float | None:
    """Fraction of the gold keywords (compared as :func:`rouge_tokenize` tokens) present anywhere in the answer;
    None when the keywords hold no letter or digit (nothing to look for)."""
    wanted = _keyword_tokens(keywords)
    if not wanted:
        return None
    return len(wanted & set(rouge_tokenize(generation))) / len(wanted)


def _lowered_with_origins(text: str) -> tuple[str, list[int]]:
    """``text.lower()`` and, for each of its characters, the index of the character it came from.

    Lowercasing can change length ("İ" becomes "i" plus a combining dot), so positions found in the lowered text
    are mapped back through this table rather than assumed to line up.
    """
    lowered, origins = [], []
    for index, char in enumerate(text):
        low = char.lower()
        lowered.append(low)
        origins += [index] * len(low)
    return "".join(lowered), origins


def _keyword_token_mask(
    tokenizer: PreTrainedTokenizerBase, token_ids: Sequence[int], keywords: set[str]
) -> list[bool]:
    """Which answer tokens overlap a keyword occurrence in the decoded answer text (character-span overlap)."""
    texts = [
        tokenizer.decode(token_ids[: i + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        for i in range(len(token_ids))
    ]
    full = texts[-1] if texts else ""
    lowered, origins = _lowered_with_origins(full)
    marked = [False] * len(full)
    for match in re.finditer(r"[a-z0-9]+", lowered):
        if match.group() in keywords:
            for position in range(match.start(), match.end()):
                marked[origins[position]] = True
    mask, previous = [], ""
    for text in texts:
        start = len(commonprefix([previous, text]))
        mask.append(any(marked[start : min(len(text), len(marked))]))
        previous = text
    return mask


def keyword_confidence(tokenizer: TokenizerLike, scores: AnswerScores, keywords: Sequence[str]) -> float | None:
    """Mean teacher-forced probability ``p(y_t | q, y_<t)`` over the gold-answer tokens that spell a keyword.

    A token counts when its decoded characters overlap an occurrence of a keyword (as a :func:`rouge_tokenize`
    token) in the decoded answer, so sub-word pieces of a name all count. None when no token does.
    """
    wanted = _keyword_tokens(keywords)
    if not wanted:
        return None
    fmt = as_format(tokenizer)
    mask = torch.tensor(_keyword_token_mask(fmt.tokenizer, scores.token_ids, wanted), dtype=torch.bool)
    if not bool(mask.any()):
        return None
    return float(scores.logprobs[mask].double().exp().mean())
