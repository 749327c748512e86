"""The base fingerprint: the full mode catches a single edited entry anywhere; old (sampled) deltas still load."""

from __future__ import annotations

import json

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import build

import grin_peft
from grin_peft import GrinConfig, GrinError
from grin_peft import fingerprint as fp


def edit_one_entry(model, name: str, position: int) -> None:
    with torch.no_grad():
        dict(model.named_parameters())[name].view(-1)[position] += 1e-3


def wide(seed: int = 0) -> torch.nn.Module:
    """Weights of 65,536 entries: more than the sampled mode's 4,096 samples per tensor."""
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256))


def test_the_full_fingerprint_catches_every_single_entry_edit_the_sampled_one_misses():
    base = wide()
    full, sampled = fp.fingerprint(base, mode="full"), fp.fingerprint(base, mode="sampled")
    generator = torch.Generator().manual_seed(0)
    params = dict(base.named_parameters())
    names = sorted(params)
    missed_by_sampled = 0
    for _ in range(40):  # the attack: one entry of one weight changed, anywhere in the model
        model = wide()
        name = names[int(torch.randint(len(names), (1,), generator=generator))]
        position = int(torch.randint(params[name].numel(), (1,), generator=generator))
        edit_one_entry(model, name, position)
        assert fp.fingerprint(model, mode="full") != full, (name, position)
        missed_by_sampled += fp.fingerprint(model, mode="sampled") == sampled
    # the sampled mode misses most edits (half the picks are 256-entry biases, fully sampled): why full is default
    assert missed_by_sampled >= 15


def test_the_mode_is_recorded_and_full_is_the_default_up_to_the_size_limit(monkeypatch):
    base = build("llama")
    assert fp.fingerprint(base).startswith("full:")
    monkeypatch.setattr(fp, "FULL_MAX_BYTES", 1000)
    assert fp.fingerprint(base).startswith("sampled:")
    assert fp.mode_of("0" * 64) == "sampled" and fp.mode_of("full:" + "0" * 64) == "full"
    with pytest.raises(ValueError, match="mode"):
        fp.fingerprint(base, mode="fast")


def test_a_base_edited_outside_the_delta_is_refused_at_load(tmp_path):
    peft_model = get_peft_model(build("llama"), GrinConfig(density=0.01, score="random", init_weights=False))
    peft_model.save_pretrained(tmp_path)
    tampered = build("llama")
    edit_one_entry(tampered, "model.embed_tokens.weight", 1234)  # not adapted, between the sampled positions
    with pytest.raises(GrinError, match="fingerprint mismatch"):
        PeftModel.from_pretrained(tampered, tmp_path)
    assert PeftModel.from_pretrained(build("llama"), tmp_path) is not None


def test_a_delta_with_an_old_sampled_fingerprint_loads_and_still_checks_the_base(tmp_path):
    peft_model = get_peft_model(build("llama"), GrinConfig(density=0.01, score="random", init_weights=False))
    peft_model.save_pretrained(tmp_path)
    config_file = tmp_path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config["base_model_fingerprint"] = fp.fingerprint(build("llama"), mode="sampled").partition(":")[2]  # bare
    config_file.write_text(json.dumps(config))
    (tmp_path / "grin.sha256").unlink(missing_ok=True)  # this delta predates the manifest too
    assert PeftModel.from_pretrained(build("llama"), tmp_path) is not None
    with pytest.raises(GrinError, match="fingerprint mismatch"):
        PeftModel.from_pretrained(build("llama", seed=3), tmp_path)


def test_revert_recomputes_the_full_fingerprint_of_the_restored_base(tmp_path):
    peft_model = get_peft_model(build("llama"), GrinConfig(density=0.01, score="random", init_weights=False))
    peft_model.save_pretrained(tmp_path)
    merged = PeftModel.from_pretrained(build("llama"), tmp_path).merge_and_unload()
    edit_one_entry(merged, "lm_head.weight", 7)  # the merged model was changed elsewhere after the merge
    with pytest.raises(GrinError, match="fingerprint"):
        grin_peft.revert(merged, tmp_path)
