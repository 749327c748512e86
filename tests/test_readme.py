"""The README's feature examples run exactly as written, pasted in order into one fresh interpreter (all but those
that need a Hub account, a GPU or the reader's own data)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# blocks that name what a reader brings: their own data, Hub account, GPU checkpoint, two trained adapters
PLACEHOLDERS = ("forget_data", "push_to_hub", "qbase", '"a", "b"')


def runnable_blocks() -> list[str]:
    text = README.read_text()
    features = text[text.index("## How it works") :]
    blocks = re.findall(r"```python\n(.*?)```", features, flags=re.S)
    return [b for b in blocks if not any(p in b for p in PLACEHOLDERS)]


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = runnable_blocks()
    assert len(blocks) >= 12
    namespace: dict = {}  # nothing added: every name a block uses comes from a block before it
    for block in blocks:
        try:
            exec(compile(block, str(README), "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"README block failed: {exc!r}\n{block}")
    assert (tmp_path / "localization.json").exists()
    assert (tmp_path / "delta" / "adapter_model.safetensors").exists()
