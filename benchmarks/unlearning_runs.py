"""Running unlearning methods in the benchmarks: memorise a target, then apply one table row's method to a copy.

What lives here, and why it is shared (``bench_tofu.py``, ``bench_hazard.py``, ``bench_audit.py``,
``bench_ledger.py``):

* a memorisation loop with length-grouped batches (padding is ~35% of TOFU's tokens with random batches, and the
  CPU time of the target/reference models dominates a benchmark run);
* one runner that trains any method through :class:`grin_peft.trainer.UnlearningTrainer` (full-parameter, LoRA or
  GRIN delta), so every method sees the same objective, hyper-parameters, steps and forget/retain pairing;
* SSD (Foster et al. 2024), which does not train and so is a plain function.

The generic plumbing (logging, caches, environment, writers) is :mod:`common`.
"""

from __future__ import annotations

import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from common import quiet_transformers  # benchmarks/ is on sys.path as a script; common puts the repo root there
from torch import nn
from transformers import get_cosine_schedule_with_warmup

from grin_peft.data import IGNORE_INDEX, QACollator, QAFormat

# ------------------------------------------------------------------------------------------------ memorisation


def length_grouped_batches(
    lengths: Sequence[int], batch_size: int, generator: torch.Generator, group: int = 16
) -> list[list[int]]:
    """Shuffled batches of similar-length examples: shuffle, sort within windows of ``group`` batches, shuffle the
    batches. Every example appears once per epoch; padding drops from ~35% to a few % on TOFU."""
    order = torch.randperm(len(lengths), generator=generator).tolist()
    window = batch_size * group
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: lengths[i])
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    perm = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in perm]


@torch.no_grad()
def mean_answer_nll(
    model: nn.Module, encoded: Sequence[Mapping[str, list[int]]], collator: QACollator, batch_size: int = 64
) -> list[float]:
    """Per-example mean answer-token NLL (float32), batched by length."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    order = sorted(range(len(encoded)), key=lambda i: len(encoded[i]["input_ids"]))
    out = [0.0] * len(encoded)
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        batch = {k: v.to(device) for k, v in collator([encoded[i] for i in rows]).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        nll = torch.nn.functional.cross_entropy(
            logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
        )
        mask = labels != IGNORE_INDEX
        for row, value in zip(rows, ((nll * mask).sum(1) / mask.sum(1)).tolist()):
            out[row] = value
    model.train(was_training)
    return out


def memorise(
    model: nn.Module,
    qa_format: QAFormat,
    items: Sequence[Mapping[str, Any]],
    *,
    epochs: int,
    lr: float,
    batch_size: int,
    seed: int,
    bf16: bool = True,
    warmup_ratio: float = 0.05,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Train ``model`` in place on the items' answers (loss on answer tokens only, the format every metric scores).

    AdamW (no weight decay), linear warm-up then cosine decay, gradient clipping at 1, bf16 autocast on CPU (1.7-2.6x
    faster than fp32 for these sizes), length-grouped batches reshuffled each epoch from ``seed``. Returns the final
    mean answer NLL and timings.
    """
    encoded = [qa_format.encode(item["question"], item["answer"]) for item in items]
    collator = QACollator.from_tokenizer(qa_format)
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    lengths = [len(e["input_ids"]) for e in encoded]
    steps_per_epoch = math.ceil(len(encoded) / batch_size)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(warmup_ratio * total), total)
    autocast = bf16  # CPU and CUDA alike
    started = time.perf_counter()
    model.train()
    for epoch in range(epochs):
        epoch_loss, seen = 0.0, 0
        for rows in length_grouped_batches(lengths, batch_size, generator):
            batch = {k: v.to(device) for k, v in collator([encoded[i] for i in rows]).items()}
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.item() * len(rows)
            seen += len(rows)
        log(f"  epoch {epoch + 1}/{epochs}: loss {epoch_loss / seen:.4f} ({time.perf_counter() - started:.0f} s)")
    model.eval()
    nll = mean_answer_nll(model, encoded, collator)
    return {
        "train_answer_nll": float(np.mean(nll)),
        "train_seconds": time.perf_counter() - started,
        "steps": total,
        "num_items": len(encoded),
        "num_tokens": int(sum(lengths)),
    }


# ------------------------------------------------------------------------------------------------ methods


@dataclass
class Method:
    """One row of a benchmark table: how the model is adapted and trained.

    ``kind``: ``"none"`` (evaluate as is), ``"full"`` (all weights trained; reference = a frozen copy), ``"lora"``
    (PEFT LoRA), ``"fila"`` (PEFT LoRA initialised by :func:`grin_peft.fila.fila_initialize` from the forget and
    localisation-retain data; reference = a frozen copy of the original), ``"grin"`` (a GRIN sparse delta,
    ``grin`` holds GrinConfig fields), ``"ssd"`` (selective synaptic dampening, no training), ``"auto"``
    (``grin_peft.unlearn`` with its own defaults: no learning rate, epochs, config or objective given).
    ``objective`` and ``lr`` feed :class:`UnlearningArguments`; ``seed``, when set, replaces the shared training
    seed.
    """

    name: str
    kind: str
    objective: str | None = None
    lr: float | None = None
    grin: dict[str, Any] = field(default_factory=dict)
    lora: dict[str, Any] = field(default_factory=dict)
    ssd: dict[str, Any] = field(default_factory=dict)
    group: str = "main"
    seed: int | None = None

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"kind": self.kind, "objective": self.objective, "lr": self.lr, "group": self.group}
        if self.seed is not None:
            out["seed"] = self.seed
        for key in ("grin", "lora", "ssd"):
            if getattr(self, key):
                out[key] = getattr(self, key)
        return out


def count_trainable(model: nn.Module) -> int:
    return int(sum(p.numel() for p in model.parameters() if p.requires_grad))


def run_method(
    method: Method,
    make_base: Callable[[], nn.Module],
    qa_format: QAFormat,
    forget: Sequence[Mapping[str, Any]],
    retain: Sequence[Mapping[str, Any]],
    *,
    train: Mapping[str, Any],
    ssd_data: Sequence[Mapping[str, Any]] | None = None,
    workdir: str,
    localize_retain: Sequence[Mapping[str, Any]] | None = None,
    localize_batch_size: int = 8,
    log: Callable[[str], None] = print,
    callbacks: Sequence[Any] = (),
) -> tuple[nn.Module, dict[str, Any]]:
    """Apply ``method`` to a fresh copy of the target (``make_base()``); return the model to evaluate and its cost.

    ``train`` holds the :class:`UnlearningArguments` shared by every trained method (epochs, batch size, seed,
    threads, bf16...); only ``objective`` and ``learning_rate`` (and ``seed`` when the method sets one) come from
    the method. ``callbacks`` (``transformers.TrainerCallback``) join the trainer of a trained method. The returned
    info has ``trainable_entries`` (weights that may change), ``wall_seconds`` (localisation/dampening + training,
    not evaluation) and the stage timings.
    """
    from peft import LoraConfig, get_peft_model

    from grin_peft import GrinConfig
    from grin_peft.trainer import UnlearningTrainer
    from grin_peft.unlearning_args import UnlearningArguments

    started = time.perf_counter()
    model = make_base()
    info: dict[str, Any] = {"timings": {}}
    if method.kind == "none":
        info.update(trainable_entries=0, wall_seconds=0.0)
        return model, info
    if method.kind == "ssd":
        ssd_info = ssd_dampen(model, qa_format, forget, ssd_data or retain, **method.ssd)
        info.update(ssd_info)
        info["wall_seconds"] = time.perf_counter() - started
        return model, info
    if method.seed is not None:
        train = {**train, "seed": method.seed}
    if method.kind == "auto":
        trained, auto_info = run_auto(model, qa_format, forget, retain, train, localize_retain, localize_batch_size)
        info.update(auto_info)
        info["wall_seconds"] = time.perf_counter() - started
        return trained, info

    ref_model = None
    if method.kind == "full":
        for p in model.parameters():
            p.requires_grad_(True)

        ref_model = make_base  # a frozen second copy, built only when the objective reads a reference
        trained: nn.Module = model
    elif method.kind in ("lora", "fila"):
        options = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": "all-linear", **method.lora}
        # LoRA draws its A matrices from torch's global RNG before the trainer seeds it: seed here, or the start
        # depends on whatever ran earlier in the process
        torch.manual_seed(int(train.get("seed", 42)))
        trained = get_peft_model(model, LoraConfig(task_type="CAUSAL_LM", **options))
        if method.kind == "fila":  # LoKU's adapter: FILA moves base weights, so keep the original as reference
            info.update(fila_init(trained, method, forget, retain if localize_retain is None else localize_retain,
                                  qa_format, localize_batch_size, workdir))  # fmt: skip
            ref_model = make_base
    elif method.kind == "grin":
        trained = get_peft_model(model, GrinConfig(**method.grin))
        if not trained.peft_config["default"].selects_at_injection:
            t0 = time.perf_counter()
            report = trained.localize(
                forget,
                retain if localize_retain is None else localize_retain,
                tokenizer=qa_format,
                batch_size=localize_batch_size,
                progress=False,
            )
            info["timings"]["localize"] = time.perf_counter() - t0
            info["localization"] = {
                "mass": report.mass,
                "budget": report.budget,
                "notes": report.notes,
                "module_density": {m.name: m.selected / m.numel for m in report.modules},
            }
    else:
        raise ValueError(f"unknown method kind {method.kind!r}")
    info["trainable_entries"] = count_trainable(trained)
    args = UnlearningArguments(
        output_dir=workdir,
        objective=method.objective,
        learning_rate=method.lr,
        save_strategy="no",
        report_to=[],
        disable_tqdm=True,
        logging_steps=10_000,
        **train,
    )
    trainer = UnlearningTrainer(
        trained,
        args,
        forget,
        retain,
        qa_format=qa_format,
        ref_model=ref_model,
        callbacks=list(callbacks),
    )
    from transformers.trainer_callback import PrinterCallback

    trainer.remove_callback(PrinterCallback)  # it prints every log dict once tqdm is off
    t0 = time.perf_counter()
    with quiet_transformers():
        output = trainer.train()
    info["timings"]["train"] = time.perf_counter() - t0
    info["train_metrics"] = {k: v for k, v in output.metrics.items() if isinstance(v, int | float)}
    info["steps"] = int(trainer.state.global_step)
    info["wall_seconds"] = time.perf_counter() - started
    trained.eval()
    return trained, info


def fila_init(
    model: nn.Module,
    method: Method,
    forget: Sequence[Mapping[str, Any]],
    retain: Sequence[Mapping[str, Any]],
    qa_format: QAFormat,
    batch_size: int,
    workdir: str,
) -> dict[str, Any]:
    """FILA on a fresh LoRA model; saves the initial adapter, which ``save_pretrained`` needs to write a plain LoRA
    adapter for the original base (``path_initial_model_for_weight_conversion``)."""
    from grin_peft.fila import fila_initialize

    t0 = time.perf_counter()
    report = fila_initialize(model, forget, retain, tokenizer=qa_format, batch_size=batch_size, progress=False)
    seconds = time.perf_counter() - t0
    initial = Path(workdir) / f"fila-{re.sub(r'[^A-Za-z0-9.=-]+', '_', method.name)}" / "fila-initial"
    with quiet_transformers():
        model.save_pretrained(initial)
    shares = sorted(m.weighted_captured for m in report.modules)
    return {
        "fila_initial": str(initial),
        "fila": {"data": report.data, "weighted_captured_median": shares[len(shares) // 2], "seconds": seconds},
    }


# the training settings the controller-driven "auto" row shares with the other rows; it picks the rest itself
AUTO_TRAIN_KEYS = (
    "per_device_train_batch_size",
    "per_device_eval_batch_size",
    "seed",
    "bf16",
    "use_cpu",
    "num_threads",
)


def run_auto(
    model: nn.Module,
    qa_format: QAFormat,
    forget: Sequence[Mapping[str, Any]],
    retain: Sequence[Mapping[str, Any]],
    train: Mapping[str, Any],
    localize_retain: Sequence[Mapping[str, Any]] | None,
    localize_batch_size: int,
) -> tuple[nn.Module, dict[str, Any]]:
    """``grin_peft.unlearn`` as a user calls it: no learning rate, epochs, config or objective, so it uses its own
    defaults (the automatic operating point, where the installed grin_peft has one). It shares the other rows'
    batch size, seed, bf16 and threads, and caps its scoring pass at the other rows' retain sample size
    (``max_batches``; scoring all of retain90 would cost more than the unlearning). Returns the trained model and
    what ``UnlearnResult`` holds, read defensively: ``operating_point`` (a dict with ``target_met``,
    ``learning_rate``, ``steps``, ``before``, ``after`` in the controller's versions) is None where absent."""
    import grin_peft

    kw = {key: train[key] for key in AUTO_TRAIN_KEYS if key in train}
    localize_kwargs = {"batch_size": localize_batch_size, "progress": False}
    if localize_retain is not None:
        localize_kwargs["max_batches"] = max(1, math.ceil(len(localize_retain) / localize_batch_size))
    with quiet_transformers():
        result = grin_peft.unlearn(model, forget, retain, tokenizer=qa_format, localize_kwargs=localize_kwargs, **kw)
    trainer = getattr(result, "trainer", None)
    state = getattr(trainer, "state", None)
    args = getattr(trainer, "args", None)
    operating = getattr(result, "operating_point", None)
    info: dict[str, Any] = {
        "trainable_entries": getattr(result, "trainable_entries", None),
        "timings": dict(getattr(result, "timings", None) or {}),
        "train_metrics": {
            k: v for k, v in (getattr(result, "train_metrics", None) or {}).items() if isinstance(v, int | float)
        },
        "steps": getattr(state, "global_step", None),
        "operating_point": dict(operating) if isinstance(operating, Mapping) else operating,
        "auto_learning_rate": getattr(args, "learning_rate", None),
        "auto_epochs": getattr(args, "num_train_epochs", None),
        "unlearn_keywords": sorted(kw),
    }
    if isinstance(operating, Mapping):
        info["steps"] = operating.get("steps", info["steps"])
        info["auto_learning_rate"] = operating.get("learning_rate", info["auto_learning_rate"])
    peft_model = result.peft_model
    peft_model.eval()
    return peft_model, info


# ------------------------------------------------------------------------------------------------ SSD


def _fisher(
    model: nn.Module,
    params: Mapping[str, nn.Parameter],
    encoded: Sequence[Mapping[str, list[int]]],
    collator: QACollator,
    batch_size: int,
) -> dict[str, torch.Tensor]:
    """SSD's importance: the mean over mini-batches of the squared mini-batch gradient of the loss (its code's
    ``calc_importance``: ``imp += grad ** 2`` per batch, divided by the number of batches)."""
    device = next(model.parameters()).device
    fisher = {name: torch.zeros_like(p, dtype=torch.float32) for name, p in params.items()}
    batches = 0
    for start in range(0, len(encoded), batch_size):
        batch = {k: v.to(device) for k, v in collator(list(encoded[start : start + batch_size])).items()}
        model.zero_grad(set_to_none=True)
        model(**batch).loss.backward()
        for name, p in params.items():
            fisher[name] += p.grad.detach().float().pow(2)
        batches += 1
    model.zero_grad(set_to_none=True)
    return {name: f / batches for name, f in fisher.items()}


def ssd_dampen(
    model: nn.Module,
    qa_format: QAFormat,
    forget: Sequence[Mapping[str, Any]],
    full: Sequence[Mapping[str, Any]],
    *,
    alpha: float = 10.0,
    lam: float = 1.0,
    batch_size: int = 8,
    targets: str = "all",
) -> dict[str, Any]:
    """Selective Synaptic Dampening (Foster et al., AAAI 2024), in place; no training.

    With ``F_D``/``F_f`` the diagonal Fisher importances on the full training data and on the forget set, every
    weight where ``F_f > alpha * F_D`` is multiplied by ``beta = min(lam * F_D / F_f, 1)``; all others are left
    alone. ``targets="all"`` dampens every parameter (the paper's setting), ``"linear"`` only the weights GRIN
    targets (every Linear but the output head). Defaults are the paper's (alpha 10, lambda 1).
    """
    collator = QACollator.from_tokenizer(qa_format)
    if targets == "linear":
        names = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, nn.Linear) and "lm_head" not in n}
        params = {n: p for n, p in model.named_parameters() if n in names}
    else:
        params = dict(model.named_parameters())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    was_training = model.training
    model.eval()
    t0 = time.perf_counter()
    enc = lambda items: [qa_format.encode(i["question"], i["answer"]) for i in items]  # noqa: E731
    f_forget = _fisher(model, params, enc(forget), collator, batch_size)
    f_full = _fisher(model, params, enc(full), collator, batch_size)
    selected = 0
    with torch.no_grad():
        for name, p in params.items():
            mask = f_forget[name] > alpha * f_full[name]
            beta = torch.clamp(lam * f_full[name] / f_forget[name].clamp_min(1e-30), max=1.0)
            p.mul_(torch.where(mask, beta, torch.ones_like(beta)).to(p.dtype))
            selected += int(mask.sum())
            p.requires_grad_(False)
    model.train(was_training)
    return {
        "trainable_entries": selected,
        "ssd_dampened_entries": selected,
        "ssd_candidate_entries": int(sum(p.numel() for p in params.values())),
        "timings": {"fisher_and_dampen": time.perf_counter() - t0},
    }
