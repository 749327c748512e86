"""`unlearn`: GRIN in one call — wrap the model, localise the delta on forget/retain data, train it, report.

Each step is also available on its own (``peft.get_peft_model`` with a :class:`~grin_peft.config.GrinConfig`,
``model.localize``, :class:`~grin_peft.trainer.UnlearningTrainer`); this module only chains them with documented
defaults and times them, so a first experiment is three lines and a tuned one changes only arguments.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import random
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import torch
from peft import PeftModel, get_peft_model
from torch import nn
from transformers import PreTrainedTokenizerBase, TrainerCallback
from transformers.trainer_callback import PrinterCallback

from .config import DEFAULT_DENSITY, GrinConfig
from .data import QAFormat, as_format
from .errors import GrinError
from .operating_point import OperatingPoint, search, split_heldout
from .paired_data import encode_dataset
from .threads import with_thread_rule
from .trainer import UnlearningTrainer, check_refusals
from .unlearning_args import UnlearningArguments

# Localisation reads at most max(len(forget), this) retain items by default (a seeded sample): per-example gradient
# statistics over a whole retain set (TOFU's retain90 is 3,600 items) cost more than the unlearning itself.
LOCALIZE_RETAIN_MIN = 256
# Settings that fix the training length or rate: giving any of them switches the automatic operating point off.
FIXED_SCHEDULE = ("learning_rate", "num_train_epochs", "max_steps")

__all__ = ["UnlearnResult", "unlearn"]


@dataclass
class UnlearnResult:
    """What :func:`unlearn` did.

    ``peft_model`` is the trained model (the best checkpoint's delta when ``load_best_model_at_end``);
    ``localization`` the :class:`~grin_peft.localize.report.LocalizationReport` (None when the entries were chosen
    without data: ``score='random'``/``'magnitude'``, or a model that already had its entries); ``train_metrics``
    `Trainer.train`'s metrics and ``log_history`` every log (training losses with the objective's parts, evaluations);
    ``eval_metrics`` a final :meth:`UnlearningTrainer.evaluate` (None without retain data); ``trainable_entries`` the
    number of trained weight entries; ``wall_time`` seconds for the whole call and ``timings`` per stage.
    ``before``/``after``: forget and retain answer probability of the original model and of the result (and, with the
    automatic operating point, on the held-out retain slice); ``operating_point`` the controller's full record
    (:func:`grin_peft.operating_point.search`; None with a fixed schedule). ``target_met`` says whether the forget
    target was reached within the retain floor (None with a fixed schedule, which sets no target).
    """

    peft_model: PeftModel
    localization: Any
    train_metrics: dict[str, float]
    log_history: list[dict[str, float]]
    trainable_entries: int
    wall_time: float
    timings: dict[str, float] = field(default_factory=dict)
    eval_metrics: dict[str, float] | None = None
    trainer: UnlearningTrainer | None = field(default=None, repr=False)
    before: dict[str, float] | None = None
    after: dict[str, float] | None = None
    operating_point: dict[str, Any] | None = None

    @property
    def target_met(self) -> bool | None:
        return None if self.operating_point is None else bool(self.operating_point["target_met"])

    def summary(self) -> dict[str, Any]:
        """JSON-ready: what was trained, the numbers before and after, and every decision of the controller."""
        return {
            "mode": "fixed schedule" if self.operating_point is None else "automatic operating point",
            "target_met": self.target_met,
            "trainable_entries": self.trainable_entries,
            "before": self.before,
            "after": self.after,
            "eval": self.eval_metrics,
            "wall_time": self.wall_time,
            "timings": self.timings,
            "operating_point": self.operating_point,
        }


@with_thread_rule
def unlearn(
    model: nn.Module,
    forget: Any,
    retain: Any = None,
    config: GrinConfig | None = None,
    objective: str | None = None,
    tokenizer: PreTrainedTokenizerBase | QAFormat | None = None,
    training_args: UnlearningArguments | None = None,
    output_dir: str | None = None,
    localize_kwargs: Mapping[str, Any] | None = None,
    *,
    refusals: Sequence[str] | None = None,
    eval_forget: Any = None,
    eval_retain: Any = None,
    callbacks: list[TrainerCallback] | None = None,
    operating_point: OperatingPoint | bool | None = None,
    localize_retain: int | None = None,
    verbose: bool = True,
    **kw: Any,
) -> UnlearnResult:
    """Make ``model`` forget ``forget`` while keeping ``retain``, by training a sparse GRIN delta.

    1. Wrap: a base model gets ``get_peft_model(model, config or GrinConfig(seed=0))`` (the model is modified in
       place, as PEFT does; pass a copy to keep the original). A `PeftModel` whose active adapter is GRIN is used
       as it is.
    2. Localise: when ``config.score`` needs data (the default ``'gradient_ratio'``, and every score but
       ``'random'``/``'magnitude'``) and the adapter has no entries yet, ``model.localize(forget, retain,
       tokenizer=tokenizer, **localize_kwargs)`` scores entries, selects the budget and injects the noise.
    3. Train: :class:`~grin_peft.trainer.UnlearningTrainer` trains only the delta's values; with retain data a
       final evaluation reports forget/retain answer probability.

    By default (no ``training_args``, no ``learning_rate``/``num_train_epochs``/``max_steps``) training runs under
    the **automatic operating point** (:mod:`grin_peft.operating_point`): part of the retain set is held out (or
    ``eval_retain`` is used as the held-out set), a probe picks the learning rate, training stops once forget answer
    probability reaches the target (default 0.2) while held-out retain probability stays above its floor (default
    0.85 x the original's), and the best evaluated state is kept. When the target is missed and the config leaves
    the budget at its default (no ``density``/``num_entries``), it localises again at 5x the density, up to
    ``OperatingPoint.max_density`` (25%). ``result.target_met`` says whether it worked; a missed target also
    raises a `UserWarning`. A fixed schedule (any of those settings, or
    ``operating_point=False``) trains exactly as told.

    Args:
        model: a causal LM (`transformers` model or any module PEFT can wrap), or a GRIN `PeftModel`.
        forget, retain: lists (or `datasets.Dataset`) of ``{"question", "answer"}`` items (need ``tokenizer``) or of
            encoded examples (``input_ids``/``labels``). ``retain`` may be None only for objectives without a
            retain term and scores that do not read it.
        config: the GRIN configuration for a base model; default ``GrinConfig(seed=0)`` (gradient-ratio score,
            density 1e-3, see its fields). Not allowed with a `PeftModel`, which already has its config.
        objective: the unlearning objective's name (default ``"npo"``: bounded, reference-anchored, the field's
            standard); with ``training_args`` it must agree with ``training_args.objective``.
        tokenizer: a tokenizer or a :class:`~grin_peft.data.QAFormat`, to encode raw items (chat template when the
            tokenizer has one) and for checkpoints.
        training_args: full control over training. Without it, :class:`~grin_peft.unlearning_args.UnlearningArguments`
            are built from ``output_dir`` and ``**kw`` (any of its fields: ``learning_rate``, ``num_train_epochs``,
            ``beta``, ``retain_weight``, ``num_threads``, ...) on top of its defaults (lr 1e-2, 10 epochs, batch 8).
        output_dir: where checkpoints and the final adapter go. None (default) keeps everything in memory: no
            checkpoint is written (``save_strategy="no"``) and a temporary directory holds Trainer's scratch files.
        localize_kwargs: extra arguments of ``model.localize`` (``batch_size``, ``max_batches``, ``progress``, ...).
        refusals: refusal answers for ``idk_nll``/``idk_dpo`` (e.g. :func:`grin_peft.data.load_tofu_idk`).
        eval_forget, eval_retain: what evaluation scores; default the training sets. Under the automatic operating
            point ``eval_retain`` is the held-out retain set (default: a seeded slice of ``retain``).
        callbacks: `transformers` trainer callbacks.
        operating_point: an :class:`~grin_peft.operating_point.OperatingPoint` (target, floor, budget), True for its
            defaults, False for a fixed schedule; None (default) means automatic unless the schedule is fixed.
        localize_retain: how many retain items (a seeded sample) the scoring pass reads; default
            ``max(len(forget), 256)``. The held-out slice is never among them.
        verbose: print the controller's decisions and the before/after numbers.

    Threads: the whole call runs under :mod:`grin_peft.threads`' rule (``num_threads`` if given, else one thread
    for a CPU model below 25M parameters unless ``OMP_NUM_THREADS`` is set), and restores torch's setting after.

    Raises:
        GrinError: on conflicting or invalid arguments and bad data, before any weight changes.
    """
    started = time.perf_counter()
    point = _operating_point(operating_point, training_args, kw)
    if point is not None and retain is None:
        raise GrinError(
            "the automatic operating point needs retain data (part of it is held out to check what is kept); pass "
            "retain=, or fix the schedule with learning_rate= and num_train_epochs=."
        )
    relocalizing = config is not None and getattr(config, "relocalize_every", None) is not None
    if isinstance(model, PeftModel):
        relocalizing = getattr(model.peft_config.get(model.active_adapter), "relocalize_every", None) is not None
    if point is not None and relocalizing:
        raise GrinError(
            "relocalize_every grows the delta during training, which the automatic operating point cannot roll back "
            "(its saved states have the old size): fix the schedule (learning_rate=, num_train_epochs=) or drop "
            "relocalize_every."
        )
    log = print if verbose else (lambda message: None)
    training_args, scratch = _training_args(training_args, objective, output_dir, kw)
    try:
        # Everything that can be refused is checked before the model is touched.
        if localize_kwargs is not None and not isinstance(localize_kwargs, Mapping):
            raise GrinError(f"localize_kwargs must be a dict, got {type(localize_kwargs).__name__}.")
        qa_format = None if tokenizer is None else as_format(tokenizer)
        forget_items = _encoded(forget, "forget", qa_format)
        retain_items = None if retain is None else _encoded(retain, "retain", qa_format)
        eval_items = {
            name: None if data is None else _encoded(data, f"eval {name}", qa_format)
            for name, data in (("forget", eval_forget), ("retain", eval_retain))
        }
        heldout_items = None
        if point is not None:
            if eval_items["retain"] is not None:
                heldout_items = eval_items["retain"]
            else:
                retain_items, heldout_items = split_heldout(retain_items, point)
        objective_obj = training_args.build_objective()
        if retain_items is None and objective_obj.requirements.retain:
            raise GrinError(f"objective {objective_obj.name!r} has a retain term but no retain set was given.")
        questions = [item.get("question") for item in forget_items]
        known = all(isinstance(q, str) for q in questions)
        refusals = check_refusals(refusals, objective_obj, questions if known else None, qa_format)

        pristine = copy.deepcopy(config)  # PEFT writes the base fingerprint into the config it is given
        densities = _density_schedule(model, config, point)
        peft_model, wrapped = _wrap(model, config)
        attempts: list[dict[str, Any]] = []
        for attempt, density in enumerate(densities):
            if attempt:
                log(f"target missed at density {densities[attempt - 1]:.3g}: localising again at {density:.3g}")
                retry = dataclasses.replace(
                    copy.deepcopy(pristine) if pristine else _default_config(), density=density
                )
                peft_model = get_peft_model(peft_model.unload(), retry)
            run = _Run(peft_model, wrapped, forget_items, retain_items, heldout_items, eval_items, qa_format)
            run.localize(localize_kwargs, localize_retain, verbose, point.seed if point else 0)
            trainer = run.trainer(training_args, refusals, callbacks, point is not None or not verbose)
            t0 = time.perf_counter()
            if point is None:
                before = _probabilities(trainer, peft_model, run.forget_eval, run.retain_eval, original=True)
                train_metrics = dict(trainer.train().metrics)
                record = None
            else:
                record = run.search(point, training_args, kw, refusals, callbacks, log)
                before = record["before"]
                train_metrics = {"steps_run": record["steps_run"], "learning_rate": record["learning_rate"]}
            run.timings["train"] = time.perf_counter() - t0
            if record is not None:
                attempts.append(
                    {
                        "density": density,
                        "target_met": record["target_met"],
                        "after": record["after"],
                        "learning_rate": record["learning_rate"],
                        "retain_weight": record["retain_weight"],
                        "steps_run": record["steps_run"],
                        "gave_up": record["gave_up"],
                        "seconds": run.timings["train"],
                        "path": [[e["step"], e["forget"], e["heldout"]] for e in record["evaluations"]],
                    }
                )
            if record is None or record["target_met"]:
                break
        if record is not None and len(densities) > 1:
            record["density_attempts"] = attempts
        eval_metrics = None
        if trainer.eval_dataset is not None:
            t0 = time.perf_counter()
            eval_metrics = trainer.evaluate()
            run.timings["evaluate"] = time.perf_counter() - t0
        if record is None:
            after = _probabilities(trainer, peft_model, run.forget_eval, run.retain_eval, original=False)
            log(
                ", ".join(f"{key} {before[key]:.3f} -> {after[key]:.3f}" for key in before)
                + " (fixed schedule: no target)"
            )
        else:
            after = record["after"]
            if not record["target_met"]:
                warnings.warn(
                    f"the unlearning target was not reached: forget prob {after['forget_prob']:.3f} (target "
                    f"{record['target_forget_prob']:.3f}), held-out retain prob {after['heldout_retain_prob']:.3f} "
                    f"(floor {record['floor_heldout_retain_prob']:.3f}).",
                    UserWarning,
                    stacklevel=2,
                )
        peft_model.grin_unlearn_summary = {"before": before, "after": after, "operating_point": record}
        if output_dir is not None:
            trainer.save_model(output_dir)
    finally:
        if scratch is not None:
            scratch.cleanup()
    return UnlearnResult(
        peft_model=peft_model,
        localization=run.report,
        train_metrics=train_metrics,
        log_history=list(trainer.state.log_history),
        trainable_entries=int(sum(peft_model.base_model.num_entries().values())),
        wall_time=time.perf_counter() - started,
        timings=run.timings,
        eval_metrics=eval_metrics,
        trainer=trainer,
        before=before,
        after=after,
        operating_point=record,
    )


class _Run:
    """One localise-and-train attempt on one wrapped model: the pieces `unlearn` chains."""

    def __init__(
        self,
        peft_model: PeftModel,
        wrapped: bool,
        forget: list[dict[str, Any]],
        retain: list[dict[str, Any]] | None,
        heldout: list[dict[str, Any]] | None,
        eval_items: dict[str, list[dict[str, Any]] | None],
        qa_format: QAFormat | None,
    ) -> None:
        self.peft_model, self.wrapped, self.qa_format = peft_model, wrapped, qa_format
        self.forget, self.retain, self.heldout, self.eval_items = forget, retain, heldout, eval_items
        self.forget_eval = eval_items["forget"] or forget
        self.retain_eval = eval_items["retain"] or retain
        self.report: Any = None
        self.timings: dict[str, float] = {}

    def localize(self, localize_kwargs: Mapping[str, Any] | None, limit: int | None, verbose: bool, seed: int) -> None:
        """Score and select, unless the entries are chosen without data or already there."""
        config = self.peft_model.peft_config[self.peft_model.active_adapter]
        if config.selects_at_injection or sum(self.peft_model.base_model.num_entries().values()) > 0:
            return
        retain = self.retain
        if retain is not None:
            cap = max(len(self.forget), LOCALIZE_RETAIN_MIN) if limit is None else limit
            retain = _sample(retain, cap, seed)
        t0 = time.perf_counter()
        options = {"tokenizer": self.qa_format, "progress": verbose, **(localize_kwargs or {})}
        try:
            self.report = self.peft_model.localize(self.forget, retain, **options)
        except BaseException:
            if self.wrapped:  # give the caller back the model as it was
                self.peft_model.unload()
            raise
        self.timings["localize"] = time.perf_counter() - t0

    def trainer(
        self,
        args: UnlearningArguments,
        refusals: list[str] | None,
        callbacks: list[TrainerCallback] | None,
        quiet: bool,
    ) -> UnlearningTrainer:
        try:
            trainer = UnlearningTrainer(
                self.peft_model,
                args,
                self.forget,
                self.retain,
                qa_format=self.qa_format,
                refusals=refusals,
                eval_forget_dataset=self.eval_items["forget"],
                eval_retain_dataset=self.heldout if self.heldout is not None else self.eval_items["retain"],
                callbacks=callbacks,
            )
        except BaseException:
            if self.wrapped:
                self.peft_model.unload()
            raise
        if quiet:
            trainer.remove_callback(PrinterCallback)  # the before/after lines say it once
        return trainer

    def search(
        self,
        point: OperatingPoint,
        args: UnlearningArguments,
        kw: Mapping[str, Any],
        refusals: list[str] | None,
        callbacks: list[TrainerCallback] | None,
        log: Any,
    ) -> dict[str, Any]:
        """The automatic operating point; checkpoints of the best state are kept in memory, not on disk."""

        accumulation = args.gradient_accumulation_steps
        if "gradient_accumulation_steps" not in kw and point.effective_batch is not None:
            wanted = min(point.effective_batch, len(self.forget))
            accumulation = max(1, wanted // (args.per_device_train_batch_size * max(1, args.world_size)))

        def segment_trainer(lr: float, max_steps: int, segment: int, retain_weight: float | None) -> UnlearningTrainer:
            settings = {**kw, "learning_rate": lr, "max_steps": max_steps, "save_strategy": "no"}
            settings["gradient_accumulation_steps"] = accumulation
            settings["seed"] = kw.get("seed", 42) + segment
            if retain_weight is not None:
                settings["retain_weight"] = retain_weight
            return self.trainer(_segment_args(args, settings), refusals, callbacks, quiet=True)

        batch = args.per_device_train_batch_size * accumulation
        retain_weight = getattr(args.build_objective(), "retain_weight", 0.0)
        record = search(
            self.peft_model,
            segment_trainer,
            point,
            forget_eval=self.forget_eval,
            heldout=self.heldout,
            retain_eval=_sample(self.retain, point.max_heldout, point.seed),
            steps_per_epoch=math.ceil(len(self.forget) / (batch * max(1, args.world_size))),
            original=self.peft_model.disable_adapter,
            retain_weight=retain_weight if retain_weight > 0 else None,
            log=log,
        )
        record["gradient_accumulation_steps"] = accumulation
        return record


def _density_schedule(model: nn.Module, config: GrinConfig | None, point: OperatingPoint | None) -> list[float | None]:
    """Densities to try in turn: more only under the automatic operating point, for a model wrapped here whose
    config leaves the budget to its default (an explicit density or num_entries is kept as given)."""
    if point is None or point.max_density is None or isinstance(model, PeftModel):
        return [None]
    if config is not None and (config.density is not None or config.num_entries is not None):
        return [None]
    densities = [DEFAULT_DENSITY]
    while densities[-1] < point.max_density:
        densities.append(min(densities[-1] * point.density_growth, point.max_density))
    return densities


def _operating_point(
    operating_point: OperatingPoint | bool | None, training_args: UnlearningArguments | None, kw: Mapping[str, Any]
) -> OperatingPoint | None:
    """The controller's settings, or None for a fixed schedule; a contradiction is refused."""
    fixed = sorted(name for name in FIXED_SCHEDULE if name in kw) + (["training_args"] if training_args else [])
    if operating_point is None:
        return None if fixed else OperatingPoint()
    if operating_point is False:
        return None
    if fixed:
        raise GrinError(
            f"operating_point chooses the learning rate and the stopping step itself; drop {fixed} or pass "
            "operating_point=False for a fixed schedule."
        )
    if operating_point is True:
        return OperatingPoint()
    if not isinstance(operating_point, OperatingPoint):
        raise GrinError(f"operating_point must be an OperatingPoint, True, False or None; got {operating_point!r}.")
    operating_point.validate()
    return operating_point


def _segment_args(template: UnlearningArguments, settings: Mapping[str, Any]) -> UnlearningArguments:
    """Training arguments of one controller segment: the caller's settings with the controller's rate and length."""
    return UnlearningArguments(
        output_dir=template.output_dir,
        objective=template.objective,
        **{"dataloader_pin_memory": template.dataloader_pin_memory, **settings},
    )


def _sample(items: Sequence[Any], n: int, seed: int) -> list[Any]:
    return list(items) if len(items) <= n else random.Random(seed).sample(list(items), n)


def _probabilities(
    trainer: UnlearningTrainer,
    peft_model: PeftModel,
    forget: Sequence[Any],
    retain: Sequence[Any] | None,
    original: bool,
) -> dict[str, float]:
    """Mean forget/retain answer probability now, or of the original model (adapter disabled)."""
    with peft_model.disable_adapter() if original else contextlib.nullcontext():
        out = {"forget_prob": float(np.mean(np.exp(-trainer.answer_nll(forget))))}
        if retain is not None:
            out["retain_prob"] = float(np.mean(np.exp(-trainer.answer_nll(retain))))
    return out


def _training_args(
    training_args: UnlearningArguments | None, objective: str | None, output_dir: str | None, kw: dict[str, Any]
) -> tuple[UnlearningArguments, tempfile.TemporaryDirectory | None]:
    """The training arguments, and the scratch directory standing in for a missing output_dir (caller cleans up)."""
    if training_args is not None:
        if not isinstance(training_args, UnlearningArguments):
            raise GrinError(f"training_args must be UnlearningArguments, got {type(training_args).__name__}.")
        if kw or output_dir is not None:
            given = sorted(kw) + (["output_dir"] if output_dir is not None else [])
            raise GrinError(
                f"give training settings either in training_args or as output_dir/keywords, not both (got {given})."
            )
        if objective is not None and objective != training_args.objective:
            raise GrinError(
                f"objective={objective!r} disagrees with training_args.objective={training_args.objective!r}."
            )
        return training_args, None
    if output_dir is None and (kw.get("save_strategy", "no") != "no" or kw.get("load_best_model_at_end")):
        raise GrinError("checkpoints (save_strategy, load_best_model_at_end) need an output_dir.")
    known = {f.name for f in fields(UnlearningArguments) if f.init}
    unknown = sorted(set(kw) - known)
    if unknown:
        raise GrinError(f"unknown training setting(s) {unknown}: see UnlearningArguments for the valid ones.")
    # pinned memory only helps a host-to-accelerator copy; on a CPU-only machine it just warns
    kw = {"dataloader_pin_memory": _has_accelerator(), **kw}
    if output_dir is not None:
        return UnlearningArguments(output_dir=output_dir, objective=objective or "npo", **kw), None
    scratch = tempfile.TemporaryDirectory(prefix="grin_unlearn_")
    try:
        args = UnlearningArguments(
            output_dir=scratch.name, objective=objective or "npo", **{"save_strategy": "no", **kw}
        )
    except BaseException:
        scratch.cleanup()
        raise
    return args, scratch


def _has_accelerator() -> bool:
    accelerator = getattr(torch, "accelerator", None)  # torch >= 2.6
    return bool(accelerator.is_available()) if accelerator is not None else torch.cuda.is_available()


def _encoded(data: Any, name: str, qa_format: QAFormat | None) -> list[dict[str, Any]]:
    """Encode once, up front: invalid data is refused before the model is wrapped, and localize and the trainer
    read the same examples. Questions travel along for refusal objectives."""
    encoded, questions = encode_dataset(data, name, qa_format)
    if questions is None:
        return list(encoded)
    return [{**example, "question": question} for example, question in zip(encoded, questions)]


def _default_config() -> GrinConfig:
    """``GrinConfig(seed=0)``: `unlearn` without a config is reproducible (a bare GrinConfig draws its seed from
    torch's RNG, as PEFT adapters do)."""
    return GrinConfig(seed=0)


def _wrap(model: nn.Module, config: GrinConfig | None) -> tuple[PeftModel, bool]:
    """The GRIN `PeftModel` to train (``model`` itself, or ``model`` wrapped with ``config``), and whether it was
    wrapped here."""
    if isinstance(model, PeftModel):
        if config is not None:
            raise GrinError("the model is already a PeftModel with its own config: do not pass config=.")
        if not isinstance(model.peft_config.get(model.active_adapter), GrinConfig):
            raise GrinError(f"the model's active adapter '{model.active_adapter}' is not a GRIN adapter.")
        return model, False
    if not isinstance(model, nn.Module):
        raise GrinError(f"model must be a torch module or a PeftModel, got {type(model).__name__}.")
    if config is not None and not isinstance(config, GrinConfig):
        raise GrinError(f"config must be a GrinConfig, got {type(config).__name__}.")
    return get_peft_model(model, config if config is not None else _default_config()), True
