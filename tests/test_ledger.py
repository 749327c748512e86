"""`grin_peft.ledger.Ledger`: apply and revert any request exactly, verify drift, refuse bad input without changes."""

from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import load_file, save_file
from tiny_models import build
from transformers import AutoModelForCausalLM

from grin_peft import GrinConfig, GrinError
from grin_peft.delta_file import WEIGHTS_NAME, group_modules, read_tensors
from grin_peft.ledger import Ledger, files
from grin_peft.ledger.record import LEDGER_NAME

pytestmark = pytest.mark.usefixtures("one_thread")
DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def load(folder) -> torch.nn.Module:
    return AutoModelForCausalLM.from_pretrained(folder, dtype="auto")


def make_delta(model_folder, out, seed, density=0.3, description=None) -> str:
    """A GRIN delta made for the model folder as it is now: random entries (dense enough that deltas of different
    seeds share entries) and random values."""
    config = GrinConfig(
        target_modules=["q_proj", "down_proj"],
        density=density,
        score="random",
        init_weights=False,
        seed=seed,
        forget_description=description,
    )
    get_peft_model(load(model_folder), config).save_pretrained(out)
    return str(out)


def deploy(tmp_path, dtype=torch.float32) -> Path:
    build("llama", dtype).save_pretrained(tmp_path / "original")
    shutil.copytree(tmp_path / "original", tmp_path / "model")
    return tmp_path / "model"


def apply_requests(tmp_path, count, dtype=torch.float32) -> tuple[Path, list[str]]:
    model = deploy(tmp_path, dtype)
    deltas = []
    for k in range(count):
        deltas.append(make_delta(model, tmp_path / f"delta{k + 1}", seed=k))
        Ledger(model).apply(deltas[-1], description=f"request {k + 1}")
    return model, deltas


def merged_with_peft(original, deltas) -> dict[str, torch.Tensor]:
    """The reference: the deltas merged in order into the original by PEFT's merge_and_unload."""
    model = load(original)
    for delta in deltas:
        model = PeftModel.from_pretrained(model, delta, grin_fingerprint_check="off").merge_and_unload()
    return model.state_dict()


def assert_weights(folder, expected) -> None:
    got = load(folder).state_dict()
    for key, value in expected.items():
        assert torch.equal(got[key], value), key


def snapshot(folder) -> dict[str, bytes]:
    """Every file of a folder, to show an operation changed nothing (the empty lock file, created by the first
    operation on a folder so that no two can interleave, is neither model nor ledger)."""
    folder = Path(folder)
    paths = [p for p in sorted(folder.rglob("*")) if p.is_file() and p.name != files.LOCK_NAME]
    return {str(p.relative_to(folder)): p.read_bytes() for p in paths}


def entries(delta) -> dict[str, set[int]]:
    modules, _ = group_modules(read_tensors(str(Path(delta) / WEIGHTS_NAME)))
    out = {}
    for name, m in modules.items():
        idx = m.indices if m.indices is not None else None
        if idx is None:
            bits = ((m.mask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
            idx = bits.nonzero().squeeze(1)
        out[name] = set(idx.tolist())
    return out


@pytest.mark.parametrize("dtype", DTYPES)
def test_revert_any_request_equals_applying_the_others_in_order_bit_for_bit(dtype, tmp_path):
    model, deltas = apply_requests(tmp_path, 4, dtype)
    first, second = entries(deltas[0]), entries(deltas[1])
    assert any(first[name] & second[name] for name in first), "the test needs overlapping deltas"
    assert_weights(model, merged_with_peft(tmp_path / "original", deltas))
    for n in range(1, 5):
        copy = tmp_path / f"revert{n}"
        shutil.copytree(model, copy)
        record = Ledger(copy).revert(n, reason="made in error")
        assert [r.id for r in record.requests] == [k for k in range(1, 5) if k != n]
        assert_weights(copy, merged_with_peft(tmp_path / "original", [d for k, d in enumerate(deltas, 1) if k != n]))
        assert Ledger(copy).verify().ok
    Ledger(model).revert(2)
    Ledger(model).revert(3)
    assert_weights(model, merged_with_peft(tmp_path / "original", [deltas[0], deltas[3]]))
    Ledger(model).revert(1)
    Ledger(model).revert(4)
    assert_weights(model, load(tmp_path / "original").state_dict())
    assert Ledger(model).show().model_fingerprint == Ledger(model).show().original_fingerprint


def test_apply_then_revert_restores_the_folder_weights_and_records_everything(tmp_path):
    model, deltas = apply_requests(tmp_path, 2)
    record = Ledger(model).show()
    assert [r.description for r in record.requests] == ["request 1", "request 2"]
    first, second = record.requests
    assert first.fingerprint_before == record.original_fingerprint
    assert (
        second.fingerprint_before == first.fingerprint_after and record.model_fingerprint == second.fingerprint_after
    )
    assert first.delta.path == str(Path(deltas[0]).resolve()) and len(first.delta_sha256) == 64
    assert [e["op"] for e in record.history] == ["apply", "apply"]
    raw = json.loads((model / LEDGER_NAME).read_text())  # human-readable JSON
    assert raw["requests"][1]["description"] == "request 2" and raw["next_id"] == 3
    Ledger(model).revert(1)
    Ledger(model).revert(2)
    assert_weights(model, load(tmp_path / "original").state_dict())
    after = Ledger(model).show()
    assert after.requests == [] and after.next_id == 3 and [e["op"] for e in after.history][-2:] == ["revert"] * 2


def test_the_weight_file_keeps_every_other_tensor_and_its_metadata(tmp_path):
    model, _ = apply_requests(tmp_path, 1)
    before, after = load_file(tmp_path / "original" / "model.safetensors"), load_file(model / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.endswith(("q_proj.weight", "down_proj.weight")) for k in changed)
    assert set(before) == set(after)


def test_verify_reports_an_edit_outside_the_ledger_and_apply_revert_refuse_it(tmp_path):
    model, deltas = apply_requests(tmp_path, 2)
    assert Ledger(model).verify().ok
    weights = load_file(model / "model.safetensors")
    key = "model.layers.0.self_attn.q_proj.weight"
    ledger_entry = sorted(entries(deltas[0])["model.layers.0.self_attn.q_proj"])[0]
    weights[key].view(-1)[ledger_entry] += 1.0
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    report = Ledger(model).verify()
    assert not report.ok
    text = str(report)
    assert "changed outside the ledger" in text and key in text and "requests touching it: [1" in text
    before = snapshot(model)
    with pytest.raises(GrinError, match="changed outside the ledger"):
        Ledger(model).revert(1)
    with pytest.raises(GrinError, match="changed outside the ledger"):
        Ledger(model).apply(make_delta(model, tmp_path / "delta3", seed=3))
    assert snapshot(model) == before


def test_a_missing_or_changed_delta_is_reported_and_blocks_revert(tmp_path):
    model, deltas = apply_requests(tmp_path, 3)
    shutil.rmtree(deltas[2])
    report = Ledger(model).verify()
    assert not report.ok and any(p.startswith("request 3:") for p in report.problems)
    before = snapshot(model)
    with pytest.raises(GrinError, match="delta3"):
        Ledger(model).revert(1)  # the replay needs request 3's delta
    assert snapshot(model) == before
    Ledger(model).revert(3)  # reverting the missing one itself needs only the others
    assert_weights(model, merged_with_peft(tmp_path / "original", deltas[:2]))
    tensors = load_file(Path(deltas[0]) / WEIGHTS_NAME)
    save_file(tensors, Path(deltas[0]) / WEIGHTS_NAME, metadata={"note": "re-saved"})
    with pytest.raises(GrinError, match="changed since it was applied"):
        Ledger(model).revert(2)


@pytest.mark.parametrize(
    "corrupt",
    [
        lambda raw: raw["requests"].pop(0),  # an entry removed by hand
        lambda raw: raw["requests"][0].update(description="edited"),
        lambda raw: raw.update(next_id=1),
    ],
    ids=["entry-removed", "entry-edited", "field-edited"],
)
def test_a_corrupted_ledger_is_refused_in_one_line_and_nothing_changes(corrupt, tmp_path):
    model, _ = apply_requests(tmp_path, 2)
    raw = json.loads((model / LEDGER_NAME).read_text())
    corrupt(raw)
    (model / LEDGER_NAME).write_text(json.dumps(raw, indent=2))
    before = snapshot(model)
    for action in (
        lambda: Ledger(model).show(),
        lambda: Ledger(model).verify(),
        lambda: Ledger(model).revert(2),
        lambda: Ledger(model).apply(str(tmp_path / "delta1")),
    ):
        with pytest.raises(GrinError, match="digest does not match") as info:
            action()
        assert "\n" not in str(info.value)
    assert snapshot(model) == before


def test_a_truncated_ledger_and_an_unknown_request_are_refused(tmp_path):
    model, _ = apply_requests(tmp_path, 1)
    with pytest.raises(GrinError, match="no applied request 7"):
        Ledger(model).revert(7)
    (model / LEDGER_NAME).write_text((model / LEDGER_NAME).read_text()[:100])
    with pytest.raises(GrinError, match="not a readable ledger"):
        Ledger(model).show()
    with pytest.raises(GrinError, match="no grin_ledger.json"):
        Ledger(tmp_path / "original").show()


def test_apply_refuses_a_delta_made_for_another_state_unless_told(tmp_path):
    model, deltas = apply_requests(tmp_path, 1)
    stale = make_delta(tmp_path / "original", tmp_path / "stale", seed=5)  # made before request 1
    before = snapshot(model)
    with pytest.raises(GrinError, match="another state of the model"):
        Ledger(model).apply(stale)
    assert snapshot(model) == before
    with pytest.warns(UserWarning, match="another state of the model"):
        Ledger(model).apply(stale, fingerprint_check="warn")
    assert_weights(model, merged_with_peft(tmp_path / "original", [deltas[0], stale]))


def test_apply_refuses_what_is_not_a_sparse_grin_delta_and_changes_nothing(tmp_path):
    model = deploy(tmp_path)
    get_peft_model(load(model), LoraConfig(target_modules=["q_proj"])).save_pretrained(tmp_path / "lora")
    nan = make_delta(model, tmp_path / "nan", seed=1)
    tensors = load_file(Path(nan) / WEIGHTS_NAME)
    key = next(k for k in tensors if k.endswith("grin_values"))
    tensors[key][0] = float("nan")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # a hand-made file has no checksum
        save_file(tensors, Path(nan) / WEIGHTS_NAME)
    before = snapshot(model)
    for delta, message in ((tmp_path / "lora", "not a GRIN delta"), (nan, "NaN"), (tmp_path / "none", "no such file")):
        with pytest.raises(GrinError, match=message), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            Ledger(model).apply(str(delta))
    assert snapshot(model) == before


def test_a_failure_while_writing_leaves_model_and_ledger_as_they_were(tmp_path, monkeypatch):
    model, _ = apply_requests(tmp_path, 1)
    delta = make_delta(model, tmp_path / "delta2", seed=2)
    before = snapshot(model)

    def disk_full(*args, **kwargs):
        raise OSError("No space left on device")

    monkeypatch.setattr(files, "save_originals", disk_full)
    with pytest.raises(OSError, match="No space"):
        Ledger(model).apply(delta)
    assert snapshot(model) == before  # temporary weight files removed too


def test_an_interrupted_operation_is_completed_by_the_next_one(tmp_path, monkeypatch):
    model, deltas = apply_requests(tmp_path, 1)
    delta = make_delta(model, tmp_path / "delta2", seed=2)

    def crash(self, led):
        raise KeyboardInterrupt  # killed after the commit point, before the renames

    monkeypatch.setattr(Ledger, "_finish", crash)
    with pytest.raises(KeyboardInterrupt):
        Ledger(model).apply(delta)
    monkeypatch.undo()
    assert Ledger(model).show().pending is not None
    assert "interrupted" in str(Ledger(model).verify())
    Ledger(model).revert(1)  # completes the apply of request 2 first, then reverts request 1
    assert [r.id for r in Ledger(model).show().requests] == [2]
    assert_weights(model, merged_with_peft(tmp_path / "original", [delta]))
    assert Ledger(model).verify().ok
    assert not list(model.glob("*.grin-tmp"))


def test_a_delta_with_empty_modules_is_applied_verified_and_reverted(tmp_path):
    model = deploy(tmp_path)
    config = GrinConfig(target_modules=["q_proj", "down_proj"], num_entries=1, score="random", init_weights=False)
    get_peft_model(load(model), config).save_pretrained(tmp_path / "one")
    assert sum(len(v) for v in entries(tmp_path / "one").values()) == 1
    Ledger(model).apply(str(tmp_path / "one"))
    assert Ledger(model).verify().ok
    Ledger(model).revert(1)
    assert_weights(model, load(tmp_path / "original").state_dict())
