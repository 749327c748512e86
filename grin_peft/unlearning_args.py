"""`UnlearningArguments`: the `TrainingArguments` of :class:`~grin_peft.trainer.UnlearningTrainer`.

They add the unlearning objective and its hyper-parameters, the evaluation criterion (:func:`unlearn_score`, which
ranks checkpoints for ``load_best_model_at_end``), torch threads and sharpness-aware unlearning's radius, and check
them all when built, before any model is loaded. A config module next to its trainer, as in TRL.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from transformers import TrainingArguments

from .errors import GrinError
from .objectives import UnlearningObjective, get_objective
from .sharpness import check_rho

__all__ = ["UNLEARN_CRITERIA", "UnlearningArguments", "unlearn_score"]

UNLEARN_CRITERIA = ("difference", "harmonic")
# Objective hyper-parameters that UnlearningArguments forwards to get_objective when set.
_OBJECTIVE_FIELDS = ("beta", "forget_weight", "retain_weight", "kl_weight", "nll_reduction", "margin")


def unlearn_score(forget_prob: float, retain_prob: float, criterion: str = "difference") -> float:
    """One number to rank checkpoints by, higher = better unlearning at a smaller cost to the retained knowledge.

    ``"difference"``: ``retain_prob - forget_prob``, in [-1, 1]; linear, so a point of retain probability is worth
    exactly a point of forget probability. ``"harmonic"``: the harmonic mean of ``1 - forget_prob`` and
    ``retain_prob``, in [0, 1]; near 0 when either side collapses, so it never prefers a model that forgot
    everything (retain included) or nothing.
    """
    if criterion == "difference":
        return retain_prob - forget_prob
    if criterion == "harmonic":
        forgotten = 1.0 - forget_prob
        return 0.0 if forgotten <= 0 or retain_prob <= 0 else 2 * forgotten * retain_prob / (forgotten + retain_prob)
    raise GrinError(f"unknown unlearn criterion {criterion!r}; valid: {', '.join(UNLEARN_CRITERIA)}.")


@dataclass
class UnlearningArguments(TrainingArguments):
    """`TrainingArguments` plus the unlearning objective and the evaluation criterion.

    Objective hyper-parameters left at None take the objective's own defaults (open-unlearning's, see
    :mod:`grin_peft.objectives`); setting one the objective does not have (``beta`` for GradDiff) raises
    :class:`GrinError`. Defaults that differ from `TrainingArguments`: ``learning_rate=1e-2`` (sparse deltas, see
    the field), ``num_train_epochs=10``, ``logging_steps=10`` (unlearning runs are short) and
    ``remove_unused_columns=False`` (batches are nested forget/retain dicts, not model inputs).
    ``load_best_model_at_end`` without ``metric_for_best_model`` selects by ``unlearn_score``.
    """

    objective: str = field(
        default="npo",
        metadata={"help": "Unlearning objective: npo, simnpo, grad_diff, grad_ascent, idk_nll, idk_dpo or ihl."},
    )
    beta: float | None = field(default=None, metadata={"help": "Inverse temperature of NPO, SimNPO and IdkDPO."})
    forget_weight: float | None = field(default=None, metadata={"help": "Weight of the forget term."})
    retain_weight: float | None = field(default=None, metadata={"help": "Weight of the retain NLL term."})
    kl_weight: float | None = field(
        default=None, metadata={"help": "Weight of KL(reference || model) on the retain batch."}
    )
    nll_reduction: str | None = field(default=None, metadata={"help": "NPO only: 'sum' or 'mean' sequence NLL."})
    margin: float | None = field(default=None, metadata={"help": "SimNPO only: the margin (open-unlearning's delta)."})
    unlearn_criterion: str = field(
        default="difference",
        metadata={
            "help": (
                "How eval_unlearn_score combines forget and retain answer probability: 'difference' "
                "(retain - forget) or 'harmonic' (harmonic mean of 1 - forget and retain)."
            )
        },
    )
    num_threads: int | None = field(
        default=None,
        metadata={
            "help": (
                "torch intra-op threads while training and evaluating (restored afterwards); None leaves torch's "
                "setting alone. On a CPU, 1 is often fastest for tiny models, the number of physical cores for "
                "larger ones."
            )
        },
    )
    learning_rate: float = field(
        default=1e-2,
        metadata={
            "help": (
                "AdamW learning rate. Default 1e-2, not Trainer's 5e-5: a sparse delta trains a few entries, each of "
                "which must move by a sizeable fraction of a typical weight (5e-5 leaves them where they started)."
            )
        },
    )
    num_train_epochs: float = field(
        default=10.0, metadata={"help": "Passes over the forget set (open-unlearning's TOFU default is 10)."}
    )
    sam_rho: float = field(
        default=0.0,
        metadata={
            "help": (
                "Sharpness-aware unlearning (grin_peft.sharpness, a defence against relearning): the L2 radius, over "
                "the trainable parameters, of the worst-case step the forget term is trained against. 0: off."
            )
        },
    )
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Unused: paired batches are not model inputs, so nothing is removed."}
    )

    def __post_init__(self) -> None:
        if self.unlearn_criterion not in UNLEARN_CRITERIA:
            raise GrinError(
                f"unlearn_criterion={self.unlearn_criterion!r} is not one of {', '.join(UNLEARN_CRITERIA)}."
            )
        if self.num_threads is not None and (
            not isinstance(self.num_threads, int) or isinstance(self.num_threads, bool) or self.num_threads < 1
        ):
            raise GrinError(f"num_threads must be a positive integer or None; got {self.num_threads!r}.")
        check_rho(self.sam_rho)
        if self.load_best_model_at_end and self.metric_for_best_model is None:
            self.metric_for_best_model = "unlearn_score"
        super().__post_init__()
        self.build_objective()  # fail now, not after the model has been loaded and localised

    def objective_kwargs(self) -> dict[str, Any]:
        """The hyper-parameters set explicitly, to pass to :func:`grin_peft.objectives.get_objective`."""
        return {name: getattr(self, name) for name in _OBJECTIVE_FIELDS if getattr(self, name) is not None}

    def build_objective(self) -> UnlearningObjective:
        """The configured objective, validated."""
        return get_objective(self.objective, **self.objective_kwargs())
