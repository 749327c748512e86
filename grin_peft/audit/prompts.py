"""Prompt attacks: the same forget questions asked differently.

* paraphrase: TOFU's ``paraphrased_question`` instead of the question (items without one are left out);
* jailbreak prefix: the answer is made to start with a compliant opener ("Sure, here is the answer:"), which the
  model continues; unlearning that only taught a refusal or a detour at the answer's first tokens fails here.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

from ..data import QAFormat

JAILBREAK_PREFIX = "Sure, here is the answer:"


@dataclasses.dataclass
class PrefixedFormat(QAFormat):
    """A :class:`QAFormat` whose answers start after ``answer_prefix``: the prefix is part of the prompt, so it is
    neither scored nor generated, and the answer is scored and generated as its continuation."""

    answer_prefix: str = JAILBREAK_PREFIX

    def _split_texts(self, question: str, answer: str, end: bool) -> tuple[str, str, bool]:
        prompt, answer_text, special = super()._split_texts(question, answer, end)
        opener = self.answer_prefix.strip()
        prompt = prompt + (opener if self.chat else " " + opener)
        return prompt, answer_text if answer_text.startswith(" ") else " " + answer_text, special


def with_prefix(fmt: QAFormat, prefix: str) -> PrefixedFormat:
    """``fmt``'s layout with ``prefix`` opening every answer."""
    options = {f.name: getattr(fmt, f.name) for f in dataclasses.fields(fmt) if f.init}
    return PrefixedFormat(**options, answer_prefix=prefix)


def paraphrased(items: Sequence[Mapping[str, Any]]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """``(plain, rephrased)``: the items that carry a non-empty string ``paraphrased_question``, once as they are
    and once with that paraphrase as the question (same answers, same order)."""
    plain, rephrased = [], []
    for item in items:
        question = item.get("paraphrased_question")
        if isinstance(question, str) and question.strip():
            plain.append(dict(item))
            rephrased.append({**item, "question": question})
    return plain, rephrased
