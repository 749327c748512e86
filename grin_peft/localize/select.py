"""Choosing which entries to train: a budget, and a deterministic top-k over scores that never holds them all."""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..errors import GrinError


def resolve_budget(numels: dict[str, int], density: float | None, num_entries: int | None) -> int:
    """Total number of entries to train, from a density or an absolute count, checked against what is targeted."""
    total = sum(numels.values())
    if total == 0:
        raise GrinError("GRIN targets no weight entries: target_modules matched nothing trainable.")
    if num_entries is not None:
        if num_entries > total:
            raise GrinError(f"num_entries={num_entries} exceeds the {total} targeted weight entries.")
        return int(num_entries)
    if density is None or not 0 < density <= 1:
        raise GrinError(f"density={density!r} must lie in (0, 1].")
    k = int(round(density * total))
    if k < 1:
        raise GrinError(f"density={density} selects no entry out of {total}; raise it or give num_entries.")
    return k


def per_module_budgets(numels: dict[str, int], k_total: int) -> dict[str, int]:
    """Split a budget over modules in proportion to their size (largest remainders get the leftovers)."""
    total = sum(numels.values())
    exact = {name: k_total * n / total for name, n in numels.items()}
    budgets = {name: int(v) for name, v in exact.items()}
    leftover = k_total - sum(budgets.values())
    order = sorted(numels, key=lambda name: (-(exact[name] - budgets[name]), name))
    for name in order[:leftover]:
        budgets[name] += 1
    return budgets


def topk_deterministic(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Indices of the k largest scores, sorted ascending; ties at the threshold go to the lowest index.

    torch.topk breaks ties arbitrarily, which would make the selection depend on the kernel and thread count.
    """
    n = scores.numel()
    if k >= n:
        return torch.arange(n, device=scores.device)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long, device=scores.device)
    threshold = torch.topk(scores, k, sorted=False).values.min()
    above = torch.nonzero(scores > threshold).flatten()
    ties = torch.nonzero(scores == threshold).flatten()[: k - above.numel()]
    return torch.sort(torch.cat([above, ties])).values


def all_finite(tensor: torch.Tensor) -> bool:
    """``isfinite(t).all()`` in one read pass without a temporary: min and max propagate NaN and reach +-inf
    (``isfinite`` costs two passes and a mask the size of the weight, ~1.5% of a bf16 scoring pass)."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return bool(torch.isfinite(low) & torch.isfinite(high))


def check_finite(name: str, scores: torch.Tensor) -> None:
    """Non-finite scores mean non-finite gradients upstream: stop rather than select garbage."""
    if not all_finite(scores):
        raise GrinError(f"{name}: scores contain NaN or Inf (non-finite gradients?).")


def select_global(names: Iterable[str], score_fn: Callable[[str], torch.Tensor], k: int) -> dict[str, torch.Tensor]:
    """One ranking over all modules' entries, streamed module by module.

    Extra memory is bounded by 2k candidates (score, module, index) plus one module's scores at a time, never all
    scores of the model. Ties are broken by module order, then by index, so runs are reproducible.
    """
    names = list(names)
    pool_scores = torch.zeros(0, dtype=torch.float32)
    pool_module = torch.zeros(0, dtype=torch.long)
    pool_index = torch.zeros(0, dtype=torch.long)
    for module_id, name in enumerate(names):
        scores = score_fn(name).detach().reshape(-1).float()
        check_finite(name, scores)
        local = topk_deterministic(scores, k)
        pool_scores = torch.cat([pool_scores, scores[local].cpu()])
        pool_module = torch.cat([pool_module, torch.full((local.numel(),), module_id, dtype=torch.long)])
        pool_index = torch.cat([pool_index, local.cpu()])
        if pool_scores.numel() > k:
            # the pool stays ordered by (module, index) among equal scores, so a stable sort breaks ties the same way
            order = torch.sort(pool_scores, descending=True, stable=True).indices[:k]
            order = torch.sort(order).values
            pool_scores, pool_module, pool_index = pool_scores[order], pool_module[order], pool_index[order]
    return {name: torch.sort(pool_index[pool_module == module_id]).values for module_id, name in enumerate(names)}


def select_per_module(
    names: Iterable[str], score_fn: Callable[[str], torch.Tensor], budgets: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Each module keeps its own top entries: equal density everywhere, whatever the score scales."""
    selected = {}
    for name in names:
        scores = score_fn(name).detach().reshape(-1).float()
        check_finite(name, scores)
        selected[name] = topk_deterministic(scores, budgets[name]).cpu()
    return selected


def select_growth(
    numels: dict[str, int],
    score_fn: Callable[[str], torch.Tensor],
    taken: dict[str, torch.Tensor],
    k: int,
    selection: str = "global",
) -> dict[str, torch.Tensor]:
    """The ``k`` best-scored entries that are not ``taken`` yet (sorted flat indices per module), to grow a support.

    ``numels`` gives the modules (in ranking order) and their sizes; ``k`` must not exceed their free entries. The
    ranking and tie rules of :func:`select_global` / :func:`select_per_module` applied to the free entries only
    (``'per_module'`` splits ``k`` over modules in proportion to their free entries). Memory: one module's scores
    and free mask at a time plus 2k candidates.
    """
    names = list(numels)
    taken = {name: torch.sort(taken[name].detach().long().cpu()).values for name in names}
    free = {name: numels[name] - taken[name].numel() for name in names}
    if not 0 <= k <= sum(free.values()):
        raise GrinError(f"cannot add {k} entries: {sum(free.values())} targeted entries are free.")

    def free_scores(name: str) -> torch.Tensor:
        scores = score_fn(name).detach().reshape(-1)
        mask = torch.ones(scores.numel(), dtype=torch.bool, device=scores.device)
        mask[taken[name].to(scores.device)] = False
        return scores[mask]

    if selection == "global":
        chosen = select_global(names, free_scores, k)
    elif k == 0:
        chosen = {name: torch.zeros(0, dtype=torch.long) for name in names}
    else:
        chosen = select_per_module(names, free_scores, per_module_budgets(free, k))
    return {name: free_to_index(chosen[name], taken[name]) for name in names}


def free_to_index(positions: torch.Tensor, taken: torch.Tensor) -> torch.Tensor:
    """Map positions among the free entries (those not in sorted ``taken``) to flat indices, without listing them.

    Before ``taken[i]`` lie ``taken[i] - i`` free entries, so free position ``c`` is flat index ``c + j`` with ``j``
    the number of taken entries whose count of free entries before them is ``<= c``.
    """
    taken = taken.long().cpu()
    before = taken - torch.arange(taken.numel())
    positions = positions.long().cpu()
    return positions + torch.searchsorted(before, positions, right=True)
