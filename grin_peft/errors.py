"""The one exception type users catch for every bad input grin_peft detects, and remedies in the caller's terms."""

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

_COMMAND_LINE: ContextVar[bool] = ContextVar("grin_command_line", default=False)


def remedy(python: str, command_line: str) -> str:
    """How to fix a problem in the caller's own terms: a Python argument, or the flag when `grin-peft` runs."""
    return command_line if _COMMAND_LINE.get() else python


@contextlib.contextmanager
def command_line_terms() -> Iterator[None]:
    """Within the block every `remedy` names command-line flags (`grin-peft` runs its commands in one)."""
    token = _COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _COMMAND_LINE.reset(token)


class GrinError(ValueError):
    """A clear, actionable error about bad input to grin_peft.

    Subclasses ValueError so code written against PEFT's own validation errors keeps working. Raised before any
    weight or file is modified.
    """
