"""Evaluation in the TOFU benchmark: the full table (generation included), the teacher-forced cheap one, and the
trajectory callback that scores checkpoints while a method trains.

* :func:`evaluate`: open-unlearning's definitions (:func:`grin_peft.metrics.evaluate_tofu`) on forget, retain
  (``retain_perturbed``), real_authors, world_facts and holdout: forget quality (KS test of forget truth ratios
  against the reference model's), model utility (harmonic mean of 9 numbers), forget ROUGE-L recall, probability,
  truth ratio, keyword accuracy/confidence, MIA AUC and privleak. Greedy generation is capped by
  :func:`generation_cap`. ~35 s on the 1.3M-parameter model on one core.
* :func:`cheap_evaluate`: teacher-forced numbers only (forget quality, forget/retain probability and truth ratio),
  about a fifth of that; the learning-rate pilot's evaluation.
* :class:`TrajectoryCallback`: forget and retain answer probability (:func:`answer_probabilities`, the same
  definition as both evaluations' ``forget_probability``/``retain_probability``: mean over items of
  ``exp(-mean answer-token NLL)``, float32, batched by length) at step 0 and every ``--eval-every`` epochs or
  steps of a run, and the run's operating checkpoint (:func:`frontier.nearest_frontier_point`'s rule) kept in
  memory, so the frontier benchmark reads a whole trajectory from one training run instead of retraining.
"""

from __future__ import annotations

import math
import time
from typing import Any

import torch
from common import log  # benchmarks/ is on sys.path when run as a script
from frontier import better_operating_point
from transformers import TrainerCallback

from grin_peft.data import QAFormat
from grin_peft.metrics import MIA_ATTACKS, answer_probability, evaluate_qa, evaluate_tofu, forget_quality

SUMMARY_KEYS = (
    "forget_quality",
    "model_utility",
    "forget_rouge_l_recall",
    "forget_probability",
    "forget_truth_ratio",
    "forget_keyword_accuracy",
    "forget_keyword_confidence",
    "forget_extraction_strength",
    "retain_probability",
    "retain_rouge_l_recall",
    "retain_truth_ratio",
    "real_authors_rouge_l_recall",
    "world_facts_rouge_l_recall",
)


def generation_cap(qa_format: QAFormat, splits: dict[str, list[dict[str, Any]]], margin: int = 8) -> int:
    """Longest gold answer (tokens, EOS included) over the generated splits, plus ``margin``.

    No gold answer is cut, so ROUGE-L recall equals open-unlearning's 200-token setting for a model that stops at
    its EOS; an unlearned model that babbles is stopped here instead of at 200 tokens, which bounds evaluation time.
    """
    longest = 0
    for name in ("forget", "retain", "real_authors", "world_facts"):
        for item in splits.get(name, []):
            enc = qa_format.encode(item["question"], item["answer"])
            longest = max(longest, sum(1 for label in enc["labels"] if label != -100))
    return longest + margin


def evaluate(
    model: torch.nn.Module,
    qa_format: QAFormat,
    splits: dict[str, list[dict[str, Any]]],
    reference: dict[str, Any] | None,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """TOFU's table for one model; ``reference`` (the retain model's own evaluation) gives the KS reference truth
    ratios and the MIA reference AUCs (privleak 0 = as identifiable as for a model that never saw the forget set)."""
    t0 = time.perf_counter()
    result = evaluate_tofu(
        model,
        qa_format,
        splits,
        None if reference is None else reference["forget_truth_ratios"],
        reference_mia_auc=None if reference is None else reference["mia_auc"],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=False,
    )
    summary = result["summary"]
    return {
        "summary": summary,
        "forget_truth_ratios": result["per_item"]["forget"]["truth_ratio"],
        "mia_auc": {attack: summary[f"mia_{attack}_auc"] for attack in MIA_ATTACKS},
        "forget_generations": result["generations"]["forget"][:5],
        "eval_seconds": time.perf_counter() - t0,
    }


def cheap_evaluate(
    model: torch.nn.Module,
    qa_format: QAFormat,
    splits: dict[str, list[dict[str, Any]]],
    reference: dict[str, Any] | None,
    batch_size: int,
) -> dict[str, Any]:
    """Teacher-forced numbers only (no generation): forget quality, forget/retain probability and truth ratio.
    About a fifth of the full evaluation's cost; used by the learning-rate pilot."""
    t0 = time.perf_counter()
    kw = {"generate": False, "batch_size": batch_size, "progress": False}
    forget = evaluate_qa(model, qa_format, splits["forget"], truth_ratio_form="forget", **kw)
    retain = evaluate_qa(model, qa_format, splits["retain"], truth_ratio_form="retain", **kw)
    ratios = forget["per_item"]["truth_ratio"]
    summary = {
        "forget_quality": None if reference is None else forget_quality(ratios, reference["forget_truth_ratios"]),
        "forget_probability": forget["summary"]["probability"],
        "forget_truth_ratio": forget["summary"]["truth_ratio"],
        "retain_probability": retain["summary"]["probability"],
        "retain_truth_ratio": retain["summary"]["truth_ratio"],
    }
    return {"summary": summary, "forget_truth_ratios": ratios, "eval_seconds": time.perf_counter() - t0}


def answer_probabilities(
    model: torch.nn.Module, qa_format: QAFormat, splits: dict[str, list[dict[str, Any]]], batch_size: int
) -> dict[str, float]:
    """``{"forget": p, "retain": p}``: mean answer probability on the evaluation splits, teacher-forced."""
    out = {}
    for name in ("forget", "retain"):
        probs = answer_probability(model, qa_format, splits[name], batch_size=batch_size, progress=False)
        out[name] = float(sum(probs) / len(probs))
    return out


def parse_eval_every(text: str) -> tuple[float, str]:
    """``"1"`` / ``"0.5"`` (epochs) or ``"20steps"`` (optimizer steps) -> ``(amount, unit)``."""
    text = str(text).strip().lower()
    unit = "steps" if text.endswith(("steps", "step")) else "epochs"
    number = text.removesuffix("steps").removesuffix("step").removesuffix("epochs").removesuffix("epoch")
    amount = float(number)
    if not amount > 0 or (unit == "steps" and amount != int(amount)):
        raise ValueError(f"--eval-every must be a positive number of epochs or a whole number of steps: {text!r}")
    return amount, unit


class TrajectoryCallback(TrainerCallback):
    """Scores forget/retain answer probability at step 0 (unless ``score_start`` is False) and every ``every``
    ``unit`` (epochs or steps) of a training run, and always at its last step; keeps a copy of the trainable
    parameters at the run's operating checkpoint (the best one with forget <= ``target``, else the one that forgot
    the most).

    ``score_start=False`` is for runs whose starting point another run already scores: the start does not depend on
    the learning rate (the target itself for full fine-tuning and LoRA, whose B starts at 0; the target plus the
    same seeded noise on the same selected entries for a GRIN/mask delta), so one run per method and seed scores
    it and the frontier, which pools every run's points, still holds it.

    ``points``: ``[{"step", "epoch", "forget", "retain"}]`` in order; ``kept``: the operating point (one of
    ``points``) and ``kept_state`` its trainable tensors, for :meth:`restore`. ``eval_seconds``: time spent here,
    to subtract from the run's training time.
    """

    def __init__(
        self,
        qa_format: QAFormat,
        splits: dict[str, list[dict[str, Any]]],
        *,
        every: float,
        unit: str,
        target: float,
        batch_size: int,
        keep_state: bool = True,
        score_start: bool = True,
    ) -> None:
        self.qa_format, self.splits = qa_format, splits
        self.every, self.unit, self.target = every, unit, target
        self.batch_size, self.keep_state, self.score_start = batch_size, keep_state, score_start
        self.points: list[dict[str, Any]] = []
        self.kept: dict[str, Any] | None = None
        self.kept_state: dict[str, torch.Tensor] | None = None
        self.eval_seconds = 0.0
        self._eval_steps: set[int] = set()
        self._steps_per_epoch = 1.0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        epochs = float(args.num_train_epochs)
        self._steps_per_epoch = state.max_steps / epochs if epochs > 0 else float(state.max_steps)
        stride = self.every * self._steps_per_epoch if self.unit == "epochs" else self.every
        count = int(math.floor(state.max_steps / stride + 1e-9)) if stride > 0 else 0
        self._eval_steps = {max(1, round(k * stride)) for k in range(1, count + 1)} | {state.max_steps}
        if self.score_start:
            self._score(model, 0)

    def on_step_end(self, args, state, control, model=None, **kwargs):
        if state.global_step in self._eval_steps:
            self._score(model, state.global_step)

    def _score(self, model: torch.nn.Module, step: int) -> None:
        t0 = time.perf_counter()
        probs = answer_probabilities(model, self.qa_format, self.splits, self.batch_size)
        point = {"step": step, "epoch": step / self._steps_per_epoch, **probs}
        self.points.append(point)
        if better_operating_point(point, self.kept, self.target):
            self.kept = point
            if self.keep_state:
                trained = model.named_parameters()
                # on the CPU: a full-parameter copy of a large model must not double its GPU memory
                self.kept_state = {name: p.detach().to("cpu", copy=True) for name, p in trained if p.requires_grad}
        self.eval_seconds += time.perf_counter() - t0
        log(f"    step {step} (epoch {point['epoch']:.2f}): forget {probs['forget']:.3f} retain {probs['retain']:.3f}")

    @torch.no_grad()
    def restore(self, model: torch.nn.Module) -> None:
        """Put the kept checkpoint's trainable values back into ``model`` (the model this callback watched)."""
        if self.kept_state is None:
            return
        for name, p in model.named_parameters():
            if name in self.kept_state:
                p.copy_(self.kept_state[name])
