"""Token-level loss arithmetic on causal-LM logits: the NLL and KL terms the unlearning objectives are built from.

Everything here is a pure function of tensors (token means under data-parallel training also read the other
processes' token counts, see :func:`token_count`). The objectives that combine these terms, and the conventions they
follow, live in :mod:`grin_peft.objectives`.

Labels use -100 (:data:`IGNORE_INDEX`) for ignored positions and the standard causal shift applies:
``logits[:, t]`` predicts ``labels[:, t + 1]``. Logits are upcast to float32 before any log-softmax.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from .errors import GrinError

IGNORE_INDEX = -100

__all__ = [
    "IGNORE_INDEX",
    "batch_nll",
    "kl_to_reference",
    "sequence_nll",
    "token_count",
]


def _shifted(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Validate shapes and apply the causal shift, so every loss below reads the same aligned pairs."""
    if logits.dim() != 3:
        raise GrinError(f"logits must have shape [batch, seq_len, vocab]; got shape {tuple(logits.shape)}.")
    if labels.shape != logits.shape[:2]:
        raise GrinError(
            f"labels must have shape [batch, seq_len] matching logits {tuple(logits.shape)}; "
            f"got shape {tuple(labels.shape)}."
        )
    if logits.shape[1] < 2:
        raise GrinError("sequences need at least 2 positions: the causal shift predicts token t+1 from position t.")
    # Upcast as Hugging Face's loss does: bf16 log-softmax loses too much precision for a loss signal.
    return logits[:, :-1].float(), labels[:, 1:]


def _token_nll(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-token NLL [batch, seq_len - 1] (0 at ignored positions) and the answer-token mask."""
    shift_logits, shift_labels = _shifted(logits, labels)
    nll = F.cross_entropy(
        shift_logits.reshape(-1, shift_logits.shape[-1]),
        shift_labels.reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="none",
    ).view(shift_labels.shape)
    return nll, shift_labels != IGNORE_INDEX


def _nll_sums(logits: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
    """Per-example summed answer NLL and answer-token counts, both [batch].

    An example with no answer token (e.g. an answer cut off by truncation) has no defined mean and is almost always
    a data bug, so it raises instead of producing NaN or a silent 0.
    """
    nll, mask = _token_nll(logits, labels)
    counts = mask.sum(dim=-1)
    empty = (counts == 0).nonzero().flatten().tolist()
    if empty:
        raise GrinError(
            f"examples {empty} of the batch have no answer token (every label is {IGNORE_INDEX} after the causal "
            "shift); check truncation and the label mask."
        )
    return nll.sum(dim=-1), counts


def sequence_nll(logits: Tensor, labels: Tensor, reduction: str = "mean") -> Tensor:
    """Per-example NLL of the answer tokens, shape [batch].

    ``reduction="sum"`` gives the negative sequence log-likelihood ``-log p(y|x)`` that NPO and DPO compare with a
    reference; ``"mean"`` divides it by the number of answer tokens (the length normalisation of SimNPO and of
    TOFU's Probability metric). Examples with no answer token raise :class:`GrinError`.
    """
    if reduction not in ("mean", "sum"):
        raise GrinError(f"reduction must be 'mean' or 'sum'; got {reduction!r}.")
    sums, counts = _nll_sums(logits, labels)
    return sums if reduction == "sum" else sums / counts


def token_count(mask: Tensor) -> Tensor:
    """The denominator of a token mean: ``mask.sum()``, or under data-parallel training (torch.distributed set up,
    gradients on) the mean of it over the processes.

    DDP averages the processes' gradients, so each process dividing its token sum by the mean count makes the
    average exactly the token mean over the global batch, what one process with the whole batch computes. With
    each process's own count instead, two processes would weigh their halves equally whatever their lengths.
    """
    count = mask.sum()
    if not (torch.is_grad_enabled() and torch.distributed.is_available() and torch.distributed.is_initialized()):
        return count
    world = torch.distributed.get_world_size()
    if world == 1:
        return count
    total = count.detach().float()
    torch.distributed.all_reduce(total)
    return total / world


def batch_nll(logits: Tensor, labels: Tensor) -> Tensor:
    """Mean NLL over every answer token of the batch (a scalar): a Hugging Face causal LM's own ``loss``.

    Longer answers weigh more than short ones, as in open-unlearning's GradAscent/GradDiff. Raises only when the
    whole batch has no answer token, since then there is nothing to average.
    """
    nll, mask = _token_nll(logits, labels)
    n_tokens = token_count(mask)
    if n_tokens == 0:
        raise GrinError(f"the batch has no answer token: every label is {IGNORE_INDEX} after the causal shift.")
    return nll.sum() / n_tokens


def kl_to_reference(logits: Tensor, ref_logits: Tensor, labels: Tensor) -> Tensor:
    """KL(p_ref || p_theta) summed over the vocabulary, averaged over the positions predicting answer tokens.

    The direction matches open-unlearning's ``compute_kl_divergence`` (``F.kl_div(log p_theta, log p_ref,
    log_target=True)``): it penalises the trained model for dropping mass where the original model put it.
    open-unlearning averages over every position of the padded batch (prompt and padding included); here only the
    positions that predict a retain answer token count, so padding length cannot dilute the term.
    """
    if ref_logits.shape != logits.shape:
        raise GrinError(
            f"reference logits must have the same shape as the logits: {tuple(ref_logits.shape)} vs "
            f"{tuple(logits.shape)}."
        )
    shift_logits, shift_labels = _shifted(logits, labels)
    mask = shift_labels != IGNORE_INDEX
    if not mask.any():
        raise GrinError(f"the batch has no answer token: every label is {IGNORE_INDEX} after the causal shift.")
    # Select answer positions before the log-softmax: it is the memory-heavy [tokens, vocab] step.
    log_p = F.log_softmax(shift_logits[mask], dim=-1)
    log_p_ref = F.log_softmax(ref_logits[:, :-1].float()[mask], dim=-1)
    return F.kl_div(log_p, log_p_ref, reduction="sum", log_target=True) / token_count(mask)
