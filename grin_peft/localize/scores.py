"""Per-entry scores from the gradient statistics: GRIN's gradient ratio and the published baselines on one machinery.

Notation (per targeted weight entry, see :mod:`.statistics`): ``g_u`` is the gradient of unit ``u``'s summed
answer-token loss at the original weights (a unit is an example, or a batch with ``grad_unit='batch'``), ``T_u`` its
answer tokens, ``n`` the number of units, ``N`` the normaliser chosen by ``GrinConfig.normalization`` (total answer
tokens; ``n`` for ``'batches'``, which counts gradient units, i.e. batches only with ``grad_unit='batch'``; or 1).
Subscripts ``f``/``r`` mean the forget/retain data.

* ``gradient_ratio`` (GRIN): ``s = A_f / (A_r + eps')`` with ``A`` per ``grad_statistic``: ``abs_sum`` =
  ``|sum_u g_u| / N``, ``sum_abs`` = ``sum_u |g_u| / N``, ``sum_sq`` = ``sum_u g_u^2 / N``. ``eps' = eps``
  (``eps_mode='absolute'``) or ``eps * Q(A_r, eps_quantile)`` (``'quantile'``), ``Q`` the exact lower quantile over
  all targeted entries (nearest rank ``floor(q (M - 1))`` of ``M`` entries). The paper's exact statistic and eps are
  not public; these are documented choices, not a reproduction.
* ``forget_gradient`` (SalUn, Fan et al. 2024): ``s = |sum_u g_f,u| / N_f``, the magnitude of the forget loss's
  gradient (SalUn thresholds ``|grad|`` of the summed forget loss). Retain data is not used.
* ``ssd`` (Foster et al. 2024): ``F = (1/n) sum_u (g_u / T_u)^2`` (diagonal Fisher from mean-loss gradients);
  ``s = F_f / F_r`` where ``F_f > ssd_alpha * F_r`` and ``0`` elsewhere (ineligible; the largest finite float32 where
  ``F_r = 0 < F_f``). SSD itself dampens every eligible weight; under a fixed budget the most eligible come first.
* ``wagle`` (Jia et al. 2024): ``s = |(w - gbar_r / mu) * gbar_f|`` with signed ``gbar = sum_u g_u / N`` (with
  ``normalization='tokens'`` the gradient of the mean answer-token loss) and ``w`` the original (dequantized) weight.
* ``squared_ratio`` (LoKU/FILA, Cha et al. 2025): ``s = F_f / (1e-5 + F_r)``, ``F`` as for ``ssd``.
* ``leverage_ratio``: GRIN's ratio restricted to entries with forget leverage. With ``A``, ``eps'`` as for
  ``gradient_ratio``, ``k`` the budget and ``P = min(M, max(k, round(leverage_pool * k)))``, the pool is every entry
  with ``A_f >= t``, ``t`` the ``P``-th largest ``A_f`` (exact, over all targeted entries; per module, with the
  module's budget, for ``selection='per_module'``); ``s = max(A_f / (A_r + eps'), tiny)`` in the pool and ``0``
  outside (``tiny`` = the smallest normal float32), so no entry outside the pool is selected while one inside is
  left. ``leverage_pool=1`` selects by ``A_f`` alone up to ties; ``P = M`` is ``gradient_ratio``.
* ``retain_complement``: ``s = -A_r`` (``A`` per ``grad_statistic``): train the ``k`` entries the retain data needs
  least, i.e. exclude the ``M - k`` it needs most; ties go to the lowest index (module order, then flat index).
  ``A_f`` is still accumulated, for the report's forget mass. Excluding the *lowest-ratio* entries instead would be
  ``gradient_ratio`` itself (its top ``k`` are exactly the complement of its ``M - k`` lowest), so there is no such
  score.

The paper's stated form, ``|sum_u g_f,u| / (|sum_u g_r,u| + eps)``, is ``gradient_ratio`` with ``abs_sum``,
``normalization='tokens'`` and an absolute eps: :meth:`GrinConfig.paper() <grin_peft.config.GrinConfig.paper>`.

``random`` and ``magnitude`` need no data; :class:`~grin_peft.model.GrinModel` scores them.

Re-localisation (:mod:`grin_peft.relocalize`) evaluates the same formulas at the current weights (base + delta):
the gradients are taken there, ``w`` in ``wagle`` is the current weight and ``k`` in ``leverage_ratio`` the
support's size after growing.

Normalisation by ``N`` never changes a ranking except through an absolute eps: with ``eps_mode='quantile'`` the
eps scales with ``A_r``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

from ..config import GrinConfig
from ..errors import GrinError
from ..layer import GrinLayer
from .select import per_module_budgets, resolve_budget
from .statistics import UNITS, Statistic

LOKU_EPS = 1e-5
_FLOAT32_MAX = torch.finfo(torch.float32).max
_FLOAT32_TINY = torch.finfo(torch.float32).tiny
# scores built on GRIN's per-entry statistic A (grad_statistic); the ratios also resolve eps
_A_SCORES = ("gradient_ratio", "leverage_ratio", "retain_complement")

# (forget kind, retain kind) accumulated for each data-driven score
_GRAD_STATISTIC_KIND = {"abs_sum": "sum", "sum_abs": "abs", "sum_sq": "sq"}


def accumulation_plan(config: GrinConfig) -> tuple[str, str | None]:
    """Which statistic kind each pass accumulates for ``config.score`` (None: that data set is not needed)."""
    if config.score in _A_SCORES:
        kind = _GRAD_STATISTIC_KIND[config.grad_statistic]
        return kind, kind
    if config.score == "forget_gradient":
        return "sum", None
    if config.score in ("ssd", "squared_ratio"):
        return "sq_mean", "sq_mean"
    if config.score == "wagle":
        return "sum", "sum"
    raise GrinError(f"score={config.score!r} needs no data; it has no gradient statistics.")


def grad_unit(config: GrinConfig) -> str:
    """What one gradient term is: an example (default) or a batch. Read from ``GrinConfig.grad_unit`` when set."""
    return getattr(config, "grad_unit", "example")


def check_config(config: GrinConfig) -> None:
    """Refuse settings that would only fail after the scoring pass."""
    if grad_unit(config) not in UNITS:
        raise GrinError(f"grad_unit={grad_unit(config)!r} is not one of {', '.join(UNITS)}.")
    if config.score == "wagle" and not config.wagle_mu > 0:
        raise GrinError(f"score='wagle' divides by wagle_mu; it must be positive, got {config.wagle_mu!r}.")


def _divisor(stat: Statistic, normalization: str) -> int:
    # 'batches' counts gradient units: the batches themselves only with grad_unit='batch'
    return {"tokens": stat.tokens, "batches": stat.units, "none": 1}[normalization]


@dataclass
class Scorer:
    """A score per module (float32, the base weight's stored layout), plus the forget/retain parts behind it."""

    score: Callable[[str], torch.Tensor]
    parts: Callable[[str], tuple[torch.Tensor, torch.Tensor | None]]
    info: dict[str, float | int | None] = field(default_factory=dict)


def nonneg_quantiles(
    names: Iterable[str], values: Callable[[str], torch.Tensor], qs: Iterable[float], chunk: int = 1 << 22
) -> list[float]:
    """Exact lower quantiles of non-negative float32 values spread over modules, in bounded memory.

    The quantile ``q`` of ``M`` values is the one at ascending rank ``floor(q (M - 1))``. See :func:`order_statistics`.
    """
    qs = list(qs)
    return order_statistics(names, values, lambda total: [int(q * (total - 1)) for q in qs], chunk, nonneg=True)


def quantiles(
    names: Iterable[str], values: Callable[[str], torch.Tensor], qs: Iterable[float], chunk: int = 1 << 22
) -> list[float]:
    """As :func:`nonneg_quantiles`, for values of any sign (e.g. ``retain_complement``'s ``-A_r``)."""
    qs = list(qs)
    return order_statistics(names, values, lambda total: [int(q * (total - 1)) for q in qs], chunk)


def nth_largest(names: Iterable[str], values: Callable[[str], torch.Tensor], n: int, chunk: int = 1 << 22) -> float:
    """The ``n``-th largest (``n >= 1``, capped at the count) of float32 values spread over modules, exactly."""
    return order_statistics(names, values, lambda total: [max(0, total - n)], chunk)[0]


def order_statistics(
    names: Iterable[str],
    values: Callable[[str], torch.Tensor],
    ranks: Callable[[int], list[int]],
    chunk: int = 1 << 22,
    nonneg: bool = False,
) -> list[float]:
    """Exact order statistics (0-based ascending ``ranks(M)`` of ``M`` values) of float32 values over modules.

    Radix select on a monotone 32-bit key of the float bit patterns (sign bit flipped for values >= 0, every bit for
    negative ones): one pass histograms the top 16 bits of the key, a second the low 16 bits inside each bin a rank
    falls into. Memory: two 65536-bin histograms plus one module's values and one chunk at a time, never all values.
    Deterministic (integer counts); -0.0 counts as +0.0. ``nonneg=True`` refuses negative values.
    """
    names = list(names)
    hist = torch.zeros(1 << 16, dtype=torch.int64)
    total = 0
    for name in names:
        for keys in _key_chunks(values(name), chunk, name, nonneg):
            hist += torch.bincount(keys >> 16, minlength=1 << 16).cpu()
            total += keys.numel()
    if total == 0:
        raise GrinError("no values to take a quantile of.")
    cum = hist.cumsum(0)
    targets = []
    for rank in ranks(total):
        high = int(torch.searchsorted(cum, torch.tensor(rank), right=True))
        targets.append((high, rank - (int(cum[high - 1]) if high else 0)))
    lows = {high: torch.zeros(1 << 16, dtype=torch.int64) for high, _ in targets}
    for name in names:
        for keys in _key_chunks(values(name), chunk, name, nonneg):
            top = keys >> 16
            for high, low_hist in lows.items():
                low_hist += torch.bincount(keys[top == high] & 0xFFFF, minlength=1 << 16).cpu()
    out = []
    for high, rest in targets:
        low = int(torch.searchsorted(lows[high].cumsum(0), torch.tensor(rest), right=True))
        key = (high << 16) | low
        bits = key - (1 << 31) if key >= 1 << 31 else -1 - key
        out.append(torch.tensor([bits], dtype=torch.int32).view(torch.float32).item())
    return out


def _key_chunks(values: torch.Tensor, chunk: int, name: str, nonneg: bool):
    flat = values.detach().reshape(-1).float()
    if flat.numel() and nonneg and not bool((flat >= 0).all()):
        raise GrinError(f"{name}: quantiles need non-negative, non-NaN values.")
    if flat.numel() and bool(torch.isnan(flat).any()):
        raise GrinError(f"{name}: quantiles need non-NaN values.")
    for start in range(0, flat.numel(), chunk):
        # + 0.0 turns -0.0 (sign bit set) into +0.0
        bits = (flat[start : start + chunk] + 0.0).view(torch.int32).long()
        yield torch.where(bits >= 0, bits + (1 << 31), -1 - bits)


def build_scorer(
    config: GrinConfig,
    layers: dict[str, GrinLayer],
    forget: Statistic,
    retain: Statistic | None,
    *,
    budget: int | None = None,
    weight: Callable[[str], torch.Tensor] | None = None,
) -> Scorer:
    """Normalise the accumulators in place and return the configured score over them.

    The accumulators are reused as the normalised statistics, so scoring adds only one module's score at a time.
    ``budget`` (default: the config's) sizes ``leverage_ratio``'s pool; ``weight`` gives ``wagle``'s ``w`` per module
    (default: the base weight; re-localisation passes the current one).
    """
    score = config.score
    if score in ("ssd", "squared_ratio"):
        for stat in (forget, retain):
            for acc in stat.values.values():
                acc.div_(stat.units)
    else:
        for stat in (forget, retain):
            if stat is not None:
                for acc in stat.values.values():
                    acc.div_(_divisor(stat, config.normalization))
    f = forget.values
    r = retain.values if retain is not None else None

    if score in _A_SCORES:
        if config.grad_statistic == "abs_sum":
            for stat in (f, r):
                for acc in stat.values():
                    acc.abs_()
        parts = lambda name: (f[name], r[name])  # noqa: E731
        if score == "retain_complement":
            return Scorer(lambda name: -r[name], parts)
        eps = float(config.eps)
        quantile = None
        if config.eps_mode == "quantile":
            quantile = nonneg_quantiles(r, lambda name: r[name], [config.eps_quantile])[0]
            eps = float(torch.tensor(config.eps, dtype=torch.float32) * quantile)
        if eps == 0 and min(float(acc.min()) for acc in r.values()) == 0:
            raise GrinError(
                f"{score}: eps resolves to 0 and some retain statistics are exactly 0, where the ratio is "
                "undefined; use eps > 0 (or eps_mode='absolute' with a positive eps)."
            )
        info: dict[str, float | int | None] = {"eps_effective": eps, "retain_quantile": quantile}
        if score == "gradient_ratio":
            return Scorer(lambda name: f[name] / (r[name] + eps), parts, info)
        thresholds = _leverage_thresholds(config, layers, f, budget)
        info["leverage_pool_entries"] = sum(int((f[name] >= thresholds[name]).sum()) for name in f)
        if config.selection == "global":
            info["leverage_threshold"] = next(iter(thresholds.values()), None)

        def leverage(name: str) -> torch.Tensor:
            ratio = (f[name] / (r[name] + eps)).clamp_(min=_FLOAT32_TINY)
            return torch.where(f[name] >= thresholds[name], ratio, torch.zeros_like(ratio))

        return Scorer(leverage, parts, info)
    if score == "forget_gradient":
        for acc in f.values():
            acc.abs_()
        return Scorer(lambda name: f[name], lambda name: (f[name], None))
    if score == "ssd":
        alpha = float(config.ssd_alpha)

        def ssd(name: str) -> torch.Tensor:
            ff, fr = f[name], r[name]
            ratio = torch.where(fr > 0, ff / fr, torch.full_like(ff, _FLOAT32_MAX)).clamp_(max=_FLOAT32_MAX)
            return torch.where(ff > alpha * fr, ratio, torch.zeros_like(ff))

        eligible = sum(int((f[name] > alpha * r[name]).sum()) for name in f)
        return Scorer(ssd, lambda name: (f[name], r[name]), {"ssd_eligible": eligible})
    if score == "wagle":
        mu = float(config.wagle_mu)
        weight = weight or (lambda name: layers[name]._grin_weight())
        return Scorer(
            lambda name: ((weight(name).detach().float() - r[name] / mu) * f[name]).abs_(),
            lambda name: (f[name].abs(), r[name].abs()),
        )
    if score == "squared_ratio":
        return Scorer(lambda name: f[name] / (r[name] + LOKU_EPS), lambda name: (f[name], r[name]))
    raise GrinError(f"score={score!r} needs no data; it has no gradient statistics.")


def _leverage_thresholds(
    config: GrinConfig, layers: dict[str, GrinLayer], f: dict[str, torch.Tensor], budget: int | None
) -> dict[str, float]:
    """Per module, the smallest A_f in leverage_ratio's pool (one global value unless selection='per_module')."""
    numels = {name: layers[name].grin_numel for name in f}
    if budget is None:
        budget = resolve_budget(numels, None if config.num_entries else config.budget_density, config.num_entries)

    def pool(k: int, total: int) -> int:
        return min(total, max(k, int(round(float(config.leverage_pool) * k))))

    if config.selection == "global":
        t = nth_largest(f, lambda name: f[name], pool(budget, sum(numels.values())))
        return {name: t for name in f}
    budgets = per_module_budgets(numels, budget)
    return {
        # no budget here: nothing is in the pool (and nothing is selected)
        name: nth_largest([name], lambda n: f[n], pool(budgets[name], numels[name])) if budgets[name] else math.inf
        for name in f
    }
