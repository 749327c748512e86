"""Specification of grin_peft.data: QA encoding, padding, and the benchmark loaders on the real shared data."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from grin_peft.data import (
    DATA_DIR_ENV,
    IGNORE_INDEX,
    QACollator,
    QAFormat,
    as_format,
    encode_items,
    load_pku,
    load_qa_jsonl,
    load_tofu,
    load_tofu_eval_splits,
    load_tofu_idk,
    load_wmdp,
    read_jsonl,
    resolve_data_dir,
)
from grin_peft.errors import GrinError

DATA_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not DATA_DIR.is_dir(), reason=f"shared benchmark data not found at {DATA_DIR}")

CORPUS = [
    "Question: Who wrote the play Romeo and Juliet?\nAnswer: William Shakespeare wrote it.",
    "Question: Where is the Eiffel Tower?\nAnswer: The Eiffel Tower is in Paris, France.",
    "Question: What is the full name of the author born in Taipei?\nAnswer: The author's full name is Hsiao Yun-Hwa.",
]
CHAT_TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def make_tokenizer(chat: bool = False) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds on a few sentences, with pad and EOS tokens."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<pad>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(CORPUS * 3, trainer)
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")
    if chat:
        hf.chat_template = CHAT_TEMPLATE
    return hf


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


# ------------------------------------------------------------------------------------------------- formatting


def test_plain_encoding_masks_prompt_and_ends_with_eos(tokenizer):
    fmt = QAFormat(tokenizer)
    enc = fmt.encode("Who wrote the play Romeo and Juliet?", "William Shakespeare wrote it.")
    prompt = fmt.encode_prompt("Who wrote the play Romeo and Juliet?")
    assert enc["input_ids"][: len(prompt)] == prompt
    assert enc["labels"][: len(prompt)] == [IGNORE_INDEX] * len(prompt)
    answer = enc["labels"][len(prompt) :]
    assert answer == enc["input_ids"][len(prompt) :] and IGNORE_INDEX not in answer
    assert answer[-1] == tokenizer.eos_token_id
    assert tokenizer.decode(answer, skip_special_tokens=True) == " William Shakespeare wrote it."
    # The whole training text is the template filled in, plus EOS.
    assert (
        tokenizer.decode(enc["input_ids"])
        == "Question: Who wrote the play Romeo and Juliet?\nAnswer: William Shakespeare wrote it.</s>"
    )


def test_prompt_does_not_end_in_a_lone_space_token(tokenizer):
    prompt = QAFormat(tokenizer).encode_prompt("Where is the Eiffel Tower?")
    assert tokenizer.decode(prompt) == "Question: Where is the Eiffel Tower?\nAnswer:"


def test_custom_template_and_no_eos(tokenizer):
    fmt = QAFormat(tokenizer, template="Q: {question} A: {answer} END", add_eos=False)
    enc = fmt.encode("Where is the Eiffel Tower?", "Paris")
    assert tokenizer.decode(enc["input_ids"]) == "Q: Where is the Eiffel Tower? A: Paris END"
    n_prompt = len(fmt.encode_prompt("Where is the Eiffel Tower?"))
    assert tokenizer.decode(enc["labels"][n_prompt:]) == " Paris END"
    bare = fmt.encode("Where is the Eiffel Tower?", "Paris", end=False)
    assert tokenizer.decode(bare["input_ids"]) == "Q: Where is the Eiffel Tower? A: Paris"


@pytest.mark.parametrize(
    "template", ["Question: {question}", "{answer} then {question}", "{question} {answer} {answer}", "{answer}"]
)
def test_bad_templates_are_rejected(tokenizer, template):
    with pytest.raises(GrinError, match="template"):
        QAFormat(tokenizer, template=template)


def test_chat_format_is_chosen_automatically_and_masks_the_prompt():
    tok = make_tokenizer(chat=True)
    fmt = as_format(tok)
    assert fmt.chat
    enc = fmt.encode("Where is the Eiffel Tower?", "Paris")
    prompt = fmt.encode_prompt("Where is the Eiffel Tower?")
    assert tok.decode(prompt) == "<|user|>Where is the Eiffel Tower?</s><|assistant|>"
    assert enc["input_ids"][: len(prompt)] == prompt
    assert tok.decode(enc["labels"][len(prompt) :]) == "Paris</s>"
    assert set(enc["labels"][: len(prompt)]) == {IGNORE_INDEX}


def test_chat_requested_without_template_fails(tokenizer):
    with pytest.raises(GrinError, match="chat_template"):
        QAFormat(tokenizer, chat=True)


def test_max_length_truncates_the_answer_and_rejects_long_prompts(tokenizer):
    fmt = QAFormat(tokenizer, max_length=20)
    enc = fmt.encode("Who wrote the play Romeo and Juliet?", "William Shakespeare wrote it. " * 5)
    assert len(enc["input_ids"]) == 20 and enc["labels"][-1] != IGNORE_INDEX
    with pytest.raises(GrinError, match="max_length"):
        QAFormat(tokenizer, max_length=3).encode("Who wrote the play Romeo and Juliet?", "x")


def test_non_string_fields_are_rejected(tokenizer):
    with pytest.raises(GrinError, match="strings"):
        QAFormat(tokenizer).encode("q", ["not", "a", "string"])


def test_encode_items_names_the_bad_item(tokenizer):
    with pytest.raises(GrinError, match="Item 1"):
        encode_items([{"question": "q", "answer": "a"}, {"question": "q"}], tokenizer)


# ---------------------------------------------------------------------------------------------------- padding


def test_collator_right_and_left_padding(tokenizer):
    features = [{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX, 6, 7]}, {"input_ids": [8], "labels": [8]}]
    pad = tokenizer.pad_token_id
    right = QACollator.from_tokenizer(tokenizer)(features)
    assert right["input_ids"].tolist() == [[5, 6, 7], [8, pad, pad]]
    assert right["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert right["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    left = QACollator.from_tokenizer(tokenizer, padding_side="left")([{"input_ids": [5, 6, 7]}, {"input_ids": [8]}])
    assert left["input_ids"].tolist() == [[5, 6, 7], [pad, pad, 8]]
    assert left["attention_mask"].tolist() == [[1, 1, 1], [0, 0, 1]]
    assert left["labels"].tolist() == [[5, 6, 7], [IGNORE_INDEX, IGNORE_INDEX, 8]]
    assert left["input_ids"].dtype == torch.long


def test_collator_errors(tokenizer):
    with pytest.raises(GrinError, match="padding_side"):
        QACollator(0, padding_side="middle")
    with pytest.raises(GrinError, match="empty"):
        QACollator(0)([])


# ------------------------------------------------------------------------------------------------ JSON Lines


def test_read_jsonl_errors_name_file_and_line(tmp_path):
    with pytest.raises(GrinError, match="does not exist"):
        read_jsonl(tmp_path / "missing.jsonl")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n\n{"question": "q", \n')
    with pytest.raises(GrinError, match="line 3 is not valid JSON"):
        read_jsonl(bad)
    arr = tmp_path / "arr.jsonl"
    arr.write_text("[1, 2]\n")
    with pytest.raises(GrinError, match="line 1 is a JSON list"):
        read_jsonl(arr)
    field = tmp_path / "field.jsonl"
    field.write_text('{"question": "q", "answer": "a"}\n{"question": "q"}\n')
    with pytest.raises(GrinError, match=r"line 2 lacks field\(s\) \['answer'\]"):
        read_jsonl(field, required=("question", "answer"))
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n  \n")
    with pytest.raises(GrinError, match="no records"):
        read_jsonl(empty)


def test_load_qa_jsonl_renames_fields(tmp_path):
    path = tmp_path / "qa.jsonl"
    path.write_text(json.dumps({"prompt": "p", "response": "r", "extra": 1}) + "\n")
    assert load_qa_jsonl(path, "prompt", "response") == [
        {"prompt": "p", "response": "r", "extra": 1, "question": "p", "answer": "r"}
    ]


def test_data_dir_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv(DATA_DIR_ENV, raising=False)
    with pytest.raises(GrinError, match=DATA_DIR_ENV):
        resolve_data_dir()
    monkeypatch.setenv(DATA_DIR_ENV, str(tmp_path))
    assert resolve_data_dir() == tmp_path
    with pytest.raises(GrinError, match="does not exist"):
        resolve_data_dir(tmp_path / "nope")


def test_missing_split_file_and_bad_names(tmp_path):
    with pytest.raises(GrinError, match="forget10.json"):
        load_tofu("forget10", tmp_path)
    with pytest.raises(GrinError, match="Invalid TOFU split"):
        load_tofu("../forget10", tmp_path)
    with pytest.raises(GrinError, match="subset"):
        load_wmdp("physics", tmp_path)
    with pytest.raises(GrinError, match="kind"):
        load_pku("toxic", tmp_path)


def test_perturbed_split_requires_truth_ratio_fields(tmp_path):
    (tmp_path / "forget01_perturbed.json").write_text('{"question": "q", "answer": "a", "perturbed_answer": ["b"]}\n')
    with pytest.raises(GrinError, match="paraphrased_answer"):
        load_tofu("forget01_perturbed", tmp_path)


def test_wmdp_answer_index_is_checked(tmp_path):
    (tmp_path / "wmdp-bio.jsonl").write_text('{"question": "q", "choices": ["a", "b"], "answer": 2}\n')
    with pytest.raises(GrinError, match="record 1 has answer 2"):
        load_wmdp("bio", tmp_path)


def test_hub_failure_becomes_grin_error(monkeypatch):
    import huggingface_hub

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", offline)
    monkeypatch.setitem(__import__("sys").modules, "datasets", None)  # force the huggingface_hub path
    with pytest.raises(GrinError, match="Could not load 'locuslab/TOFU'"):
        load_tofu("forget10", "locuslab/TOFU")
    with pytest.raises(GrinError, match="datasets"):
        load_wmdp("bio", "cais/wmdp")


# ------------------------------------------------------------------------------------------ the real data files


@needs_data
def test_tofu_counts_and_fields():
    forget = load_tofu("forget10", DATA_DIR)
    assert len(forget) == 400 and set(forget[0]) == {"question", "answer"}
    perturbed = load_tofu("forget10_perturbed", DATA_DIR / "tofu")
    assert len(perturbed) == 400
    assert all(len(row["perturbed_answer"]) == 5 and isinstance(row["paraphrased_answer"], str) for row in perturbed)
    assert [row["question"] for row in perturbed] == [row["question"] for row in forget]
    assert len(load_tofu("forget01", DATA_DIR)) == 40 and len(load_tofu("forget05", DATA_DIR)) == 200
    assert len(load_tofu("retain90", DATA_DIR)) == 3600 and len(load_tofu("full", DATA_DIR)) == 4000


@needs_data
def test_tofu_eval_splits_from_env(monkeypatch):
    monkeypatch.setenv(DATA_DIR_ENV, str(DATA_DIR))
    splits = load_tofu_eval_splits("forget10")
    assert {name: len(rows) for name, rows in splits.items()} == {
        "forget": 400,
        "retain": 400,
        "real_authors": 100,
        "world_facts": 117,
        "holdout": 400,
    }
    assert all(len(row["perturbed_answer"]) == 5 for row in splits["retain"])
    assert all(len(row["perturbed_answer"]) == 3 for row in splits["real_authors"] + splits["world_facts"])
    with pytest.raises(GrinError, match="forget_split"):
        load_tofu_eval_splits("retain90")


@needs_data
def test_idk_wmdp_and_pku_files():
    idk = load_tofu_idk(DATA_DIR)
    assert len(idk) == 100 and "I don't have that information." in idk
    sizes = {subset: len(load_wmdp(subset, DATA_DIR)) for subset in ("bio", "chem", "cyber")}
    assert sizes == {"bio": 1273, "chem": 408, "cyber": 1987}
    item = load_wmdp("chem", DATA_DIR / "wmdp")[0]
    assert len(item["choices"]) == 4 and 0 <= item["answer"] < 4
    unsafe, safe = load_pku("unsafe", DATA_DIR), load_pku("safe", DATA_DIR)
    assert len(unsafe) == 200 and len(safe) == 200
    assert not any(row["is_safe"] for row in unsafe) and all(row["is_safe"] for row in safe)
    assert all(isinstance(row["prompt"], str) and isinstance(row["response"], str) for row in unsafe)


@needs_data
def test_real_split_encodes_with_prompt_prefix(tokenizer):
    items = load_tofu("forget10_perturbed", DATA_DIR)[:20]
    fmt = QAFormat(tokenizer)
    for item, enc in zip(items, encode_items(items, fmt)):
        prompt = fmt.encode_prompt(item["question"])
        assert enc["input_ids"][: len(prompt)] == prompt
        assert all(label == IGNORE_INDEX for label in enc["labels"][: len(prompt)])
        assert all(label != IGNORE_INDEX for label in enc["labels"][len(prompt) :])
