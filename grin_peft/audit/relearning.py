"""Relearning attack: fine-tune the unlearned model a little and see whether forgotten answers come back.

Two data sources, as published: a small part of the forget set, measured on the held-out rest of it (Hu et al.,
"Unlearning or obfuscating?": ~10 examples; Unlearn-Smooth: lr 1e-5, batch 4, 15-150 steps), and data that holds
none of the forget set (retain or related data; Deeb & Roger). Full fine-tuning by default; LoRA (Lucki et al.:
r 128, alpha 16, lr 2e-4) on request. A small plain training loop, so the attack needs nothing but the model.
"""

from __future__ import annotations

import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..data import QACollator, QAFormat
from ..errors import GrinError
from .quantization import plain_model


@dataclass(frozen=True)
class RelearnSettings:
    """How the attacker fine-tunes: ``items`` forget examples (the rest is held out and measured), ``steps``
    optimizer steps of ``batch_size`` examples at constant ``lr`` (AdamW, no weight decay), ``method`` "full" or
    "lora" (``lora_r``, alpha 16, all linear layers)."""

    items: int = 10
    steps: int = 50
    lr: float = 1e-5
    batch_size: int = 4
    method: str = "full"
    lora_r: int = 128
    seed: int = 0

    def __post_init__(self) -> None:
        if self.method not in ("full", "lora"):
            raise GrinError(f"relearning method must be 'full' or 'lora'; got {self.method!r}.")
        if self.items < 1 or self.steps < 1 or self.batch_size < 1 or self.lr <= 0 or self.lora_r < 1:
            raise GrinError(
                "relearning needs items, steps, batch size and LoRA rank >= 1 and lr > 0; got "
                f"items={self.items}, steps={self.steps}, batch_size={self.batch_size}, lr={self.lr}, "
                f"lora_r={self.lora_r}."
            )


def split_forget(
    forget: Sequence[Mapping[str, Any]], settings: RelearnSettings
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """A seeded sample of ``settings.items`` forget items to train on and the rest, held out, to measure."""
    if settings.items >= len(forget):
        raise GrinError(
            f"relearning on {settings.items} forget items leaves none of the {len(forget)} held out to measure; "
            "lower the relearning item count."
        )
    order = list(range(len(forget)))
    random.Random(settings.seed).shuffle(order)
    chosen = set(order[: settings.items])
    train = [dict(forget[i]) for i in sorted(chosen)]
    held_out = [dict(item) for i, item in enumerate(forget) if i not in chosen]
    return train, held_out


def relearn(
    model: nn.Module, fmt: QAFormat, items: Sequence[Mapping[str, Any]], settings: RelearnSettings
) -> nn.Module:
    """A copy of ``model`` fine-tuned on ``items`` (next-token loss on the answers, cycling through the items in a
    seeded order); ``model`` itself is not touched."""
    attacked = plain_model(model)
    if settings.method == "lora":
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(r=settings.lora_r, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
        attacked = get_peft_model(attacked, lora)
    else:
        for param in attacked.parameters():
            param.requires_grad_(True)
    params = [p for p in attacked.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=settings.lr, weight_decay=0.0)
    encoded = [fmt.encode(item["question"], item["answer"]) for item in items]
    collate = QACollator.from_tokenizer(fmt, "right")
    device = next(attacked.parameters()).device
    rng = random.Random(settings.seed)
    order: list[int] = []
    attacked.train()
    for _ in range(settings.steps):
        batch_ids = []
        while len(batch_ids) < min(settings.batch_size, len(encoded)):
            if not order:
                order = rng.sample(range(len(encoded)), len(encoded))
            batch_ids.append(order.pop())
        batch = {k: v.to(device) for k, v in collate([encoded[i] for i in batch_ids]).items()}
        loss = attacked(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    attacked.eval()
    return attacked
