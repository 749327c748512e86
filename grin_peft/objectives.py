"""Unlearning objectives on causal-LM logits, and a registry of them by name.

Every objective is a pure function of tensors, built from the token-level terms of :mod:`grin_peft.losses`. The
trainer runs the model (and the reference, i.e. the same model with its adapter disabled, under ``torch.no_grad``)
and hands the results over in an :class:`ObjectiveInputs`; each objective declares in
:attr:`UnlearningObjective.requirements` which of those tensors it reads, so the trainer runs no forward pass it does
not need.

Conventions, chosen to match open-unlearning (locuslab) so that results stay comparable with the field's reference
framework:

- Labels use -100 for ignored positions and the standard causal shift applies: ``logits[:, t]`` predicts
  ``labels[:, t + 1]``.
- Token-level NLL terms (grad ascent, retain NLL, refusal NLL) are the mean over every answer token of the batch,
  which is what a Hugging Face causal LM returns as ``loss`` and what open-unlearning uses.
- The inverted hinge loss (IHL) is a token-level term too: the mean over every answer token of the batch.
- Sequence-level terms (NPO, DPO) use the per-example *sum* of token NLL (open-unlearning's ``compute_batch_nll``);
  SimNPO divides that sum by the number of answer tokens.
- Reference quantities arrive as per-example summed NLL (``sequence_nll(ref_logits, labels, reduction="sum")``),
  except for the KL term, which needs the reference's full distribution and so takes reference logits.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass, fields
from typing import ClassVar

import torch.nn.functional as F
from torch import Tensor

from .errors import GrinError
from .losses import IGNORE_INDEX, _nll_sums, _shifted, batch_nll, kl_to_reference

__all__ = [
    "OBJECTIVES",
    "GradAscent",
    "GradDiff",
    "IHL",
    "IdkDPO",
    "IdkNLL",
    "NPO",
    "ObjectiveInputs",
    "Requirements",
    "SimNPO",
    "UnlearningObjective",
    "get_objective",
]


@dataclass(frozen=True)
class Requirements:
    """What an objective reads, so the trainer computes nothing else.

    ``forget``, ``refusal``, ``retain``: the trained model's logits on that batch (with gradients).
    ``reference_forget``, ``reference_refusal``: the reference model's per-example summed NLL on that batch.
    ``reference_retain``: the reference model's logits on the retain batch (for the KL term).
    """

    forget: bool
    refusal: bool
    retain: bool
    reference_forget: bool
    reference_refusal: bool
    reference_retain: bool


@dataclass
class ObjectiveInputs:
    """The tensors an objective may read; fill in what :attr:`UnlearningObjective.requirements` asks for.

    Logits are [batch, seq_len, vocab] from the model being trained; labels are the collator's [batch, seq_len]
    labels with -100 on ignored positions. The refusal batch holds the forget questions paired with refusal answers
    (e.g. TOFU's ``idontknow.jsonl``); for DPO its rows must pair with the forget batch's rows. Reference NLLs are
    per-example sums, ``sequence_nll(ref_logits, labels, reduction="sum")``, computed under ``torch.no_grad``.
    """

    forget_logits: Tensor | None = None
    forget_labels: Tensor | None = None
    refusal_logits: Tensor | None = None
    refusal_labels: Tensor | None = None
    retain_logits: Tensor | None = None
    retain_labels: Tensor | None = None
    ref_forget_nll: Tensor | None = None
    ref_refusal_nll: Tensor | None = None
    ref_retain_logits: Tensor | None = None


def _check_number(owner: str, name: str, value: object, bound: str | None) -> None:
    """Reject non-numbers, NaN/inf and values outside ``bound`` up front, before a run wastes hours on them.

    ``bound`` is ``"> 0"``, ``">= 0"`` or None (any finite number).
    """
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise GrinError(f"{owner}: {name} must be a finite number; got {value!r}.")
    if (bound == "> 0" and value <= 0) or (bound == ">= 0" and value < 0):
        raise GrinError(f"{owner}: {name} must be {bound}; got {value!r}.")


def _token_mean(sums: Tensor, counts: Tensor) -> float:
    """The batch's token-mean NLL for logging, so ``forget_nll`` means the same for every objective."""
    return (sums.sum() / counts.sum()).item()


def _check_reference_nll(owner: str, name: str, ref_nll: Tensor, batch_size: int) -> None:
    if ref_nll.shape != (batch_size,):
        raise GrinError(
            f"{owner}: {name} must be the per-example summed NLL, shape ({batch_size},); got {tuple(ref_nll.shape)}."
        )


@dataclass(frozen=True, kw_only=True)
class UnlearningObjective(ABC):
    """Common interface: ``loss = forget_weight * forget_term + retain_weight * NLL_r + kl_weight * KL_r``.

    ``NLL_r`` is :func:`batch_nll` on the retain batch (GradDiff's retain term, open-unlearning's default
    ``retain_loss_type: NLL``); ``KL_r`` is :func:`kl_to_reference` on the retain batch (open-unlearning's
    ``retain_loss_type: KL``). A zero weight drops the term and its forward passes from :attr:`requirements`.
    Subclasses define the forget term and declare which forget-side tensors it reads.
    """

    forget_weight: float = 1.0
    retain_weight: float = 1.0
    kl_weight: float = 0.0

    name: ClassVar[str]
    uses_forget: ClassVar[bool] = True
    uses_refusal: ClassVar[bool] = False
    uses_reference_forget: ClassVar[bool] = False
    uses_reference_refusal: ClassVar[bool] = False

    def __post_init__(self) -> None:
        for name in ("forget_weight", "retain_weight", "kl_weight"):
            _check_number(self.name, name, getattr(self, name), ">= 0")

    @property
    def requirements(self) -> Requirements:
        """The tensors :meth:`compute` reads from its :class:`ObjectiveInputs`."""
        return Requirements(
            forget=self.uses_forget,
            refusal=self.uses_refusal,
            retain=self.retain_weight > 0 or self.kl_weight > 0,
            reference_forget=self.uses_reference_forget,
            reference_refusal=self.uses_reference_refusal,
            reference_retain=self.kl_weight > 0,
        )

    def compute(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        """The scalar loss to backpropagate, and detached float values of its parts for logging.

        Log keys: ``loss``, ``forget_term`` (unweighted), ``retain_nll`` / ``retain_kl`` when weighted in, and the
        objective's own (``forget_nll`` and ``refusal_nll`` are always token means over the batch).
        """
        self._check_inputs(inputs)
        forget_term, logs = self._forget_term(inputs)
        logs["forget_term"] = forget_term.item()
        loss = self.forget_weight * forget_term
        if self.retain_weight > 0:
            retain_nll = batch_nll(inputs.retain_logits, inputs.retain_labels)
            logs["retain_nll"] = retain_nll.item()
            loss = loss + self.retain_weight * retain_nll
        if self.kl_weight > 0:
            retain_kl = kl_to_reference(inputs.retain_logits, inputs.ref_retain_logits, inputs.retain_labels)
            logs["retain_kl"] = retain_kl.item()
            loss = loss + self.kl_weight * retain_kl
        logs["loss"] = loss.item()
        return loss, logs

    @abstractmethod
    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        """The unweighted forget-side loss, and what to log about it."""

    def _check_inputs(self, inputs: ObjectiveInputs) -> None:
        """Name the missing tensor, instead of failing later on an opaque ``None`` attribute error."""
        needs = self.requirements
        wanted = {
            "forget_logits": needs.forget,
            "forget_labels": needs.forget,
            "refusal_logits": needs.refusal,
            "refusal_labels": needs.refusal,
            "retain_logits": needs.retain,
            "retain_labels": needs.retain,
            "ref_forget_nll": needs.reference_forget,
            "ref_refusal_nll": needs.reference_refusal,
            "ref_retain_logits": needs.reference_retain,
        }
        missing = [field for field, needed in wanted.items() if needed and getattr(inputs, field) is None]
        if missing:
            raise GrinError(f"objective {self.name!r} ({self!r}) needs {', '.join(missing)} in its ObjectiveInputs.")


@dataclass(frozen=True, kw_only=True)
class GradDiff(UnlearningObjective):
    """Gradient difference: ``L = -w_f * NLL_f + w_r * NLL_r``.

    Both NLLs are token means over the batch (:func:`batch_nll`), as in open-unlearning's GradDiff
    (``gamma`` = ``forget_weight``, ``alpha`` = ``retain_weight``, both 1 by default).
    """

    name: ClassVar[str] = "grad_diff"

    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        forget_nll = batch_nll(inputs.forget_logits, inputs.forget_labels)
        return -forget_nll, {"forget_nll": forget_nll.item()}


@dataclass(frozen=True, kw_only=True)
class GradAscent(GradDiff):
    """Gradient ascent: ``L = -w_f * NLL_f``; GradDiff with no retain term by default.

    Unbounded below: the loss falls without limit as the forget answers become improbable, which is why it is
    the baseline that collapses models fastest.
    """

    name: ClassVar[str] = "grad_ascent"
    retain_weight: float = 0.0


@dataclass(frozen=True, kw_only=True)
class NPO(UnlearningObjective):
    """Negative Preference Optimization (Zhang et al. 2024), with a GradDiff-style retain term.

    ``L_f = -(2/beta) * mean_i logsigmoid(beta * (NLL_theta(y_i|x_i) - NLL_ref(y_i|x_i)))``

    which is the paper's ``-(2/beta) E[log sigmoid(-beta * log(pi_theta / pi_ref))]`` with ``log pi = -NLL``. The
    loss is ``(2/beta) log 2`` at ``theta == ref``, falls towards 0 as the forget answers become less likely than
    under the reference, and, unlike grad ascent, is bounded below. Sign and defaults follow open-unlearning's NPO
    (``beta=0.1``, ``gamma`` = ``forget_weight`` = 1, ``alpha`` = ``retain_weight`` = 1).

    ``nll_reduction="sum"`` (default, as open-unlearning's ``compute_batch_nll``) compares sequence
    log-likelihoods; ``"mean"`` divides both NLLs by the answer length, so long answers do not saturate the
    sigmoid sooner than short ones.
    """

    name: ClassVar[str] = "npo"
    uses_reference_forget: ClassVar[bool] = True
    beta: float = 0.1
    nll_reduction: str = "sum"

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self.name, "beta", self.beta, "> 0")
        if self.nll_reduction not in ("sum", "mean"):
            raise GrinError(f"{self.name}: nll_reduction must be 'sum' or 'mean'; got {self.nll_reduction!r}.")

    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        logits, labels = inputs.forget_logits, inputs.forget_labels
        _check_reference_nll(self.name, "ref_forget_nll", inputs.ref_forget_nll, logits.shape[0])
        sums, counts = _nll_sums(logits, labels)
        nll, ref_nll = sums, inputs.ref_forget_nll.to(sums)
        if self.nll_reduction == "mean":
            nll, ref_nll = nll / counts, ref_nll / counts
        log_ratio = nll - ref_nll  # = -log(pi_theta / pi_ref), > 0 once the model has unlearned
        loss = -F.logsigmoid(self.beta * log_ratio).mean() * 2 / self.beta
        return loss, {"forget_nll": _token_mean(sums, counts), "forget_log_ratio": log_ratio.mean().item()}


@dataclass(frozen=True, kw_only=True)
class SimNPO(UnlearningObjective):
    """SimNPO (Fan et al. 2024): NPO without a reference model, on the length-normalised NLL.

    ``L_f = -(2/beta) * mean_i logsigmoid(beta * (NLL_theta(y_i|x_i) / |y_i| - margin))``

    This is the formula of the authors' code (OPTML-Group/Unlearn-Simple) and of open-unlearning's SimNPO, where
    the margin is subtracted before scaling by beta. The paper writes ``logsigmoid(-(beta/|y|) log pi - gamma)``,
    i.e. ``gamma = beta * margin``; both agree at the default margin of 0.

    Defaults are open-unlearning's TOFU configuration: ``beta=4.5``, ``margin=0`` (its ``delta``),
    ``forget_weight=0.125`` (its ``gamma``, the authors' ``npo_coeff``), ``retain_weight=1`` (its ``alpha``).
    """

    name: ClassVar[str] = "simnpo"
    forget_weight: float = 0.125
    beta: float = 4.5
    margin: float = 0.0

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self.name, "beta", self.beta, "> 0")
        # Any finite margin is well defined; a negative one just lets the sigmoid saturate later.
        _check_number(self.name, "margin", self.margin, None)

    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        sums, counts = _nll_sums(inputs.forget_logits, inputs.forget_labels)
        loss = -F.logsigmoid(self.beta * (sums / counts - self.margin)).mean() * 2 / self.beta
        return loss, {"forget_nll": _token_mean(sums, counts)}


IHL_REDUCTIONS = ("tokens", "examples")


@dataclass(frozen=True, kw_only=True)
class IHL(UnlearningObjective):
    """Inverted hinge loss (Cha et al., ICLR 2025, the loss of LoKU), with a GradDiff-style retain term.

    Per answer token ``y_t``, with ``p`` the softmax at the position that predicts it:
    ``IHL_t = 1 + p(y_t) - max_{v != y_t} p(v)``, a hinge on the margin between the true token and its strongest
    rival. Lowering it moves probability from the true token to that one rival (a fluent alternative) instead of
    spreading it anywhere as gradient ascent does, and it is bounded in [0, 2], so it cannot run away. The hinge's
    clamp at 0 never acts (the margin is >= -1), so there is none.

    Choices the paper leaves open follow the authors' code (csm9493/efficient-llm-unlearning, TOFU/dataloader.py):
    ``reduction="tokens"`` (default) averages over every answer token of the batch, as :func:`batch_nll` does;
    ``"examples"`` averages each example's tokens first, so long answers weigh no more than short ones. The retain
    term is their ``forget_loss + retain_loss`` (``forget_weight = retain_weight = 1``). Logits are always
    softmaxed in float32 (their code skips the softmax when every logit happens to lie in [0, 1]).
    """

    name: ClassVar[str] = "ihl"
    reduction: str = "tokens"

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.reduction not in IHL_REDUCTIONS:
            raise GrinError(
                f"{self.name}: reduction must be one of {', '.join(IHL_REDUCTIONS)}; got {self.reduction!r}."
            )

    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        logits, labels = _shifted(inputs.forget_logits, inputs.forget_labels)
        if logits.shape[-1] < 2:
            raise GrinError(f"{self.name}: the hinge needs a rival token; the vocabulary has {logits.shape[-1]}.")
        mask = labels != IGNORE_INDEX
        counts = mask.sum(dim=-1)
        if not bool(mask.any()) or (self.reduction == "examples" and bool((counts == 0).any())):
            raise GrinError(
                f"{self.name}: examples {(counts == 0).nonzero().flatten().tolist()} of the batch have no answer "
                f"token (every label is {IGNORE_INDEX} after the causal shift); check truncation and the label mask."
            )
        # Only answer positions go through the softmax: [answer tokens, vocab] is the memory-heavy step.
        target = labels[mask].unsqueeze(-1)
        log_p = F.log_softmax(logits[mask], dim=-1)
        p = log_p.exp()
        p_true = p.gather(-1, target).squeeze(-1)
        rival = p.scatter(-1, target, -1.0).max(dim=-1).values  # -1: below every probability
        hinge = 1.0 + p_true - rival
        if self.reduction == "tokens":
            loss = hinge.mean()
        else:
            rows = mask.nonzero()[:, 0]
            loss = (hinge.new_zeros(mask.shape[0]).index_add(0, rows, hinge) / counts).mean()
        forget_nll = -log_p.gather(-1, target).mean()
        return loss, {"forget_nll": forget_nll.item(), "forget_rival_prob": rival.mean().item()}


@dataclass(frozen=True, kw_only=True)
class IdkNLL(UnlearningObjective):
    """Refusal fine-tuning: ``L = w_f * NLL_idk + w_r * NLL_r``.

    ``NLL_idk`` is :func:`batch_nll` on the refusal batch (the forget questions paired with refusal answers such as
    "I don't know"). The true forget answers are never read. TOFU's original "idk" loss took one token mean over
    the concatenated refusal + retain batch; the weighted sum here keeps the two terms' scales independent of the
    two batches' answer lengths.
    """

    name: ClassVar[str] = "idk_nll"
    uses_forget: ClassVar[bool] = False
    uses_refusal: ClassVar[bool] = True

    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        refusal_nll = batch_nll(inputs.refusal_logits, inputs.refusal_labels)
        return refusal_nll, {"refusal_nll": refusal_nll.item()}


@dataclass(frozen=True, kw_only=True)
class IdkDPO(UnlearningObjective):
    """DPO with the refusal answer preferred over the true forget answer (the "PO" of WAGLE and GRIN).

    ``L_f = -(2/beta) * mean_i logsigmoid(beta * ((log pi(c_i) - log pi_ref(c_i)) - (log pi(r_i) - log pi_ref(r_i))))``

    with ``c`` the refusal (chosen) answer, ``r`` the forget (rejected) answer, ``log pi = -`` summed token NLL and
    the reference being the model with its adapter disabled. This is open-unlearning's ``compute_dpo_loss``
    (including its ``2/beta`` scale, so ``L_f = (2/beta) log 2`` at ``theta == ref``) with its DPO defaults:
    ``beta=0.1``, ``forget_weight`` = ``gamma`` = 1, ``retain_weight`` = ``alpha`` = 1. Row i of the refusal batch
    must hold the same question as row i of the forget batch.
    """

    name: ClassVar[str] = "idk_dpo"
    uses_refusal: ClassVar[bool] = True
    uses_reference_forget: ClassVar[bool] = True
    uses_reference_refusal: ClassVar[bool] = True
    beta: float = 0.1

    def __post_init__(self) -> None:
        super().__post_init__()
        _check_number(self.name, "beta", self.beta, "> 0")

    def _forget_term(self, inputs: ObjectiveInputs) -> tuple[Tensor, dict[str, float]]:
        batch_size = inputs.forget_logits.shape[0]
        if inputs.refusal_logits.shape[0] != batch_size:
            raise GrinError(
                f"{self.name}: the refusal batch must pair row by row with the forget batch; got "
                f"{inputs.refusal_logits.shape[0]} refusal rows for {batch_size} forget rows."
            )
        _check_reference_nll(self.name, "ref_forget_nll", inputs.ref_forget_nll, batch_size)
        _check_reference_nll(self.name, "ref_refusal_nll", inputs.ref_refusal_nll, batch_size)
        chosen_nll, chosen_counts = _nll_sums(inputs.refusal_logits, inputs.refusal_labels)
        rejected_nll, rejected_counts = _nll_sums(inputs.forget_logits, inputs.forget_labels)
        chosen_log_ratio = -(chosen_nll - inputs.ref_refusal_nll.to(chosen_nll))
        rejected_log_ratio = -(rejected_nll - inputs.ref_forget_nll.to(rejected_nll))
        margin = chosen_log_ratio - rejected_log_ratio
        loss = -F.logsigmoid(self.beta * margin).mean() * 2 / self.beta
        logs = {
            "forget_nll": _token_mean(rejected_nll, rejected_counts),
            "refusal_nll": _token_mean(chosen_nll, chosen_counts),
            "dpo_margin": margin.mean().item(),
        }
        return loss, logs


OBJECTIVES: dict[str, type[UnlearningObjective]] = {
    cls.name: cls for cls in (GradAscent, GradDiff, NPO, SimNPO, IdkNLL, IdkDPO, IHL)
}


def _normalise(name: str) -> str:
    # "NPO", "SimNPO", "GradDiff", "grad-diff" all resolve: open-unlearning spells its methods in CamelCase.
    return name.lower().replace("_", "").replace("-", "")


def get_objective(name: str, **kwargs: float | str) -> UnlearningObjective:
    """Build an objective by name (case, ``_`` and ``-`` ignored), validating its hyper-parameters.

    Unknown names and unknown hyper-parameters raise :class:`GrinError` listing the valid ones, rather than a
    TypeError from a constructor the caller never saw.
    """
    if not isinstance(name, str):
        raise GrinError(f"objective name must be a string; got {name!r}.")
    by_key = {_normalise(key): cls for key, cls in OBJECTIVES.items()}
    cls = by_key.get(_normalise(name))
    if cls is None:
        raise GrinError(f"unknown objective {name!r}; valid names: {', '.join(OBJECTIVES)}.")
    valid = [f.name for f in fields(cls)]
    unknown = sorted(set(kwargs) - set(valid))
    if unknown:
        raise GrinError(
            f"objective {cls.name!r} has no hyper-parameter {', '.join(unknown)}; valid ones: {', '.join(valid)}."
        )
    return cls(**kwargs)
