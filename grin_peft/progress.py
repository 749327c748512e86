"""Progress output for logs: tqdm bars become periodic plain lines when stderr is not a terminal, and a status line
breaks long silences. Used by `grin-peft`; the library itself never changes global output settings."""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, TextIO

from tqdm import tqdm as _tqdm

LINE_INTERVAL_S = 30.0  # one progress line per bar at most this often in a log
SILENCE_S = 30.0  # a status line after this long without output


class LineProgress(_tqdm):
    """tqdm for logs: one plain line per `mininterval` seconds and one at the end; no carriage returns."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("mininterval", LINE_INTERVAL_S)
        kwargs.update(ascii=True, dynamic_ncols=False, leave=False)
        self._last_line: str | None = None
        super().__init__(*args, **kwargs)

    def display(self, msg: str | None = None, pos: int | None = None) -> None:
        """Write the bar's state as one line (tqdm calls this at most every `mininterval`)."""
        if msg == "":  # tqdm clearing the bar: nothing to clear in a log
            return
        self._write_line(msg or str(self))

    def _write_line(self, line: str) -> None:
        if self.disable or line == self._last_line:
            return
        self._last_line = line
        self.fp.write(line + "\n")
        self.fp.flush()

    def close(self) -> None:
        """Close, then write the final state once (tqdm's close disables the bar, hence the direct write)."""
        line = None if self.disable else str(self)
        super().close()
        if line is not None and line != self._last_line:
            self._last_line = line
            self.fp.write(line + "\n")
            self.fp.flush()


@contextlib.contextmanager
def line_progress_if_not_a_terminal(stream: TextIO | None = None) -> Iterator[bool]:
    """Within the block `tqdm.auto.tqdm` (what grin_peft's bars use) is `LineProgress` when `stream` (stderr) is not
    a terminal; yields whether it is. Modules that draw bars must be imported inside the block."""
    import tqdm.auto

    stream = stream or sys.stderr
    original = tqdm.auto.tqdm
    if not stream.isatty():
        tqdm.auto.tqdm = LineProgress
    try:
        yield tqdm.auto.tqdm is LineProgress
    finally:
        tqdm.auto.tqdm = original


class _Watched:
    """A stream proxy that records when it was last written to."""

    def __init__(self, stream: TextIO, heartbeat: Heartbeat) -> None:
        self._stream, self._heartbeat = stream, heartbeat

    def write(self, text: str) -> int:
        self._heartbeat.last_output = time.monotonic()
        return self._stream.write(text)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


class Heartbeat:
    """Within the block, print `<label>: still working (<elapsed>)` to stderr after every `silence` seconds in which
    nothing was written to stdout or stderr, so a long quiet step is not mistaken for a hang."""

    def __init__(self, label: str, silence: float = SILENCE_S) -> None:
        self.label, self.silence = label, silence
        self.last_output = self.start = time.monotonic()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(min(self.silence, 1.0)):
            now = time.monotonic()
            if now - self.last_output >= self.silence:
                elapsed = int(now - self.start)
                sys.stderr.write(f"{self.label}: still working ({elapsed // 60}m{elapsed % 60:02d}s elapsed)\n")
                sys.stderr.flush()

    def __enter__(self) -> Heartbeat:
        self._streams = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Watched(sys.stdout, self), _Watched(sys.stderr, self)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        sys.stdout, sys.stderr = self._streams
