"""Re-localisation during training: every N optimizer steps, rescore at the current weights and grow the delta.

A localisation scores entries once, at the original weights. As the delta trains, the entries that matter for the
forget data move: re-localisation rescores every ``GrinConfig.relocalize_every`` optimizer steps with the adapter's
own score, taking gradients at the weights the model computes with now (base + delta; ``wagle`` also uses the
current weight, ``magnitude`` ``|w + delta|``, ``random`` a fresh draw per growth step), and adds the
``round(relocalize_grow x budget)`` best-scored entries that are not selected yet (``budget`` being the initial
one: ``density`` x targeted entries, or ``num_entries``). The delta keeps the union: selected entries keep their
trained values, new ones start at 0 (at noise with ``relocalize_noise=True``), so with the default growing changes
nothing the model computes until the next optimizer step. ``leverage_ratio``'s pool is sized by the support after
growing. With ``selection='per_module'`` the new entries are split over modules in proportion to their free
entries. No growth happens after the last step (those entries would never train).

Configuration lives in :class:`~grin_peft.config.GrinConfig` (``relocalize_every``, ``relocalize_grow``,
``relocalize_noise``), so it is saved with the delta, as PEFT's AdaLoRA keeps its rank schedule in its config.
:class:`~grin_peft.trainer.UnlearningTrainer` adds a :class:`RelocalizeCallback` by itself when the adapter's config
sets ``relocalize_every``, scoring on its forget and retain sets; with another ``transformers.Trainer`` pass
``callbacks=[RelocalizeCallback(forget, retain)]``; in a custom loop call :meth:`RelocalizeCallback.grow` and
:func:`replace_in_optimizer` yourself.

The optimizer: growing replaces each grown module's values Parameter by a larger one. The callback points the
optimizer's param groups at the new Parameters and moves their state (:func:`replace_in_optimizer`): every state
tensor shaped like the parameter (AdamW's ``exp_avg``/``exp_avg_sq``, SGD's momentum) keeps the kept entries'
values at their new positions and is 0 for new entries, as RigL does; scalar state (AdamW's ``step``) is kept. With
one step count per Parameter, new entries get no bias correction of their own: for a steady gradient and default
betas their AdamW steps peak at about 1.1x the learning rate when grown after 10 steps, 2.2x after 100 and 6.5x
after thousands (instead of 1x), settling as their moments fill over a few hundred steps.
``RelocalizeCallback(optimizer_state="reset")`` drops the grown Parameters' state instead (every entry restarts with
a fresh bias correction; kept entries lose their moments). The learning-rate schedule
is untouched. Single process only: DDP/FSDP/DeepSpeed hold the parameters themselves, so growing is refused there.

Saving, loading, merging and exact revert work on a grown delta as on any other (the file holds the union, with
each entry's original base value), and a Trainer checkpoint saved after growing resumes exactly.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from transformers import TrainerCallback

from .config import GrinConfig
from .errors import GrinError
from .localize.pipeline import current_scores, current_weight, selection_mass
from .localize.scores import accumulation_plan
from .localize.select import resolve_budget, select_growth
from .noise import module_generator, noise_values

__all__ = ["RelocalizeCallback", "attach_relocalization", "replace_in_optimizer"]

logger = logging.getLogger(__name__)

OPTIMIZER_STATES = ("keep", "reset")


def replace_in_optimizer(
    optimizer: torch.optim.Optimizer,
    swaps: Iterable[tuple[nn.Parameter, nn.Parameter, torch.Tensor]],
    state: str = "keep",
) -> None:
    """Point an optimizer at grown Parameters: ``(old, new, positions of old's entries in new)`` per Parameter.

    ``state='keep'``: state tensors shaped like ``old`` are scattered into zeros shaped like ``new``; other state
    (scalars such as AdamW's step) is kept; a Parameter without state (one that had no entries, so no gradient)
    starts afresh. ``'reset'``: the state of grown Parameters is dropped (the optimizer
    initialises it again at the next step). Accelerate's wrapped optimizers are handled through ``.optimizer``.
    """
    if state not in OPTIMIZER_STATES:
        raise GrinError(f"optimizer_state={state!r} is not one of {', '.join(OPTIMIZER_STATES)}.")
    inner = optimizer
    while hasattr(inner, "optimizer") and isinstance(inner.optimizer, torch.optim.Optimizer):
        inner = inner.optimizer
    for old, new, positions in swaps:
        found = False
        for group in inner.param_groups:
            for i, param in enumerate(group["params"]):
                if param is old:
                    group["params"][i] = new
                    found = True
        if not found:
            raise GrinError("the optimizer does not hold a grown GRIN parameter; was it built for this model?")
        old_state = inner.state.pop(old, None)
        if state == "reset" or not old_state:
            continue
        moved = {}
        for key, value in old_state.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and value.shape == old.shape:
                grown = torch.zeros(new.shape, dtype=value.dtype, device=value.device)
                grown[positions.to(value.device)] = value
                moved[key] = grown
            else:
                moved[key] = value
        inner.state[new] = moved


class RelocalizeCallback(TrainerCallback):
    """Grow a GRIN adapter every ``GrinConfig.relocalize_every`` optimizer steps (see the module documentation).

    Args:
        forget, retain: the data to rescore on, in any form ``model.localize`` takes (lists of tokenized examples or
            question/answer dicts with ``tokenizer=``, or DataLoaders). Default: the forget and retain sets of the
            :class:`~grin_peft.trainer.UnlearningTrainer` being trained (its training dataset's).
        adapter_name: the GRIN adapter to grow (default: the model's active adapter).
        tokenizer, batch_size, max_batches, progress: as for ``model.localize``; ``max_batches`` bounds the cost of
            each rescoring pass.
        optimizer_state: ``'keep'`` (default) or ``'reset'``, see :func:`replace_in_optimizer`.

    ``history`` lists one record per growth: ``step``, ``added``, ``entries`` (after growing), ``forget_mass`` /
    ``retain_mass`` (share of the current statistics the whole support holds; None for data-free scores) and
    ``seconds``.
    """

    def __init__(
        self,
        forget: Any = None,
        retain: Any = None,
        *,
        adapter_name: str | None = None,
        tokenizer: Any = None,
        batch_size: int = 8,
        max_batches: int | None = None,
        progress: bool = False,
        optimizer_state: str = "keep",
    ) -> None:
        if optimizer_state not in OPTIMIZER_STATES:
            raise GrinError(f"optimizer_state={optimizer_state!r} is not one of {', '.join(OPTIMIZER_STATES)}.")
        self.forget, self.retain = forget, retain
        self.adapter_name = adapter_name
        self.tokenizer, self.batch_size, self.max_batches, self.progress = tokenizer, batch_size, max_batches, progress
        self.optimizer_state = optimizer_state
        self.history: list[dict[str, Any]] = []

    # ------------------------------------------------------------------------------------------- Trainer events
    def on_train_begin(self, args, state, control, model=None, train_dataloader=None, **kwargs):
        if getattr(args, "world_size", 1) > 1:
            raise GrinError(
                "re-localisation replaces parameters during training, which DDP/FSDP/DeepSpeed do not allow; train "
                "in one process or set relocalize_every=None."
            )
        _, config, _ = self._adapter(model)
        if self.forget is None:
            dataset = getattr(train_dataloader, "dataset", None)
            if dataset is None or not hasattr(dataset, "forget"):
                raise GrinError("RelocalizeCallback needs forget= (and retain=) data outside UnlearningTrainer.")
            self.forget = dataset.forget
            self.retain = self.retain if self.retain is not None else getattr(dataset, "retain", None)
        check_data(config, self.forget, self.retain)

    def on_step_end(self, args, state, control, model=None, optimizer=None, **kwargs):
        _, config, _ = self._adapter(model)
        every = config.relocalize_every
        if every is None or state.global_step % every or state.global_step >= state.max_steps:
            return
        self.grow(model, optimizer, step=state.global_step)

    # ------------------------------------------------------------------------------------------- growing
    def _adapter(self, model: Any) -> tuple[Any, GrinConfig, str]:
        from .model import GrinModel

        tuner = getattr(model, "base_model", model)
        if not isinstance(tuner, GrinModel):
            raise GrinError(f"RelocalizeCallback needs a GRIN PEFT model, got {type(model).__name__}.")
        adapter = self.adapter_name or tuner.active_adapters[0]
        config = tuner.peft_config.get(adapter)
        if not isinstance(config, GrinConfig):
            raise GrinError(f"'{adapter}' is not a GRIN adapter of this model.")
        return tuner, config, adapter

    def grow(self, model: Any, optimizer: torch.optim.Optimizer | None = None, step: int = 0) -> dict[str, Any]:
        """Rescore at the current weights and add ``round(relocalize_grow x budget)`` entries now.

        ``optimizer`` (if given) is pointed at the grown Parameters; ``step`` names the random stream of the
        ``random`` score and of the new entries' noise. Returns the new ``history`` record.
        """
        start = time.perf_counter()
        tuner, config, adapter = self._adapter(model)
        layers = tuner.grin_layers(adapter)
        numels = {name: layer.grin_numel for name, layer in layers.items()}
        budget = resolve_budget(numels, None if config.num_entries else config.budget_density, config.num_entries)
        taken = {name: layer.grin_indices[adapter].detach().long().cpu() for name, layer in layers.items()}
        entries = sum(idx.numel() for idx in taken.values())
        add = min(max(1, round(config.relocalize_grow * budget)), sum(numels.values()) - entries)
        scorer = None
        if add > 0:
            if config.score == "random":
                score_fn = lambda name: torch.rand(  # noqa: E731
                    numels[name], generator=module_generator(config.seed, name, f"relocalize:{step}")
                )
            elif config.score == "magnitude":
                score_fn = lambda name: current_weight(layers[name]).abs()  # noqa: E731
            else:
                scorer = current_scores(
                    tuner,
                    self.forget,
                    self.retain,
                    adapter,
                    budget=entries + add,
                    tokenizer=self.tokenizer,
                    batch_size=self.batch_size,
                    max_batches=self.max_batches,
                    progress=self.progress,
                ).scorer
                score_fn = scorer.score
            added = select_growth(numels, score_fn, taken, add, config.selection)
            values = None
            if config.relocalize_noise:
                values = {
                    name: noise_values(
                        layers[name]._grin_weight(),
                        idx,
                        config.noise_std,
                        config.noise_scale,
                        config.seed,
                        name,
                        purpose=f"relocalize:{step}",
                    )
                    for name, idx in added.items()
                }
            swaps = tuner.grow_entries(adapter, added, values)
            if optimizer is not None:
                replace_in_optimizer(optimizer, swaps.values(), self.optimizer_state)
        mass: dict[str, float | None] = {"forget": None, "retain": None}
        if scorer is not None:
            support = {name: layer.grin_indices[adapter] for name, layer in layers.items()}
            mass = selection_mass(list(layers), scorer, support)
        record = {
            "step": step,
            "added": add,
            "entries": entries + add,
            "forget_mass": mass["forget"],
            "retain_mass": mass["retain"],
            "seconds": time.perf_counter() - start,
        }
        self.history.append(record)
        logger.info("GRIN re-localisation at step %d: +%d entries, %d in all", step, add, entries + add)
        return record


def check_data(config: GrinConfig, forget: Any, retain: Any) -> None:
    """Refuse a re-localisation that would lack data, before training starts."""
    if config.selects_at_injection:
        return
    if forget is None:
        raise GrinError(f"re-localisation with score={config.score!r} needs forget data.")
    if accumulation_plan(config)[1] is not None and retain is None:
        raise GrinError(
            f"re-localisation with score={config.score!r} needs retain data: pass retain_dataset (UnlearningTrainer) "
            "or retain= (RelocalizeCallback)."
        )


def attach_relocalization(trainer: Any, model: Any, forget: Any, retain: Any) -> None:
    """Add a :class:`RelocalizeCallback` on ``forget``/``retain`` to a trainer whose GRIN adapter asks for one and
    that has none yet (UnlearningTrainer calls this)."""
    from .model import GrinModel

    tuner = getattr(model, "base_model", None)
    if not isinstance(tuner, GrinModel) or not tuner.active_adapters:
        return
    config = tuner.peft_config.get(tuner.active_adapters[0])
    if not isinstance(config, GrinConfig) or config.relocalize_every is None:
        return
    if any(isinstance(callback, RelocalizeCallback) for callback in trainer.callback_handler.callbacks):
        return
    check_data(config, forget, retain)
    trainer.add_callback(RelocalizeCallback(forget, retain))
