"""Specification of the synthetic TOFU-like data set: deterministic, split by person, TOFU's field names."""

from __future__ import annotations

import json
import re

import pytest

from grin_peft.data import read_jsonl
from grin_peft.errors import GrinError
from grin_peft.synthetic import (
    FACTS,
    REFUSALS,
    SyntheticDataset,
    generate_dataset,
    load_splits,
    save_splits,
    write_jsonl,
)

TOFU_FIELDS = {"question", "answer", "paraphrased_question", "paraphrased_answer", "perturbed_answer"}


@pytest.fixture(scope="module")
def dataset() -> SyntheticDataset:
    return generate_dataset()


def all_items(dataset: SyntheticDataset) -> list[dict]:
    return dataset.forget + dataset.retain + dataset.holdout


def facts_of(dataset: SyntheticDataset) -> dict[str, dict[str, str]]:
    return {person["name"]: person for person in dataset.people}


def test_same_seed_gives_the_same_data_set(dataset):
    assert generate_dataset() == dataset
    assert generate_dataset(seed=0) == dataset


def test_different_seeds_give_different_data_sets(dataset):
    other = generate_dataset(seed=1)
    assert other.forget != dataset.forget
    assert {p["name"] for p in other.people} != {p["name"] for p in dataset.people}


def test_default_sizes(dataset):
    # 20 trained people x 5 questions; 10% forgotten; as many holdout people as forgotten ones.
    assert (len(dataset.forget), len(dataset.retain), len(dataset.holdout)) == (10, 90, 10)
    assert len(dataset.people) == 22
    assert dataset.train == dataset.forget + dataset.retain


def test_custom_sizes():
    data = generate_dataset(num_people=10, questions_per_person=3, forget_fraction=0.3, num_holdout_people=0)
    assert (len(data.forget), len(data.retain), len(data.holdout)) == (9, 21, 0)
    data = generate_dataset(num_people=5, questions_per_person=len(FACTS), num_holdout_people=4, num_perturbed=5)
    assert {item["fact"] for item in data.retain} == set(FACTS)
    assert len(data.holdout) == 4 * len(FACTS)
    assert all(len(item["perturbed_answer"]) == 5 for item in all_items(data))


def test_split_is_by_person(dataset):
    people = {split: {item["person"] for item in getattr(dataset, split)} for split in ("forget", "retain", "holdout")}
    assert (len(people["forget"]), len(people["retain"]), len(people["holdout"])) == (2, 18, 2)
    assert not people["forget"] & people["retain"]
    assert not people["holdout"] & (people["forget"] | people["retain"])
    # Each person is asked about distinct facts.
    for name in people["forget"] | people["retain"]:
        facts = [item["fact"] for item in all_items(dataset) if item["person"] == name]
        assert len(facts) == len(set(facts)) == 5


def test_people_are_unique_and_name_questions_identify_one_person(dataset):
    names = [person["name"] for person in dataset.people]
    assert len(set(names)) == len(names)
    descriptions = {(p["profession"], p["birthplace"], p["birth_year"]) for p in dataset.people}
    assert len(descriptions) == len(names)


def test_items_have_tofu_field_names(dataset):
    for item in all_items(dataset):
        assert set(item) == TOFU_FIELDS | {"person", "fact"}
        assert all(isinstance(item[key], str) and item[key] for key in TOFU_FIELDS - {"perturbed_answer"})
        assert item["fact"] in FACTS


def test_answers_state_the_persons_facts(dataset):
    people = facts_of(dataset)
    for item in all_items(dataset):
        person = people[item["person"]]
        for key in FACTS[item["fact"]]:
            assert person[key] in item["answer"]
            assert person[key] in item["paraphrased_answer"]


def test_paraphrases_change_the_wording(dataset):
    for item in all_items(dataset):
        assert item["paraphrased_answer"] != item["answer"]
        assert item["paraphrased_question"] != item["question"]


def test_perturbed_answers_are_wrong_distinct_and_keep_the_template(dataset):
    people = facts_of(dataset)
    for item in all_items(dataset):
        perturbed = item["perturbed_answer"]
        assert len(perturbed) == 3
        assert len(set(perturbed)) == 3
        assert item["answer"] not in perturbed
        # Same sentence, only the fact's value swapped for another one.
        truth = people[item["person"]][FACTS[item["fact"]][-1]]
        assert item["answer"].count(truth) == 1
        prefix, suffix = item["answer"].split(truth)
        prefix = re.sub(r"\ban? $", "", prefix)  # "a"/"an" agrees with the swapped-in profession
        for wrong in perturbed:
            assert wrong.startswith(prefix) and wrong.endswith(suffix)
            assert truth not in wrong


def test_refusals(dataset):
    assert dataset.refusals == list(REFUSALS)
    assert len(set(REFUSALS)) == 20


def test_jsonl_round_trip(tmp_path, dataset):
    path = tmp_path / "forget.jsonl"
    write_jsonl(dataset.forget, path)
    lines = path.read_text(encoding="utf-8").splitlines()
    assert len(lines) == len(dataset.forget)
    assert json.loads(lines[0]) == dataset.forget[0]
    assert read_jsonl(path) == dataset.forget


def test_save_and_load_splits(tmp_path, dataset):
    save_splits(dataset, tmp_path / "demo")
    assert sorted(p.name for p in (tmp_path / "demo").iterdir()) == [
        "forget.jsonl",
        "holdout.jsonl",
        "people.jsonl",
        "refusals.txt",
        "retain.jsonl",
    ]
    assert load_splits(tmp_path / "demo") == dataset


def test_load_splits_reports_bad_input_and_accepts_an_empty_split(tmp_path):
    with pytest.raises(GrinError, match="does not exist"):
        load_splits(tmp_path)
    dataset = generate_dataset(num_people=4)
    save_splits(dataset, tmp_path)
    (tmp_path / "holdout.jsonl").write_text("", encoding="utf-8")
    assert load_splits(tmp_path).holdout == []
    (tmp_path / "retain.jsonl").write_text('{"question": "q"}\n\n{not json}\n', encoding="utf-8")
    with pytest.raises(GrinError, match=r"retain.jsonl: line 3 is not valid JSON"):
        load_splits(tmp_path)
    (tmp_path / "retain.jsonl").write_text('{"question": "q"}\n["a list"]\n', encoding="utf-8")
    with pytest.raises(GrinError, match=r"line 2 is a JSON list, expected an object"):
        load_splits(tmp_path)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"num_people": 1},
        {"num_people": 0},
        {"num_people": 2.5},
        {"questions_per_person": 0},
        {"questions_per_person": len(FACTS) + 1},
        {"forget_fraction": 0.0},
        {"forget_fraction": 1.0},
        {"forget_fraction": "half"},
        {"num_holdout_people": -1},
        {"num_perturbed": 0},
        {"num_perturbed": 100},
    ],
)
def test_bad_sizes_raise(kwargs):
    with pytest.raises(GrinError):
        generate_dataset(**kwargs)
