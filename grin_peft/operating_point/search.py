"""The automatic operating point: find a learning rate, train until the forget target is met, keep the best state.

No fixed learning rate, epoch count or step budget serves a 1M-parameter model and a 7B one, so :func:`search`
measures instead of guessing. The user states what "forgotten" means (forget-set answer probability at most a
target, absolute or relative to the original model) and what must be kept (answer probability on a held-out slice
of the retain data, which training and localisation never see, at least a fraction of the original model's). Then:

1. **Probe** (the learning rate): from the same starting delta, a few optimizer steps at each rate of a log grid,
   each scored on small slices of the forget and held-out retain sets. The chosen rate is the *most careful rate
   that keeps pace*: among rates whose probe removed at least the forget probability that the step budget needs
   (linear pace, reaching the target in half the budget) without breaking the retain floor, the one that lost the
   least held-out retain probability per unit of forget probability removed (ties within 0.01 go to the smaller
   rate). If none keeps pace, the fastest rate that keeps the floor.
2. **Train** under watch: forget and held-out retain probabilities (teacher-forced, batched) every ``eval_every``
   steps. A run below the retain floor gets ``repair_epochs`` passes over the forget set to climb back above it
   (NPO first drives the forget answers down at the cost of retain, then its forget gradient fades and the retain
   term repairs: 3-4 epochs on TOFU, BENCHMARKS.md section 6.2). Still below the floor after that, it rolls back to
   the state with the lowest forget probability above the floor and continues with the objective's retain weight
   tripled (twice at most: that changes the path's direction, a smaller rate mostly does not), then at the grid's
   next smaller rate. A pace too slow to reach the target within the budget, with at least half the retain margin
   unspent, continues from the current state at the grid's next larger rate (both bounded by ``max_adjustments``
   and the grid's ends). A rollback whose best path so far removed at least a quarter of the forgetting the target
   needs and lost more than twice the held-out retain probability per unit of forgetting that the target allows
   ends the search: smaller rates move along much the same path (and `unlearn` may try a larger density). Once the
   target is met, training goes on while held-out retain keeps improving, for at most ``patience`` evaluations
   without improvement.
3. **Keep** the best evaluated state by one printed rule: among states that met the target and kept the floor, the
   highest held-out retain probability; if none met the target, the lowest forget probability among states that
   kept the floor; otherwise the starting state.

Every decision (probes, segments, evaluations, the chosen state) is returned as a plain dict, for
``unlearn_summary.json`` and the model card.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from .point import OperatingPoint

__all__ = ["SELECTION_RULE", "search"]

SELECTION_RULE = (
    "among evaluated states with forget prob <= target and held-out retain prob >= floor: the highest held-out "
    "retain prob; if none met the target: the lowest forget prob among states above the floor; else the start"
)

# (learning rate, max steps, segment index, retain weight or None for the objective's own) -> UnlearningTrainer
TrainerFactory = Callable[[float, int, int, "float | None"], Any]


@dataclass
class _Evaluation:
    step: int
    lr: float
    retain_weight: float | None
    forget: float
    heldout: float
    meets_target: bool
    above_floor: bool


def _snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


@torch.no_grad()
def _restore(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    params = dict(model.named_parameters())
    for name, value in state.items():
        params[name].copy_(value)


def _mean_prob(trainer: Any, examples: Sequence[Any]) -> float:
    return float(np.mean(np.exp(-trainer.answer_nll(examples))))


class _Search:
    """The state of one search; see the module docstring for the rules."""

    def __init__(
        self,
        model: nn.Module,
        make_trainer: TrainerFactory,
        point: OperatingPoint,
        forget_eval: Sequence[Any],
        heldout: Sequence[Any],
        steps_per_epoch: int,
        log: Callable[[str], None],
    ) -> None:
        self.model, self.make_trainer, self.point, self.log = model, make_trainer, point, log
        self.forget_eval, self.heldout = list(forget_eval), list(heldout)
        self.steps_per_epoch = max(1, int(steps_per_epoch))
        self.budget = max(1, math.ceil(point.max_epochs * self.steps_per_epoch))
        self.eval_every = point.eval_every or max(1, min(self.steps_per_epoch // 2, point.probe_steps))
        self.history: list[_Evaluation] = []
        self.segments: list[dict[str, Any]] = []
        self.best: tuple[_Evaluation, dict[str, torch.Tensor]] | None = None  # met the target
        self.fallback: tuple[_Evaluation, dict[str, torch.Tensor]] | None = None  # lowest forget above the floor
        self.since_improvement = 0
        self.repair_steps = math.ceil(point.repair_epochs * self.steps_per_epoch)
        self.below_floor_since: int | None = None  # the step of the last evaluation above the floor before a dip
        self.steps_done = 0
        self.gave_up = False
        self.start_heldout: float | None = None  # the original model's held-out retain probability

    # -------------------------------------------------------------------------------------------- probes
    def probe(self, start_forget: float, target: float) -> tuple[float, list[dict[str, Any]]]:
        """Pick the learning rate; the model is back in its starting state afterwards."""
        rng = random.Random(self.point.seed + 1)
        forget_slice = rng.sample(self.forget_eval, min(self.point.probe_items, len(self.forget_eval)))
        held_slice = rng.sample(self.heldout, min(self.point.probe_items, len(self.heldout)))
        initial = _snapshot(self.model)
        steps = min(self.point.probe_steps, self.budget)
        trainer0 = self.make_trainer(self.point.lr_grid[0], steps, 0, None)
        f0, h0 = _mean_prob(trainer0, forget_slice), _mean_prob(trainer0, held_slice)
        # pace: the probe's share of the forget drop needed to reach the target in half the budget
        needed = max(0.0, start_forget - target) * steps / max(1.0, self.budget / 2)
        probes = []
        for index, lr in enumerate(self.point.lr_grid):
            _restore(self.model, initial)
            trainer = trainer0 if index == 0 else self.make_trainer(lr, steps, 0, None)
            trainer.train()
            f, h = _mean_prob(trainer, forget_slice), _mean_prob(trainer, held_slice)
            removed, lost = f0 - f, max(0.0, h0 - h)
            probes.append(
                {
                    "lr": lr,
                    "forget": f,
                    "heldout": h,
                    "forget_removed": removed,
                    "heldout_lost": lost,
                    "cost": lost / removed if removed > 0 else math.inf,
                    "keeps_pace": removed >= needed,
                    "keeps_floor": h >= self.point.retain_floor * h0,
                }
            )
            self.log(f"  probe lr {lr:.3g}: forget {f0:.3f} -> {f:.3f}, held-out retain {h0:.3f} -> {h:.3f}")
            if h < self.point.retain_floor * h0 and removed > 0:
                break  # larger steps only do more damage
        _restore(self.model, initial)
        safe = [p for p in probes if p["keeps_floor"]]
        paced = [p for p in safe if p["keeps_pace"] and p["forget_removed"] > 0]
        if paced:
            best_cost = min(p["cost"] for p in paced)
            chosen = min(p["lr"] for p in paced if p["cost"] <= best_cost + 0.01)
            why = "the most careful rate that keeps pace"
        elif safe:
            chosen = max(safe, key=lambda p: (p["forget_removed"], -p["lr"]))["lr"]
            why = "no rate kept pace: the fastest rate that kept the floor"
        else:
            chosen = self.point.lr_grid[0]
            why = "every rate broke the floor: the smallest rate"
        self.log(f"  chosen learning rate {chosen:.3g} ({why})")
        for p in probes:
            p["chosen"] = p["lr"] == chosen
        return chosen, probes

    # -------------------------------------------------------------------------------------------- training
    def observe(self, trainer: Any, lr: float, target: float, floor: float, retain_weight: float | None = None) -> str:
        """Evaluate now; return 'continue', 'done', 'rollback' or 'faster'."""
        evaluation = _Evaluation(
            step=self.steps_done,
            lr=lr,
            retain_weight=retain_weight,
            forget=_mean_prob(trainer, self.forget_eval),
            heldout=_mean_prob(trainer, self.heldout),
            meets_target=False,
            above_floor=False,
        )
        evaluation.meets_target = evaluation.forget <= target
        evaluation.above_floor = evaluation.heldout >= floor
        self.history.append(evaluation)
        self.log(
            f"  step {evaluation.step:4d} lr {lr:.3g}: forget {evaluation.forget:.3f} (target {target:.3f}), "
            f"held-out retain {evaluation.heldout:.3f} (floor {floor:.3f})"
        )
        if not evaluation.above_floor:
            if self.best is not None:
                self.since_improvement += 1
                if self.since_improvement >= self.point.patience:
                    return "done"
            # NPO's forget gradient fades once the answers are unlikely and the retain term repairs: a run gets
            # `repair_epochs` below the floor to recover before it is rolled back
            if self.below_floor_since is None:
                self.below_floor_since = self._last_step_above_floor()
            if self.steps_done - self.below_floor_since <= self.repair_steps:
                return "continue"
            return "done" if self.best is not None else "rollback"
        self.below_floor_since = None
        if evaluation.meets_target:
            if self.best is None or evaluation.heldout > self.best[0].heldout:
                self.best = (evaluation, _snapshot(self.model))
                self.since_improvement = 0
            else:
                self.since_improvement += 1
            return "done" if self.since_improvement >= self.point.patience else "continue"
        if self.best is not None:  # met before, drifted back above the target
            self.since_improvement += 1
            return "done" if self.since_improvement >= self.point.patience else "continue"
        if self.fallback is None or evaluation.forget < self.fallback[0].forget:
            self.fallback = (evaluation, _snapshot(self.model))
        faster_exists = any(g > lr for g in self.point.lr_grid)
        return "faster" if faster_exists and self._too_slow(target, floor) else "continue"

    def hopeless(self, before: dict[str, float], target: float, floor: float) -> bool:
        """At a rollback: the best path so far paid more than twice the held-out retain per unit of forgetting that
        the target allows, so smaller rates will not get there either (they move along much the same path)."""
        if self.fallback is None:
            return False
        best = self.fallback[0]
        removed = before["forget_prob"] - best.forget
        if removed < max(0.05, 0.25 * (before["forget_prob"] - target)):
            return False  # a path that has hardly forgotten yet says nothing about its cost
        allowed = (before["heldout_retain_prob"] - floor) / max(before["forget_prob"] - target, 1e-12)
        paid = (before["heldout_retain_prob"] - best.heldout) / removed
        if paid <= 2 * allowed:
            return False
        self.log(
            f"  stopping: the best path so far lost {paid:.2f} held-out retain per unit of forget probability, the "
            f"target allows {allowed:.2f}; this budget cannot reach it"
        )
        self.gave_up = True
        return True

    def _last_step_above_floor(self) -> int:
        """Where the current dip below the floor began: the last evaluation above it in this segment, or the
        segment's start."""
        start = self.segments[-1]["start_step"] if self.segments else 0
        above = [e.step for e in self.history if e.above_floor and e.step >= start]
        return max(above, default=start)

    def _too_slow(self, target: float, floor: float) -> bool:
        """The linear pace of this segment's last two evaluations cannot reach the target within the budget, and at
        least half the retain margin is unspent (a run near its floor that repairs must not be pushed harder)."""
        segment = [e for e in self.history if e.step > self.segments[-1]["start_step"]]
        if len(segment) < 2:
            return False
        a, b = segment[-2], segment[-1]
        start = self.history[0].heldout if self.start_heldout is None else self.start_heldout
        if b.heldout - floor < 0.5 * (start - floor):
            return False
        pace = (a.forget - b.forget) / max(1, b.step - a.step)
        remaining = self.budget - self.steps_done
        return pace <= 0 or (b.forget - target) / pace > remaining

    def run_segment(self, lr: float, retain_weight: float | None, target: float, floor: float) -> str:
        from transformers import TrainerCallback

        search = self
        index = len(self.segments)
        self.segments.append(
            {
                "lr": lr,
                "retain_weight": retain_weight,
                "start_step": self.steps_done,
                "end_step": None,
                "outcome": None,
            }
        )
        outcome = ["budget"]

        class Watch(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                search.steps_done += 1
                if state.global_step % search.eval_every == 0 or search.steps_done >= search.budget:
                    decision = search.observe(trainer, lr, target, floor, retain_weight)
                    if decision != "continue":
                        outcome[0] = decision
                        control.should_training_stop = True
                return control

        self.below_floor_since = None
        trainer = self.make_trainer(lr, self.budget - self.steps_done, index, retain_weight)
        trainer.add_callback(Watch())
        trainer.train()
        self.segments[-1].update(end_step=self.steps_done, outcome=outcome[0])
        return outcome[0]


def search(
    model: nn.Module,
    make_trainer: TrainerFactory,
    point: OperatingPoint,
    *,
    forget_eval: Sequence[Any],
    heldout: Sequence[Any],
    retain_eval: Sequence[Any],
    steps_per_epoch: int,
    original: Callable[[], Any],
    retain_weight: float | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Run the probe, the watched training and the final choice; leave ``model`` in the chosen state.

    Args:
        model: the model being trained; only its ``requires_grad`` parameters are snapshotted and restored.
        make_trainer: ``(learning_rate, max_steps, segment, retain_weight) -> UnlearningTrainer`` over the training
            data (never the held-out slice), with ``save_strategy="no"``; ``retain_weight`` None means the
            objective's own.
        forget_eval, heldout, retain_eval: encoded examples scored for the target, the floor and the report.
        steps_per_epoch: optimizer steps per pass over the forget set (sets the budget and the default interval).
        original: a context manager factory under which ``model`` behaves as the original model (the adapter
            disabled), for the starting numbers.
        retain_weight: the objective's retain NLL weight, which a rollback may multiply by ``retain_growth``;
            None when the objective has no retain NLL term.
        log: where progress lines go.

    Returns:
        the JSON-ready record: target, floor, rule, probes, segments, evaluations, the chosen state, before/after.
    """
    point.validate()
    started = time.perf_counter()
    search_state = _Search(model, make_trainer, point, forget_eval, heldout, steps_per_epoch, log)
    scorer = make_trainer(point.lr_grid[0], 1, 0, None)
    with original():
        before = {
            "forget_prob": _mean_prob(scorer, forget_eval),
            "retain_prob": _mean_prob(scorer, retain_eval),
            "heldout_retain_prob": _mean_prob(scorer, heldout),
        }
    search_state.start_heldout = before["heldout_retain_prob"]
    target = point.target(before["forget_prob"])
    floor = point.retain_floor * before["heldout_retain_prob"]
    log(
        f"operating point: forget prob {before['forget_prob']:.3f} -> target <= {target:.3f}; held-out retain prob "
        f"{before['heldout_retain_prob']:.3f} -> floor >= {floor:.3f} ({len(heldout)} held-out items); budget "
        f"{search_state.budget} steps, evaluation every {search_state.eval_every}"
    )
    start_state = _snapshot(model)
    lr, probes = search_state.probe(before["forget_prob"], target)
    adjustments = boosts = 0
    grid = point.lr_grid
    weight = retain_weight
    while search_state.steps_done < search_state.budget:
        outcome = search_state.run_segment(lr, weight, target, floor)
        if outcome in ("done", "budget"):
            break
        if adjustments >= point.max_adjustments:
            log(f"  stopping: {adjustments} rate adjustments made (max_adjustments)")
            break
        if outcome == "rollback" and weight is not None and boosts < point.max_retain_growths:
            # the path costs too much retain: weigh the retain term more (changes the direction, a smaller rate
            # mostly does not)
            _restore(model, search_state.fallback[1] if search_state.fallback else start_state)
            log(f"  held-out retain fell below the floor: back to the best state, retain weight {weight:.3g} -> "
                f"{weight * point.retain_growth:.3g}")  # fmt: skip
            weight *= point.retain_growth
            boosts += 1
            adjustments += 1
            continue
        if outcome == "rollback":
            if search_state.hopeless(before, target, floor):
                break
            _restore(model, search_state.fallback[1] if search_state.fallback else start_state)
            smaller = [g for g in grid if g < lr]
            if not smaller:
                log(f"  held-out retain fell below the floor at the smallest rate ({lr:.3g}): stopping")
                break
            new_lr = smaller[-1]
            log(f"  held-out retain fell below the floor: back to the best state, lr {lr:.3g} -> {new_lr:.3g}")
        else:  # faster: observe() only asks when the grid has a larger rate
            new_lr = min(g for g in grid if g > lr)
            log(f"  too slow to reach the target in the budget: lr {lr:.3g} -> {new_lr:.3g}")
        lr = new_lr
        adjustments += 1
    chosen_eval: _Evaluation | None
    if search_state.best is not None:
        chosen_eval, state = search_state.best
    elif search_state.fallback is not None:
        chosen_eval, state = search_state.fallback
    else:
        chosen_eval, state = None, start_state
    _restore(model, state)
    after = {
        "forget_prob": _mean_prob(scorer, forget_eval),
        "retain_prob": _mean_prob(scorer, retain_eval),
        "heldout_retain_prob": _mean_prob(scorer, heldout),
    }
    met = after["forget_prob"] <= target and after["heldout_retain_prob"] >= floor
    record = {
        "settings": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(point).items()},
        "target_forget_prob": target,
        "floor_heldout_retain_prob": floor,
        "selection_rule": SELECTION_RULE,
        "target_met": met,
        "learning_rate": chosen_eval.lr if chosen_eval else lr,
        "retain_weight": chosen_eval.retain_weight if chosen_eval else weight,
        "steps": chosen_eval.step if chosen_eval else 0,
        "steps_run": search_state.steps_done,
        "budget_steps": search_state.budget,
        "gave_up": search_state.gave_up,
        "eval_every": search_state.eval_every,
        "probes": probes,
        "segments": search_state.segments,
        "evaluations": [asdict(e) for e in search_state.history],
        "before": before,
        "after": after,
        "num_heldout": len(heldout),
        "wall_seconds": time.perf_counter() - started,
    }
    log(f"kept: {SELECTION_RULE}")
    log(
        "  -> "
        + (
            f"step {chosen_eval.step} (lr {chosen_eval.lr:.3g})"
            if chosen_eval
            else "the starting state (no evaluated state kept the floor)"
        )
        + f": forget prob {before['forget_prob']:.3f} -> {after['forget_prob']:.3f}, retain prob "
        f"{before['retain_prob']:.3f} -> {after['retain_prob']:.3f}, held-out retain prob "
        f"{before['heldout_retain_prob']:.3f} -> {after['heldout_retain_prob']:.3f}"
    )
    if not met:
        log(
            f"WARNING: the target was NOT reached (forget prob {after['forget_prob']:.3f}, target {target:.3f}; "
            f"held-out retain {after['heldout_retain_prob']:.3f}, floor {floor:.3f})."
        )
    return record
