"""How many torch threads `unlearn` and `grin-peft unlearn` use: one for small models, torch's choice otherwise.

Why a rule at all: a small model's matmuls are too small to split across threads, and OpenMP threads that wait for
each other on a busy CPU turn every parallel region into a scheduling lottery. On this project's 2-core machine a CLI
run on a tiny model took 46 s with torch's default threads and 1.5 s with one thread, with a byte-identical delta
(issue 15); the same step time measurements per model size are in BENCHMARKS.md §2 (`benchmarks/bench_threads.py`).

The rule, in order:

1. an explicit thread count wins (``num_threads=`` of `unlearn` / `UnlearningArguments`, ``--threads`` of the CLI);
2. an ``OMP_NUM_THREADS`` set in the environment is the user's choice: torch's setting is left alone;
3. a model with fewer than :data:`SMALL_MODEL_PARAMETERS` parameters runs on one thread;
4. otherwise torch's setting is left alone.

The previous setting is restored when the call returns, so the rule never leaks into the caller's process.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import os
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
from torch import nn

from .errors import GrinError

__all__ = ["SMALL_MODEL_PARAMETERS", "choose_threads", "torch_threads", "with_thread_rule"]

# one thread was 4-14x faster than two at every size measured, 1.3M to 21M parameters (GRIN training step, 2-core
# CPU shared with other jobs, OpenMP's default waiting policy: BENCHMARKS.md §2); larger models keep torch's choice
SMALL_MODEL_PARAMETERS = 25_000_000

F = TypeVar("F", bound=Callable[..., Any])


def choose_threads(model: nn.Module, num_threads: int | None = None) -> int | None:
    """The thread count the rule picks for ``model``, or None to leave torch's setting alone."""
    if num_threads is not None:
        if isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1:
            raise GrinError(f"num_threads must be a positive integer or None; got {num_threads!r}.")
        return num_threads
    if os.environ.get("OMP_NUM_THREADS", "").strip():
        return None
    if not isinstance(model, nn.Module):
        return None
    parameters = sum(p.numel() for p in model.parameters())
    on_cpu = all(p.device.type == "cpu" for p in model.parameters())
    return 1 if on_cpu and parameters < SMALL_MODEL_PARAMETERS else None


@contextlib.contextmanager
def torch_threads(num_threads: int | None) -> Iterator[None]:
    """Run the block with ``num_threads`` torch intra-op threads (None: unchanged), then restore the previous count."""
    if num_threads is None:
        yield
        return
    previous = torch.get_num_threads()
    torch.set_num_threads(num_threads)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def with_thread_rule(fn: F) -> F:
    """Run ``fn(model, ...)`` under :func:`choose_threads` of its model and its ``num_threads`` (a keyword, or
    ``training_args.num_threads``)."""

    signature = inspect.signature(fn)

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        bound = signature.bind_partial(*args, **kwargs).arguments
        requested = kwargs.get("num_threads")
        if requested is None and bound.get("training_args") is not None:
            requested = getattr(bound["training_args"], "num_threads", None)
        with torch_threads(choose_threads(bound.get("model"), requested)):
            return fn(*args, **kwargs)

    return wrapper  # type: ignore[return-value]
