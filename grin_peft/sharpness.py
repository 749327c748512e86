"""Sharpness-aware unlearning: a defence against the relearning attack (``UnlearningArguments(sam_rho=...)``).

Fan et al. (ICML 2025, "Towards LLM Unlearning Resilient to Relearning Attacks: A Sharpness-Aware Minimization
Perspective and Beyond") read relearning as an adversary that moves the weights a little to undo the forgetting,
and unlearn against the worst such move: ``min_theta max_{|delta| <= rho} L_f(theta + delta) + L_r(theta)``. SAM's
first-order answer to the inner maximisation is ``delta = rho * g / |g|`` with ``g`` the forget term's gradient
(the direction in which the forget loss rises fastest, i.e. back towards the forgotten answers); the step then
uses the forget term's gradient at ``theta + delta`` and the retain terms' gradient at ``theta``.

Per micro-batch this costs two forget passes (forward + backward) and one retain pass where the plain step has
one of each. Only the trainable parameters move, so for a GRIN delta the perturbation stays on the selected
entries: the sparse support is untouched. ``rho`` is an L2 norm over all trainable parameters, in weight units.
Measured against the audit's relearning attack, and what it costs in retained knowledge: BENCHMARKS.md section 10.1.
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from accelerate.utils import DistributedType
from torch import Tensor, nn
from transformers import Trainer

from .errors import GrinError
from .objectives import ObjectiveInputs, UnlearningObjective

if TYPE_CHECKING:
    from .trainer import UnlearningTrainer

__all__ = ["check_rho", "perturbation", "sharpness_aware_step"]


def check_rho(rho: object) -> None:
    """Refuse a radius that is not a finite number >= 0 when the arguments are built, not at the first step."""
    if isinstance(rho, bool) or not isinstance(rho, int | float) or not math.isfinite(rho) or rho < 0:
        raise GrinError(
            f"sam_rho must be a finite number >= 0 (0 switches sharpness-aware unlearning off); got {rho!r}."
        )


def perturbation(grads: list[Tensor | None], rho: float) -> list[Tensor | None]:
    """SAM's ascent step ``rho * g / |g|_2``, with the norm taken over every tensor together; zero where the
    gradient is zero or missing (a parameter the forget loss does not reach is not perturbed)."""
    present = [g for g in grads if g is not None]
    if not present:
        return [None for _ in grads]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in present]))
    scale = rho / norm if norm > 0 else torch.zeros_like(norm)
    return [None if g is None else (g.float() * scale).to(g.dtype) for g in grads]


@dataclass(frozen=True, kw_only=True)
class _RetainPart(UnlearningObjective):
    """The retain side (retain NLL and KL) of an objective's loss alone, without its forget passes."""

    name: ClassVar[str] = "retain part"
    uses_forget: ClassVar[bool] = False

    def compute(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        loss, logs = super().compute(inputs)
        logs.pop("forget_term")  # the forget pass logs the real one
        return loss, logs

    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        return inputs.retain_logits.new_zeros((), dtype=torch.float32), {}


@contextlib.contextmanager
def _objective(trainer: UnlearningTrainer, objective: UnlearningObjective) -> Iterator[None]:
    plain = trainer.objective
    trainer.objective = objective
    try:
        yield
    finally:
        trainer.objective = plain


@contextlib.contextmanager
def _unlogged(trainer: UnlearningTrainer) -> Iterator[None]:
    """The perturbed pass's loss parts are not the model's: keep them out of the training logs."""
    saved = [{k: list(v) for k, v in logs.items()} for logs in (trainer._objective_logs, trainer._run_logs)]
    try:
        yield
    finally:
        for logs, before in zip((trainer._objective_logs, trainer._run_logs), saved):
            logs.clear()
            logs.update(before)


def _trainable(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def sharpness_aware_step(
    trainer: UnlearningTrainer, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: Any = None
) -> Tensor:
    """One micro-batch of sharpness-aware unlearning, accumulating into ``.grad`` like ``Trainer.training_step``:
    the forget part's gradient at ``theta + rho * g / |g|`` plus the retain part's at ``theta``.

    Returns (and logs) the plain loss at ``theta``, so runs with and without SAM log comparable numbers. Each part
    goes through ``Trainer.training_step``: autocast, gradient-accumulation scaling and ``accelerator.backward``
    stay as they are.
    """
    backend = trainer.accelerator.distributed_type
    if backend in (DistributedType.DEEPSPEED, DistributedType.FSDP):
        raise GrinError(
            f"sam_rho > 0 needs each process to hold whole parameters and to step after backward; {backend.value} "
            "shards them or steps inside backward. Train without sam_rho, or with DDP."
        )
    rho = trainer.args.sam_rho
    plain = trainer.objective
    forget_part = dataclasses.replace(plain, retain_weight=0.0, kl_weight=0.0)
    params = _trainable(model)
    accumulated = [p.grad for p in params]  # earlier micro-batches' gradients, set aside while g is computed
    for p in params:
        p.grad = None
    with _objective(trainer, forget_part):
        loss = Trainer.training_step(trainer, model, inputs, num_items_in_batch)
    deltas = perturbation([p.grad for p in params], rho)
    for p, grad in zip(params, accumulated):
        p.grad = grad
    saved = [p.detach().clone() for p in params]
    with torch.no_grad():
        for p, delta in zip(params, deltas):
            if delta is not None:
                p.add_(delta)
    try:
        with _objective(trainer, forget_part), _unlogged(trainer):
            Trainer.training_step(trainer, model, inputs, num_items_in_batch)
    finally:
        with torch.no_grad():
            for p, value in zip(params, saved):
                p.copy_(value)  # exactly theta again, not theta + delta - delta
    if plain.requirements.retain:
        retain_part = _RetainPart(retain_weight=plain.retain_weight, kl_weight=plain.kl_weight)
        with _objective(trainer, retain_part):
            loss = loss + Trainer.training_step(trainer, model, inputs, num_items_in_batch)
    return loss
