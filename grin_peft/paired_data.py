"""The paired data every unlearning step reads: a forget batch with a retain batch (and refusal answers).

:class:`PairedUnlearningDataset` is indexed by ``(forget, retain, refusal)`` triples that :class:`PairedSampler`
draws as a pure function of ``(seed, epoch, position)``, and :class:`PairedCollator` pads each part on its own, so
`transformers.Trainer` runs the pairing with its own data loader (resuming, workers, accelerate and all).
:func:`encode_dataset` turns what users pass (question/answer dicts or already encoded examples) into encoded
examples, refusing bad items before any training starts.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from .data import IGNORE_INDEX, EncodedQA, QACollator, QAFormat
from .errors import GrinError

__all__ = ["PairedCollator", "PairedSampler", "PairedUnlearningDataset", "encode_dataset"]


class PairedUnlearningDataset(Dataset):
    """Indexed by ``(forget index, retain index, refusal index)`` triples from :class:`PairedSampler`.

    An item is ``{"forget": ..., "retain": ..., "refusal": ...}`` with each value an encoded example
    (``input_ids``/``labels``); keys for data the objective does not read are left out. The refusal example is the
    forget question with refusal string ``k`` as its answer, encoded on first use (a forget set of N items and K
    refusal strings has N * K possible pairs, most never drawn). An int index ``i`` means ``(i, i, i)`` modulo the
    sizes, so the dataset also works with a plain sampler. Its length, the forget set's, is the epoch length.
    """

    def __init__(
        self,
        forget: Sequence[EncodedQA],
        retain: Sequence[EncodedQA] | None = None,
        *,
        forget_questions: Sequence[str] | None = None,
        refusals: Sequence[str] | None = None,
        qa_format: QAFormat | None = None,
        use_forget: bool = True,
    ) -> None:
        if not forget:
            raise GrinError("the forget set is empty: there is nothing to unlearn.")
        if retain is not None and not retain:
            raise GrinError("the retain set is empty; pass None if the objective needs no retain data.")
        if refusals is not None:
            if not refusals:
                raise GrinError("the list of refusal strings is empty.")
            if forget_questions is None or qa_format is None:
                raise GrinError("refusal pairing needs the forget questions and a QAFormat to encode them.")
            if len(forget_questions) != len(forget):
                raise GrinError(f"{len(forget_questions)} forget questions for {len(forget)} forget examples.")
        self.forget, self.retain = list(forget), None if retain is None else list(retain)
        self.forget_questions = None if forget_questions is None else list(forget_questions)
        self.refusals = None if refusals is None else list(refusals)
        self.qa_format = qa_format
        self.use_forget = use_forget
        self._refusal_cache: dict[tuple[int, int], EncodedQA] = {}

    def __len__(self) -> int:
        return len(self.forget)

    @property
    def num_retain(self) -> int:
        return 0 if self.retain is None else len(self.retain)

    @property
    def num_refusals(self) -> int:
        return 0 if self.refusals is None else len(self.refusals)

    def refusal_example(self, forget_index: int, refusal_index: int) -> EncodedQA:
        """Forget question ``forget_index`` answered with refusal string ``refusal_index``."""
        key = (forget_index, refusal_index)
        if key not in self._refusal_cache:
            self._refusal_cache[key] = self.qa_format.encode(
                self.forget_questions[forget_index], self.refusals[refusal_index]
            )
        return self._refusal_cache[key]

    def __getitem__(self, index: int | tuple[int, int, int]) -> dict[str, EncodedQA]:
        if isinstance(index, int | np.integer):
            index = (int(index),) * 3
        forget_index, retain_index, refusal_index = index
        forget_index %= len(self.forget)
        item: dict[str, EncodedQA] = {}
        if self.use_forget:
            item["forget"] = self.forget[forget_index]
        if self.retain is not None:
            item["retain"] = self.retain[retain_index % len(self.retain)]
        if self.refusals is not None:
            item["refusal"] = self.refusal_example(forget_index, refusal_index % len(self.refusals))
        return item


class PairedSampler(Sampler[tuple[int, int, int]]):
    """Yields ``(forget, retain, refusal)`` index triples: one epoch = one pass over the forget set.

    The forget order is reshuffled every epoch. Retain examples come from an endless stream that is independent of
    the forget order: the retain set reshuffled at every pass through it, so each retain example is seen once per
    pass whatever the two sets' sizes, and the stream continues across epochs instead of restarting. Refusal
    strings are drawn uniformly per forget example and epoch. Every draw is a pure function of ``(seed, epoch,
    position)``, so resuming from a checkpoint (which skips the first batches of an epoch) replays exactly the same
    pairs, and dataloader workers or processes never disagree. ``shuffle=False`` keeps both sets in order (forget
    example i of epoch e pairs with retain example ``(e * n_forget + i) mod n_retain``), for debugging and tests.
    """

    def __init__(self, num_forget: int, num_retain: int, num_refusals: int, seed: int, shuffle: bool = True) -> None:
        if num_forget < 1:
            raise GrinError("the forget set is empty: there is nothing to unlearn.")
        self.num_forget, self.num_retain, self.num_refusals = num_forget, num_retain, num_refusals
        self.seed, self.shuffle = int(seed), shuffle
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        """Called by `Trainer` (through accelerate) at the start of every epoch."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_forget

    def _rng(self, stream: int, counter: int) -> np.random.Generator:
        # SeedSequence-derived streams: independent for every (seed, stream, counter), no shared state.
        return np.random.default_rng([self.seed, stream, counter])

    def _retain_pass(self, cycle: int) -> np.ndarray:
        if not self.shuffle:
            return np.arange(self.num_retain)
        return self._rng(1, cycle).permutation(self.num_retain)

    def __iter__(self) -> Iterator[tuple[int, int, int]]:
        n = self.num_forget
        forget = self._rng(0, self.epoch).permutation(n) if self.shuffle else np.arange(n)
        if self.num_refusals == 0:
            refusal = np.zeros(n, dtype=np.int64)
        elif self.shuffle:
            refusal = self._rng(2, self.epoch).integers(0, self.num_refusals, size=n)
        else:
            refusal = (self.epoch * n + np.arange(n)) % self.num_refusals
        retain = np.zeros(n, dtype=np.int64)
        if self.num_retain:
            start = self.epoch * n  # position of this epoch's first retain draw in the endless stream
            positions = np.arange(start, start + n)
            cycles = positions // self.num_retain
            passes = {int(c): self._retain_pass(int(c)) for c in np.unique(cycles)}
            retain = np.array([passes[int(c)][p % self.num_retain] for c, p in zip(cycles, positions)])
        yield from zip(forget.tolist(), retain.tolist(), refusal.tolist())


@dataclass
class PairedCollator:
    """Pad each part of a paired batch separately: ``{"forget": {...}, "retain": {...}, ...}`` of tensors."""

    collator: QACollator

    def __call__(self, features: Sequence[Mapping[str, EncodedQA]]) -> dict[str, dict[str, torch.Tensor]]:
        if not features:
            raise GrinError("Cannot collate an empty batch.")
        return {key: self.collator([feature[key] for feature in features]) for key in features[0]}


def _as_items(data: Any, name: str) -> list[Mapping[str, Any]]:
    """A list of example dicts from a list, a `datasets.Dataset` or any sized indexable collection."""
    if data is None:
        raise GrinError(f"the {name} set is missing.")
    if isinstance(data, str | bytes | Mapping) or not hasattr(data, "__len__") or not hasattr(data, "__getitem__"):
        raise GrinError(
            f"the {name} set must be a list of examples (dicts) or a datasets.Dataset; got {type(data).__name__}."
        )
    items = [data[i] for i in range(len(data))]
    if not items:
        raise GrinError(f"the {name} set is empty.")
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise GrinError(f"{name} example {index} is a {type(item).__name__}, not a dict.")
    return items


def encode_dataset(data: Any, name: str, qa_format: QAFormat | None) -> tuple[list[EncodedQA], list[str] | None]:
    """Encoded examples (kept as given, or encoded from ``question``/``answer`` fields) and the questions if known.

    Encoded examples need ``labels`` with ``IGNORE_INDEX`` on prompt tokens, since the loss must only see answer
    tokens; an example whose answer is empty (e.g. truncated away) is refused here rather than mid-training.
    """
    items = _as_items(data, name)
    if "input_ids" in items[0]:
        encoded = []
        for index, item in enumerate(items):
            if "input_ids" not in item or "labels" not in item:
                raise GrinError(
                    f"{name} example {index} needs 'input_ids' and 'labels' (labels = {IGNORE_INDEX} on prompt "
                    "tokens, the token id on answer tokens); or give raw 'question'/'answer' items and a tokenizer."
                )
            ids, labels = list(item["input_ids"]), list(item["labels"])
            if len(ids) != len(labels):
                raise GrinError(f"{name} example {index}: {len(ids)} input_ids but {len(labels)} labels.")
            if all(label == IGNORE_INDEX for label in labels[1:]):
                raise GrinError(f"{name} example {index} has no answer token (every label after the first is -100).")
            encoded.append({"input_ids": ids, "labels": labels})
        questions = [item.get("question") for item in items]
        return encoded, questions if all(isinstance(q, str) for q in questions) else None
    for index, item in enumerate(items):
        if "question" not in item or "answer" not in item:
            raise GrinError(
                f"{name} example {index} has neither 'input_ids'/'labels' nor 'question'/'answer'; it has "
                f"{sorted(item)}."
            )
    if qa_format is None:
        raise GrinError(
            f"the {name} set holds raw question/answer items: pass processing_class=<tokenizer> (or qa_format=) "
            "to encode them."
        )
    return [qa_format.encode(item["question"], item["answer"]) for item in items], [item["question"] for item in items]
