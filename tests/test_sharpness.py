"""Specification of sharpness-aware unlearning (grin_peft.sharpness, ``UnlearningArguments(sam_rho=...)``).

The step must be SAM on the forget term and nothing else: the perturbation is ``rho * g / |g|`` along the forget
term's gradient, the forget gradient is taken there, the retain gradient at the unperturbed weights, the weights
come back exactly, and ``rho = 0`` is the plain step. Checked by hand with autograd on a tiny random Llama.
"""

from __future__ import annotations

import copy
import math

import pytest
import tiny_models
import torch
from peft import get_peft_model

from grin_peft import GrinConfig
from grin_peft.data import IGNORE_INDEX
from grin_peft.errors import GrinError
from grin_peft.losses import batch_nll
from grin_peft.sharpness import check_rho, perturbation
from grin_peft.trainer import UnlearningTrainer
from grin_peft.unlearning_args import UnlearningArguments

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def examples(seed: int) -> list[dict]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for length in (6, 9, 7, 8):
        ids = torch.randint(3, tiny_models.VOCAB, (length,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    return out


def make_trainer(tmp_path, **kw) -> UnlearningTrainer:
    # init_weights=False: non-zero random delta values, so the adapted model differs from the base.
    model = get_peft_model(tiny_models.build("llama"), GrinConfig(score="random", density=0.05, init_weights=False))
    settings = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        num_train_epochs=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
        objective="grad_diff",
        train_sampling_strategy="sequential",
    )
    settings.update(kw)
    return UnlearningTrainer(model, UnlearningArguments(**settings), examples(0), examples(1))


def params(trainer: UnlearningTrainer) -> list[torch.nn.Parameter]:
    return [p for p in trainer.model.parameters() if p.requires_grad]


def grads(trainer: UnlearningTrainer) -> list[torch.Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in params(trainer)]


def nll(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return batch_nll(logits, batch["labels"])


def step(trainer: UnlearningTrainer, batch) -> torch.Tensor:
    trainer.current_gradient_accumulation_steps = 1  # set by Trainer's loop, which these tests do not run
    return trainer.training_step(trainer.model, batch)


# ------------------------------------------------------------------------------------------------ the radius


def test_perturbation_is_rho_along_the_normalised_gradient_over_all_tensors_together():
    deltas = perturbation([torch.tensor([3.0, 0.0]), None, torch.tensor([4.0])], rho=0.5)
    torch.testing.assert_close(deltas[0], torch.tensor([0.3, 0.0]))  # |g| = 5 over both tensors
    assert deltas[1] is None  # a parameter the forget loss does not reach stays put
    torch.testing.assert_close(deltas[2], torch.tensor([0.4]))
    assert perturbation([torch.zeros(3)], rho=1.0)[0].eq(0).all()  # no direction: no move, no NaN


@pytest.mark.parametrize("rho", [-0.1, math.nan, math.inf, "0.1", True, None])
def test_bad_radius_is_refused_when_the_arguments_are_built(tmp_path, rho):
    with pytest.raises(GrinError, match="sam_rho must be a finite number >= 0"):
        check_rho(rho)
    with pytest.raises(GrinError, match="sam_rho"):
        UnlearningArguments(output_dir=str(tmp_path), sam_rho=rho)


# ------------------------------------------------------------------------------------------------ the step


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_step_is_forget_gradient_at_the_perturbed_point_plus_retain_gradient_at_theta(tmp_path, rho):
    trainer = make_trainer(tmp_path, sam_rho=rho)
    batch = next(iter(trainer.get_train_dataloader()))
    model, ps = trainer.model, params(trainer)
    theta = [p.detach().clone() for p in ps]
    model.train()
    # By hand (GradDiff, weights 1): L_f = -NLL_f, L_r = NLL_r.
    clean_forget = -nll(model, batch["forget"])
    g = torch.autograd.grad(clean_forget, ps)
    norm = torch.sqrt(sum((x**2).sum() for x in g))
    with torch.no_grad():
        for p, x in zip(ps, g):
            p.add_(rho * x / norm)
    perturbed_forget = -nll(model, batch["forget"])
    forget_adv = torch.autograd.grad(perturbed_forget, ps)
    with torch.no_grad():
        for p, t in zip(ps, theta):
            p.copy_(t)
    retain_nll = nll(model, batch["retain"])
    retain = torch.autograd.grad(retain_nll, ps)
    assert perturbed_forget.item() > clean_forget.item()  # the perturbation climbs the forget loss (to relearning)

    loss = step(trainer, batch)
    for got, a, b in zip(grads(trainer), forget_adv, retain):
        torch.testing.assert_close(got, a + b, rtol=1e-5, atol=1e-6)
    assert all(torch.equal(p, t) for p, t in zip(ps, theta))  # exactly theta again
    plain = clean_forget.item() + retain_nll.item()
    assert loss.item() == pytest.approx(plain, rel=1e-5)  # the logged loss is the plain loss at theta


def test_rho_zero_through_the_sharpness_path_is_the_plain_step(tmp_path):
    from grin_peft.sharpness import sharpness_aware_step

    plain = make_trainer(tmp_path)
    batch = next(iter(plain.get_train_dataloader()))
    step(plain, batch)
    sam = make_trainer(tmp_path)
    sam.args.sam_rho = 0.0
    sam.current_gradient_accumulation_steps = 1
    sharpness_aware_step(sam, sam.model, batch)
    for a, b in zip(grads(plain), grads(sam)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)  # forget and retain backpropagated apart


def test_rho_zero_trains_bit_for_bit_like_no_sharpness(tmp_path):
    runs = []
    for settings in ({}, {"sam_rho": 0.0}):
        trainer = make_trainer(tmp_path, num_train_epochs=2, per_device_train_batch_size=2, **settings)
        trainer.train()
        runs.append([p.detach().clone() for p in params(trainer)])
    assert all(torch.equal(a, b) for a, b in zip(*runs))


def test_a_second_micro_batch_adds_to_the_first_ones_gradient(tmp_path):
    """Gradient accumulation: the step sets earlier gradients aside while it computes its perturbation."""
    trainer = make_trainer(tmp_path, sam_rho=0.3, per_device_train_batch_size=2)
    first, second = list(trainer.get_train_dataloader())[:2]
    separate = []
    for batch in (first, second):
        trainer.model.zero_grad(set_to_none=True)
        step(trainer, batch)
        separate.append(grads(trainer))
    trainer.model.zero_grad(set_to_none=True)
    step(trainer, first)
    step(trainer, second)
    for got, a, b in zip(grads(trainer), *separate):
        torch.testing.assert_close(got, a + b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("objective", ["npo", "grad_ascent"])
def test_training_logs_the_parts_once_per_step_at_theta(tmp_path, objective):
    trainer = make_trainer(tmp_path, sam_rho=0.2, objective=objective, logging_steps=1, per_device_train_batch_size=2)
    before = copy.deepcopy([p.detach() for p in params(trainer)])
    trainer.train()
    logged = [entry for entry in trainer.state.log_history if "forget_term" in entry]
    assert len(logged) == trainer.state.global_step == 2  # one entry per step, not one per pass
    assert ("retain_nll" in logged[0]) == (objective == "npo")  # grad_ascent has no retain term
    assert not any(torch.equal(a, b) for a, b in zip(before, params(trainer)))  # it trained
