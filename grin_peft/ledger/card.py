"""The model card section of a ledgered model: which requests its weights hold, so whoever downloads it can see."""

from __future__ import annotations

import os

from ..delta_file import atomic_write_text
from .record import LEDGER_NAME, Record

CARD_NAME = "README.md"
HEADING = "## GRIN unlearning ledger"


def _cell(text: str) -> str:
    return " ".join(text.replace("|", "\\|").split()) or "-"


def section(record: Record) -> str:
    """The card section for a ledger: every applied request in order, and how to check the claim."""
    lines = [
        HEADING,
        "",
        f"This model's weights hold {len(record.requests)} unlearning request(s), merged in this order as GRIN sparse "
        f"deltas by grin_peft's ledger (`{LEDGER_NAME}` in this folder). Check that the weights are what it says "
        "with `grin-peft ledger verify --model <this folder>`; undo any request exactly with "
        "`grin-peft ledger revert N`.",
        "",
    ]
    if record.requests:
        lines += [
            "| request | applied (UTC) | description | delta | delta sha256 | entries |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {r.id} | {r.applied_at} | {_cell(r.description)} | {_cell(r.delta.describe())} | "
            f"`{r.delta_sha256[:16]}` | {r.entries:,} |"
            for r in record.requests
        ]
    else:
        lines.append("No request is applied: the weights are the original model's at every ledger entry.")
    lines += ["", f"- original model fingerprint: `{record.original_fingerprint}`"]
    lines.append(f"- current model fingerprint: `{record.model_fingerprint}`")
    return "\n".join(lines) + "\n"


def card_text(existing: str | None, record: Record) -> str:
    """The card with its ledger section replaced (or added); the rest of an existing card is kept as it was."""
    if not existing:
        return "# Ledgered model\n\n" + section(record)
    if HEADING not in existing:
        return existing.rstrip() + "\n\n" + section(record)
    head, _, tail = existing.partition(HEADING)
    rest = tail.find("\n## ")
    after = tail[rest + 1 :] if rest >= 0 else ""
    return head + section(record) + ("\n" + after if after else "")


def update_card(folder: str, record: Record) -> None:
    """Rewrite the folder's README.md ledger section atomically."""
    path = os.path.join(folder, CARD_NAME)
    existing = None
    if os.path.isfile(path):
        with open(path) as handle:
            existing = handle.read()
    atomic_write_text(card_text(existing, record), path)


def card_lists(folder: str, record: Record) -> bool:
    """Whether the folder's card shows exactly this ledger's section."""
    path = os.path.join(folder, CARD_NAME)
    if not os.path.isfile(path):
        return False
    with open(path) as handle:
        return section(record) in handle.read()
