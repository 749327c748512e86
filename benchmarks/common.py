"""Shared plumbing of the unlearning benchmarks (``bench_tofu.py``, ``bench_hazard.py``).

What lives here, and why it is shared:

* an atomic on-disk cache for trained tiny models (both benchmarks memorise a corpus once, then unlearn many times);
* worker-process logging and environment, thread settings, and a context that silences transformers' logs;
* environment recording and JSON/markdown writers.

Memorising a target and running the unlearning methods is :mod:`unlearning_runs`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO))  # the scripts that import this module import grin_peft from this checkout

COMPLETE_MARKER = "complete.json"
WORKER_TAG = "BENCH_TOFU_WORKER"  # set in a worker process's environment: its log lines carry the tag


def log(message: str) -> None:
    """Print one line at once, tagged with the worker's name inside a worker process."""
    tag = os.environ.get(WORKER_TAG)
    print(f"[worker {tag}] {message}" if tag else message, flush=True)


def worker_env(tag: str) -> dict[str, str]:
    """The environment of a worker process: its log tag, and OpenMP threads that sleep instead of spinning."""
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), WORKER_TAG: tag}


# ------------------------------------------------------------------------------------------------ environment


def set_threads(num_threads: int | None) -> int:
    """Set torch's intra-op threads (None: leave them); return the number in use.

    Tiny models train much faster on ONE thread on a busy 2-core machine: two threads spin waiting for each other
    on matrices too small to split (measured 10-50x slower), so the CPU protocol pins 1 and records it.
    """
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    return torch.get_num_threads()


def environment() -> dict[str, Any]:
    """Versions and machine facts that a benchmark number depends on, for the JSON output."""
    import peft
    import scipy
    import transformers

    import grin_peft

    info: dict[str, Any] = {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "scipy": scipy.__version__,
        "grin_peft": grin_peft.__version__,
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }
    try:
        info["load_average_at_start"] = os.getloadavg()
    except OSError:
        pass
    return info


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def file_digest(paths: Sequence[Path]) -> str:
    """SHA-256 of the files' bytes (in order): cache keys change when the data does."""
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).read_bytes())
    return h.hexdigest()


def settings_key(payload: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_root(sub: str) -> Path:
    """``$XDG_CACHE_HOME/grin_peft/<sub>`` (default ``~/.cache/grin_peft/<sub>``)."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grin_peft" / sub


def cached_dir(final: Path, build: Callable[[Path], dict[str, Any]]) -> tuple[Path, dict[str, Any], bool]:
    """Return ``(directory, info, built_now)`` for a cache entry, building it first when missing.

    ``build(staging)`` writes everything into a temporary sibling and returns the info stored in the completion
    marker; the directory is moved into place with one ``os.replace``, so an interrupted run never leaves an entry
    that looks complete (an entry without its marker is rebuilt), and two processes building the same entry keep
    whichever finished first.
    """
    marker = final / COMPLETE_MARKER
    if marker.is_file():
        return final, json.loads(marker.read_text(encoding="utf-8")), False
    if final.exists():
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        info = build(staging)
        (staging / COMPLETE_MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
        try:
            os.replace(staging, final)
        except OSError:
            if not marker.is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final, json.loads(marker.read_text(encoding="utf-8")), True


@contextmanager
def quiet_transformers():
    """Silence transformers' progress bars and info logs inside a benchmark loop."""
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    level = hf_logging.get_verbosity()
    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)
        if bars:
            hf_logging.enable_progress_bar()


# ------------------------------------------------------------------------------------------------ output


def fmt_num(value: Any, kind: str = "g") -> str:
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, int):
        return f"{value:,}"
    if not math.isfinite(value):
        return str(value)
    if kind == "e":
        return f"{value:.2e}"
    if kind == "s":
        return f"{value:.0f}"
    return f"{value:.3f}"


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """``columns`` = (key, header, number format: g/e/s)."""
    lines = ["| " + " | ".join(h for _, h, _ in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt_num(row.get(k), f) for k, _, f in columns) + " |")
    return "\n".join(lines)


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_average() -> list[float] | None:
    """1/5/15-minute load averages: how busy the machine was (timings on a shared 2-core box vary several-fold)."""
    try:
        return list(os.getloadavg())
    except OSError:
        return None


def json_safe(value: Any) -> Any:
    """Replace non-finite floats with None and numpy scalars with Python numbers (strict JSON)."""
    if isinstance(value, Mapping):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [json_safe(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value
