"""FILA: a LoRA adapter initialised from the forget/retain Fisher ratio (Cha et al., ICLR 2025, LoKU's adapter).

Why: a LoRA adapter starts at ``B = 0``, so its first steps spend themselves finding where the forget data lives.
FILA starts it there instead. Per targeted linear weight ``W`` (out x in):

1. Importance ``I = F_f / (F_r + 1e-5)``, with ``F`` the diagonal empirical Fisher of the forget (f) and retain (r)
   data: grin_peft's ``squared_ratio`` score, from the same gradient-statistics pass as GRIN's localisation
   (:mod:`grin_peft.localize.statistics`; ``F = (1/n) sum_u (g_u / T_u)^2`` over units ``u``, each with ``T_u``
   answer tokens).
2. Row weights ``w_i = sqrt(sum_j I_ij)`` (the row-wise Fisher weighting of Hsu et al. 2022, as the paper and its
   code do), and the weighted rank-``r`` approximation ``min ||diag(w) (W - s B A)||_F``, solved exactly by the SVD of
   ``diag(w) W = U S V^T``: ``A = sqrt(S_r / s) V_r^T``, ``B = diag(1 / (w + 1e-5)) U_r sqrt(S_r / s)``, ``s`` the
   adapter's scaling.
3. The base weight becomes ``W - s B A`` (computed from the stored, rounded ``B`` and ``A``), so the model's output
   is unchanged at initialisation while the adapter holds the part of ``W`` that matters most to the forget data.

Choices the paper leaves open, and what is done here (the authors' code: csm9493/efficient-llm-unlearning,
TOFU/measure_importance.py and forget.py):

* ``grad_unit="example"`` (default): Fisher terms from per-example gradients, grin_peft's ``squared_ratio``.
  ``"batch"`` takes them from batch-mean gradients, closer to the authors' code, which squares each batch's
  mean-loss gradient (and weighs it by the batch's answer tokens, which grin_peft's statistic does not).
* The SVD is exact (``torch.linalg.svd``); the authors use the randomised ``torch.svd_lowrank``, cheaper on 7B models
  but approximate.
* The data for the Fisher is whatever is passed: the authors use every forget batch with its paired retain batch.

The base weights change, as with PEFT's PiSSA/OLoRA initialisations, and that has two consequences:

* Saving: ``model.save_pretrained(initial_dir)`` right after :func:`fila_initialize`, then after training
  ``model.save_pretrained(out_dir, path_initial_model_for_weight_conversion=initial_dir)`` writes a plain LoRA
  adapter (rank ``2r``) that applies to the *original* base model. A plain ``save_pretrained`` writes an adapter that
  is only correct on the modified base.
* Objectives that read a reference (``npo``, ``idk_dpo``, ``kl_weight > 0``): the model with its adapter disabled is
  ``W - s B A``, not the original model, so pass ``ref_model=`` a copy of the original to the trainer. LoKU's own
  loss, ``objective="ihl"``, reads no reference.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from .config import GrinConfig
from .errors import GrinError
from .localize.pipeline import _check_positive, prepare_batches
from .localize.scores import LOKU_EPS, accumulation_plan, build_scorer, check_config
from .localize.statistics import collect_statistic

__all__ = ["FilaModule", "FilaReport", "fila_factors", "fila_initialize"]

FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass(frozen=True)
class FilaModule:
    """What FILA put into one module's adapter.

    ``captured``: ``||s B A||_F / ||W||_F``, the share of the weight moved into the adapter; ``weighted_captured``:
    the same under the row weights ``diag(w)``, i.e. the share of the importance-weighted weight.
    """

    name: str
    rank: int
    captured: float
    weighted_captured: float


@dataclass
class FilaReport:
    """The initialisation's modules and the data its Fisher came from."""

    modules: list[FilaModule]
    grad_unit: str
    data: dict[str, dict[str, int]] = field(default_factory=dict)
    seconds: float = 0.0

    def summary(self) -> str:
        """A few lines for logs: data, and the captured shares across modules."""
        shares = sorted(m.weighted_captured for m in self.modules)
        lines = [
            f"FILA: {len(self.modules)} modules, rank {sorted({m.rank for m in self.modules})}, "
            f"Fisher from {self.grad_unit} gradients, {self.seconds:.1f} s",
            *(
                f"  {what}: {d['units']} units, {d['answer_tokens']} answer tokens"
                for what, d in sorted(self.data.items())
            ),
            f"  importance-weighted share of W in the adapter: min {shares[0]:.3f}, median "
            f"{shares[len(shares) // 2]:.3f}, max {shares[-1]:.3f}",
        ]
        return "\n".join(lines)


def fila_factors(
    weight: torch.Tensor, importance: torch.Tensor, rank: int, scaling: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """LoRA factors ``(A, B)`` of the row-weighted rank-``rank`` approximation of ``weight`` (out x in, float32).

    ``importance`` has ``weight``'s shape; row ``i`` weighs ``sqrt(sum_j importance_ij)``. ``scaling * B @ A``
    minimises ``||diag(w) (weight - scaling * B @ A)||_F`` over rank-``rank`` products (Eckart-Young on
    ``diag(w) weight``), split evenly between the factors as the authors do.
    """
    if weight.shape != importance.shape or weight.dim() != 2:
        raise GrinError(
            f"FILA needs a 2-D weight and an importance of its shape; got {tuple(weight.shape)} and "
            f"{tuple(importance.shape)}."
        )
    if not 1 <= rank <= min(weight.shape):
        raise GrinError(f"FILA: rank {rank} must be between 1 and min{tuple(weight.shape)} = {min(weight.shape)}.")
    if not scaling > 0:
        raise GrinError(f"FILA: the adapter scaling must be positive; got {scaling!r}.")
    w = importance.float().sum(dim=1).sqrt()
    u, s, vh = torch.linalg.svd(w[:, None] * weight.float(), full_matrices=False)
    root = (s[:rank] / scaling).sqrt()
    a = root[:, None] * vh[:rank]
    b = (u[:, :rank] * root) / (w + LOKU_EPS)[:, None]
    return a, b


def _lora_layers(model: Any, adapter_name: str) -> tuple[dict[str, nn.Module], Any]:
    """The adapter's LoRA layers, refusing anything FILA cannot initialise, before any work."""
    from peft import LoraConfig, PeftModel
    from peft.tuners.lora import Linear as LoraLinear
    from peft.tuners.lora import LoraLayer

    if not isinstance(model, PeftModel):
        raise GrinError(f"FILA initialises a PEFT LoRA adapter: pass the PeftModel, got {type(model).__name__}.")
    config = model.peft_config.get(adapter_name)
    if not isinstance(config, LoraConfig):
        raise GrinError(f"'{adapter_name}' is not a LoRA adapter of this model.")
    if config.use_dora:
        raise GrinError("FILA initialises plain LoRA; DoRA's magnitude vector has no FILA initialisation.")
    layers = {}
    for name, module in model.base_model.model.named_modules():
        if not isinstance(module, LoraLayer) or adapter_name not in module.lora_A:
            continue
        if type(module) is not LoraLinear:
            raise GrinError(f"{name}: FILA supports LoRA on linear layers only, not {type(module).__name__}.")
        base = module.get_base_layer()
        weight = getattr(base, "weight", None)
        if not isinstance(weight, torch.Tensor) or weight.dtype not in FLOAT_DTYPES or weight.dim() != 2:
            raise GrinError(
                f"{name}: FILA rewrites the base weight, so it needs a plain float weight (not quantized)."
            )
        if module.merged_adapters:
            raise GrinError(f"{name}: unmerge the adapters before FILA (it needs the original weights).")
        if bool(module.lora_B[adapter_name].weight.detach().any()):
            raise GrinError(
                f"{name}: the adapter is not fresh (lora_B is non-zero); FILA initialises a new adapter, and on a "
                "trained one it would move the base weights a second time."
            )
        layers[name] = module
    if not layers:
        raise GrinError(f"adapter '{adapter_name}' targets no layer.")
    return layers, config


def fila_initialize(
    model: Any,
    forget: Any,
    retain: Any,
    adapter_name: str = "default",
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    grad_unit: str = "example",
    progress: bool = True,
) -> FilaReport:
    """Initialise a fresh LoRA adapter of ``model`` (a PeftModel) with FILA, and move the base weights so that the
    model's output is unchanged; returns what went where.

    ``forget``/``retain`` take the forms :func:`grin_peft.localize` takes (a DataLoader, tokenized examples, or
    question/answer dicts with ``tokenizer=``). Every check (adapter, layers, data) runs before the gradient passes,
    and every module's factors are computed before any weight is written, so a failure leaves the model as it was.
    See the module docstring for saving the result and for objectives that read a reference.
    """
    layers, config = _lora_layers(model, adapter_name)
    _check_positive("batch_size", batch_size)
    _check_positive("max_batches", max_batches, optional=True)
    scoring = GrinConfig(score="squared_ratio", grad_unit=grad_unit)
    check_config(scoring)
    forget_kind, retain_kind = accumulation_plan(scoring)
    options = dict(tokenizer=tokenizer, batch_size=batch_size, max_batches=max_batches)
    batches = {
        "forget": prepare_batches(forget, "forget", **options),
        "retain": prepare_batches(retain, "retain", **options),
    }
    started = time.perf_counter()
    stats = {}
    for what, kind in (("forget", forget_kind), ("retain", retain_kind)):
        stats[what] = collect_statistic(
            model.base_model.model,
            layers,
            batches[what],
            kind,
            unit=grad_unit,
            progress=progress,
            desc=f"FILA {what} gradients",
            total=batches[what].total,
        )
    data = {what: {"units": s.units, "answer_tokens": s.tokens} for what, s in stats.items()}
    scorer = build_scorer(scoring, layers, stats["forget"], stats["retain"])
    plans, modules = [], []
    with torch.no_grad():
        for name, layer in layers.items():
            plan, module = _plan(name, layer, adapter_name, scorer.score(name))
            plans.append(plan)
            modules.append(module)
        for lora_a, a, lora_b, b, base, residual in plans:
            lora_a.copy_(a)
            lora_b.copy_(b)
            base.copy_(residual)
    return FilaReport(modules, grad_unit, data, time.perf_counter() - started)


def _plan(name: str, layer: nn.Module, adapter_name: str, importance: torch.Tensor) -> tuple[tuple, FilaModule]:
    """One module's new adapter factors and base weight (nothing written yet), and its report line."""
    base = layer.get_base_layer().weight
    lora_a, lora_b = layer.lora_A[adapter_name].weight, layer.lora_B[adapter_name].weight
    scaling = float(layer.scaling[adapter_name])
    transposed = bool(layer.fan_in_fan_out)
    weight = base.detach().float()
    weight, importance = (weight.t(), importance.t()) if transposed else (weight, importance)
    a, b = fila_factors(weight, importance.to(weight.device), layer.r[adapter_name], scaling)
    a, b = a.to(lora_a.dtype), b.to(lora_b.dtype)
    # the residual absorbs the factors' rounding, so only its own rounding separates the output from the original
    moved = scaling * (b.float() @ a.float())
    residual = weight - moved
    if not (bool(torch.isfinite(a).all()) and bool(torch.isfinite(b).all()) and bool(torch.isfinite(residual).all())):
        raise GrinError(f"{name}: FILA factors are NaN/Inf (overflow in the adapter dtype?); nothing was changed.")
    w = importance.float().sum(dim=1).sqrt()[:, None]
    module = FilaModule(
        name,
        int(layer.r[adapter_name]),
        _share(moved, weight),
        _share(w * moved, w * weight),
    )
    residual = residual.t() if transposed else residual
    return (lora_a, a, lora_b, b, base, residual.to(base.dtype)), module


def _share(part: torch.Tensor, whole: torch.Tensor) -> float:
    norm = float(whole.norm())
    return float(part.norm()) / norm if norm > 0 and math.isfinite(norm) else 0.0
