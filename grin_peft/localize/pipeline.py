"""`localize`: score every targeted entry on forget/retain data, select the budget, inject noise, report.

Every check that can fail runs before the scoring pass: adapter, budget, targets, merged state, score settings, and
the data (non-empty, labelled, a tokenizer for raw question/answer pairs, a first batch peeked from loaders).
"""

from __future__ import annotations

import itertools
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler

from ..config import GrinConfig
from ..data import IGNORE_INDEX, QACollator, encode_items, pad_token_id
from ..errors import GrinError
from .report import SCORE_QUANTILES, LocalizationReport, ModuleDensity, split_module_name
from .scores import Scorer, accumulation_plan, build_scorer, check_config, grad_unit, quantiles
from .select import resolve_budget
from .statistics import World, collect_statistic

SETTINGS = (
    "score",
    "grad_statistic",
    "eps",
    "eps_mode",
    "eps_quantile",
    "normalization",
    "selection",
    "ssd_alpha",
    "wagle_mu",
    "leverage_pool",
    "noise_std",
    "noise_scale",
    "seed",
    "density",
    "num_entries",
)


@dataclass
class Batches:
    """A re-iterable source of collated batches: the same global sequence on every rank."""

    make: Callable[[], Iterator[dict[str, torch.Tensor]]]
    total: int | None

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        return self.make()


def prepare_batches(
    data: Any,
    what: str,
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    world: World | None = None,
) -> Batches:
    """Turn a DataLoader, a sequence of tokenized examples or of question/answer dicts into validated batches.

    Tokenized examples need ``input_ids`` and ``labels`` (loss where labels != -100); question/answer dicts are
    encoded with :class:`grin_peft.data.QAFormat` (loss on answer tokens only) and need ``tokenizer=``.
    """
    world = world or World()
    if data is None:
        raise GrinError(f"{what} data is required for this score.")
    if isinstance(data, DataLoader):
        if world.size > 1 and isinstance(getattr(data, "sampler", None), DistributedSampler):
            raise GrinError(
                f"{what}: pass the same unsharded DataLoader on every rank (no DistributedSampler); localize deals "
                "batches to ranks itself so that the result equals a single process's."
            )
        first = next(iter(data), None)
        if first is None:
            raise GrinError(f"{what} data is empty.")
        _check_batch(first, what)
        try:
            total = len(data)
        except TypeError:
            total = None
        return _limited(lambda: iter(data), total, max_batches)
    if isinstance(data, (str, bytes, Mapping)) or not (hasattr(data, "__len__") and hasattr(data, "__getitem__")):
        raise GrinError(
            f"{what} data must be a torch DataLoader or a list of examples (tokenized dicts with input_ids/labels, "
            f"or question/answer dicts with tokenizer=); got {type(data).__name__}."
        )
    if len(data) == 0:
        raise GrinError(f"{what} data is empty.")
    items = [data[i] for i in range(len(data))]
    for index, item in enumerate(items):
        if not isinstance(item, Mapping):
            raise GrinError(f"{what}: example {index} is a {type(item).__name__}, expected a dict.")
    if "input_ids" in items[0]:
        for index, item in enumerate(items):
            if "input_ids" not in item or "labels" not in item:
                raise GrinError(
                    f"{what}: example {index} lacks input_ids or labels (labels mark the tokens to score; use -100 "
                    f"elsewhere); it has {sorted(item)}."
                )
        encoded = [{"input_ids": _ids(item["input_ids"]), "labels": _ids(item["labels"])} for item in items]
        for index, item in enumerate(encoded):
            if len(item["input_ids"]) != len(item["labels"]):
                raise GrinError(
                    f"{what}: example {index} has {len(item['input_ids'])} input_ids but {len(item['labels'])} labels."
                )
    elif "question" in items[0] and "answer" in items[0]:
        if tokenizer is None:
            raise GrinError(f"{what}: question/answer examples need tokenizer= to be encoded.")
        encoded = encode_items(items, tokenizer)
    else:
        raise GrinError(
            f"{what}: examples need input_ids and labels, or question and answer; the first has {sorted(items[0])}."
        )
    if not any(label != IGNORE_INDEX for item in encoded for label in item["labels"][1:]):
        raise GrinError(f"{what}: every label is {IGNORE_INDEX}; there is no answer token to score.")
    collate = QACollator(pad_token_id(getattr(tokenizer, "tokenizer", tokenizer)) if tokenizer is not None else 0)
    chunks = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
    return _limited(lambda: map(collate, chunks), len(chunks), max_batches)


def _ids(values: Any) -> list[int]:
    return values.tolist() if isinstance(values, torch.Tensor) else list(values)


def _check_positive(name: str, value: Any, optional: bool = False) -> None:
    if optional and value is None:
        return
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise GrinError(f"{name}={value!r} must be a positive integer.")


def _limited(make: Callable[[], Iterator], total: int | None, max_batches: int | None) -> Batches:
    if max_batches is None:
        return Batches(make, total)
    return Batches(
        lambda: itertools.islice(make(), max_batches), max_batches if total is None else min(total, max_batches)
    )


def _check_batch(batch: Any, what: str) -> None:
    if not isinstance(batch, Mapping):
        raise GrinError(f"{what}: the DataLoader must yield dicts, got {type(batch).__name__}.")
    for key in ("input_ids", "labels"):
        if not isinstance(batch.get(key), torch.Tensor):
            raise GrinError(
                f"{what}: batches need '{key}' tensors (labels mark the tokens to score, -100 elsewhere); the first "
                f"batch has {sorted(batch)}."
            )


@dataclass
class Scores:
    """Scores of every targeted entry (not yet selected) and what they were computed from."""

    scorer: Scorer
    data: dict[str, dict[str, Any]]
    timings: dict[str, float]
    world: World


def _check_adapter(tuner: Any, adapter_name: str) -> tuple[GrinConfig, dict[str, Any], int]:
    """The adapter's config, layers and budget, refusing anything that cannot be localized, before any work."""
    from ..model import GrinModel

    if not isinstance(tuner, GrinModel):
        raise GrinError(f"localize needs a GRIN model, got {type(tuner).__name__}.")
    config = tuner.peft_config.get(adapter_name)
    if not isinstance(config, GrinConfig):
        raise GrinError(f"'{adapter_name}' is not a GRIN adapter of this model.")
    layers = tuner.grin_layers(adapter_name)
    numels = {name: layer.grin_numel for name, layer in layers.items()}
    k = resolve_budget(numels, None if config.num_entries else config.budget_density, config.num_entries)
    merged = [name for name, layer in layers.items() if layer.merged_adapters]
    if merged:
        raise GrinError(f"{merged[0]}: unmerge the adapters before localize (scores need the original weights).")
    check_config(config)
    return config, layers, k


def compute_scores(
    tuner: Any,
    forget: Any,
    retain: Any = None,
    adapter_name: str = "default",
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = True,
    group: Any = None,
) -> Scores:
    """Score every targeted entry of the adapter without selecting anything (ablations, inspection).

    Arguments as for :func:`localize`. The scores are computed lazily per module from float32 statistics held for
    all targeted weights (two copies at most), so keep the result only as long as needed.
    """
    config, layers, _ = _check_adapter(tuner, adapter_name)
    return _scores(tuner, config, layers, forget, retain, tokenizer, batch_size, max_batches, progress, group)


def current_scores(
    tuner: Any,
    forget: Any,
    retain: Any = None,
    adapter_name: str = "default",
    *,
    budget: int | None = None,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = False,
    group: Any = None,
) -> Scores:
    """Score every targeted entry at the weights the model computes with now (base + active deltas), for
    re-localisation during training.

    As :func:`compute_scores`, except that the gradients are taken with the adapters on (the taps see the layers'
    outputs including the delta, so ``grad_y^T x`` is the gradient at the current weights), ``wagle``'s ``w`` is the
    current weight and ``budget`` sizes ``leverage_ratio``'s pool (default: the config's budget). Data-free scores
    have no statistics: :mod:`grin_peft.relocalize` scores them itself.
    """
    config, layers, _ = _check_adapter(tuner, adapter_name)
    if config.selects_at_injection:
        raise GrinError(f"score={config.score!r} needs no data; it has no gradient statistics.")
    return _scores(
        tuner, config, layers, forget, retain, tokenizer, batch_size, max_batches, progress, group, True, budget
    )


def current_weight(layer: Any) -> torch.Tensor:
    """The weight a GRIN layer computes with now, in float32: the base (dequantized) plus every active, unmerged
    adapter's delta (a merged delta is already in the base)."""
    weight = layer._grin_weight().detach().float()
    if layer.disable_adapters or layer.merged:
        return weight
    for adapter in layer.active_adapters:
        if adapter in layer.grin_values and layer.grin_values[adapter].numel():
            weight = weight + layer.get_delta_weight(adapter).detach().float()
    return weight


def _scores(
    tuner: Any,
    config: GrinConfig,
    layers: dict[str, Any],
    forget: Any,
    retain: Any,
    tokenizer: Any,
    batch_size: int,
    max_batches: int | None,
    progress: bool,
    group: Any,
    current: bool = False,
    budget: int | None = None,
) -> Scores:
    world = World.current(group)
    _check_positive("batch_size", batch_size)
    _check_positive("max_batches", max_batches, optional=True)
    if config.selects_at_injection:
        return Scores(Scorer(tuner._data_free_score(config), lambda name: (None, None)), {}, {}, world)
    forget_kind, retain_kind = accumulation_plan(config)
    options = dict(tokenizer=tokenizer, batch_size=batch_size, max_batches=max_batches, world=world)
    batches = {"forget": prepare_batches(forget, "forget", **options)}
    if retain_kind:
        batches["retain"] = prepare_batches(retain, "retain", **options)
    stats, data, timings = {}, {}, {}
    for what, kind in (("forget", forget_kind), ("retain", retain_kind)):
        if kind is None:
            continue
        stat = collect_statistic(
            tuner.model,
            layers,
            batches[what],
            kind,
            unit=grad_unit(config),
            world=world,
            progress=progress,
            desc=f"GRIN {what} gradients",
            total=batches[what].total,
            adapters=current,
        )
        stats[what] = stat
        timings[f"{what}_pass"] = stat.seconds
        data[what] = {
            "batches": stat.batches,
            "examples": stat.examples,
            "units": stat.units,
            "answer_tokens": stat.tokens,
            "statistic": kind,
        }
    weight = (lambda name: current_weight(layers[name])) if current else None
    scorer = build_scorer(config, layers, stats["forget"], stats.get("retain"), budget=budget, weight=weight)
    return Scores(scorer, data, timings, world)


def localize(
    tuner: Any,
    forget: Any,
    retain: Any = None,
    adapter_name: str = "default",
    *,
    tokenizer: Any = None,
    batch_size: int = 8,
    max_batches: int | None = None,
    progress: bool = True,
    group: Any = None,
) -> LocalizationReport:
    """Select the adapter's entries from data and initialise them with the configured noise.

    Args:
        tuner: the :class:`~grin_peft.model.GrinModel` (``peft_model.base_model``); ``peft_model.localize`` calls
            this.
        forget, retain: a DataLoader yielding dicts with ``input_ids``/``attention_mask``/``labels``, or a list of
            tokenized examples (``input_ids``, ``labels``), or a list of ``{"question", "answer"}`` dicts with
            ``tokenizer=``. ``retain`` is unused by ``score='forget_gradient'``; ``random``/``magnitude`` use neither.
        tokenizer: encodes question/answer dicts (a tokenizer or a :class:`~grin_peft.data.QAFormat`); also gives
            the pad id when collating tokenized examples.
        batch_size: examples per batch for lists (a DataLoader keeps its own). With the default per-example
            gradient unit it only trades speed for memory; with ``grad_unit='batch'`` it is part of what the
            statistics mean.
        max_batches: use at most this many batches of each data set.
        progress: tqdm bars for the scoring passes (rank 0 only).
        group: torch.distributed process group (default: the default group when initialised). Give every rank the
            same, unsharded data: batches are dealt round-robin and statistics exchanged so that the selection
            equals a single process's bit for bit.

    Returns:
        A :class:`LocalizationReport`; the adapter now holds the selected entries with noise-initialised values.
    """
    start = time.perf_counter()
    config, layers, k = _check_adapter(tuner, adapter_name)
    scores = _scores(tuner, config, layers, forget, retain, tokenizer, batch_size, max_batches, progress, group)
    if scores.world.size > 1:  # every rank writes rank 0's noise (a seed drawn from torch's RNG can differ per rank)
        device = next(iter(layers.values()))._grin_weight().device
        config.seed = int(scores.world.all_gather(torch.tensor([config.seed], device=device))[0])
    timings = dict(scores.timings)
    t0 = time.perf_counter()
    selected = tuner.select_entries(adapter_name, scores.scorer.score)
    timings["selection"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    report = _report(config, adapter_name, layers, selected, scores.scorer, k, scores.world)
    report.data = scores.data
    timings["report"] = time.perf_counter() - t0
    timings["total"] = time.perf_counter() - start
    report.timings = timings
    return report


def _report(
    config: GrinConfig,
    adapter_name: str,
    layers: dict[str, Any],
    selected: dict[str, torch.Tensor],
    scorer: Scorer,
    k: int,
    world: World,
) -> LocalizationReport:
    """Densities, score quantiles, the selection threshold and the forget/retain mass the selection holds."""
    modules = []
    for name, layer in layers.items():
        layer_index, kind = split_module_name(name)
        count = int(selected.get(name, torch.zeros(0)).numel())
        modules.append(ModuleDensity(name, layer_index, kind, layer.grin_numel, count))
    total = sum(m.numel for m in modules)
    names = list(layers)
    score_quantiles = quantiles(names, scorer.score, SCORE_QUANTILES)
    threshold = None
    for name in names:
        idx = selected.get(name)
        if idx is not None and idx.numel():
            scores = scorer.score(name).reshape(-1)
            low = float(scores[idx.to(scores.device)].min())
            threshold = low if threshold is None else min(threshold, low)
    mass = {} if config.selects_at_injection else selection_mass(names, scorer, selected)
    notes = []
    eligible = scorer.info.get("ssd_eligible")
    if eligible is not None and eligible < k:
        notes.append(
            f"SSD's alpha={config.ssd_alpha} admits only {eligible} entries for a budget of {k}; the rest of the "
            "budget went to ineligible entries (score 0, lowest index first). Lower ssd_alpha or the budget."
        )
    settings = {key: getattr(config, key) for key in SETTINGS}
    settings["grad_unit"] = grad_unit(config)
    return LocalizationReport(
        adapter_name=adapter_name,
        score=config.score,
        settings=settings,
        budget={"entries": k, "targeted": total, "density": k / total, "selection": config.selection},
        modules=modules,
        score_quantiles={f"{q:g}": v for q, v in zip(SCORE_QUANTILES, score_quantiles)},
        score_threshold=threshold,
        mass=mass,
        info=dict(scorer.info),
        world_size=world.size,
        notes=notes,
    )


def selection_mass(names: list[str], scorer: Scorer, selected: dict[str, torch.Tensor]) -> dict[str, float | None]:
    """The share of the forget and the retain statistic behind the score that the selected entries hold (None for a
    statistic the score did not use, or one that is 0 everywhere)."""
    sums = {"forget": [0.0, 0.0], "retain": [0.0, 0.0]}
    used = set()
    for name in names:
        idx = selected.get(name, torch.zeros(0, dtype=torch.long))
        for what, part in zip(("forget", "retain"), scorer.parts(name)):
            if part is None:
                continue
            used.add(what)
            flat = part.reshape(-1)
            sums[what][0] += float(flat[idx.to(flat.device).long()].double().sum())
            sums[what][1] += float(flat.double().sum())
    return {what: (s / t if what in used and t > 0 else None) for what, (s, t) in sums.items()}
