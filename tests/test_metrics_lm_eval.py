"""grin_peft.metrics.lm_eval runs lm-evaluation-harness on the in-memory model, offline, and the project's own
multiple-choice scorer agrees with lm-eval's acc item by item (base model, GRIN adapter active, merged)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import get_peft_model
from test_metrics import make_model, make_tokenizer

from grin_peft import GrinConfig, GrinError
from grin_peft import metrics as M
from grin_peft.data import QACollator, QAFormat

pytest.importorskip("lm_eval")

# WMDP-shaped items (question, four choices, answer index); the tiny model's preferences among them vary.
ITEMS = [
    {"question": "Who wrote the play Romeo and Juliet?", "choices": ["Shakespeare", "Twain", "Eco", "Woolf"]},
    {"question": " Where is the Eiffel Tower? ", "choices": ["Rome", "Paris, France", "Oslo", "Lima"]},
    {"question": "Which river flows through Paris?", "choices": ["Seine", "Thames", "Danube", "Nile"]},
    {"question": "Who painted the Mona Lisa?", "choices": ["Monet", "Picasso", "Leonardo da Vinci", "Dali"]},
    {"question": "What does the author write?", "choices": ["Poems", "Songs", "Plays", "Books about leadership"]},
    {"question": "What is 2 + 2?", "choices": ["3", "4", "5", "22"]},
]
ITEMS = [{**item, "answer": index % 4} for index, item in enumerate(ITEMS)]


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def task_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("wmdp") / "wmdp-bio.jsonl"
    path.write_text("".join(json.dumps(item) + "\n" for item in ITEMS))
    return path


def _grin(model):
    config = GrinConfig(target_modules="all-linear", density=0.05, score="random", seed=0, noise_std=1.0)
    return get_peft_model(model, config)


@pytest.fixture(scope="module")
def trained(tokenizer):
    """A tiny Llama taught the letters of four of the items in lm-eval's layout, so its choices differ by item."""
    net = make_model(len(tokenizer), seed=3)
    fmt = QAFormat(tokenizer, template="{question}{answer}", chat=False, add_eos=False)
    examples = [
        fmt.encode(M.mcq_prompt(i["question"], i["choices"], "biology"), " " + "ABCD"[i["answer"]], end=False)
        for i in ITEMS[:4]
    ]
    batch = QACollator.from_tokenizer(fmt)(examples)
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2)
    for _ in range(30):
        net(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return net.eval()


@pytest.mark.parametrize("variant", ["base", "grin", "merged"])
def test_letter_scorer_agrees_with_lm_eval_acc(variant, trained, tokenizer, task_file):
    model = copy.deepcopy(trained)
    if variant != "base":
        model = _grin(model)
    if variant == "merged":
        model = model.merge_and_unload()
    result = M.lm_eval(model, tokenizer, [str(task_file)], log_samples=True)
    samples = sorted(result["samples"]["local_wmdp_bio"], key=lambda s: s["doc_id"])
    theirs = [[resp[0][0] for resp in sample["resps"]] for sample in samples]
    ours = M.multiple_choice_accuracy(model, tokenizer, ITEMS, scoring="letter", subject="biology", progress=False)
    assert ours["choice_scores"] == [pytest.approx(row, abs=1e-4) for row in theirs]
    assert ours["correct"] == [bool(sample["acc"]) for sample in samples]
    assert ours["accuracy"] == pytest.approx(result["results"]["local_wmdp_bio"]["acc,none"])
    assert len(set(ours["predictions"])) > 1  # the check compares real choices, not one constant answer


def test_lm_eval_sees_the_adapter(tokenizer, task_file):
    """The GRIN adapter changes lm-eval's log-likelihoods, and disabling it gives the base model's back."""
    base = make_model(len(tokenizer), seed=3)
    plain = M.lm_eval(base, tokenizer, str(task_file), log_samples=True)["samples"]["local_wmdp_bio"]
    peft_model = _grin(base)
    adapted = M.lm_eval(peft_model, tokenizer, str(task_file), log_samples=True)["samples"]["local_wmdp_bio"]
    with peft_model.disable_adapter():
        disabled = M.lm_eval(peft_model, tokenizer, str(task_file), log_samples=True)["samples"]["local_wmdp_bio"]

    def lls(samples):
        return [resp[0][0] for s in sorted(samples, key=lambda s: s["doc_id"]) for resp in s["resps"]]

    assert lls(disabled) == pytest.approx(lls(plain), abs=1e-5)
    assert lls(adapted) != pytest.approx(lls(plain), abs=1e-3)


def test_local_task_is_lm_evals_wmdp_layout(task_file, tmp_path):
    task = M.local_mcq_task(task_file)
    assert task["description"] == "The following are multiple choice questions (with answers) about biology.\n\n"
    assert task["doc_to_choice"] == ["A", "B", "C", "D"] and task["output_type"] == "multiple_choice"
    other = tmp_path / "mine.jsonl"
    other.write_text(task_file.read_text())
    assert M.local_mcq_task(other, subject="anatomy")["description"].endswith("about anatomy.\n\n")
    assert M.local_mcq_task(other)["description"] == ""


def test_lm_eval_input_errors(tokenizer, tmp_path):
    model = make_model(len(tokenizer))
    with pytest.raises(GrinError, match="does not exist"):
        M.lm_eval(model, tokenizer, [str(tmp_path / "missing.jsonl")])
    with pytest.raises(GrinError, match="at least one task"):
        M.lm_eval(model, tokenizer, " , ")
    with pytest.raises(GrinError, match="could not run"):
        M.lm_eval(model, tokenizer, ["no_such_task_anywhere"])
