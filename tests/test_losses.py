"""Specification of the token-level losses (grin_peft.losses), checked against hand computations on tiny logits.

Expected values are computed with ``math`` on explicit numbers, never through the torch code under test, so a wrong
shift, mask, sign or reduction shows up as a numeric mismatch. test_objectives reuses the hand data and helpers.
"""

import math

import pytest
import torch

from grin_peft.errors import GrinError
from grin_peft.losses import batch_nll, kl_to_reference, sequence_nll

# Batch 2, sequence 4, vocab 3. logits[b][t] predicts labels[b][t + 1]; the last position predicts nothing.
FORGET_LOGITS = [
    [[1.0, 2.0, 0.0], [0.5, -1.0, 2.0], [0.0, 0.0, 0.0], [9.0, -9.0, 9.0]],
    [[2.0, 1.0, 0.0], [3.0, 0.0, 1.0], [-1.0, 0.0, 1.0], [-9.0, 9.0, 9.0]],
]
# Example 0 answers tokens 1 and 2 (predicted from positions 0 and 1); example 1 answers 0, 1, 2 from positions 0-2.
FORGET_LABELS = [[-100, 1, 2, -100], [-100, 0, 1, 2]]

RETAIN_LOGITS = [
    [[0.0, 1.0, -1.0], [2.0, 0.0, 1.0], [5.0, 5.0, 5.0]],
    [[1.0, 1.0, 3.0], [0.0, -2.0, 0.5], [5.0, -5.0, 0.0]],
]
RETAIN_LABELS = [[-100, 0, 2], [-100, -100, 0]]


def log_softmax(row: list[float]) -> list[float]:
    log_z = math.log(sum(math.exp(x) for x in row))
    return [x - log_z for x in row]


def token_nlls(logits: list, labels: list) -> list[list[float]]:
    """Per-example lists of answer-token NLLs, with the causal shift done by hand."""
    out = []
    for rows, labs in zip(logits, labels):
        out.append([-log_softmax(rows[t])[labs[t + 1]] for t in range(len(labs) - 1) if labs[t + 1] != -100])
    return out


def tensor(data: list, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.float32, requires_grad=requires_grad)


def labels(data: list) -> torch.Tensor:
    return torch.tensor(data, dtype=torch.long)


F_NLL = token_nlls(FORGET_LOGITS, FORGET_LABELS)
R_NLL = token_nlls(RETAIN_LOGITS, RETAIN_LABELS)
F_SUM = [sum(x) for x in F_NLL]
F_MEAN = [sum(x) / len(x) for x in F_NLL]
F_TOKEN_MEAN = sum(F_SUM) / sum(len(x) for x in F_NLL)
R_TOKEN_MEAN = sum(sum(x) for x in R_NLL) / sum(len(x) for x in R_NLL)


# ---------------------------------------------------------------- NLL primitives


def test_hand_values_are_as_intended():
    # Pins the hand helper itself on one entry: position 0 of example 0 predicts token 1 from logits [1, 2, 0].
    assert F_NLL[0][0] == pytest.approx(-(2.0 - math.log(math.e + math.e**2 + 1.0)))
    assert [len(x) for x in F_NLL] == [2, 3]


def test_sequence_nll_sum_and_mean_match_hand_computation():
    logits, labs = tensor(FORGET_LOGITS), labels(FORGET_LABELS)
    assert sequence_nll(logits, labs, reduction="sum").tolist() == pytest.approx(F_SUM, rel=1e-6)
    assert sequence_nll(logits, labs).tolist() == pytest.approx(F_MEAN, rel=1e-6)


def test_batch_nll_is_token_mean_over_batch():
    # Weighted by answer length: (2 tokens + 3 tokens) in one mean, not the mean of per-example means.
    assert batch_nll(tensor(FORGET_LOGITS), labels(FORGET_LABELS)).item() == pytest.approx(F_TOKEN_MEAN, rel=1e-6)
    assert F_TOKEN_MEAN != pytest.approx(sum(F_MEAN) / 2, rel=0.05)


def test_ignored_positions_and_last_position_do_not_matter():
    logits = tensor(FORGET_LOGITS)
    changed = logits.clone()
    changed[:, -1] = torch.tensor([100.0, -100.0, 50.0])  # the last position predicts nothing
    changed[0, 2] = torch.tensor([-7.0, 7.0, 3.0])  # predicts labels[0][3] == -100
    for reduction in ("sum", "mean"):
        assert torch.equal(
            sequence_nll(logits, labels(FORGET_LABELS), reduction),
            sequence_nll(changed, labels(FORGET_LABELS), reduction),
        )


def test_causal_shift_is_applied():
    # Without the shift, position 1 of example 0 would score token 1 (its own label) instead of token 2.
    logits = torch.zeros(1, 3, 3)
    logits[0, 0] = torch.tensor([0.0, 10.0, 0.0])  # confidently predicts token 1 at position 1
    logits[0, 1] = torch.tensor([0.0, -10.0, 0.0])
    nll = sequence_nll(logits, labels([[-100, 1, -100]]), reduction="sum").item()
    assert nll == pytest.approx(-log_softmax([0.0, 10.0, 0.0])[1], abs=1e-6)
    assert nll < 1e-3


def test_bf16_logits_are_upcast():
    nll = sequence_nll(tensor(FORGET_LOGITS).bfloat16(), labels(FORGET_LABELS), reduction="sum")
    assert nll.dtype == torch.float32
    assert nll.tolist() == pytest.approx(F_SUM, rel=2e-2)


def test_example_without_answer_tokens_raises():
    # Label at position 0 is never predicted, so example 1 has no answer token after the shift.
    with pytest.raises(GrinError, match=r"examples \[1\]"):
        sequence_nll(torch.zeros(2, 3, 4), labels([[-100, 1, 2], [3, -100, -100]]))
    with pytest.raises(GrinError, match="no answer token"):
        batch_nll(torch.zeros(2, 3, 4), labels([[-100, -100, -100], [3, -100, -100]]))


@pytest.mark.parametrize(
    ("logits", "labs", "match"),
    [
        (torch.zeros(2, 3), [[1, 1, 1], [1, 1, 1]], r"\[batch, seq_len, vocab\]"),
        (torch.zeros(2, 3, 4), [[1, 1], [1, 1]], r"labels must have shape"),
        (torch.zeros(2, 1, 4), [[1], [1]], r"at least 2 positions"),
    ],
)
def test_bad_shapes_raise(logits, labs, match):
    with pytest.raises(GrinError, match=match):
        sequence_nll(logits, labels(labs))


def test_bad_reduction_raises():
    with pytest.raises(GrinError, match="reduction"):
        sequence_nll(tensor(FORGET_LOGITS), labels(FORGET_LABELS), reduction="max")


# ---------------------------------------------------------------- KL to the reference


def test_kl_is_zero_for_identical_logits_and_matches_hand_value_otherwise():
    logits, labs = tensor(RETAIN_LOGITS), labels(RETAIN_LABELS)
    assert kl_to_reference(logits, logits.clone(), labs).item() == pytest.approx(0.0, abs=1e-7)

    ref = logits.clone()
    ref[0, 1] = torch.tensor([0.0, 0.0, 0.0])  # predicts labels[0][2]: an answer position
    ref[1, 0] = torch.tensor([3.0, 1.0, -1.0])  # predicts labels[1][1] == -100: must not count
    ref[1, 2] = torch.tensor([-3.0, 3.0, 0.0])  # last position: must not count
    # KL(p_ref || p_theta) at the one changed answer position, averaged over the 3 answer positions.
    log_p, log_q = log_softmax(RETAIN_LOGITS[0][1]), log_softmax([0.0, 0.0, 0.0])
    expected = sum(math.exp(lq) * (lq - lp) for lp, lq in zip(log_p, log_q)) / 3
    kl = kl_to_reference(logits, ref, labs).item()
    assert kl > 0
    assert kl == pytest.approx(expected, rel=1e-5)


def test_kl_direction_is_reference_first():
    # KL(q || p) != KL(p || q) for these two distributions; the reference q must be the first argument.
    p, q = [2.0, 0.0, 0.0], [0.0, 0.0, 0.0]
    logits = torch.tensor([[p, p]])
    ref = torch.tensor([[q, q]])
    log_p, log_q = log_softmax(p), log_softmax(q)
    forward = sum(math.exp(b) * (b - a) for a, b in zip(log_p, log_q))
    backward = sum(math.exp(a) * (a - b) for a, b in zip(log_p, log_q))
    assert forward != pytest.approx(backward, rel=1e-2)
    assert kl_to_reference(logits, ref, labels([[-100, 0]])).item() == pytest.approx(forward, rel=1e-5)


def test_kl_shape_mismatch_raises():
    with pytest.raises(GrinError, match="same shape"):
        kl_to_reference(torch.zeros(2, 3, 4), torch.zeros(2, 3, 5), labels([[0, 1, 2], [0, 1, 2]]))


def test_kl_gradient_pulls_towards_reference():
    ref = tensor(RETAIN_LOGITS)
    logits = (ref + torch.tensor([1.0, -1.0, 0.5])).requires_grad_()
    before = kl_to_reference(logits.detach(), ref, labels(RETAIN_LABELS)).item()
    kl_to_reference(logits, ref, labels(RETAIN_LABELS)).backward()
    with torch.no_grad():
        logits -= 0.5 * logits.grad
    assert 0 < kl_to_reference(logits.detach(), ref, labels(RETAIN_LABELS)).item() < before
