"""Specification of the tiny local model: tokenizer, config, memorisation and the on-disk cache."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from grin_peft.errors import GrinError
from grin_peft.synthetic import SyntheticDataset, generate_dataset
from grin_peft.tiny import (
    MemorisationSettings,
    answer_nll,
    build_model,
    greedy_answers,
    load_or_train_memorised_model,
    memorise,
    tiny_llama_config,
    train_tokenizer,
)

# Small enough to train in about a second: the cache tests check behaviour, not memorisation quality.
TINY_SETTINGS = MemorisationSettings(
    num_people=3, questions_per_person=2, vocab_size=400, hidden_size=32, num_layers=1, num_heads=2, epochs=2
)


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


@pytest.fixture(scope="module")
def dataset() -> SyntheticDataset:
    return generate_dataset(num_people=4, questions_per_person=3)


@pytest.fixture(scope="module")
def tokenizer(dataset):
    texts = [f"Question: {item['question']}\nAnswer: {item['answer']}" for item in dataset.train]
    return train_tokenizer(texts, vocab_size=512)


def test_tokenizer_round_trips_text(tokenizer, dataset):
    texts = [item["answer"] for item in dataset.holdout]  # never seen in training
    texts += ['Unseen: naïve café, 1954!\n  two  spaces "quoted" \u2014 ok']
    for text in texts:
        ids = tokenizer(text)["input_ids"]
        assert ids[0] == tokenizer.bos_token_id
        assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert [tokenizer.pad_token_id, tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.unk_token_id] == [
        0,
        1,
        2,
        3,
    ]


def test_tokenizer_compresses_the_training_text(tokenizer, dataset):
    answer = dataset.train[0]["answer"]
    assert len(tokenizer(answer, add_special_tokens=False)["input_ids"]) < len(answer) / 2


def test_tokenizer_is_deterministic_and_saves(tmp_path, tokenizer, dataset):
    texts = [f"Question: {item['question']}\nAnswer: {item['answer']}" for item in dataset.train]
    assert train_tokenizer(texts, vocab_size=512).get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path)
    reloaded = type(tokenizer).from_pretrained(tmp_path)
    text = dataset.retain[0]["question"]
    assert reloaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert reloaded.eos_token_id == tokenizer.eos_token_id


def test_tokenizer_rejects_a_tiny_vocabulary():
    with pytest.raises(GrinError, match="vocab_size"):
        train_tokenizer(["some text"], vocab_size=100)


def test_build_model_size_and_seed():
    config = tiny_llama_config(1024)
    model = build_model(config, seed=0)
    # 2 untied 1024 x 128 embeddings + 2 layers of (4 attention 128 x 128 + 3 MLP 128 x 512 matrices + 2 norms).
    assert sum(p.numel() for p in model.parameters()) == 2 * 1024 * 128 + 2 * (4 * 128**2 + 3 * 128 * 512 + 256) + 128
    assert not model.training
    state = torch.random.get_rng_state()
    same = build_model(config, seed=0)
    assert torch.equal(torch.random.get_rng_state(), state)  # the caller's RNG stream is untouched
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), same.parameters()))
    other = build_model(config, seed=1)
    assert not torch.equal(model.lm_head.weight, other.lm_head.weight)


def test_config_rejects_indivisible_heads():
    with pytest.raises(GrinError, match="divisible"):
        tiny_llama_config(512, hidden_size=100, num_heads=3)


def test_memorise_learns_the_answers_deterministically(tokenizer, dataset):
    items = dataset.train[:8]
    config = tiny_llama_config(len(tokenizer))
    model = build_model(config, seed=0)
    before = sum(answer_nll(model, tokenizer, items)) / len(items)
    after = memorise(model, tokenizer, items, epochs=30, batch_size=4, progress=False)
    assert before > 5.0
    assert after < 0.5
    assert after == pytest.approx(sum(answer_nll(model, tokenizer, items)) / len(items))
    answers = greedy_answers(model, tokenizer, [item["question"] for item in items])
    assert sum(answer == item["answer"] for answer, item in zip(answers, items)) >= 6

    again = build_model(config, seed=0)
    assert memorise(again, tokenizer, items, epochs=30, batch_size=4, progress=False) == after
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))


def test_greedy_answers_do_not_depend_on_batching(tokenizer, dataset):
    # Left padding in a batch must not change what any row generates.
    model = build_model(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2), seed=3)
    questions = [item["question"] for item in dataset.train[:5]]
    batched = greedy_answers(model, tokenizer, questions, max_new_tokens=8)
    assert batched == greedy_answers(model, tokenizer, questions, max_new_tokens=8, batch_size=1)


def test_memorise_restores_the_thread_count(tokenizer, dataset):
    model = build_model(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2))
    torch.set_num_threads(2)
    memorise(model, tokenizer, dataset.train[:2], epochs=1, progress=False)
    assert torch.get_num_threads() == 2


@pytest.mark.parametrize(
    "kwargs", [{"epochs": 0}, {"batch_size": 0}, {"lr": 0.0}, {"warmup_ratio": 1.0}, {"epochs": 1.5}]
)
def test_memorise_rejects_bad_arguments(tokenizer, dataset, kwargs):
    model = build_model(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2))
    with pytest.raises(GrinError):
        memorise(model, tokenizer, dataset.train, progress=False, **kwargs)
    with pytest.raises(GrinError, match="at least one item"):
        memorise(model, tokenizer, [], progress=False)


def test_cache_trains_once_then_loads(tmp_path):
    first = load_or_train_memorised_model(tmp_path, TINY_SETTINGS, progress=False)
    assert first.trained
    assert first.path == tmp_path / TINY_SETTINGS.cache_key()
    assert [p.name for p in tmp_path.iterdir()] == [first.path.name]  # no staging directory left behind
    assert first.info["num_train_items"] == len(first.dataset.train) == 6

    second = load_or_train_memorised_model(tmp_path, TINY_SETTINGS, progress=False)
    assert not second.trained
    assert second.path == first.path
    assert second.dataset == first.dataset
    assert second.info == json.loads(json.dumps(first.info))
    assert all(torch.equal(a, b) for a, b in zip(first.model.parameters(), second.model.parameters()))
    question = second.dataset.forget[0]["question"]
    assert second.tokenizer(question)["input_ids"] == first.tokenizer(question)["input_ids"]


def test_cache_key_covers_every_setting():
    keys = {TINY_SETTINGS.cache_key()}
    for field, value in [("data_seed", 1), ("epochs", 3), ("lr", 1e-3), ("bf16_autocast", True)]:
        keys.add(dataclasses.replace(TINY_SETTINGS, **{field: value}).cache_key())
    assert len(keys) == 5


def test_unfinished_cache_entry_is_rebuilt(tmp_path):
    # What an interrupted build that somehow reached the final name would look like: no completion marker.
    broken = tmp_path / TINY_SETTINGS.cache_key()
    broken.mkdir()
    (broken / "config.json").write_text("{truncated", encoding="utf-8")
    result = load_or_train_memorised_model(tmp_path, TINY_SETTINGS, progress=False)
    assert result.trained
    assert (broken / "complete.json").is_file()
    assert json.loads((broken / "config.json").read_text(encoding="utf-8"))["model_type"] == "llama"


def test_overrides_replace_single_settings(tmp_path):
    result = load_or_train_memorised_model(tmp_path, TINY_SETTINGS, progress=False, data_seed=5)
    assert result.path.name == dataclasses.replace(TINY_SETTINGS, data_seed=5).cache_key()
    assert result.info["settings"]["data_seed"] == 5
    with pytest.raises(GrinError, match="unknown setting"):
        load_or_train_memorised_model(tmp_path, TINY_SETTINGS, progress=False, no_such_setting=1)
