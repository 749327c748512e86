"""bench_training's diagnostic bound: GRIN with its values' gradient replaced by zeros, all else unchanged."""

from __future__ import annotations

import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

import training_methods  # noqa: E402

import grin_peft.fused as fused  # noqa: E402

SPEC = {"hidden": 64, "layers": 1, "intermediate": 192, "vocab": 128, "batch": 2, "seq": 16}


def _values_grads(trainer: training_methods.Trainer) -> torch.Tensor:
    return torch.cat([p.grad.view(-1) for p in trainer.params if p.grad is not None])


def test_the_bound_skips_only_the_values_gradient_and_puts_the_kernel_back():
    base = training_methods.build_base(SPEC)
    batch = training_methods.make_batch(SPEC)
    kernel = fused._values_grad
    trainers = {}
    for kind in ("grin", "grin_bound"):
        model = training_methods.apply_method(training_methods.shared_copy(base), kind, 0.05)
        trainers[kind] = training_methods.Trainer(kind, model, batch, kind=kind)
    losses = {}
    for kind, trainer in trainers.items():
        trainer.opt = None  # keep the gradients to look at them
        losses[kind] = trainer.step()
    assert fused._values_grad is kernel
    assert losses["grin"] == losses["grin_bound"]  # same pattern, same (zero) delta: forward unchanged
    assert _values_grads(trainers["grin"]).abs().sum() > 0
    assert _values_grads(trainers["grin_bound"]).abs().sum() == 0
    names = training_methods.method_table([1e-3], bound=[1e-3])
    assert names[training_methods.bound_name(1e-3)] == ("grin_bound", 1e-3)
