"""Output for logs: bars as periodic lines, status lines over silences, and only the noise silenced."""

from __future__ import annotations

import io
import logging
import time
import warnings

from grin_peft.cli import _quiet_third_party_noise
from grin_peft.progress import Heartbeat, LineProgress, line_progress_if_not_a_terminal


def test_a_bar_in_a_log_is_a_few_plain_lines_not_carriage_returns():
    log = io.StringIO()
    bar = LineProgress(total=1000, desc="GRIN retain gradients", unit="step", file=log, mininterval=0.05)
    for _ in range(1000):
        bar.update(1)
    time.sleep(0.06)
    bar.update(0)
    bar.set_postfix(loss="0.1")
    bar.close()
    lines = log.getvalue().splitlines()
    assert "\r" not in log.getvalue()
    assert 2 <= len(lines) <= 5 and len(set(lines)) == len(lines)
    assert lines[-1].startswith("GRIN retain gradients: 100%") and "1000/1000" in lines[-1]


def test_bars_become_lines_only_when_stderr_is_not_a_terminal():
    import tqdm.auto

    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    original = tqdm.auto.tqdm
    with line_progress_if_not_a_terminal(io.StringIO()) as lines:
        assert lines and tqdm.auto.tqdm is LineProgress
    with line_progress_if_not_a_terminal(Terminal()) as lines:
        assert not lines and tqdm.auto.tqdm is original
    assert tqdm.auto.tqdm is original


def test_a_long_silence_gets_a_status_line_and_output_resets_it(capsys):
    with Heartbeat("grin-peft unlearn", silence=0.2):
        time.sleep(0.75)
    silent = capsys.readouterr().err.splitlines()
    assert 2 <= len(silent) <= 4 and all(line.startswith("grin-peft unlearn: still working (0m") for line in silent)
    with Heartbeat("grin-peft unlearn", silence=0.5):
        for _ in range(10):
            print("step")
            time.sleep(0.08)
    assert "still working" not in capsys.readouterr().err


def test_only_the_noise_is_silenced(caplog):
    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    with warnings.catch_warnings(record=True) as seen, caplog.at_level(logging.WARNING):
        warnings.simplefilter("always")  # what a user running with -W always sees, minus the CLI's filters below
        with _quiet_third_party_noise():
            logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: no module 'kernels'")
            logger.warning("a real bitsandbytes problem")
            warnings.warn_explicit("x is deprecated", FutureWarning, "modeling_utils.py", 1, module="transformers.x")
            warnings.warn_explicit("your config is odd", UserWarning, "modeling_utils.py", 1, module="transformers.x")
            warnings.warn_explicit("y is deprecated", FutureWarning, "mine.py", 1, module="user_code")
    assert [r.getMessage() for r in caplog.records] == ["a real bitsandbytes problem"]
    assert sorted(str(w.message) for w in seen) == ["y is deprecated", "your config is odd"]
    logger.warning("Failed to load CPU gemm_4bit_forward: outside the CLI it shows")
    assert "outside the CLI" in caplog.records[-1].getMessage()
