"""Run one piece of work on several threads at once and keep what each returned and raised (a thread's exception is
otherwise lost)."""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any


def run_on_threads(work: Callable[[], list[Any]], threads: int) -> tuple[list[Any], list[BaseException]]:
    """Start ``threads`` threads on ``work`` together; returns every result they produced and every exception."""
    results: list[Any] = []
    errors: list[BaseException] = []

    def run() -> None:
        try:
            results.extend(work())
        except Exception as error:
            errors.append(error)

    started = [threading.Thread(target=run) for _ in range(threads)]
    for thread in started:
        thread.start()
    for thread in started:
        thread.join()
    return results, errors
