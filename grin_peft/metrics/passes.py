"""The two model passes every metric is built from, and the item helpers they share.

:func:`score_answers` (teacher-forced per-token statistics of answers given questions) and
:func:`generate_answers` (batched greedy decoding) both run under ``torch.no_grad`` with the model in eval mode and
restore each module's train/eval flag afterwards.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm
from transformers import GenerationConfig, PreTrainedTokenizerBase

from ..data import IGNORE_INDEX, QACollator, QAFormat, as_format
from ..errors import GrinError

Items = Sequence[Mapping[str, Any]]
TokenizerLike = PreTrainedTokenizerBase | QAFormat


@dataclass
class AnswerScores:
    """Teacher-forced statistics of one answer's tokens (those with a label, EOS included) given its prompt."""

    token_ids: list[int]
    logprobs: torch.Tensor  # log p(y_t | prompt, y_<t), float32, shape (n,)
    hits: torch.Tensor  # argmax == y_t, bool, shape (n,)
    vocab_mean: torch.Tensor | None = None  # E_p[log p] at each position (MinK++); None unless requested
    vocab_var: torch.Tensor | None = None  # Var_p[log p] at each position

    @property
    def nll(self) -> float:
        """Mean token NLL over every labelled token, open-unlearning's ``avg_loss``."""
        return float(-self.logprobs.double().mean())

    @property
    def probability(self) -> float:
        """``exp(-mean token NLL)``, TOFU's per-item answer probability."""
        return math.exp(-self.nll)

    def without_last(self) -> AnswerScores:
        """The same statistics minus the last labelled position (the EOS prediction).

        open-unlearning's token-wise passes drop it ("-1 to ignore eos prediction"), so its exact memorisation,
        extraction strength, MinK and MinK++ are computed on these positions; probability, LOSS and ZLib keep it.
        """
        cut = slice(0, max(0, len(self.token_ids) - 1))
        return replace(
            self,
            token_ids=self.token_ids[cut],
            logprobs=self.logprobs[cut],
            hits=self.hits[cut],
            vocab_mean=None if self.vocab_mean is None else self.vocab_mean[cut],
            vocab_var=None if self.vocab_var is None else self.vocab_var[cut],
        )


def label_text(tokenizer: TokenizerLike, scores: AnswerScores) -> str:
    """The labelled tokens decoded without special tokens: open-unlearning's text of an answer (ZLib, ROUGE)."""
    return as_format(tokenizer).tokenizer.decode(scores.token_ids, skip_special_tokens=True)


@contextmanager
def inference(model: nn.Module) -> Iterator[None]:
    """Eval mode and no_grad for the duration, then each module's own training flag back (mixed states survive)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        for module, training in modes:
            module.training = training


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _batches(lengths: Sequence[int], batch_size: int) -> list[list[int]]:
    """Index batches, longest first, so each batch pads little and memory trouble shows up at once."""
    if batch_size < 1:
        raise GrinError(f"batch_size must be at least 1; got {batch_size}.")
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def score_answers(
    model: nn.Module,
    tokenizer: TokenizerLike,
    questions: Sequence[str],
    answers: Sequence[str],
    *,
    batch_size: int = 8,
    vocab_stats: bool = False,
    end: bool = True,
    progress: bool = True,
    desc: str = "Scoring answers",
) -> list[AnswerScores]:
    """Teacher-force each ``(question, answer)`` and return per-answer-token statistics, in input order.

    ``vocab_stats`` adds the mean and variance of log p over the vocabulary at each answer position (MinK++).
    ``end=False`` scores the bare answer without EOS or the template text after it (multiple-choice options).
    """
    if len(questions) != len(answers):
        raise GrinError(f"{len(questions)} questions but {len(answers)} answers.")
    fmt = as_format(tokenizer)
    encoded = [fmt.encode(q, a, end=end) for q, a in zip(questions, answers)]
    collate = QACollator.from_tokenizer(fmt, "right")
    device = _device(model)
    results: list[AnswerScores | None] = [None] * len(encoded)
    with inference(model):
        for batch_ids in tqdm(
            _batches([len(e["input_ids"]) for e in encoded], batch_size), desc=desc, disable=not progress
        ):
            batch = collate([encoded[i] for i in batch_ids])
            logits = model(
                input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device)
            ).logits
            labels = batch["labels"][:, 1:].to(device)
            mask = labels != IGNORE_INDEX
            # Only answer positions go through the (vocab-wide) softmax.
            logp = torch.log_softmax(logits[:, :-1][mask].float(), dim=-1)
            targets = labels[mask]
            token_lp = logp.gather(1, targets[:, None]).squeeze(1).cpu()
            hits = (logp.argmax(-1) == targets).cpu()
            mean = var = None
            if vocab_stats:
                p = logp.exp()
                expected = (p * logp).sum(-1)
                mean, var = expected.cpu(), ((p * logp.square()).sum(-1) - expected.square()).cpu()
            counts = mask.sum(1).tolist()
            offsets = np.cumsum([0, *counts])
            for row, index in enumerate(batch_ids):
                span = slice(int(offsets[row]), int(offsets[row + 1]))
                results[index] = AnswerScores(
                    token_ids=targets[span].tolist(),
                    logprobs=token_lp[span],
                    hits=hits[span],
                    vocab_mean=None if mean is None else mean[span],
                    vocab_var=None if var is None else var[span],
                )
    return results  # type: ignore[return-value]


def _stop_ids(model: nn.Module, fmt: QAFormat) -> list[int]:
    """EOS ids ending an answer: the tokenizer's, plus (chat only) the model's generation-config ones, which name
    end-of-turn tokens such as Llama-3's ``<|eot_id|>``. Plain-format models built from a config carry meaningless
    default ids there, so those are not trusted."""
    ids = list(fmt.eos_token_ids)
    config = getattr(model, "generation_config", None)
    extra = getattr(config, "eos_token_id", None) if fmt.chat else None
    ids += [extra] if isinstance(extra, int) else list(extra or [])
    return list(dict.fromkeys(int(i) for i in ids))


def generate_answers(
    model: nn.Module,
    tokenizer: TokenizerLike,
    questions: Sequence[str],
    *,
    max_new_tokens: int = 200,
    batch_size: int = 8,
    eos_token_ids: Sequence[int] | None = None,
    progress: bool = True,
) -> list[str]:
    """Greedy answers to each question (left-padded batches, stop at EOS or ``max_new_tokens``), in input order.

    Returned text is decoded without special tokens and stripped; it is cut at the first stop token, which also
    drops whatever a finished row produced while the rest of its batch was still generating.
    """
    if max_new_tokens < 1:
        raise GrinError(f"max_new_tokens must be at least 1; got {max_new_tokens}.")
    fmt = as_format(tokenizer)
    prompts = [{"input_ids": fmt.encode_prompt(q)} for q in questions]
    collate = QACollator.from_tokenizer(fmt, "left")
    stops = list(eos_token_ids) if eos_token_ids is not None else _stop_ids(model, fmt)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=collate.pad_token_id,
        eos_token_id=stops or None,
    )
    device = _device(model)
    texts: list[str] = [""] * len(prompts)
    with inference(model):
        batches = _batches([len(p["input_ids"]) for p in prompts], batch_size)
        for batch_ids in tqdm(batches, desc="Generating", disable=not progress):
            batch = collate([prompts[i] for i in batch_ids])
            out = model.generate(
                input_ids=batch["input_ids"].to(device),
                attention_mask=batch["attention_mask"].to(device),
                generation_config=config,
            )
            for row, index in enumerate(batch_ids):
                new = out[row, batch["input_ids"].shape[1] :].tolist()
                cut = next((i for i, token in enumerate(new) if token in stops), len(new))
                texts[index] = fmt.tokenizer.decode(new[:cut], skip_special_tokens=True).strip()
    return texts


# ------------------------------------------------------------------------------------------------ item helpers


def require(items: Items, keys: Sequence[str], where: str) -> None:
    """Refuse an empty item list or an item without one of ``keys``, naming the item, before any model pass."""
    if not items:
        raise GrinError(f"{where}: no items to evaluate.")
    for index, item in enumerate(items):
        missing = [key for key in keys if key not in item]
        if missing:
            raise GrinError(f"{where}: item {index} lacks field(s) {missing}; it has {sorted(item)}.")


def alternatives(item: Mapping[str, Any], key: str, index: int) -> list[str]:
    """``item[key]`` as a non-empty list of strings (TOFU: a paraphrase is a string, perturbations a list)."""
    value = item[key]
    values = [value] if isinstance(value, str) else list(value)
    if not values or not all(isinstance(v, str) for v in values):
        raise GrinError(f"Item {index}: '{key}' must be a string or a non-empty list of strings.")
    return values


def grouped_nll(
    model: nn.Module, tokenizer: TokenizerLike, questions: Sequence[str], groups: Sequence[Sequence[str]], **kw: Any
) -> list[list[float]]:
    """Mean token NLL of every answer in every group, in one flattened batched pass."""
    flat_q = [q for q, group in zip(questions, groups) for _ in group]
    flat_a = [a for group in groups for a in group]
    scores = iter(score_answers(model, tokenizer, flat_q, flat_a, **kw))
    return [[next(scores).nll for _ in group] for group in groups]


def answer_nll(model: nn.Module, tokenizer: TokenizerLike, items: Items, **kwargs: Any) -> list[float]:
    """Per-item mean token NLL of ``item["answer"]`` given ``item["question"]`` (answer tokens and EOS only).

    ``kwargs`` go to :func:`score_answers` (``batch_size``, ``progress``).
    """
    require(items, ("question", "answer"), "answer_nll")
    questions, answers = [item["question"] for item in items], [item["answer"] for item in items]
    return [s.nll for s in score_answers(model, tokenizer, questions, answers, **kwargs)]


def answer_probability(model: nn.Module, tokenizer: TokenizerLike, items: Items, **kwargs: Any) -> list[float]:
    """Per-item ``exp(-mean token NLL)`` of the answer, TOFU's Probability (a per-token geometric mean)."""
    return [math.exp(-nll) for nll in answer_nll(model, tokenizer, items, **kwargs)]


def finite_array(values: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    """``values`` as a 1-D float64 array; empty or non-finite input is a `GrinError` naming ``name``."""
    array = np.asarray(values, dtype=np.float64).reshape(-1)
    if array.size == 0:
        raise GrinError(f"{name} is empty.")
    if not np.all(np.isfinite(array)):
        raise GrinError(f"{name} contains NaN or infinite values.")
    return array


def mean_defined(values: Sequence[float | None]) -> float | None:
    """Mean over the values that are defined (not None), as open-unlearning skips None scores; None if none is."""
    defined = [v for v in values if v is not None]
    return float(np.mean(defined)) if defined else None
