"""Specification of grin_peft.metrics: hand-computed values for the formulas, a tiny Llama for the model passes."""

from __future__ import annotations

import math
import zlib

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

from grin_peft import metrics as M
from grin_peft.data import IGNORE_INDEX, QACollator, QAFormat, encode_items
from grin_peft.errors import GrinError

FORGET = [
    {"question": "Who wrote the play Romeo and Juliet?", "answer": "William Shakespeare wrote it."},
    {"question": "Where is the Eiffel Tower?", "answer": "The Eiffel Tower is in Paris, France."},
]
RETAIN = [
    {"question": "What is the full name of the author born in Taipei?", "answer": "Her full name is Hsiao Yun-Hwa."},
    {"question": "What does the author write?", "answer": "She writes books about leadership."},
]
HOLDOUT = [
    {"question": "Which river flows through Paris?", "answer": "The Seine flows through Paris."},
    {"question": "Who painted the Mona Lisa?", "answer": "Leonardo da Vinci painted it."},
]
CORPUS = [f"Question: {item['question']}\nAnswer: {item['answer']}" for item in FORGET + RETAIN + HOLDOUT]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained in milliseconds on the items above, with pad and EOS tokens."""
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
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="</s>", pad_token="<pad>")


def make_model(vocab_size: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.fixture(scope="module", autouse=True)
def single_thread():
    """One intra-op thread: this tiny model's ops are too small to share, and two threads on a busy 2-core machine
    run about ten times slower than one."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tokenizer() -> PreTrainedTokenizerFast:
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer) -> torch.nn.Module:
    """An untrained tiny Llama: enough for checks that compare batched code against manual computation."""
    return make_model(len(tokenizer))


@pytest.fixture(scope="module")
def trained(tokenizer) -> torch.nn.Module:
    """A tiny Llama that has memorised FORGET and RETAIN (but not HOLDOUT), in about two seconds."""
    net = make_model(len(tokenizer), seed=1)
    batch = QACollator.from_tokenizer(tokenizer)(encode_items(FORGET + RETAIN, tokenizer))
    optimizer = torch.optim.AdamW(net.parameters(), lr=2e-2)
    net.train()
    for _ in range(60):
        net(**batch).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    return net.eval()


# -------------------------------------------------------------------------------------------------- strings


def test_rouge_tokenize_is_rouge_scores_tokenizer():
    assert M.rouge_tokenize("The Cat-sat, on 2 MATS!") == ["the", "cat", "sat", "on", "2", "mats"]
    assert M.rouge_tokenize("Skármeta") == ["sk", "rmeta"]  # rouge_score drops non-ASCII letters too
    assert M.rouge_tokenize("running dogs", stem=True) == ["run", "dog"]  # Porter, on tokens of 4+ characters


def test_rouge_l_recall_hand_values():
    # rouge_score's README example: LCS "the quick brown jumps the" = 5 of the reference's 9 tokens.
    reference = "The quick brown fox jumps over the lazy dog"
    prediction = "The quick brown dog jumps on the log."
    assert M.rouge_l_recall(prediction, reference) == pytest.approx(5 / 9)
    assert M.rouge_l_recall(reference, prediction) == pytest.approx(5 / 8)
    assert M.rouge_l_recall("PARIS, france", "Paris France") == 1.0
    assert M.rouge_l_recall("", "Paris") == 0.0 and M.rouge_l_recall("Paris", "...") == 0.0
    assert M.rouge_l_recall("b a", "a b c") == pytest.approx(1 / 3)


def test_rouge_l_recall_stems_like_open_unlearning():
    # The example: stemmed, every reference token is matched; unstemmed (opt-in), none is.
    assert M.rouge_l_recall("study showed connected", "Studies show connections") == 1.0
    assert M.rouge_l_recall("study showed connected", "Studies show connections", stem=False) == 0.0


def test_keywords_drop_stopwords_and_question_words():
    question = "What is the full name of the author born in Taipei?"
    assert M.extract_keywords("The author's full name is Hsiao Yun-Hwa.", question) == ["hsiao", "yun", "hwa"]
    # Fallbacks: content words even if the question has them, then every token.
    assert M.extract_keywords("The author.", "Who is the author?") == ["author"]
    assert M.extract_keywords("It is.", "Is it?") == ["it", "is"]
    assert M.extract_keywords("Paris, Paris!") == ["paris"]


def test_keyword_accuracy():
    assert M.keyword_accuracy("Her name is Hsiao Wang.", ["hsiao", "yun", "hwa"]) == pytest.approx(1 / 3)
    assert M.keyword_accuracy("It was hsiao YUN-HWA", ["Hsiao Yun-Hwa"]) == 1.0
    assert M.keyword_accuracy("nothing", ["Paris"]) == 0.0
    assert M.keyword_accuracy("text", ["...", "!"]) is None  # no keyword token: undefined, not an error


def test_refusal_keyword_scorer():
    assert M.refusal_keyword_scorer("p", "I\u2019m sorry, but I can't help with that.") == 0.0
    assert M.refusal_keyword_scorer("p", "  ") == 0.0
    assert M.refusal_keyword_scorer("p", "Sure, first you need to ...") == 1.0


# -------------------------------------------------------------------------------------------------- numbers


def test_harmonic_mean():
    assert M.harmonic_mean([1.0, 0.5, 0.25]) == pytest.approx(3 / 7)
    assert M.harmonic_mean([0.9, 0.0, 0.8]) == 0.0
    with pytest.raises(GrinError, match="non-negative"):
        M.harmonic_mean([0.5, -0.1])
    with pytest.raises(GrinError, match="empty"):
        M.harmonic_mean([])


def test_forget_quality_is_the_ks_p_value():
    # Exact two-sided KS test, n = m = 3, D = 1: p = 2 / C(6, 3) = 0.1.
    assert M.forget_quality([1.0, 2.0, 3.0], [4.0, 5.0, 6.0]) == pytest.approx(0.1)
    assert M.forget_quality([0.3, 0.5, 0.9], [0.3, 0.5, 0.9]) == pytest.approx(1.0)
    with pytest.raises(GrinError, match="NaN"):
        M.forget_quality([float("nan")], [1.0])


def test_roc_auc_known_cases():
    assert M.roc_auc([3.0, 4.0], [1.0, 2.0]) == 1.0
    assert M.roc_auc([1.0, 2.0], [3.0, 4.0]) == 0.0
    assert M.roc_auc([1.0, 1.0, 1.0], [1.0, 1.0]) == 0.5
    # Pairs: (0.5 vs 0.5) tie = 1/2, the other three pairs won: 3.5 / 4.
    assert M.roc_auc([0.5, 0.8], [0.5, 0.2]) == pytest.approx(0.875)
    # Forget losses below every holdout loss: fully identifiable, AUC 1 in open-unlearning's convention.
    assert M.mia_auc(forget_scores=[0.1, 0.2], holdout_scores=[2.0, 3.0]) == 1.0


def test_privleak():
    assert M.privleak(0.9) == pytest.approx(-80.0)
    assert M.privleak(0.5) == pytest.approx(0.0)
    assert M.privleak(0.3, reference_auc=0.4) == pytest.approx((0.7 - 0.6) / 0.6 * 100)
    assert M.privleak(0.5, reference_auc=1.0) == pytest.approx(0.5 / 1e-10 * 100)  # open-unlearning's 1e-10 guard
    with pytest.raises(GrinError, match="AUC"):
        M.privleak(1.5)


def test_truth_ratio_formulas():
    # P_correct = 0.5; perturbed 0.25 and 0.0625 have geometric mean 0.125; TR = 0.125 / 0.5.
    correct, wrong = -math.log(0.5), [-math.log(0.25), -math.log(0.0625)]
    assert M.truth_ratios([correct], [wrong]) == [pytest.approx(0.25)]
    assert M.aggregate_truth_ratio([0.5, 2.0, 1.0], "forget") == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert M.aggregate_truth_ratio([0.5, 2.0, 1.0], "retain") == pytest.approx((0.5 + 0 + 0) / 3)
    assert M.normalized_probability(-math.log(0.5), [-math.log(0.25)] * 2) == pytest.approx(0.5)
    with pytest.raises(GrinError, match="form"):
        M.aggregate_truth_ratio([1.0], "neither")
    with pytest.raises(GrinError, match="no perturbed"):
        M.truth_ratios([0.1], [[]])


def test_ratios_give_open_unlearnings_number_where_probabilities_underflow():
    # exp(-800) underflows to 0: open-unlearning's 1e-10 guards turn that into numbers, not errors.
    assert M.truth_ratios([800.0], [[1.0] * 5]) == [pytest.approx(math.exp(-1) / 1e-10)]
    assert M.normalized_probability(800.0, [800.0, 900.0, 750.0]) == 0.0
    assert M.aggregate_truth_ratio([0.0, 1.0], "forget") == pytest.approx(0.5)
    assert M.aggregate_truth_ratio([0.0, 1e300], "forget") == pytest.approx(0.0)


def test_mia_scores_on_hand_built_vectors():
    logprobs = torch.tensor([-1.0, -2.0, -3.0, -4.0, -5.0])
    assert M.mink_score(logprobs, k=0.4) == pytest.approx(4.5)  # mean NLL of the 2 least likely tokens
    assert M.mink_score(logprobs, k=0.1) == pytest.approx(5.0)  # never fewer than one token
    assert M.mink_score(logprobs, k=1.0) == pytest.approx(3.0)
    assert M.mink_score(torch.tensor([]), k=0.4) == 0.0  # no tokens: open-unlearning's 0
    with pytest.raises(GrinError, match="k"):
        M.mink_score(logprobs, k=0.0)
    # z = [(-1 + 1.5) / 0.5, (-2 + 1.5) / 1] = [1, -0.5]; the lowest one is -0.5.
    z_score = M.mink_plus_plus_score(
        torch.tensor([-1.0, -2.0]), torch.tensor([-1.5, -1.5]), torch.tensor([0.25, 1.0]), k=0.5
    )
    assert z_score == pytest.approx(0.5)
    assert M.zlib_score(2.0, "abc") == pytest.approx(2.0 / len(zlib.compress(b"abc")))


def test_exact_memorization_and_extraction_strength():
    hits = torch.tensor([True, False, True, True])
    assert M.exact_memorization(hits) == 0.75
    assert M.extraction_strength(hits) == 0.5  # teacher-forcing 2 tokens makes the rest come out
    assert M.extraction_strength(torch.tensor([True, True, True])) == 1.0
    assert M.extraction_strength(torch.tensor([False, True, True])) == pytest.approx(2 / 3)
    # No prefix makes the rest come out: open-unlearning's loop stops at k = n - 1, so 1/n rather than 0.
    assert M.extraction_strength(torch.tensor([True, True, False])) == pytest.approx(1 / 3)
    assert M.extraction_strength(torch.tensor([], dtype=torch.bool)) == 0.0
    assert M.exact_memorization(torch.tensor([], dtype=torch.bool)) is None


# -------------------------------------------------------------------------------------------- model passes


def _manual_answer_logprobs(model, tokenizer, question, answer):
    enc = QAFormat(tokenizer).encode(question, answer)
    ids, labels = torch.tensor([enc["input_ids"]]), torch.tensor(enc["labels"])
    with torch.no_grad():
        logp = torch.log_softmax(model(input_ids=ids).logits[0].float(), dim=-1)
    positions = [t for t in range(1, len(labels)) if labels[t] != IGNORE_INDEX]
    return torch.stack([logp[t - 1, labels[t]] for t in positions]), logp[[t - 1 for t in positions]]


def test_answer_nll_matches_manual_logits_in_mixed_length_batches(model, tokenizer):
    items = FORGET + RETAIN + HOLDOUT
    scores = M.score_answers(
        model,
        tokenizer,
        [i["question"] for i in items],
        [i["answer"] for i in items],
        batch_size=4,
        vocab_stats=True,
        progress=False,
    )
    for item, score in zip(items, scores):
        expected, logp = _manual_answer_logprobs(model, tokenizer, item["question"], item["answer"])
        torch.testing.assert_close(score.logprobs, expected, atol=1e-5, rtol=1e-5)
        assert score.nll == pytest.approx(-expected.mean().item(), abs=1e-5)
        assert score.probability == pytest.approx(math.exp(-score.nll))
        assert score.hits.tolist() == (logp.argmax(-1) == torch.tensor(score.token_ids)).tolist()
        p = logp.exp()
        torch.testing.assert_close(score.vocab_mean, (p * logp).sum(-1), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(
            score.vocab_var, (p * logp**2).sum(-1) - (p * logp).sum(-1) ** 2, atol=1e-4, rtol=1e-4
        )
        assert score.token_ids[-1] == tokenizer.eos_token_id


def test_scoring_restores_each_modules_mode(model, tokenizer):
    model.train()
    model.model.layers[0].eval()
    M.score_answers(model, tokenizer, ["q"], ["a"], progress=False)
    assert model.training and model.model.layers[1].training and not model.model.layers[0].training
    model.eval()


def test_model_truth_ratio_combines_answer_nlls(model, tokenizer):
    item = {
        "question": "Where is the Eiffel Tower?",
        "paraphrased_answer": "In Paris.",
        "perturbed_answer": ["In Rome.", "In Oslo."],
    }
    nll = {
        a: M.score_answers(model, tokenizer, [item["question"]], [a], progress=False)[0].nll
        for a in ("In Paris.", "In Rome.", "In Oslo.")
    }
    expected = math.exp(nll["In Paris."] - (nll["In Rome."] + nll["In Oslo."]) / 2)
    assert M.truth_ratio(model, tokenizer, [item], progress=False) == [pytest.approx(expected, rel=1e-4)]


def test_batched_left_padded_generation_equals_one_by_one(model, tokenizer):
    questions = [i["question"] for i in FORGET + HOLDOUT]
    batched = M.generate_answers(model, tokenizer, questions, max_new_tokens=6, batch_size=4, progress=False)
    single = [M.generate_answers(model, tokenizer, [q], max_new_tokens=6, progress=False)[0] for q in questions]
    assert batched == single
    with pytest.raises(GrinError, match="max_new_tokens"):
        M.generate_answers(model, tokenizer, questions, max_new_tokens=0)


def test_keyword_confidence_averages_keyword_token_probabilities(tokenizer):
    fmt = QAFormat(tokenizer)
    enc = fmt.encode("Where is the Eiffel Tower?", "Paris, France.")
    ids = [t for t in enc["labels"] if t != IGNORE_INDEX]
    # Sub-word pieces of a keyword all count: "France" is three tokens here.
    assert tokenizer.convert_ids_to_tokens(ids) == ["ĠParis", ",", "ĠFr", "an", "ce", ".", "</s>"]
    probs = torch.tensor([0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7])
    scores = M.AnswerScores(token_ids=ids, logprobs=probs.log(), hits=torch.ones(7, dtype=torch.bool))
    assert M.keyword_confidence(fmt, scores, ["france"]) == pytest.approx((0.3 + 0.4 + 0.5) / 3)
    assert M.keyword_confidence(fmt, scores, ["Paris France"]) == pytest.approx((0.1 + 0.3 + 0.4 + 0.5) / 4)
    assert M.keyword_confidence(fmt, scores, ["london"]) is None
    assert M.keyword_confidence(fmt, scores, ["..."]) is None


def test_keyword_tokens_stay_aligned_when_lowercasing_lengthens_the_text(tokenizer):
    # "İ".lower() is two characters; the keyword "paris" must still mark exactly the tokens spelling "Paris".
    fmt = QAFormat(tokenizer)
    ids = [t for t in fmt.encode("Where?", "İİİİ Paris is here.")["labels"] if t != IGNORE_INDEX]
    assert tokenizer.decode(ids[9]) == " Paris"  # after a leading space and eight byte pieces of "İİİİ"
    probs = torch.linspace(0.05, 0.95, len(ids))
    scores = M.AnswerScores(token_ids=ids, logprobs=probs.log(), hits=torch.ones(len(ids), dtype=torch.bool))
    assert M.keyword_confidence(fmt, scores, ["paris"]) == pytest.approx(probs[9].item())


def test_evaluate_qa_on_a_memorised_model(trained, tokenizer):
    trained.train()
    result = M.evaluate_qa(trained, tokenizer, FORGET, max_new_tokens=24, progress=False)
    assert trained.training
    trained.eval()
    assert result["generations"] == [item["answer"] for item in FORGET]  # stopped at EOS
    summary = result["summary"]
    for name in ("rouge_l_recall", "keyword_accuracy", "exact_memorization", "extraction_strength"):
        assert summary[name] == 1.0, name
    assert summary["probability"] > 0.9 and summary["keyword_confidence"] > 0.9
    assert summary["nll"] == pytest.approx(sum(result["per_item"]["nll"]) / 2)
    assert result["per_item"]["keywords"][1] == ["paris", "france"]
    assert "truth_ratio" not in summary


def _perturbed(items, paraphrase=True):
    out = []
    for item in items:
        extra = {"perturbed_answer": ["The answer is not known.", "Nobody knows it."]}
        if paraphrase:
            extra["paraphrased_answer"] = item["answer"].rstrip(".") + " indeed."
        out.append({**item, **extra})
    return out


def test_evaluate_tofu_table(trained, tokenizer):
    splits = {
        "forget": _perturbed(FORGET),
        "retain": _perturbed(RETAIN),
        "real_authors": _perturbed(HOLDOUT, paraphrase=False),
        "world_facts": _perturbed(RETAIN[:1], paraphrase=False),
        "holdout": HOLDOUT,
    }
    result = M.evaluate_tofu(trained, tokenizer, splits, [0.9, 1.1, 1.0], max_new_tokens=24, progress=False)
    summary = result["summary"]
    assert summary["model_utility"] == pytest.approx(M.harmonic_mean([summary[k] for k in M.MODEL_UTILITY_KEYS]))
    forget_ratios = result["per_item"]["forget"]["truth_ratio"]
    assert forget_ratios == pytest.approx(
        M.truth_ratio(trained, tokenizer, splits["forget"], progress=False), rel=1e-4
    )
    assert summary["forget_truth_ratio"] == pytest.approx(M.aggregate_truth_ratio(forget_ratios, "forget"))
    assert summary["forget_quality"] == pytest.approx(M.forget_quality(forget_ratios, [0.9, 1.1, 1.0]))
    assert summary["forget_rouge_l_recall"] == 1.0 and summary["retain_rouge_l_recall"] == 1.0
    # Memorised forget answers versus never-seen holdout answers: every attack separates them.
    assert summary["mia_loss_auc"] == 1.0 and summary["privleak_loss"] == pytest.approx(-100.0)
    assert set(result["generations"]) == {"forget", "retain", "real_authors", "world_facts"}
    with pytest.raises(GrinError, match="Unknown TOFU split"):
        M.evaluate_tofu(trained, tokenizer, {"forgot": FORGET})


def test_evaluate_mia_reuses_scores_and_reference(trained, tokenizer):
    result = M.evaluate_mia(trained, tokenizer, FORGET, HOLDOUT, reference_auc={"loss": 0.6}, progress=False)
    assert set(result["auc"]) == set(M.MIA_ATTACKS)
    assert result["privleak"]["loss"] == pytest.approx(M.privleak(result["auc"]["loss"], 0.6))
    assert result["privleak"]["zlib"] == pytest.approx(M.privleak(result["auc"]["zlib"], 0.5))
    assert result["scores"]["forget"]["loss"] == pytest.approx(
        [
            s.nll
            for s in M.score_answers(
                trained, tokenizer, [i["question"] for i in FORGET], [i["answer"] for i in FORGET], progress=False
            )
        ]
    )


def test_multiple_choice_accuracy(trained, tokenizer):
    items = [
        {
            "question": FORGET[1]["question"],
            "choices": ["Berlin, Germany.", FORGET[1]["answer"], "Rome."],
            "answer": 1,
        },
        {"question": FORGET[0]["question"], "choices": [FORGET[0]["answer"], "Mark Twain."], "answer": 0},
    ]
    result = M.multiple_choice_accuracy(trained, tokenizer, items, progress=False)
    assert result["predictions"] == [1, 0] and result["accuracy"] == 1.0
    manual = M.score_answers(
        trained, tokenizer, [items[0]["question"]] * 3, items[0]["choices"], end=False, progress=False
    )
    assert result["choice_scores"][0] == pytest.approx([s.logprobs.mean().item() for s in manual], abs=1e-5)
    letters = M.multiple_choice_accuracy(trained, tokenizer, items, scoring="letter", progress=False)
    assert len(letters["predictions"]) == 2 and [len(row) for row in letters["choice_scores"]] == [3, 2]
    with pytest.raises(GrinError, match="answer index"):
        M.multiple_choice_accuracy(trained, tokenizer, [{**items[1], "answer": 5}], progress=False)


def test_evaluate_pku_with_a_pluggable_scorer(trained, tokenizer):
    items = [{"prompt": i["question"], "response": i["answer"]} for i in FORGET]
    result = M.evaluate_pku(
        trained, tokenizer, items, scorer=lambda p, r: float("Paris" in r), max_new_tokens=24, progress=False
    )
    assert result["per_item"]["harm_score"] == [0.0, 1.0] and result["summary"]["harm_score"] == 0.5
    assert result["summary"]["probability"] > 0.9
    quiet = M.evaluate_pku(trained, tokenizer, items, scorer=None, progress=False)
    assert quiet["generations"] == [] and set(quiet["summary"]) == {"nll", "probability"}


def test_input_errors(model, tokenizer):
    with pytest.raises(GrinError, match="2 questions but 1 answers"):
        M.score_answers(model, tokenizer, ["a", "b"], ["c"])
    with pytest.raises(GrinError, match="lacks field"):
        M.evaluate_qa(model, tokenizer, [{"question": "q"}], progress=False)
    with pytest.raises(GrinError, match="no items"):
        M.evaluate_qa(model, tokenizer, [], progress=False)
    with pytest.raises(GrinError, match="batch_size"):
        M.score_answers(model, tokenizer, ["a"], ["b"], batch_size=0)


def test_answer_nll_and_probability_helpers(model, tokenizer):
    nll = M.answer_nll(model, tokenizer, FORGET, progress=False)
    expected = [
        -_manual_answer_logprobs(model, tokenizer, i["question"], i["answer"])[0].mean().item() for i in FORGET
    ]
    assert nll == pytest.approx(expected, abs=1e-5)
    assert M.answer_probability(model, tokenizer, FORGET, progress=False) == pytest.approx([math.exp(-x) for x in nll])
