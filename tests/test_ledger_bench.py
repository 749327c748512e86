"""benchmarks/bench_ledger.py end to end on its smoke settings (needs the real TOFU files; skipped without them)."""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
TOFU = BENCHMARKS.parent.parent / "shared" / "data" / "tofu"
sys.path.insert(0, str(BENCHMARKS))

import bench_ledger  # noqa: E402

pytestmark = [
    pytest.mark.usefixtures("one_thread"),
    pytest.mark.skipif(not (TOFU / "forget10_perturbed.json").exists(), reason="needs the TOFU files"),
]


def test_smoke_run_reports_every_method_and_an_exact_revert(tmp_path):
    argv = ["--smoke", "--requests", "2", "--epochs", "1", "--data", str(TOFU)]
    bench_ledger.main([*argv, "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path)])
    result = json.loads((tmp_path / "ledger_smoke.json").read_text())
    for method in ("grin", "full", "lora"):
        steps = result[method]["steps"]
        assert [len(s["requests"]) for s in steps] == [1, 2]
        assert all(math.isfinite(g["probability"]) for s in steps for g in s["requests"])
        assert result[method]["revert_2"]["seconds"] >= 0
    revert = result["grin"]["revert_2"]
    assert revert["bit_exact"] is True and revert["verify_ok"] is True
    assert len(result["union"]["final"]["requests"]) == 2
    assert "Revert request 2" in (tmp_path / "ledger_smoke.md").read_text()
