"""`UnlearningTrainer`: a `transformers.Trainer` that trains a PEFT adapter (GRIN's sparse delta) to unlearn.

Every step pairs one forget batch with one retain batch (and, for refusal objectives, the forget questions paired
with refusal answers), computes the forward passes the objective asks for (see
:attr:`grin_peft.objectives.UnlearningObjective.requirements`) and backpropagates its loss. The pairing lives in a
dataset, a sampler and a collator (:mod:`grin_peft.paired_data`), not in a custom loop, so everything `Trainer`
does keeps working: logging, checkpoints and resuming, gradient accumulation, mixed precision,
accelerate/DeepSpeed/FSDP, progress bars and callbacks.

Reference quantities (NPO's and DPO's reference NLLs, the KL term's reference logits) come from the same PEFT model
with its adapter disabled, in eval mode and under ``torch.no_grad``: the frozen base *is* the reference, so no
second copy of the model is held in memory.

Full-parameter baselines (GradAscent, GradDiff, NPO on every weight, as in open-unlearning) train a plain
`transformers` model instead of a `PeftModel`: every parameter with ``requires_grad`` is trained, and the reference
comes from a frozen copy passed as ``ref_model=`` (a module, or a zero-argument callable returning one, which is
only called when the objective reads a reference, so GradAscent/GradDiff never pay for a second copy).

Evaluation scores the forget and retain answers' probability (TOFU's Probability: ``exp(-mean answer-token NLL)``,
averaged over items, teacher-forced, no generation) and a criterion combining them, ``eval_unlearn_score``, usable
with ``metric_for_best_model`` and ``load_best_model_at_end``. The arguments and that criterion live in
:mod:`grin_peft.unlearning_args`.
"""

from __future__ import annotations

import contextlib
import time
import warnings
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from peft import PeftModel
from torch import nn
from torch.utils.data import Dataset, Sampler
from transformers import PreTrainedTokenizerBase, Trainer, TrainerCallback

from .data import EncodedQA, QACollator, QAFormat, as_format
from .errors import GrinError, remedy
from .losses import sequence_nll
from .objectives import ObjectiveInputs, UnlearningObjective
from .paired_data import PairedCollator, PairedSampler, PairedUnlearningDataset, encode_dataset
from .sharpness import sharpness_aware_step
from .threads import torch_threads
from .unlearning_args import UnlearningArguments, unlearn_score

__all__ = ["UnlearningTrainer", "check_refusals"]


class UnlearningTrainer(Trainer):
    """Train a PEFT adapter (a GRIN delta) to forget ``forget_dataset`` while keeping ``retain_dataset``.

    Args:
        model: a `peft.PeftModel`, normally with a GRIN adapter whose entries are selected (data-free scores select
            at creation, the others in ``model.localize(forget, retain)``), or any PEFT adapter (LoRA, ...). Only its
            trainable parameters change. A plain model (no PEFT wrapper) is trained in full: every parameter with
            ``requires_grad``; objectives with a reference term then need ``ref_model``.
        args: :class:`UnlearningArguments` (objective, hyper-parameters, evaluation criterion, everything of
            `TrainingArguments`). ``per_device_train_batch_size`` is the size of each forget and each retain batch.
        forget_dataset, retain_dataset: encoded examples (``input_ids``/``labels``, e.g. from
            :func:`grin_peft.data.encode_items`) or raw ``question``/``answer`` items, as lists or `datasets.Dataset`.
            The retain set may be None for objectives without a retain term (GradAscent).
        processing_class: the tokenizer; encodes raw items with the default :class:`~grin_peft.data.QAFormat`
            (its chat template when it has one) and is saved with checkpoints.
        qa_format: a :class:`~grin_peft.data.QAFormat` for a custom layout (template, system prompt, max_length).
        refusals: refusal answers (e.g. :func:`grin_peft.data.load_tofu_idk`) for ``idk_nll`` / ``idk_dpo``; each
            forget question is paired with one drawn per epoch. Needs the forget questions (raw items).
        eval_forget_dataset, eval_retain_dataset: what :meth:`evaluate` scores; default the training sets.
        objective: a ready :class:`~grin_peft.objectives.UnlearningObjective`, overriding ``args.objective`` and
            its hyper-parameters (for custom objectives).
        ref_model: the reference model of NPO/DPO/KL terms: a frozen module, or a zero-argument callable returning
            one (called only when the objective needs a reference). Required for a plain model with such an
            objective; with a `PeftModel` it replaces the default reference (the model with its adapter disabled).
            It is put in eval mode, frozen and moved to the training device.
        callbacks, optimizers, optimizer_cls_and_kwargs: as in `Trainer`. A GRIN adapter whose config sets
            ``relocalize_every`` gets a :class:`~grin_peft.relocalize.RelocalizeCallback` on the forget and retain
            sets unless ``callbacks`` holds one.
    """

    # compute_loss returns a per-micro-batch mean: Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(
        self,
        model: PeftModel,
        args: UnlearningArguments | None = None,
        forget_dataset: Any = None,
        retain_dataset: Any = None,
        *,
        processing_class: PreTrainedTokenizerBase | None = None,
        qa_format: QAFormat | None = None,
        refusals: Sequence[str] | None = None,
        eval_forget_dataset: Any = None,
        eval_retain_dataset: Any = None,
        objective: UnlearningObjective | None = None,
        ref_model: nn.Module | Callable[[], nn.Module] | None = None,
        callbacks: list[TrainerCallback] | None = None,
        optimizers: tuple[torch.optim.Optimizer | None, torch.optim.lr_scheduler.LambdaLR | None] = (None, None),
        optimizer_cls_and_kwargs: tuple[type[torch.optim.Optimizer], dict[str, Any]] | None = None,
    ) -> None:
        if args is None:
            args = UnlearningArguments(output_dir="unlearning_output")
        if not isinstance(args, UnlearningArguments):
            raise GrinError(f"args must be UnlearningArguments, got {type(args).__name__}.")
        if objective is not None and not isinstance(objective, UnlearningObjective):
            raise GrinError(f"objective must be an UnlearningObjective, got {type(objective).__name__}.")
        self.objective = objective if objective is not None else args.build_objective()
        needs = self.objective.requirements
        needs_reference = needs.reference_forget or needs.reference_refusal or needs.reference_retain
        _check_model(model, self.objective.name if needs_reference else None, ref_model is not None)
        if ref_model is not None and not isinstance(ref_model, nn.Module) and not callable(ref_model):
            raise GrinError(f"ref_model must be a torch module or a callable returning one, got {type(ref_model)}.")
        self.ref_model: nn.Module | None = None
        if needs_reference and ref_model is not None:
            self.ref_model = ref_model if isinstance(ref_model, nn.Module) else ref_model()
            if not isinstance(self.ref_model, nn.Module):
                raise GrinError(f"ref_model() must return a torch module, got {type(self.ref_model).__name__}.")
            if self.ref_model is model:
                raise GrinError("ref_model must be a separate frozen copy, not the model being trained.")
            self.ref_model.eval().requires_grad_(False)

        if qa_format is None and processing_class is not None:
            qa_format = as_format(processing_class)
        if qa_format is not None and not isinstance(qa_format, QAFormat):
            raise GrinError(f"qa_format must be a grin_peft.data.QAFormat, got {type(qa_format).__name__}.")
        self.qa_format = qa_format
        if processing_class is None and qa_format is not None:
            processing_class = qa_format.tokenizer

        forget, forget_questions = encode_dataset(forget_dataset, "forget", qa_format)
        retain = None
        if retain_dataset is not None:
            retain, _ = encode_dataset(retain_dataset, "retain", qa_format)
        elif needs.retain:
            raise GrinError(
                f"objective {self.objective.name!r} has a retain term (retain_weight or kl_weight > 0) but no "
                "retain set was given."
            )
        refusal_strings = check_refusals(refusals, self.objective, forget_questions, qa_format)
        train_dataset = PairedUnlearningDataset(
            forget,
            retain if needs.retain else None,
            forget_questions=forget_questions if refusal_strings else None,
            refusals=refusal_strings,
            qa_format=qa_format,
            use_forget=needs.forget or needs.reference_forget,
        )
        eval_forget, eval_retain = forget, retain
        if eval_forget_dataset is not None:
            eval_forget = encode_dataset(eval_forget_dataset, "eval forget", qa_format)[0]
        if eval_retain_dataset is not None:
            eval_retain = encode_dataset(eval_retain_dataset, "eval retain", qa_format)[0]
        eval_dataset = {"forget": eval_forget, "retain": eval_retain} if eval_retain is not None else None
        if eval_dataset is None and args.eval_strategy != "no":
            raise GrinError("evaluation needs retain examples: pass retain_dataset or eval_retain_dataset.")

        pad_id = _pad_id(processing_class)
        self._qa_collator = QACollator(pad_id)
        self._objective_logs: dict[str, list[float]] = defaultdict(list)  # since the last training log
        self._run_logs: dict[str, list[float]] = defaultdict(list)  # since train() started
        super().__init__(
            model=model,
            args=args,
            data_collator=PairedCollator(self._qa_collator),
            train_dataset=train_dataset,
            eval_dataset=eval_dataset,
            processing_class=processing_class,
            callbacks=callbacks,
            optimizers=optimizers,
            optimizer_cls_and_kwargs=optimizer_cls_and_kwargs,
        )
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        from .relocalize import attach_relocalization

        attach_relocalization(self, model, forget, retain)  # when the GRIN config sets relocalize_every

    # ------------------------------------------------------------------------------------------- data plumbing
    def _get_train_sampler(self, train_dataset: Dataset | None = None) -> Sampler:
        """A :class:`PairedSampler`: shuffled unless ``train_sampling_strategy="sequential"`` (length grouping and
        rebalancing do not apply to paired batches)."""
        dataset = train_dataset if train_dataset is not None else self.train_dataset
        seed = self.args.data_seed if self.args.data_seed is not None else self.args.seed
        return PairedSampler(
            len(dataset),
            dataset.num_retain,
            dataset.num_refusals,
            seed,
            shuffle=self.args.train_sampling_strategy != "sequential",
        )

    def _get_collator_with_removed_columns(self, data_collator: Any, description: str | None = None) -> Any:
        # Paired batches are nested dicts, not model inputs: there is no column to remove.
        return data_collator

    def floating_point_ops(self, inputs: dict[str, Any]) -> int:
        """Forward + backward FLOPs of the trained passes (the reference passes are forward-only and not counted)."""
        return sum(super(UnlearningTrainer, self).floating_point_ops(batch) for batch in inputs.values())

    def _track_num_input_tokens(self, inputs: dict[str, Any]) -> None:
        for batch in inputs.values():
            super()._track_num_input_tokens(batch)

    # ------------------------------------------------------------------------------------------- the loss
    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, dict[str, torch.Tensor]],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, float]]:
        """Run the passes the objective needs, then its loss; log its parts (averaged over each logging window)."""
        needs = self.objective.requirements
        forget, retain, refusal = inputs.get("forget"), inputs.get("retain"), inputs.get("refusal")
        values: dict[str, torch.Tensor] = {}
        if needs.reference_forget or needs.reference_refusal or needs.reference_retain:
            with torch.no_grad(), self._reference_mode(model) as ref:
                if needs.reference_forget:
                    values["ref_forget_nll"] = sequence_nll(_logits(ref, forget), forget["labels"], "sum")
                if needs.reference_refusal:
                    values["ref_refusal_nll"] = sequence_nll(_logits(ref, refusal), refusal["labels"], "sum")
                if needs.reference_retain:
                    values["ref_retain_logits"] = _logits(ref, retain)
        if needs.forget:
            values["forget_logits"], values["forget_labels"] = _logits(model, forget), forget["labels"]
        if needs.refusal:
            values["refusal_logits"], values["refusal_labels"] = _logits(model, refusal), refusal["labels"]
        if needs.retain:
            values["retain_logits"], values["retain_labels"] = _logits(model, retain), retain["labels"]
        loss, logs = self.objective.compute(ObjectiveInputs(**values))
        if model.training:
            for key, value in logs.items():
                if key != "loss":  # Trainer logs the loss itself
                    self._objective_logs[key].append(value)
                    self._run_logs[key].append(value)
        return (loss, logs) if return_outputs else loss

    def training_step(
        self, model: nn.Module, inputs: dict[str, Any], num_items_in_batch: torch.Tensor | int | None = None
    ) -> torch.Tensor:
        """`Trainer.training_step`, or with ``args.sam_rho > 0`` a sharpness-aware one (:mod:`grin_peft.sharpness`)."""
        if self.args.sam_rho > 0:
            return sharpness_aware_step(self, model, inputs, num_items_in_batch)
        return super().training_step(model, inputs, num_items_in_batch)

    @contextlib.contextmanager
    def _reference_mode(self, model: nn.Module) -> Iterator[nn.Module]:
        """Yield the reference model: ``ref_model`` when given (under the same autocast as training), else this model
        with its adapter disabled and in eval mode (no dropout)."""
        if self.ref_model is not None:
            with self.accelerator.autocast():
                yield self.ref_model
            return
        peft_model = self.accelerator.unwrap_model(model)
        was_training = peft_model.training
        peft_model.eval()
        try:
            with peft_model.disable_adapter():
                yield model
        finally:
            peft_model.train(was_training)

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the objective's logged parts to training logs: averaged since the last training log to each one, and
        averaged over the whole run (``train_<part>``) to the final summary, so even a run shorter than
        ``logging_steps`` reports them (also in ``train().metrics``)."""
        if "loss" in logs and self._objective_logs:
            logs.update(self._mean_logs(self._objective_logs, prefix=""))
            self._objective_logs.clear()
        if "train_loss" in logs and self._run_logs:
            logs.update(self._mean_logs(self._run_logs, prefix="train_"))
            self._run_logs.clear()
        super().log(logs, start_time)

    def _mean_logs(self, values: dict[str, list[float]], prefix: str) -> dict[str, float]:
        keys = sorted(values)
        means = torch.tensor([float(np.mean(values[key])) for key in keys], device=self.args.device)
        if self.accelerator.num_processes > 1:
            means = self.accelerator.reduce(means, reduction="mean")
        return {prefix + key: value for key, value in zip(keys, means.tolist())}

    # ------------------------------------------------------------------------------------------- train / evaluate
    def train(self, *args: Any, **kwargs: Any) -> Any:
        """`Trainer.train`, under ``args.num_threads`` torch threads when set."""
        with torch_threads(self.args.num_threads):
            return super().train(*args, **kwargs)

    def evaluate(
        self,
        eval_dataset: Mapping[str, Any] | None = None,
        ignore_keys: list[str] | None = None,
        metric_key_prefix: str = "eval",
    ) -> dict[str, float]:
        """Score forget and retain answer probability; no generation, so it is cheap enough to run often.

        Returns (and logs) ``{prefix}_forget_prob`` and ``{prefix}_retain_prob`` (mean over items of
        ``exp(-mean answer-token NLL)``, TOFU's Probability, as :func:`grin_peft.metrics.answer_probability`),
        ``{prefix}_forget_nll`` / ``{prefix}_retain_nll`` (mean answer-token NLL over items),
        ``{prefix}_unlearn_score`` (:func:`unlearn_score` with ``args.unlearn_criterion``) and the runtime.
        ``eval_dataset`` may be ``{"forget": ..., "retain": ...}`` to score other sets (encoded or raw items).
        Every process scores the whole sets, so the numbers agree across processes without gathering.
        """
        if eval_dataset is None:
            if self.eval_dataset is None:
                raise GrinError("evaluation needs retain examples: pass retain_dataset or eval_retain_dataset.")
            sets = self.eval_dataset
        else:
            if not isinstance(eval_dataset, Mapping) or set(eval_dataset) != {"forget", "retain"}:
                raise GrinError("eval_dataset must be a dict with exactly the keys 'forget' and 'retain'.")
            sets = {
                key: encode_dataset(value, f"eval {key}", self.qa_format)[0] for key, value in eval_dataset.items()
            }
        start = time.time()
        metrics: dict[str, float] = {}
        with torch_threads(self.args.num_threads):
            for key in ("forget", "retain"):
                nll = self.answer_nll(sets[key])
                metrics[f"{metric_key_prefix}_{key}_prob"] = float(np.mean(np.exp(-nll)))
                metrics[f"{metric_key_prefix}_{key}_nll"] = float(np.mean(nll))
        metrics[f"{metric_key_prefix}_unlearn_score"] = unlearn_score(
            metrics[f"{metric_key_prefix}_forget_prob"],
            metrics[f"{metric_key_prefix}_retain_prob"],
            self.args.unlearn_criterion,
        )
        runtime = time.time() - start
        metrics[f"{metric_key_prefix}_runtime"] = round(runtime, 4)
        metrics[f"{metric_key_prefix}_samples_per_second"] = round(
            (len(sets["forget"]) + len(sets["retain"])) / max(runtime, 1e-9), 3
        )
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

    @torch.no_grad()
    def answer_nll(self, examples: Sequence[EncodedQA]) -> np.ndarray:
        """Per-example mean answer-token NLL (encoded examples), batched by length to waste little padding.

        Teacher-forced and cheap, so callbacks (e.g. :mod:`grin_peft.operating_point`) can call it every few steps;
        ``exp(-nll)`` is TOFU's answer probability.
        """
        model = self.model_wrapped
        peft_model = self.accelerator.unwrap_model(model)
        was_training = peft_model.training
        peft_model.eval()
        order = sorted(range(len(examples)), key=lambda i: len(examples[i]["input_ids"]))
        out = np.zeros(len(examples))
        batch_size = self.args.per_device_eval_batch_size
        try:
            for start in range(0, len(order), batch_size):
                rows = order[start : start + batch_size]
                batch = self._prepare_inputs(self._qa_collator([examples[i] for i in rows]))
                with self.accelerator.autocast():
                    logits = _logits(model, batch)
                out[rows] = sequence_nll(logits, batch["labels"], "mean").float().cpu().numpy()
        finally:
            peft_model.train(was_training)
        return out


def _logits(model: nn.Module, batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """Logits of one padded batch; labels are not passed, so the model computes no loss of its own."""
    return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits


def _check_model(model: Any, reference_objective: str | None = None, has_ref_model: bool = False) -> None:
    """Refuse what cannot be trained. ``reference_objective`` names the objective when it reads a reference."""
    if not isinstance(model, PeftModel):
        if not isinstance(model, nn.Module):
            raise GrinError(
                f"UnlearningTrainer trains a PEFT adapter or a torch model, got a {type(model).__name__}: wrap the "
                "model with peft.get_peft_model(model, grin_peft.GrinConfig(...)) first, or use "
                "grin_peft.pipeline.unlearn."
            )
        if reference_objective is not None and not has_ref_model:
            raise GrinError(
                f"UnlearningTrainer got a plain {type(model).__name__} (trained in full) and objective "
                f"{reference_objective!r} needs a reference model: pass ref_model=<a frozen copy>, or train a PEFT "
                "adapter (e.g. peft.get_peft_model(model, grin_peft.GrinConfig(...))), whose disabled adapter is the "
                "reference."
            )
        if not any(p.requires_grad for p in model.parameters()):
            raise GrinError("the model has no trainable parameter: set requires_grad on the weights to train.")
        return
    tuner = model.base_model
    if hasattr(tuner, "num_entries") and sum(tuner.num_entries().values()) == 0:
        raise GrinError(
            "the GRIN adapter has no selected entries yet: call model.localize(forget, retain) first (scores other "
            "than 'random' and 'magnitude' select from data)."
        )
    if not any(p.requires_grad for p in model.parameters()):
        raise GrinError("the model has no trainable parameter: is the adapter in inference mode?")


def check_refusals(
    refusals: Sequence[str] | None,
    objective: UnlearningObjective,
    forget_questions: Sequence[str] | None,
    qa_format: QAFormat | None,
) -> list[str] | None:
    """The refusal strings when the objective reads a refusal batch; clear errors when it cannot be built."""
    needs = objective.requirements
    if not (needs.refusal or needs.reference_refusal):
        if refusals is not None:
            warnings.warn(
                f"refusals are ignored: objective {objective.name!r} has no refusal term.", UserWarning, stacklevel=3
            )
        return None
    if refusals is None:
        raise GrinError(
            f"objective {objective.name!r} trains towards refusal answers: pass "
            f"{remedy('refusals=[...] (e.g. grin_peft.data.load_tofu_idk())', '--refusals FILE (one answer a line)')}."
        )
    if isinstance(refusals, str | bytes) or not isinstance(refusals, Sequence):
        raise GrinError("refusals must be a list of strings (e.g. grin_peft.data.load_tofu_idk()).")
    strings = list(refusals)
    if not strings or not all(isinstance(s, str) and s.strip() for s in strings):
        raise GrinError("refusals must be a non-empty list of non-empty strings.")
    if forget_questions is None:
        raise GrinError(
            "refusal objectives pair each forget question with a refusal answer: give the forget set as raw "
            "question/answer items (or encoded items that keep a 'question' field)."
        )
    if qa_format is None:
        raise GrinError("refusal answers must be encoded: pass processing_class=<tokenizer> (or qa_format=).")
    return strings


def _pad_id(processing_class: PreTrainedTokenizerBase | None) -> int:
    """Padding id: the tokenizer's pad (else EOS) token, else 0.

    Padded positions are masked out of attention and labels, so the id only has to be a valid token; 0 always is
    (a model config's ids may not be: GPT-2's default EOS lies outside a small test vocabulary).
    """
    if processing_class is not None:
        for token_id in (processing_class.pad_token_id, processing_class.eos_token_id):
            if token_id is not None:
                return int(token_id)
    return 0
