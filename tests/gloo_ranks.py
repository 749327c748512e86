"""The distributed tests' launcher: start each rank of a gloo (CPU) process group as a subprocess and wait for all.

Each rank writes its log to a file, never to a pipe: a rank blocked on a full pipe would stall the others inside a
collective, and the test would hang instead of failing. A rank still running at the deadline gets SIGABRT, which
Python's fault handler turns into a traceback of every thread in its log, so a hang fails with where it hung.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def run_ranks(script: str, workdir: Path, world: int = 2, timeout: float = 240.0, threads: int | None = None) -> None:
    """Run ``python tests/SCRIPT WORKDIR RANK WORLD`` for every rank; fail with all logs if any rank fails or hangs."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(HERE.parent), str(HERE), os.environ.get("PYTHONPATH", "")]),
        "GLOO_SOCKET_IFNAME": "lo",
        "PYTHONFAULTHANDLER": "1",
    }
    if threads is not None:
        env["OMP_NUM_THREADS"] = str(threads)
    logs = [Path(workdir) / f"rank{rank}.log" for rank in range(world)]
    workers = []
    try:
        for rank, log in enumerate(logs):
            with open(log, "wb") as sink:
                command = [sys.executable, str(HERE / script), str(workdir), str(rank), str(world)]
                workers.append(subprocess.Popen(command, env=env, stdout=sink, stderr=subprocess.STDOUT))
        deadline = time.monotonic() + timeout
        while any(w.poll() is None for w in workers) and time.monotonic() < deadline:
            time.sleep(0.2)
        hung = [rank for rank, w in enumerate(workers) if w.poll() is None]
        for rank in hung:
            workers[rank].send_signal(signal.SIGABRT)
        for w in workers:
            try:
                w.wait(timeout=30)
            except subprocess.TimeoutExpired:
                w.kill()
                w.wait()
    finally:
        for w in workers:
            if w.poll() is None:
                w.kill()
    failed = [rank for rank, w in enumerate(workers) if w.returncode != 0]
    if hung or failed:
        text = "\n".join(f"--- rank {r} (exit {workers[r].returncode}) ---\n{_tail(logs[r])}" for r in range(world))
        what = f"ranks {hung} still running after {timeout:.0f} s" if hung else f"ranks {failed} failed"
        pytest.fail(f"{script}: {what}\n{text}")


def exit_rank() -> None:
    """End a rank whose results are on disk without tearing anything down.

    Past the barrier every rank has finished its collectives (DDP's all-reduce completes inside ``backward``) and this
    rank's last barrier message is on the wire, so it exits at once: destroying the process group, or DDP's reducer
    when ``main`` returns, once left rank 0 hanging in C code in CI (twice, each time after its results were saved).
    """
    import torch.distributed

    torch.distributed.barrier()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def _tail(path: Path, limit: int = 3000) -> str:
    return path.read_bytes().decode(errors="replace")[-limit:]
