"""What "forgotten" and "kept" mean for the automatic operating point, and the held-out slice that checks it.

:class:`OperatingPoint` holds the user's targets and the controller's budget (every field documented, validated
before any weight changes); :func:`split_heldout` sets aside the retain items that training and localisation never
see. The controller itself is :mod:`grin_peft.operating_point.search`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ..errors import GrinError, remedy

__all__ = ["OperatingPoint", "split_heldout"]


@dataclass
class OperatingPoint:
    """What "forgotten" and "kept" mean, and how much search the controller may spend.

    Defaults (documented choices, checked on TOFU at CPU scale in BENCHMARKS.md, not the paper's): forget answer
    probability at most 0.2 (open-unlearning's TOFU retain-only Llama models sit near 0.1-0.2 on forget10), and
    held-out retain answer probability at least 0.85 of the original model's.
    """

    forget_target: float = field(
        default=0.2,
        metadata={"help": "Forget-set answer probability to reach: absolute, or a fraction of the start if relative."},
    )
    relative: bool = field(
        default=False, metadata={"help": "Read forget_target as a fraction of the original model's forget prob."}
    )
    retain_floor: float = field(
        default=0.85,
        metadata={"help": "Held-out retain answer probability must stay >= this fraction of the original model's."},
    )
    heldout_fraction: float = field(
        default=0.1, metadata={"help": "Share of the retain set held out (never trained on, never localised on)."}
    )
    max_heldout: int = field(default=200, metadata={"help": "At most this many held-out retain items."})
    max_epochs: float = field(default=20.0, metadata={"help": "Step budget, in passes over the forget set."})
    eval_every: int | None = field(
        default=None,
        metadata={"help": "Steps between evaluations; default half an epoch, at most probe_steps (at least 1)."},
    )
    lr_grid: tuple[float, ...] = field(
        default=(1e-4, 3e-4, 1e-3, 3e-3, 1e-2, 3e-2, 1e-1),
        metadata={"help": "Learning rates the probe may choose from (ascending); adjustments stay inside it."},
    )
    probe_steps: int = field(default=8, metadata={"help": "Optimizer steps per probe."})
    probe_items: int = field(default=64, metadata={"help": "Forget and held-out items scored after each probe."})
    patience: int = field(
        default=2, metadata={"help": "Evaluations without held-out improvement after the target is met."}
    )
    repair_epochs: float = field(
        default=4.0,
        metadata={
            "help": (
                "Passes over the forget set a run may spend below the held-out floor, repairing, before it is rolled "
                "back (NPO's drop-then-repair took 3-4 epochs on TOFU, BENCHMARKS.md section 6)."
            )
        },
    )
    max_adjustments: int = field(
        default=6, metadata={"help": "Changes of rate or retain weight (rollbacks + speed-ups) allowed."}
    )
    retain_growth: float = field(
        default=3.0, metadata={"help": "A rollback first multiplies the objective's retain weight by this."}
    )
    max_retain_growths: int = field(
        default=2, metadata={"help": "How many times the retain weight may grow before rollbacks lower the rate."}
    )
    seed: int = field(default=0, metadata={"help": "Seed of the held-out split and the probe slices."})
    effective_batch: int | None = field(
        default=32,
        metadata={
            "help": (
                "Forget (and retain) examples per optimizer step that `unlearn` aims for, by gradient accumulation "
                "over the per-device batch, when gradient_accumulation_steps is not given; capped at the forget set's "
                "size; None leaves accumulation alone. On TOFU's 1.3M-parameter target, steps of 8 missed the "
                "default target and steps of 32 met it (BENCHMARKS.md section 6)."
            )
        },
    )
    max_density: float | None = field(
        default=0.5,
        metadata={
            "help": (
                "When the target is missed and the GRIN budget was left at its default, `unlearn` localises again "
                "at density_growth x the density, up to this; None never grows. An explicit density is kept. 0.5: "
                "GRIN's best TOFU frontier (BENCHMARKS.md section 6.5)."
            )
        },
    )
    density_growth: float = field(default=5.0, metadata={"help": "Factor between successive densities (> 1)."})

    def __post_init__(self) -> None:
        self.lr_grid = tuple(float(lr) for lr in self.lr_grid)
        self.validate()

    def validate(self) -> None:
        """Refuse a target that cannot be reached or a budget that cannot run, before any weight changes."""
        if not 0 < self.forget_target < 1:
            raise GrinError(
                f"forget_target={self.forget_target!r} cannot be reached: it must lie strictly between 0 and 1 "
                "(an answer probability of exactly 0 is never reached)."
            )
        if not 0 < self.retain_floor <= 1:
            raise GrinError(f"retain_floor={self.retain_floor!r} must lie in (0, 1] (a fraction of the start).")
        if not 0 < self.heldout_fraction < 1:
            raise GrinError(f"heldout_fraction={self.heldout_fraction!r} must lie strictly between 0 and 1.")
        if self.effective_batch is not None and (
            not isinstance(self.effective_batch, int)
            or isinstance(self.effective_batch, bool)
            or self.effective_batch < 1
        ):
            raise GrinError(f"effective_batch={self.effective_batch!r} must be a positive integer or None.")
        for name in ("max_heldout", "probe_steps", "probe_items"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise GrinError(f"{name}={value!r} must be a positive integer.")
        for name in ("patience", "max_adjustments", "max_retain_growths"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise GrinError(f"{name}={value!r} must be a non-negative integer.")
        if self.eval_every is not None and (not isinstance(self.eval_every, int) or self.eval_every < 1):
            raise GrinError(f"eval_every={self.eval_every!r} must be a positive integer or None.")
        if self.max_density is not None and not 0 < self.max_density <= 1:
            raise GrinError(f"max_density={self.max_density!r} must lie in (0, 1] or be None.")
        if not self.retain_growth >= 1:
            raise GrinError(f"retain_growth={self.retain_growth!r} must be at least 1.")
        if not self.density_growth > 1:
            raise GrinError(f"density_growth={self.density_growth!r} must be greater than 1.")
        if not self.max_epochs > 0:
            raise GrinError(f"max_epochs={self.max_epochs!r} must be positive.")
        if not self.repair_epochs >= 0:
            raise GrinError(f"repair_epochs={self.repair_epochs!r} must be non-negative.")
        grid = self.lr_grid
        if not grid or any(not (math.isfinite(lr) and lr > 0) for lr in grid) or list(grid) != sorted(set(grid)):
            raise GrinError(f"lr_grid={grid!r} must be a non-empty, strictly ascending list of positive rates.")

    def target(self, start_forget: float) -> float:
        """The absolute forget probability to reach, from the original model's."""
        return self.forget_target * start_forget if self.relative else self.forget_target


def split_heldout(retain: Sequence[Any], point: OperatingPoint) -> tuple[list[Any], list[Any]]:
    """``(train, heldout)``: a seeded slice of the retain set that training and localisation never see."""
    items = list(retain)
    if len(items) < 2:
        raise GrinError(
            "the automatic operating point holds out part of the retain set to check what is kept: it needs at "
            f"least 2 retain items, got {len(items)} ("
            + remedy("or pass eval_retain=, or fix learning_rate/num_train_epochs", "or fix --lr/--epochs")
            + ")."
        )
    n_heldout = min(point.max_heldout, max(1, round(point.heldout_fraction * len(items))), len(items) - 1)
    order = list(range(len(items)))
    random.Random(point.seed).shuffle(order)
    held = set(order[:n_heldout])
    return [x for i, x in enumerate(items) if i not in held], [x for i, x in enumerate(items) if i in held]
