"""Specification of the unlearning objectives, checked against hand computations on tiny logits.

Expected values are computed with ``math`` on explicit numbers, never through the torch code under test, so a wrong
shift, mask, sign or reduction shows up as a numeric mismatch. The hand data and helpers come from test_losses.
"""

import math

import pytest
import torch
from test_losses import (
    F_MEAN,
    F_NLL,
    F_SUM,
    F_TOKEN_MEAN,
    FORGET_LABELS,
    FORGET_LOGITS,
    R_NLL,
    R_TOKEN_MEAN,
    RETAIN_LABELS,
    RETAIN_LOGITS,
    labels,
    log_softmax,
    tensor,
)

from grin_peft.errors import GrinError
from grin_peft.losses import batch_nll, sequence_nll
from grin_peft.objectives import (
    IHL,
    NPO,
    OBJECTIVES,
    GradAscent,
    GradDiff,
    IdkDPO,
    IdkNLL,
    ObjectiveInputs,
    SimNPO,
    get_objective,
)


def log_sigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


def forget_inputs(**extra: torch.Tensor) -> ObjectiveInputs:
    return ObjectiveInputs(forget_logits=tensor(FORGET_LOGITS), forget_labels=labels(FORGET_LABELS), **extra)


def with_retain(inputs: ObjectiveInputs) -> ObjectiveInputs:
    inputs.retain_logits = tensor(RETAIN_LOGITS)
    inputs.retain_labels = labels(RETAIN_LABELS)
    return inputs


# ---------------------------------------------------------------- objectives against hand computations


def test_grad_ascent():
    loss, logs = GradAscent(forget_weight=0.5).compute(forget_inputs())
    assert loss.item() == pytest.approx(-0.5 * F_TOKEN_MEAN, rel=1e-6)
    assert logs["forget_nll"] == pytest.approx(F_TOKEN_MEAN, rel=1e-6)


def test_grad_diff():
    loss, logs = GradDiff(forget_weight=2.0, retain_weight=3.0).compute(with_retain(forget_inputs()))
    assert loss.item() == pytest.approx(-2.0 * F_TOKEN_MEAN + 3.0 * R_TOKEN_MEAN, rel=1e-6)
    assert logs["retain_nll"] == pytest.approx(R_TOKEN_MEAN, rel=1e-6)
    assert logs["loss"] == pytest.approx(loss.item())


def test_npo_matches_formula_with_sum_reduction():
    beta, ref = 0.5, [1.0, 4.0]
    npo = NPO(beta=beta, retain_weight=0.0)
    loss, logs = npo.compute(forget_inputs(ref_forget_nll=tensor(ref)))
    expected = -2 / beta * sum(log_sigmoid(beta * (s - r)) for s, r in zip(F_SUM, ref)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    assert logs["forget_log_ratio"] == pytest.approx(sum(s - r for s, r in zip(F_SUM, ref)) / 2, rel=1e-6)


def test_npo_mean_reduction_normalises_both_nlls_by_length():
    beta, ref = 2.0, [1.0, 4.0]  # summed reference NLLs, as the trainer passes them
    npo = NPO(beta=beta, retain_weight=0.0, nll_reduction="mean")
    loss, _ = npo.compute(forget_inputs(ref_forget_nll=tensor(ref)))
    lengths = [len(x) for x in F_NLL]
    expected = -2 / beta * sum(log_sigmoid(beta * (s - r) / n) for s, r, n in zip(F_SUM, ref, lengths)) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("beta", [0.1, 1.0, 3.0])
def test_npo_at_reference_is_two_over_beta_log_two(beta):
    ref = sequence_nll(tensor(FORGET_LOGITS), labels(FORGET_LABELS), reduction="sum")
    loss, _ = NPO(beta=beta, retain_weight=0.0).compute(forget_inputs(ref_forget_nll=ref))
    assert loss.item() == pytest.approx(2 / beta * math.log(2), rel=1e-6)


def test_npo_adds_retain_and_kl_terms():
    ref_nll = sequence_nll(tensor(FORGET_LOGITS), labels(FORGET_LABELS), reduction="sum")
    inputs = with_retain(forget_inputs(ref_forget_nll=ref_nll))
    inputs.ref_retain_logits = tensor(RETAIN_LOGITS)  # identical: KL 0
    loss, logs = NPO(retain_weight=0.5, kl_weight=3.0).compute(inputs)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2) + 0.5 * R_TOKEN_MEAN, rel=1e-6)
    assert logs["retain_kl"] == pytest.approx(0.0, abs=1e-7)


def test_simnpo_matches_formula():
    beta, margin = 4.5, 0.3
    loss, _ = SimNPO(beta=beta, margin=margin, forget_weight=1.0, retain_weight=0.0).compute(forget_inputs())
    expected = -2 / beta * sum(log_sigmoid(beta * (m - margin)) for m in F_MEAN) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_simnpo_defaults_follow_open_unlearning():
    simnpo = SimNPO()
    assert (simnpo.beta, simnpo.margin, simnpo.forget_weight, simnpo.retain_weight) == (4.5, 0.0, 0.125, 1.0)
    loss, logs = simnpo.compute(with_retain(forget_inputs()))
    forget = -2 / 4.5 * sum(log_sigmoid(4.5 * m) for m in F_MEAN) / 2
    assert logs["forget_term"] == pytest.approx(forget, rel=1e-6)
    assert loss.item() == pytest.approx(0.125 * forget + R_TOKEN_MEAN, rel=1e-6)


def test_idk_nll_uses_refusal_batch_not_forget_answers():
    # The retain batch stands in as "refusal" data here: any batch with answers will do.
    inputs = ObjectiveInputs(
        refusal_logits=tensor(RETAIN_LOGITS),
        refusal_labels=labels(RETAIN_LABELS),
        retain_logits=tensor(FORGET_LOGITS),
        retain_labels=labels(FORGET_LABELS),
    )
    loss, logs = IdkNLL(forget_weight=2.0, retain_weight=0.5).compute(inputs)
    assert loss.item() == pytest.approx(2.0 * R_TOKEN_MEAN + 0.5 * F_TOKEN_MEAN, rel=1e-6)
    assert logs["refusal_nll"] == pytest.approx(R_TOKEN_MEAN, rel=1e-6)


def dpo_inputs(ref_forget: list[float], ref_refusal: list[float]) -> ObjectiveInputs:
    # Refusal answers: the retain batch's logits and labels, padded to the forget batch's length.
    refusal_logits = torch.cat([tensor(RETAIN_LOGITS), torch.zeros(2, 1, 3)], dim=1)
    refusal_labels = torch.cat([labels(RETAIN_LABELS), torch.full((2, 1), -100)], dim=1)
    return forget_inputs(
        refusal_logits=refusal_logits,
        refusal_labels=refusal_labels,
        ref_forget_nll=tensor(ref_forget),
        ref_refusal_nll=tensor(ref_refusal),
    )


def test_idk_dpo_matches_formula():
    beta, ref_forget, ref_refusal = 0.5, [1.0, 2.0], [3.0, 0.5]
    loss, logs = IdkDPO(beta=beta, retain_weight=0.0).compute(dpo_inputs(ref_forget, ref_refusal))
    chosen = [sum(x) for x in R_NLL]
    terms = []
    for c, c_ref, r, r_ref in zip(chosen, ref_refusal, F_SUM, ref_forget):
        # log pi = -NLL: chosen log-ratio minus rejected log-ratio.
        terms.append(log_sigmoid(beta * ((-c + c_ref) - (-r + r_ref))))
    assert loss.item() == pytest.approx(-2 / beta * sum(terms) / 2, rel=1e-6)
    assert logs["forget_nll"] == pytest.approx(F_TOKEN_MEAN, rel=1e-6)


def test_idk_dpo_at_reference_is_two_over_beta_log_two():
    inputs = dpo_inputs([0.0, 0.0], [0.0, 0.0])
    inputs.ref_forget_nll = sequence_nll(inputs.forget_logits, inputs.forget_labels, reduction="sum")
    inputs.ref_refusal_nll = sequence_nll(inputs.refusal_logits, inputs.refusal_labels, reduction="sum")
    loss, logs = IdkDPO(beta=0.1, retain_weight=0.0).compute(inputs)
    assert loss.item() == pytest.approx(2 / 0.1 * math.log(2), rel=1e-6)
    assert logs["dpo_margin"] == pytest.approx(0.0, abs=1e-6)


def test_idk_dpo_rejects_unpaired_batches():
    inputs = dpo_inputs([1.0, 2.0], [1.0, 2.0])
    inputs.refusal_logits, inputs.refusal_labels = inputs.refusal_logits[:1], inputs.refusal_labels[:1]
    with pytest.raises(GrinError, match="pair row by row"):
        IdkDPO(retain_weight=0.0).compute(inputs)


# ---------------------------------------------------------------- inverted hinge loss


def token_hinges(logits: list, labels: list) -> list[list[float]]:
    """Per-example lists of 1 + p(true) - max p(other), softmax and causal shift done by hand."""
    out = []
    for rows, labs in zip(logits, labels):
        hinges = []
        for t in range(len(labs) - 1):
            if labs[t + 1] == -100:
                continue
            p = [math.exp(x) for x in log_softmax(rows[t])]
            true = labs[t + 1]
            hinges.append(1.0 + p[true] - max(q for v, q in enumerate(p) if v != true))
        out.append(hinges)
    return out


F_HINGE = token_hinges(FORGET_LOGITS, FORGET_LABELS)


def test_ihl_hand_values_are_as_intended():
    # Example 0, position 0: softmax of [1, 2, 0], true token 1 is the most likely, its rival token 0.
    z = math.e + math.e**2 + 1.0
    assert F_HINGE[0][0] == pytest.approx(1.0 + math.e**2 / z - math.e / z)
    # Example 1, position 2: logits [-1, 0, 1], true token 2 is the most likely, its rival token 1.
    z = math.exp(-1) + 1.0 + math.e
    assert F_HINGE[1][2] == pytest.approx(1.0 + math.e / z - 1.0 / z)


def test_ihl_is_the_token_mean_of_the_hinge_over_the_batch():
    loss, logs = IHL(retain_weight=0.0).compute(forget_inputs())
    assert loss.item() == pytest.approx(sum(map(sum, F_HINGE)) / 5, rel=1e-6)
    assert logs["forget_term"] == pytest.approx(loss.item())
    assert logs["forget_nll"] == pytest.approx(F_TOKEN_MEAN, rel=1e-6)


def test_ihl_examples_reduction_averages_each_example_first():
    loss, _ = IHL(retain_weight=0.0, reduction="examples").compute(forget_inputs())
    assert loss.item() == pytest.approx(sum(sum(h) / len(h) for h in F_HINGE) / 2, rel=1e-6)


def test_ihl_default_adds_the_retain_nll_with_weight_one():
    """The authors' TOFU loss: forget IHL + retain NLL."""
    objective = get_objective("ihl")
    assert (objective.forget_weight, objective.retain_weight, objective.kl_weight) == (1.0, 1.0, 0.0)
    assert objective.requirements.retain and not objective.requirements.reference_forget
    loss, logs = objective.compute(with_retain(forget_inputs()))
    assert loss.item() == pytest.approx(sum(map(sum, F_HINGE)) / 5 + R_TOKEN_MEAN, rel=1e-6)
    assert logs["retain_nll"] == pytest.approx(R_TOKEN_MEAN, rel=1e-6)


def test_ihl_is_one_for_a_tie_two_for_certainty_and_near_zero_once_the_rival_wins():
    labs = labels([[-100, 1]])
    tie = IHL(retain_weight=0.0).compute(
        ObjectiveInputs(forget_logits=tensor([[[0.0, 0.0, 0.0]] * 2]), forget_labels=labs)
    )
    assert tie[0].item() == pytest.approx(1.0)
    sure = tensor([[[0.0, 50.0, 0.0]] * 2])
    assert IHL(retain_weight=0.0).compute(ObjectiveInputs(forget_logits=sure, forget_labels=labs))[0].item() == (
        pytest.approx(2.0)
    )
    lost = tensor([[[50.0, 0.0, 0.0]] * 2])
    assert IHL(retain_weight=0.0).compute(ObjectiveInputs(forget_logits=lost, forget_labels=labs))[0].item() == (
        pytest.approx(0.0, abs=1e-6)
    )


def test_ihl_step_moves_probability_to_the_strongest_rival_only():
    """The gradient raises the rival's logit and lowers the true token's; the third token's logit is untouched."""
    logits = tensor([[[1.0, 2.0, 0.0], [0.0, 0.0, 0.0]]], requires_grad=True)
    IHL(retain_weight=0.0).compute(ObjectiveInputs(forget_logits=logits, forget_labels=labels([[-100, 1]])))[
        0
    ].backward()
    grad = logits.grad[0, 0]
    assert grad[1] > 0 > grad[0]  # true token 1 pushed down, rival 0 pulled up (gradient descent)
    # d/dz_2 (p_1 - p_0) = -p_2 p_1 + p_2 p_0 = p_2 (p_0 - p_1): only through the softmax normaliser
    z = math.e + math.e**2 + 1.0
    assert grad[2].item() == pytest.approx((1 / z) * (math.e / z - math.e**2 / z), rel=1e-5)
    assert torch.equal(logits.grad[0, 1], torch.zeros(3))  # the last position predicts nothing


def test_ihl_bf16_logits_are_upcast():
    bf16 = tensor(FORGET_LOGITS).to(torch.bfloat16)
    loss, _ = IHL(retain_weight=0.0).compute(ObjectiveInputs(forget_logits=bf16, forget_labels=labels(FORGET_LABELS)))
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(sum(map(sum, F_HINGE)) / 5, rel=1e-2)


def test_ihl_refuses_empty_examples_and_a_vocabulary_without_rivals():
    with pytest.raises(GrinError, match=r"examples \[0\]"):
        IHL(retain_weight=0.0, reduction="examples").compute(
            ObjectiveInputs(forget_logits=tensor(FORGET_LOGITS), forget_labels=labels([[-100] * 4, [-100, 0, 1, 2]]))
        )
    with pytest.raises(GrinError, match="no answer token"):
        IHL(retain_weight=0.0).compute(
            ObjectiveInputs(forget_logits=tensor(FORGET_LOGITS), forget_labels=labels([[-100] * 4] * 2))
        )
    with pytest.raises(GrinError, match="rival"):
        IHL(retain_weight=0.0).compute(
            ObjectiveInputs(forget_logits=tensor([[[0.0], [0.0]]]), forget_labels=labels([[-100, 0]]))
        )


# ---------------------------------------------------------------- gradient direction


def forget_answer_prob(logits: torch.Tensor) -> float:
    return (-batch_nll(logits, labels(FORGET_LABELS))).exp().item()


@pytest.mark.parametrize("name", ["grad_ascent", "grad_diff", "npo", "simnpo", "idk_dpo", "ihl"])
def test_one_sgd_step_lowers_forget_answer_probability(name):
    logits = tensor(FORGET_LOGITS, requires_grad=True)
    before = forget_answer_prob(logits.detach())
    inputs = dpo_inputs([0.0, 0.0], [0.0, 0.0])
    inputs.forget_logits = logits
    inputs.ref_forget_nll = sequence_nll(logits.detach(), inputs.forget_labels, reduction="sum")
    inputs.ref_refusal_nll = sequence_nll(inputs.refusal_logits, inputs.refusal_labels, reduction="sum")
    loss, _ = get_objective(name, retain_weight=0.0).compute(inputs)
    loss.backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    assert forget_answer_prob(logits.detach()) < before


def test_one_sgd_step_on_idk_nll_raises_refusal_probability():
    logits = tensor(RETAIN_LOGITS, requires_grad=True)
    inputs = ObjectiveInputs(refusal_logits=logits, refusal_labels=labels(RETAIN_LABELS))
    before = batch_nll(logits.detach(), labels(RETAIN_LABELS)).item()
    IdkNLL(retain_weight=0.0).compute(inputs)[0].backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    assert batch_nll(logits.detach(), labels(RETAIN_LABELS)).item() < before


# ---------------------------------------------------------------- requirements, registry, validation


def test_requirements_declare_only_what_is_read():
    ga = get_objective("grad_ascent").requirements
    assert (ga.forget, ga.retain, ga.refusal, ga.reference_forget, ga.reference_retain) == (
        True,
        False,
        False,
        False,
        False,
    )
    assert get_objective("grad_ascent", kl_weight=1.0).requirements.reference_retain
    assert get_objective("grad_diff").requirements.retain
    assert not get_objective("grad_diff", retain_weight=0.0).requirements.retain
    assert get_objective("npo").requirements.reference_forget
    assert not get_objective("simnpo").requirements.reference_forget
    idk = get_objective("idk_nll").requirements
    assert idk.refusal and not idk.forget and not idk.reference_refusal
    dpo = get_objective("idk_dpo").requirements
    assert dpo.forget and dpo.refusal and dpo.reference_forget and dpo.reference_refusal


def test_missing_inputs_are_named():
    with pytest.raises(GrinError, match="ref_forget_nll"):
        NPO(retain_weight=0.0).compute(forget_inputs())
    with pytest.raises(GrinError, match="retain_logits, retain_labels"):
        GradDiff().compute(forget_inputs())
    with pytest.raises(GrinError, match="ref_retain_logits"):
        GradAscent(kl_weight=1.0).compute(with_retain(forget_inputs()))
    with pytest.raises(GrinError, match="refusal_logits"):
        IdkNLL(retain_weight=0.0).compute(forget_inputs())


def test_reference_nll_shape_is_checked():
    with pytest.raises(GrinError, match=r"shape \(2,\)"):
        NPO(retain_weight=0.0).compute(forget_inputs(ref_forget_nll=tensor([[1.0, 2.0]])))


def test_registry_names_and_spellings():
    assert list(OBJECTIVES) == ["grad_ascent", "grad_diff", "npo", "simnpo", "idk_nll", "idk_dpo", "ihl"]
    for name, cls in OBJECTIVES.items():
        assert type(get_objective(name)) is cls
    # open-unlearning's CamelCase spellings resolve too.
    assert type(get_objective("GradDiff")) is GradDiff
    assert type(get_objective("SimNPO")) is SimNPO
    assert type(get_objective("IdkDPO")) is IdkDPO
    assert type(get_objective("IHL")) is IHL
    assert get_objective("npo", beta=0.5).beta == 0.5


def test_unknown_name_lists_valid_ones():
    with pytest.raises(GrinError, match="grad_ascent, grad_diff, npo, simnpo, idk_nll, idk_dpo, ihl"):
        get_objective("rmu")
    with pytest.raises(GrinError, match="must be a string"):
        get_objective(None)


def test_unknown_hyper_parameter_lists_valid_ones():
    with pytest.raises(GrinError, match=r"no hyper-parameter gamma; valid ones: .*beta, margin"):
        get_objective("simnpo", gamma=0.125)
    with pytest.raises(GrinError, match="no hyper-parameter beta"):
        get_objective("grad_diff", beta=0.1)


@pytest.mark.parametrize(
    ("name", "kwargs", "match"),
    [
        ("npo", {"beta": 0.0}, "beta must be > 0"),
        ("simnpo", {"beta": -1.0}, "beta must be > 0"),
        ("idk_dpo", {"beta": float("nan")}, "beta must be a finite number"),
        ("grad_diff", {"retain_weight": -0.1}, "retain_weight must be >= 0"),
        ("grad_ascent", {"forget_weight": -1}, "forget_weight must be >= 0"),
        ("idk_nll", {"kl_weight": float("inf")}, "kl_weight must be a finite number"),
        ("npo", {"beta": True}, "beta must be a finite number"),
        ("npo", {"beta": "0.1"}, "beta must be a finite number"),
        ("simnpo", {"margin": float("nan")}, "margin must be a finite number"),
        ("npo", {"nll_reduction": "max"}, "nll_reduction"),
        ("ihl", {"reduction": "sum"}, "reduction must be one of tokens, examples"),
    ],
)
def test_bad_hyper_parameters_raise(name, kwargs, match):
    with pytest.raises(GrinError, match=match):
        get_objective(name, **kwargs)


def test_objectives_are_immutable_and_keyword_only():
    npo = NPO()
    with pytest.raises(AttributeError):
        npo.beta = 1.0
    with pytest.raises(TypeError):
        NPO(1.0)
    assert "beta=0.1" in repr(npo)
