"""Membership inference: can forget items still be told apart from never-seen holdout items of the same kind?

The attacks and AUC convention are :func:`grin_peft.metrics.evaluate_mia`'s (LOSS, ZLib, MinK, MinK++; AUC 1 =
forget items look fully memorised, 0.5 = indistinguishable from the holdout). The audit scores the original and
the unlearned model and reports how much of the original's membership signal is left:
``(AUC_unlearned - AUC_ref) / (AUC_original - AUC_ref)`` with ``AUC_ref`` the AUC of a model that never saw the
forget set (0.5 unless given), i.e. the recovered-fraction formula with the ideal in place of the unlearned model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from ..data import QAFormat
from .measure import recovered_fraction


def membership(
    original: nn.Module,
    unlearned: nn.Module,
    fmt: QAFormat,
    forget: Sequence[Mapping[str, Any]],
    holdout: Sequence[Mapping[str, Any]],
    *,
    k: float,
    reference_auc: float,
    min_gap: float,
    batch_size: int,
) -> list[dict[str, Any]]:
    """One row per MIA attack: AUC and privleak of both models and the share of the membership signal left."""
    from ..metrics import MIA_ATTACKS, evaluate_mia

    kw = {"k": k, "reference_auc": reference_auc, "batch_size": batch_size, "progress": False}
    before = evaluate_mia(original, fmt, forget, holdout, **kw)
    after = evaluate_mia(unlearned, fmt, forget, holdout, **kw)
    return [
        {
            "attack": attack,
            "auc_original": before["auc"][attack],
            "auc_unlearned": after["auc"][attack],
            "privleak_original": before["privleak"][attack],
            "privleak_unlearned": after["privleak"][attack],
            "signal_left": recovered_fraction(before["auc"][attack], reference_auc, after["auc"][attack], min_gap),
        }
        for attack in MIA_ATTACKS
    ]
