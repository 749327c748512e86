"""The README's feature examples run as written (those that need no Hub account, GPU or external model)."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
# blocks that name placeholders a reader fills in (their own model, repo, quantized checkpoint)
PLACEHOLDERS = ("forget_data", "push_to_hub", "qbase", "other_base", '"a", "b"')


def runnable_blocks() -> list[str]:
    text = README.read_text()
    features = text[text.index("## How it works") :]
    blocks = re.findall(r"```python\n(.*?)```", features, flags=re.S)
    return [b for b in blocks if not any(p in b for p in PLACEHOLDERS)]


def test_readme_examples_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    blocks = runnable_blocks()
    assert len(blocks) >= 5
    namespace: dict = {}
    exec("import torch\ntorch.manual_seed(0)\nfrom peft import PeftModel", namespace)
    for block in blocks:
        try:
            exec(compile(block, str(README), "exec"), namespace)
        except Exception as exc:  # pragma: no cover - the message is the point
            pytest.fail(f"README block failed: {exc!r}\n{block}")
    assert (tmp_path / "localization.json").exists()
    assert (tmp_path / "delta" / "adapter_model.safetensors").exists()
