"""`grin_peft.audit`: run every attack family on an unlearned model and its original, and report.

Reference points of every recovered fraction: the **unlearned** model without the attack on the same items (plain
questions, full precision, no fine-tuning) and the **original** model given the attack's input (the same items and
prompt) without its weight changes. 0 = the attack recovered nothing, 1 = all that unlearning removed.
"""

from __future__ import annotations

import copy
import logging
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

from torch import nn
from transformers import PreTrainedTokenizerBase

from ..data import QAFormat, as_format
from ..errors import GrinError
from .measure import Thresholds, measure, qa_items, recovered, verdict
from .membership import membership
from .names import ATTACKS, MODES
from .prompts import JAILBREAK_PREFIX, paraphrased, with_prefix
from .quantization import change_vs_bin_width, plain_model, quantize, quantized_modules
from .relearning import RelearnSettings, relearn, split_forget
from .report import AuditReport


def _original_of(model: nn.Module, original: nn.Module | None) -> nn.Module:
    from peft import PeftModel

    if original is not None:
        return original
    if isinstance(model, PeftModel):
        return copy.deepcopy(model).unload()  # the base model the adapters were trained on
    raise GrinError(
        "audit: a plain (full-parameter) unlearned model needs original=<the model before unlearning> as reference."
    )


def _attacks(attacks: Sequence[str] | None, holdout: Any) -> list[str]:
    if attacks is None:
        return [a for a in ATTACKS if a != "membership" or holdout is not None]
    unknown = [a for a in attacks if a not in ATTACKS]
    if unknown or not attacks:
        raise GrinError(f"audit: unknown or no attack(s) {unknown}; choose from {list(ATTACKS)}.")
    if "membership" in attacks and holdout is None:
        raise GrinError("audit: the membership attack needs holdout data (never-trained items of the same kind).")
    return list(dict.fromkeys(attacks))


def audit(
    model: nn.Module,
    forget: Sequence[Mapping[str, Any]],
    retain: Sequence[Mapping[str, Any]],
    *,
    tokenizer: PreTrainedTokenizerBase | QAFormat,
    original: nn.Module | None = None,
    holdout: Sequence[Mapping[str, Any]] | None = None,
    attacks: Sequence[str] | None = None,
    quantization_modes: Sequence[str] = MODES,
    relearn_settings: RelearnSettings | None = None,
    relearn_data: Sequence[Mapping[str, Any]] | None = None,
    jailbreak_prefix: str = JAILBREAK_PREFIX,
    thresholds: Thresholds | None = None,
    mia_k: float = 0.4,
    mia_reference_auc: float = 0.5,
    max_items: int | None = None,
    max_new_tokens: int = 64,
    batch_size: int = 8,
    name: str = "model",
    log: Callable[[str], None] | None = None,
) -> AuditReport:
    """Does the forgetting hold? Attack ``model`` (a GRIN or LoRA PeftModel, or a plain unlearned model with
    ``original``) with quantization, relearning, paraphrased questions, a jailbreak answer prefix and membership
    inference, and report every forget and retain metric before and after, with recovered fractions and verdicts.

    ``forget``/``retain``/``holdout``/``relearn_data`` are question/answer records (TOFU's fields; a
    ``paraphrased_question`` enables the paraphrase attack). ``attacks`` None = every attack the data allows
    (membership needs ``holdout``). ``max_items`` caps the forget, retain and holdout items measured (relearning
    holds out the forget items it does not train on). Neither model is modified: attacks run on copies.
    """
    started = time.perf_counter()
    say = log or (lambda message: None)
    fmt = as_format(tokenizer)
    thresholds = thresholds or Thresholds()
    relearn_settings = relearn_settings or RelearnSettings()
    if max_items is not None and max_items < 1:
        raise GrinError(f"audit: max_items must be at least 1; got {max_items}.")
    chosen = _attacks(attacks, holdout)
    unknown_modes = [m for m in quantization_modes if m not in MODES]
    if unknown_modes:
        raise GrinError(f"audit: unknown quantization mode(s) {unknown_modes}; choose from {list(MODES)}.")
    forget_all, retain_all = qa_items(forget, "forget"), qa_items(retain, "retain")
    retain_items = retain_all[:max_items]
    holdout_items = qa_items(holdout, "holdout")[:max_items] if holdout is not None else None
    related = qa_items(relearn_data, "relearning") if relearn_data is not None else retain_all
    forget_items = forget_all[:max_items]
    if "relearning" in chosen:
        relearn_train, held_out = split_forget(forget_all, relearn_settings)
        held_out = held_out[:max_items]
    reference = _original_of(model, original)
    kw = {"max_new_tokens": max_new_tokens, "batch_size": batch_size}

    def evaluate(target: nn.Module, items: list[dict[str, Any]], fmt_: QAFormat = fmt, with_retain: bool = True):
        return measure(target, fmt_, items, retain_items if with_retain else None, **kw)

    say("measuring the original and the unlearned model")
    base = {"original": evaluate(reference, forget_items), "unlearned": evaluate(model, forget_items)}
    report = AuditReport(name=name, thresholds=thresholds, baseline=base)
    report.settings = {
        "attacks": chosen,
        "forget_items": len(forget_items),
        "retain_items": len(retain_items),
        "holdout_items": None if holdout_items is None else len(holdout_items),
        "max_new_tokens": max_new_tokens,
        "quantization_modes": list(quantization_modes),
        "relearning": vars(relearn_settings) | {"data_items": len(related)},
        "jailbreak_prefix": jailbreak_prefix,
        "mia_k": mia_k,
        "mia_reference_auc": mia_reference_auc,
    }

    def add(attack: str, variant: str, items: int, original_m, unlearned_m, attacked_m) -> None:
        fractions = recovered(original_m["forget"], unlearned_m["forget"], attacked_m["forget"], thresholds.min_gap)
        label, sentence = verdict(f"{attack} ({variant})", fractions, thresholds)
        report.rows.append(
            {
                "attack": attack,
                "variant": variant,
                "items": items,
                "original": original_m["forget"],
                "unlearned": unlearned_m["forget"],
                "attacked": attacked_m["forget"],
                "recovered": fractions,
                "retain_unlearned": base["unlearned"]["retain"],
                "retain_attacked": attacked_m.get("retain"),
                "verdict_label": label,
                "verdict": sentence,
            }
        )
        say(sentence)

    if "quantization" in chosen:
        plain_original, plain_unlearned = plain_model(reference), plain_model(model)
        for mode in quantization_modes:
            say(f"quantization: {mode}")
            quantized = quantize(model, mode)
            if mode == quantization_modes[0]:
                report.module_changes = change_vs_bin_width(
                    plain_original, plain_unlearned, quantized_modules(quantized)
                )
            with _quiet_bitsandbytes():
                attacked = evaluate(quantized, forget_items)
            add("quantization", mode, len(forget_items), base["original"], base["unlearned"], attacked)
            del quantized
        del plain_original, plain_unlearned
    if "relearning" in chosen:
        s = relearn_settings
        how = f"{s.method}, {s.items} items, {s.steps} steps of {s.batch_size}, lr {s.lr:g}"
        original_m = evaluate(reference, held_out, with_retain=False)
        unlearned_m = evaluate(model, held_out, with_retain=False)
        sources = [("forget", relearn_train), ("related", _sample(related, s))]
        for source, train_items in sources:
            say(f"relearning on {source} data ({how})")
            attacked = evaluate(relearn(model, fmt, train_items, s), held_out)
            add("relearning", f"{source} data: {how}", len(held_out), original_m, unlearned_m, attacked)
    if "paraphrase" in chosen:
        plain, rephrased = paraphrased(forget_items)
        if not plain:
            report.notes.append("paraphrase: not run - no forget item has a 'paraphrased_question'.")
        else:
            say("paraphrased questions")
            unlearned_m = (
                base["unlearned"] if len(plain) == len(forget_items) else evaluate(model, plain, with_retain=False)
            )
            original_m = evaluate(reference, rephrased, with_retain=False)
            attacked = evaluate(model, rephrased, with_retain=False)
            add("paraphrase", "paraphrased_question", len(plain), original_m, unlearned_m, attacked)
    if "jailbreak" in chosen:
        say("jailbreak answer prefix")
        prefixed = with_prefix(fmt, jailbreak_prefix)
        original_m = evaluate(reference, forget_items, prefixed, with_retain=False)
        attacked = evaluate(model, forget_items, prefixed)
        variant = f"answer prefix {jailbreak_prefix!r}"
        add("jailbreak", variant, len(forget_items), original_m, base["unlearned"], attacked)
    if "membership" in chosen:
        say("membership inference")
        report.membership = membership(
            reference,
            model,
            fmt,
            forget_items,
            holdout_items,
            k=mia_k,
            reference_auc=mia_reference_auc,
            min_gap=thresholds.min_gap,
            batch_size=batch_size,
        )
        report.add_membership_verdict()
    report.seconds = time.perf_counter() - started
    return report


@contextmanager
def _quiet_bitsandbytes() -> Iterator[None]:
    """bitsandbytes logs a warning per 8-bit CPU matmul (inputs cast to fp16); once per layer and batch is noise."""
    logger = logging.getLogger("bitsandbytes")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _sample(items: list[dict[str, Any]], settings: RelearnSettings) -> list[dict[str, Any]]:
    return random.Random(settings.seed).sample(items, min(settings.items, len(items)))
