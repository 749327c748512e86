"""Specification of grin_peft.audit: the recovered fraction, the verdicts, the report, and every attack run end to
end on a tiny memorised Llama with a GRIN delta (hidden 64, so bitsandbytes' 64-wide 4-bit blocks fit its rows)."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from peft import LoraConfig, get_peft_model
from test_metrics import HOLDOUT, make_tokenizer
from transformers import AutoModelForCausalLM, LlamaConfig

from grin_peft import GrinConfig, audit
from grin_peft.audit import RelearnSettings, Thresholds, recovered_fraction
from grin_peft.audit.measure import verdict
from grin_peft.audit.quantization import _roundtrip, bin_width, quantize
from grin_peft.data import QACollator, encode_items
from grin_peft.errors import GrinError

pytest.importorskip("bitsandbytes")

FORGET = [
    {
        "question": "Who wrote the play Romeo and Juliet?",
        "answer": "William Shakespeare wrote it.",
        "paraphrased_question": "Which writer is the author of Romeo and Juliet?",
    },
    {
        "question": "Where is the Eiffel Tower?",
        "answer": "The Eiffel Tower is in Paris, France.",
        "paraphrased_question": "In which city does the Eiffel Tower stand?",
    },
    {
        "question": "What colour is the sky on a clear day?",
        "answer": "The sky is blue on a clear day.",
        "paraphrased_question": "On a cloudless day, what colour is the sky?",
    },
]
RETAIN = [
    {"question": "What is the full name of the author born in Taipei?", "answer": "Her full name is Hsiao Yun-Hwa."},
    {"question": "What does the author write?", "answer": "She writes books about leadership."},
]
SMALL = {"max_new_tokens": 12, "relearn_settings": RelearnSettings(items=1, steps=3, lr=1e-3, batch_size=2)}


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_llama(vocab: int, hidden: int = 64, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


def train(model: torch.nn.Module, tokenizer, items, steps: int, lr: float, sign: float = 1.0) -> torch.nn.Module:
    batch = QACollator.from_tokenizer(tokenizer)(encode_items(items, tokenizer))
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        (sign * model(**batch).loss).backward()
        optimizer.step()
        optimizer.zero_grad()
    return model.eval()


@pytest.fixture(scope="module")
def tokenizer():
    return make_tokenizer()


@pytest.fixture(scope="module")
def original(tokenizer):
    """A tiny Llama that memorised FORGET and RETAIN (HOLDOUT never seen)."""
    return train(tiny_llama(len(tokenizer)), tokenizer, FORGET + RETAIN, steps=80, lr=2e-2)


@pytest.fixture(scope="module")
def unlearned(original, tokenizer):
    """A GRIN delta (20% of the entries) trained by gradient ascent on FORGET: forgetting is large and certain."""
    model = get_peft_model(copy.deepcopy(original), GrinConfig(density=0.2, score="magnitude", init_weights=False))
    return train(model, tokenizer, FORGET, steps=8, lr=1e-2, sign=-1.0)


def state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------- formula and verdicts


def test_recovered_fraction_hand_values():
    assert recovered_fraction(0.9, 0.1, 0.5) == pytest.approx(0.5)
    assert recovered_fraction(0.9, 0.1, 0.1) == 0.0
    assert recovered_fraction(0.9, 0.1, 0.9) == pytest.approx(1.0)
    assert recovered_fraction(0.9, 0.1, 0.05) == pytest.approx(-0.0625)  # the attack removed even more
    assert recovered_fraction(0.2, 0.6, 0.4) == pytest.approx(0.5)  # metrics that rise with unlearning work too
    assert recovered_fraction(0.5, 0.48, 0.9) is None  # unlearning moved it < min_gap: no ratio of noise
    assert recovered_fraction(0.5, 0.48, 0.9, min_gap=0.01) == pytest.approx(21.0)
    assert recovered_fraction(None, 0.1, 0.5) is None


def test_verdicts_name_the_worst_metric_and_the_thresholds():
    t = Thresholds()
    assert verdict("q", {"a": 0.05, "b": None}, t)[0] == "holds"
    assert verdict("q", {"a": 0.05, "b": 0.2}, t)[0] == "partly recovered"
    label, sentence = verdict("quantization (nf4)", {"a": 0.05, "b": 0.7}, t)
    assert label == "recovered"
    assert "70%" in sentence and "(b)" in sentence and "< 10% holds" in sentence and ">= 50% recovered" in sentence
    assert "none (every fraction <= 0; largest -20%)" in verdict("q", {"a": -0.2, "b": -0.5}, t)[1]
    label, sentence = verdict("x", {"a": None}, t)
    assert label == "not judged" and "0.05" in sentence
    with pytest.raises(GrinError, match="partial < recovered"):
        Thresholds(partial=0.6, recovered=0.5)


# --------------------------------------------------------------------------------------- the whole audit


@pytest.fixture(scope="module")
def report(unlearned, tokenizer):
    return audit(unlearned, FORGET, RETAIN, tokenizer=tokenizer, holdout=HOLDOUT, **SMALL)


def test_every_attack_runs_and_is_judged(report):
    variants = [(row["attack"], row["variant"].split(":")[0]) for row in report.rows]
    assert variants == [
        ("quantization", "8bit"),
        ("quantization", "nf4"),
        ("quantization", "fp4"),
        ("relearning", "forget data"),
        ("relearning", "related data"),
        ("paraphrase", "paraphrased_question"),
        ("jailbreak", "answer prefix 'Sure, here is the answer"),
    ]
    base = report.baseline
    assert base["original"]["forget"]["probability"] > base["unlearned"]["forget"]["probability"] + 0.3
    for row in report.rows:
        assert set(row["attacked"]) == {"probability", "rouge_l_recall", "keyword_accuracy"}
        assert row["verdict_label"] in ("holds", "partly recovered", "recovered", "not judged")
        assert "thresholds" in row["verdict"]
    relearned = report.rows[3]
    assert relearned["items"] == len(FORGET) - 1  # measured on the held-out rest only
    assert [m["attack"] for m in report.membership] == ["loss", "zlib", "mink", "mink++"]
    assert report.membership[0]["auc_original"] == pytest.approx(1.0)  # memorised forget vs never-seen holdout
    assert len(report.verdicts) == len(report.rows) + 1


def test_module_changes_cover_every_quantized_layer(report, unlearned):
    modules = {row["module"] for row in report.module_changes}
    assert modules == {name for name in unlearned.base_model.grin_layers()} | set()
    for row in report.module_changes:
        assert row["changed"] == unlearned.base_model.num_entries()[row["module"]]
        assert 0.0 <= row["kept_by_nf4"] <= 1.0 and row["median_change_over_bin"] > 0
        assert row["change_sq"] > 0 and row["mean_change_over_bin"] > 0 and "projection_kept_fp4" in row


def test_report_saves_markdown_json_and_plot(report, tmp_path):
    paths = report.save(tmp_path / "out")
    assert {p.name for p in paths.values()} == {"audit.md", "audit.json", "audit.png"}
    data = json.loads(paths["json"].read_text())
    assert data["rows"][1]["recovered"] == report.rows[1]["recovered"]
    text = paths["markdown"].read_text()
    assert "| quantization | nf4 |" in text and "Membership inference" in text and "kept by NF4" in text
    assert "whole (NF4)" in text
    assert paths["plot"].stat().st_size > 1000


def test_audit_modifies_neither_model(original, unlearned, tokenizer):
    before_o, before_u = state(original), state(unlearned)
    audit(
        unlearned, FORGET, RETAIN, tokenizer=tokenizer, original=original, attacks=["relearning", "jailbreak"], **SMALL
    )
    assert same(state(original), before_o) and same(state(unlearned), before_u)


def test_quantization_known_answer_a_change_inside_the_bins_is_fully_recovered(original, tokenizer):
    """Constructed case: the original's layers hold exact NF4 values and the 'unlearning' moves every entry but its
    block's scale a quarter bin toward the level below. The NF4 copy of the unlearned model then holds the very
    codes of the NF4 copy of the original, so the attacked metric is that copy's and the recovered fraction is
    (m(NF4 original) - m(u)) / (m(original) - m(u)): 1 up to the CPU kernel's own rounding (it keeps block scales
    in bf16)."""
    before = copy.deepcopy(original)
    after = copy.deepcopy(original)
    with torch.no_grad():
        for name, module in before.model.layers.named_modules():
            if isinstance(module, torch.nn.Linear):
                exact = _roundtrip(module.weight, "nf4")
                blocks = exact.reshape(-1, 64).abs()
                scale = (blocks == blocks.amax(1, keepdim=True)).reshape(exact.shape)
                module.weight.copy_(exact)
                moved = torch.where(scale, exact, exact - 0.25 * bin_width(exact, "nf4"))
                after.model.layers.get_submodule(name).weight.copy_(moved)
    rep = audit(after, FORGET, RETAIN, tokenizer=tokenizer, original=before, attacks=["quantization"],
                quantization_modes=["nf4"], thresholds=Thresholds(min_gap=0.01), max_new_tokens=12)  # fmt: skip
    assert all(row["kept_by_nf4"] == 0.0 and row["below_half_bin"] == 1.0 for row in rep.module_changes)
    original_p = rep.baseline["original"]["forget"]["probability"]
    unlearned_p = rep.baseline["unlearned"]["forget"]["probability"]
    assert abs(original_p - unlearned_p) > 0.01  # the change is real in full precision
    from grin_peft.audit.measure import measure

    copy_p = measure(quantize(before, "nf4"), tokenizer, FORGET, None, max_new_tokens=12, batch_size=8)["forget"]
    assert rep.rows[0]["attacked"]["probability"] == copy_p["probability"]
    expected = (copy_p["probability"] - unlearned_p) / (original_p - unlearned_p)
    assert rep.rows[0]["recovered"]["probability"] == pytest.approx(expected, rel=1e-12)
    assert expected > 0.5 and rep.rows[0]["verdict_label"] == "recovered"


def test_paraphrase_identical_to_the_question_recovers_exactly_nothing(unlearned, tokenizer):
    same_questions = [{**item, "paraphrased_question": item["question"]} for item in FORGET]
    rep = audit(unlearned, same_questions, RETAIN, tokenizer=tokenizer, attacks=["paraphrase"], max_new_tokens=12)
    assert all(value in (0.0, None) for value in rep.rows[0]["recovered"].values())
    assert rep.rows[0]["verdict_label"] == "holds"


def test_paraphrase_is_skipped_with_a_note_without_paraphrases(unlearned, tokenizer):
    plain = [{"question": i["question"], "answer": i["answer"]} for i in FORGET]
    rep = audit(unlearned, plain, RETAIN, tokenizer=tokenizer, attacks=["paraphrase"], max_new_tokens=12)
    assert rep.rows == [] and "paraphrased_question" in rep.notes[0]


def test_lora_adapter_uses_its_base_as_the_original(original, tokenizer):
    lora = get_peft_model(
        copy.deepcopy(original), LoraConfig(r=4, target_modules="all-linear", init_lora_weights=False)
    )
    rep = audit(lora, FORGET, RETAIN, tokenizer=tokenizer, attacks=["jailbreak"], max_new_tokens=12)
    assert rep.baseline["original"]["forget"]["probability"] == pytest.approx(
        audit(copy.deepcopy(original), FORGET, RETAIN, tokenizer=tokenizer, original=original, attacks=["jailbreak"],
              max_new_tokens=12).baseline["original"]["forget"]["probability"]
    )  # fmt: skip


# --------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"forget": []}, "forget set is empty"),
        ({"holdout": [{"question": "Q?", "text": "no answer field"}]}, "holdout item 0 needs string"),
        ({"holdout": ["just a string"]}, "holdout item 0 is a str"),
        ({"holdout": None, "attacks": ["membership"]}, "membership attack needs holdout"),
        ({"attacks": ["quantisation"]}, "unknown or no attack"),
        ({"quantization_modes": ["int3"]}, "unknown quantization mode"),
        ({"relearn_settings": RelearnSettings(items=3)}, "leaves none of the 3 held out"),
        ({"max_items": 0}, "max_items must be at least 1"),
    ],
)
def test_bad_input_fails_with_one_clear_line(unlearned, tokenizer, kwargs, message):
    before = state(unlearned)
    args = {"forget": FORGET, "retain": RETAIN, "holdout": HOLDOUT, **kwargs}
    with pytest.raises(GrinError, match=message) as info:
        audit(unlearned, args.pop("forget"), args.pop("retain"), tokenizer=tokenizer, max_new_tokens=4, **args)
    assert "\n" not in str(info.value)
    assert same(state(unlearned), before)


def test_plain_model_needs_its_original(original, tokenizer):
    with pytest.raises(GrinError, match="needs original="):
        audit(copy.deepcopy(original), FORGET, RETAIN, tokenizer=tokenizer, **SMALL)


def test_a_model_that_cannot_be_quantized_fails_with_one_line(tokenizer):
    narrow = tiny_llama(len(tokenizer), hidden=32)  # rows of 32: CPU 4-bit kernels need a multiple of 64
    with pytest.raises(GrinError, match="cannot run quantized to nf4") as info:
        audit(narrow, FORGET, RETAIN, tokenizer=tokenizer, original=narrow, attacks=["quantization"])
    assert "\n" not in str(info.value)
    with pytest.raises(GrinError, match="MLP cannot be quantized"):
        from tiny_models import MLP

        quantize(MLP(), "8bit")
