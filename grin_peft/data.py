"""Question/answer formatting, padding and loaders for the unlearning benchmarks (TOFU, WMDP, PKU-SafeRLHF).

One :class:`QAFormat` turns ``(question, answer)`` into token ids and labels for training and for every metric,
so a model is always scored on exactly the text it was trained on, and the prompt used for generation is always an
exact token prefix of the training encoding (otherwise greedy answers are measured after a prompt the model never
saw). Loaders return plain ``list[dict]`` with the benchmarks' own field names; they read local JSON Lines files
in place (the data root comes from an explicit path or the ``GRIN_DATA_DIR`` environment variable) or, when
asked for a Hub dataset id, fetch it with ``datasets`` / ``huggingface_hub``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypedDict

import torch
from transformers import PreTrainedTokenizerBase

from .errors import GrinError

__all__ = [
    "DATA_DIR_ENV",
    "DEFAULT_TEMPLATE",
    "IGNORE_INDEX",
    "EncodedQA",
    "QACollator",
    "QAFormat",
    "as_format",
    "encode_items",
    "load_pku",
    "load_qa_jsonl",
    "load_tofu",
    "load_tofu_eval_splits",
    "load_tofu_idk",
    "load_wmdp",
    "pad_token_id",
    "read_jsonl",
    "resolve_data_dir",
]

IGNORE_INDEX = -100
DATA_DIR_ENV = "GRIN_DATA_DIR"
DEFAULT_TEMPLATE = "Question: {question}\nAnswer: {answer}"

TOFU_HUB_ID = "locuslab/TOFU"
WMDP_HUB_ID = "cais/wmdp"
PKU_HUB_ID = "PKU-Alignment/PKU-SafeRLHF"

# Anything shaped like "owner/name" that is not an existing path is taken as a Hub dataset id.
_HUB_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


class EncodedQA(TypedDict):
    """One tokenised example: ``labels`` equals ``input_ids`` on answer tokens and ``IGNORE_INDEX`` elsewhere."""

    input_ids: list[int]
    labels: list[int]


@dataclass
class QAFormat:
    """How a question and its answer become tokens, shared by training, scoring and generation.

    Two layouts:

    * plain (default when the tokenizer has no chat template): ``template`` with ``{question}`` before
      ``{answer}``, followed by the tokenizer's EOS token so the model learns to stop. Spaces right before
      ``{answer}`` belong to the answer, so BPE tokenizers see ``" word"`` tokens as in running text and the prompt
      does not end in a lone space token.
    * chat (default when ``tokenizer.chat_template`` is set): ``apply_chat_template`` with an optional system
      message, a user message holding the question and an assistant message holding the answer; the template's own
      end-of-turn tokens close the answer, so no EOS is appended.

    The answer tokens are those of the full text after the prompt tokens when the prompt tokenises to a prefix of
    the full text (the usual case); otherwise the answer is tokenised on its own and appended, which keeps the
    prefix guarantee at the cost of a slightly unnatural boundary.
    """

    tokenizer: PreTrainedTokenizerBase
    template: str = DEFAULT_TEMPLATE
    chat: bool | None = None
    system_prompt: str | None = None
    max_length: int | None = None
    add_eos: bool = True
    _prompt_part: str = field(init=False, repr=False)
    _suffix_part: str = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if self.chat is None:
            self.chat = bool(getattr(self.tokenizer, "chat_template", None))
        if self.chat and not getattr(self.tokenizer, "chat_template", None):
            raise GrinError(
                "QAFormat(chat=True) needs a tokenizer with a chat_template; use chat=False for plain text."
            )
        if self.template.count("{answer}") != 1 or self.template.count("{question}") != 1:
            raise GrinError(
                f"template must contain '{{question}}' and '{{answer}}' exactly once each; got {self.template!r}."
            )
        prompt_part, suffix_part = self.template.split("{answer}")
        if "{question}" not in prompt_part:
            raise GrinError(f"template must place '{{question}}' before '{{answer}}'; got {self.template!r}.")
        self._prompt_part, self._suffix_part = prompt_part, suffix_part
        if self.max_length is not None and self.max_length < 2:
            raise GrinError(f"max_length must be at least 2 tokens; got {self.max_length}.")
        if self.add_eos and not self.chat and self.tokenizer.eos_token_id is None:
            raise GrinError("The tokenizer has no eos_token: set one, or build QAFormat(add_eos=False).")

    @property
    def eos_token_ids(self) -> list[int]:
        """Token ids that end a generated answer: the tokenizer's EOS (chat models may add their own, see metrics)."""
        return [] if self.tokenizer.eos_token_id is None else [int(self.tokenizer.eos_token_id)]

    def _messages(self, question: str) -> list[dict[str, str]]:
        system = [{"role": "system", "content": self.system_prompt}] if self.system_prompt else []
        return [*system, {"role": "user", "content": question}]

    def _tokenize(self, text: str, special: bool) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=special)["input_ids"])

    def _split_texts(self, question: str, answer: str, end: bool) -> tuple[str, str, bool]:
        """Return (prompt text, answer text, whether the prompt text still needs the tokenizer's special tokens)."""
        if self.chat:
            prompt = self.tokenizer.apply_chat_template(
                self._messages(question), tokenize=False, add_generation_prompt=True
            )
            if not end:
                return prompt, answer, False
            full = self.tokenizer.apply_chat_template(
                [*self._messages(question), {"role": "assistant", "content": answer}], tokenize=False
            )
            if full.startswith(prompt):
                return prompt, full[len(prompt) :], False
            # Template renders the history differently once an answer exists: fall back to the bare answer.
            return prompt, answer, False
        prompt = self._prompt_part.replace("{question}", question)
        stripped = prompt.rstrip(" ")
        return stripped, prompt[len(stripped) :] + answer + (self._suffix_part if end else ""), True

    def encode_prompt(self, question: str) -> list[int]:
        """Token ids of the prompt alone, for generation; always a prefix of ``encode(question, ...)``."""
        prompt, _, special = self._split_texts(question, "", end=False)
        ids = self._tokenize(prompt, special)
        if self.max_length is not None and len(ids) >= self.max_length:
            raise GrinError(
                f"The prompt is {len(ids)} tokens, leaving no room for an answer within max_length={self.max_length}: "
                f"{question[:80]!r}"
            )
        return ids

    def encode(self, question: str, answer: str, *, end: bool = True) -> EncodedQA:
        """Tokenise one example with loss on the answer tokens only.

        ``end=False`` leaves out the EOS token and the template text after the answer, for scoring an answer as a
        bare continuation (multiple-choice options).
        """
        if not isinstance(question, str) or not isinstance(answer, str):
            raise GrinError(
                f"question and answer must be strings; got {type(question).__name__} and {type(answer).__name__}."
            )
        prompt_text, answer_text, special = self._split_texts(question, answer, end)
        prompt_ids = self.encode_prompt(question)
        full_ids = self._tokenize(prompt_text + answer_text, special)
        if full_ids[: len(prompt_ids)] == prompt_ids:
            answer_ids = full_ids[len(prompt_ids) :]
        else:
            answer_ids = self._tokenize(answer_text, False)
        eos = self.tokenizer.eos_token_id
        if end and self.add_eos and not self.chat and (not answer_ids or answer_ids[-1] != eos):
            answer_ids.append(int(eos))
        if not answer_ids:
            raise GrinError(f"The answer tokenises to nothing, so there is nothing to score: {answer!r}.")
        if self.max_length is not None:
            answer_ids = answer_ids[: self.max_length - len(prompt_ids)]
        return {
            "input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
        }


def as_format(tokenizer_or_format: PreTrainedTokenizerBase | QAFormat) -> QAFormat:
    """Accept a tokenizer (default layout) or a ready :class:`QAFormat`, so every API takes either."""
    if isinstance(tokenizer_or_format, QAFormat):
        return tokenizer_or_format
    if isinstance(tokenizer_or_format, PreTrainedTokenizerBase):
        return QAFormat(tokenizer_or_format)
    raise GrinError(f"Expected a Hugging Face tokenizer or a QAFormat; got {type(tokenizer_or_format).__name__}.")


def encode_items(
    items: Sequence[Mapping[str, Any]],
    tokenizer: PreTrainedTokenizerBase | QAFormat,
    question_key: str = "question",
    answer_key: str = "answer",
) -> list[EncodedQA]:
    """Tokenise a list of QA dicts; the result is a ready map-style dataset for ``transformers.Trainer``."""
    fmt = as_format(tokenizer)
    encoded = []
    for index, item in enumerate(items):
        if question_key not in item or answer_key not in item:
            raise GrinError(f"Item {index} lacks '{question_key}' or '{answer_key}'; it has {sorted(item)}.")
        encoded.append(fmt.encode(item[question_key], item[answer_key]))
    return encoded


def pad_token_id(tokenizer: PreTrainedTokenizerBase) -> int:
    """The id used for padding: the pad token, else EOS (padding is masked out, so its identity does not matter)."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pad is None:
        raise GrinError("The tokenizer has neither a pad_token nor an eos_token to pad batches with; set one.")
    return int(pad)


@dataclass
class QACollator:
    """Pad encoded examples into ``input_ids``, ``attention_mask`` and ``labels`` tensors.

    Right padding (the default) for training and teacher-forced scoring; left padding for batched generation, where
    every prompt must end at the last column so new tokens follow it directly. Features without ``labels`` (prompts)
    get labels equal to their ids. Padding positions always carry ``IGNORE_INDEX`` labels.
    """

    pad_token_id: int
    padding_side: Literal["right", "left"] = "right"

    def __post_init__(self) -> None:
        if self.padding_side not in ("right", "left"):
            raise GrinError(f"padding_side must be 'right' or 'left'; got {self.padding_side!r}.")

    @classmethod
    def from_tokenizer(
        cls, tokenizer: PreTrainedTokenizerBase | QAFormat, padding_side: Literal["right", "left"] = "right"
    ) -> QACollator:
        """Build a collator padding with the tokenizer's pad token (or EOS when it has none)."""
        return cls(pad_token_id(as_format(tokenizer).tokenizer), padding_side)

    def __call__(self, features: Sequence[Mapping[str, Sequence[int]]]) -> dict[str, torch.Tensor]:
        if not features:
            raise GrinError("Cannot collate an empty batch.")
        width = max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(features), width), dtype=torch.long)
        labels = torch.full((len(features), width), IGNORE_INDEX, dtype=torch.long)
        for row, feature in enumerate(features):
            n = len(feature["input_ids"])
            cols = slice(0, n) if self.padding_side == "right" else slice(width - n, width)
            ids[row, cols] = torch.as_tensor(feature["input_ids"], dtype=torch.long)
            mask[row, cols] = 1
            labels[row, cols] = torch.as_tensor(feature.get("labels", feature["input_ids"]), dtype=torch.long)
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}


# ----------------------------------------------------------------------------------------------------------- files


def resolve_data_dir(path: str | os.PathLike[str] | None = None) -> Path:
    """The local data root: ``path`` when given, else ``$GRIN_DATA_DIR``; it must be an existing directory."""
    chosen = path if path is not None else os.environ.get(DATA_DIR_ENV)
    if not chosen:
        raise GrinError(f"No data directory: pass one explicitly or set the {DATA_DIR_ENV} environment variable.")
    root = Path(chosen).expanduser()
    if not root.is_dir():
        raise GrinError(f"Data directory {str(root)!r} does not exist or is not a directory.")
    return root


def read_jsonl(
    path: str | os.PathLike[str], required: Iterable[str] = (), allow_empty: bool = False
) -> list[dict[str, Any]]:
    """Read a JSON Lines file of objects (blank lines skipped), checking that each has the ``required`` fields.

    TOFU ships JSON Lines under a ``.json`` name, so the extension is not trusted. Every error names the file and,
    for a bad record, its 1-based line number. An empty file is an error unless ``allow_empty`` (a split that may
    legitimately be empty, such as a small synthetic holdout).
    """
    path = Path(path)
    if not path.is_file():
        raise GrinError(f"Data file {str(path)!r} does not exist.")
    required = tuple(required)
    rows: list[dict[str, Any]] = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise GrinError(f"{path}: line {line_no} is not valid JSON ({err.msg}).") from err
            if not isinstance(row, dict):
                raise GrinError(f"{path}: line {line_no} is a JSON {type(row).__name__}, expected an object.")
            missing = [key for key in required if key not in row]
            if missing:
                raise GrinError(f"{path}: line {line_no} lacks field(s) {missing}; it has {sorted(row)}.")
            rows.append(row)
    if not rows and not allow_empty:
        raise GrinError(f"{path}: the file holds no records.")
    return rows


def load_qa_jsonl(
    path: str | os.PathLike[str], question_key: str = "question", answer_key: str = "answer"
) -> list[dict[str, Any]]:
    """Read a user's QA file; items keep all their fields and gain ``question``/``answer`` when renamed."""
    rows = read_jsonl(path, required=(question_key, answer_key))
    for line_no, row in enumerate(rows, start=1):
        if not isinstance(row[question_key], str) or not isinstance(row[answer_key], str):
            raise GrinError(f"{path}: record {line_no} has a non-string '{question_key}' or '{answer_key}'.")
        row["question"], row["answer"] = row[question_key], row[answer_key]
    return rows


def _is_hub_id(source: str | os.PathLike[str]) -> bool:
    return isinstance(source, str) and bool(_HUB_ID.match(source)) and not Path(source).exists()


def _local_file(source: str | os.PathLike[str] | None, subdir: str, filename: str) -> Path:
    """Find ``filename`` in ``source`` itself or in its benchmark sub-folder (``source`` may be the data root)."""
    root = resolve_data_dir(source)
    for candidate in (root / filename, root / subdir / filename):
        if candidate.is_file():
            return candidate
    raise GrinError(f"Data file {filename!r} not found in {str(root)!r} or {str(root / subdir)!r}.")


def _load_hub_rows(repo_id: str, config: str, split: str, filename: str | None = None) -> list[dict[str, Any]]:
    """Rows of a Hub dataset: via ``datasets`` when installed, else (if given) one raw JSON Lines file."""
    try:
        import datasets
    except ImportError:
        datasets = None
    try:
        if datasets is not None:
            return [dict(row) for row in datasets.load_dataset(repo_id, config, split=split)]
        if filename is None:
            raise GrinError(f"Loading {repo_id!r} from the Hub needs the `datasets` package: pip install datasets.")
        from huggingface_hub import hf_hub_download

        return read_jsonl(hf_hub_download(repo_id, filename, repo_type="dataset"))
    except GrinError:
        raise
    except Exception as err:  # network, auth and missing-config errors all mean "not available"
        raise GrinError(
            f"Could not load {repo_id!r} ({config}) from the Hub: {err}. Offline, pass a local data directory instead."
        ) from err


def _check_fields(rows: list[dict[str, Any]], required: Sequence[str], where: str) -> list[dict[str, Any]]:
    if not rows:
        raise GrinError(f"{where}: no records.")
    for index, row in enumerate(rows, start=1):
        missing = [key for key in required if key not in row]
        if missing:
            raise GrinError(f"{where}: record {index} lacks field(s) {missing}; it has {sorted(row)}.")
    return rows


def _tofu_required(split: str) -> tuple[str, ...]:
    if split in ("real_authors_perturbed", "world_facts_perturbed"):
        return ("question", "answer", "perturbed_answer")
    if split.endswith("_perturbed"):
        return ("question", "answer", "paraphrased_answer", "perturbed_answer")
    return ("question", "answer")


def load_tofu(split: str, source: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """Load one TOFU split (``forget10``, ``forget10_perturbed``, ``retain_perturbed``, ``real_authors``, ...).

    ``source`` is a local directory (the TOFU folder or the data root holding ``tofu/``), a Hub dataset id such as
    ``"locuslab/TOFU"`` (config = split), or None for ``$GRIN_DATA_DIR``. Perturbed splits are checked for the
    fields the truth ratio needs.
    """
    if not re.fullmatch(r"[\w]+", split):
        raise GrinError(f"Invalid TOFU split name {split!r}.")
    required = _tofu_required(split)
    if source is not None and _is_hub_id(source):
        return _check_fields(
            _load_hub_rows(str(source), split, "train", f"{split}.json"), required, f"{source}:{split}"
        )
    return read_jsonl(_local_file(source, "tofu", f"{split}.json"), required=required)


def load_tofu_eval_splits(
    forget_split: str = "forget10", source: str | os.PathLike[str] | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The splits ``metrics.evaluate_tofu`` expects, keyed forget/retain/real_authors/world_facts/holdout."""
    match = re.fullmatch(r"forget(\d+)", forget_split)
    if match is None:
        raise GrinError(f"forget_split must look like 'forget10'; got {forget_split!r}.")
    return {
        "forget": load_tofu(f"{forget_split}_perturbed", source),
        "retain": load_tofu("retain_perturbed", source),
        "real_authors": load_tofu("real_authors_perturbed", source),
        "world_facts": load_tofu("world_facts_perturbed", source),
        "holdout": load_tofu(f"holdout{match.group(1)}", source),
    }


def load_tofu_idk(source: str | os.PathLike[str] | None = None) -> list[str]:
    """TOFU's refusal strings (``idontknow.jsonl``: despite the name, one plain-text line each)."""
    path = _local_file(source, "tofu", "idontknow.jsonl")
    lines = [line.strip() for line in path.read_text(encoding="utf-8").splitlines()]
    strings = [line for line in lines if line]
    if not strings:
        raise GrinError(f"{path}: the file holds no refusal strings.")
    return strings


def load_wmdp(subset: str = "bio", source: str | os.PathLike[str] | None = None) -> list[dict[str, Any]]:
    """WMDP multiple-choice items ``{question, choices, answer}`` for subset bio, chem or cyber.

    Local files are ``wmdp-{subset}.jsonl``; a Hub id (``"cais/wmdp"``) needs the ``datasets`` package.
    """
    if subset not in ("bio", "chem", "cyber"):
        raise GrinError(f"WMDP subset must be 'bio', 'chem' or 'cyber'; got {subset!r}.")
    required = ("question", "choices", "answer")
    if source is not None and _is_hub_id(source):
        rows = _check_fields(_load_hub_rows(str(source), f"wmdp-{subset}", "test"), required, f"{source}:{subset}")
        where = f"{source}:{subset}"
    else:
        path = _local_file(source, "wmdp", f"wmdp-{subset}.jsonl")
        rows, where = read_jsonl(path, required=required), str(path)
    for index, row in enumerate(rows, start=1):
        choices, answer = row["choices"], row["answer"]
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) for c in choices):
            raise GrinError(f"{where}: record {index} needs 'choices' as a list of at least two strings.")
        if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(choices):
            raise GrinError(f"{where}: record {index} has answer {answer!r}, not an index into its choices.")
    return rows


def load_pku(
    kind: Literal["unsafe", "safe"] = "unsafe", source: str | os.PathLike[str] | None = None
) -> list[dict[str, Any]]:
    """PKU-SafeRLHF ``{prompt, response, is_safe}`` pairs; ``unsafe`` ones are the SafePKU forget set.

    Locally reads ``{kind}_sampled_200.jsonl``. From the Hub (``"PKU-Alignment/PKU-SafeRLHF"``, test split, needs
    ``datasets``) each row's two responses become pairs and only those of the requested kind are kept.
    """
    if kind not in ("unsafe", "safe"):
        raise GrinError(f"kind must be 'unsafe' or 'safe'; got {kind!r}.")
    if source is not None and _is_hub_id(source):
        rows = _load_hub_rows(str(source), "default", "test")
        _check_fields(rows, ("prompt", "response_0", "response_1", "is_response_0_safe", "is_response_1_safe"), source)
        want_safe = kind == "safe"
        pairs = [
            {"prompt": row["prompt"], "response": row[f"response_{i}"], "is_safe": want_safe}
            for row in rows
            for i in (0, 1)
            if bool(row[f"is_response_{i}_safe"]) == want_safe
        ]
        return _check_fields(pairs, ("prompt", "response"), f"{source} ({kind})")
    return read_jsonl(
        _local_file(source, "pku_saferlhf", f"{kind}_sampled_200.jsonl"), required=("prompt", "response")
    )
