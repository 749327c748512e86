"""Authenticity and atomicity of a saved delta (issue 11, items 6, 7, 10, 17), each test the attack it prevents."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import os
import signal
import time
from pathlib import Path

import pytest
import torch
from hub_server import unique_repo_id
from huggingface_hub import ModelCard, hf_hub_download
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import build, state

import grin_peft
from grin_peft import GrinConfig, GrinError
from grin_peft.atomic_folder import TMP_MARK, clean_stale
from grin_peft.delta_file import atomic_save_file
from grin_peft.integrity import MANIFEST_NAME, write_manifest

WEIGHTS, CONFIG = "adapter_model.safetensors", "adapter_config.json"


def make_delta(path, seed=0, **fields):
    config = GrinConfig(density=0.01, score="random", init_weights=False, seed=seed, **fields)
    model = get_peft_model(build("llama"), config)
    model.save_pretrained(path)
    return model


def tamper_values(path):
    """The attacker's edit: new values, a valid checksum, a fresh manifest (none of them is a secret)."""
    tensors = load_file(path / WEIGHTS)
    key = next(k for k in sorted(tensors) if k.endswith("grin_values"))
    tensors[key] = tensors[key] + 1.0
    atomic_save_file(tensors, str(path / WEIGHTS))
    write_manifest(path)


def sha256_file(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


# ---------------------------------------------------------------- item 6: pinning the delta's digest
def test_save_records_the_digest_of_the_manifest_which_lists_both_files(tmp_path):
    model = make_delta(tmp_path)
    digest = model.grin_delta_sha256
    assert digest == sha256_file(tmp_path / MANIFEST_NAME)  # `sha256sum grin.sha256`
    lines = (tmp_path / MANIFEST_NAME).read_text().splitlines()
    assert lines == [f"{sha256_file(tmp_path / CONFIG)}  {CONFIG}", f"{sha256_file(tmp_path / WEIGHTS)}  {WEIGHTS}"]
    assert digest in (tmp_path / "README.md").read_text()


def test_a_pinned_digest_loads_the_pinned_delta(tmp_path):
    digest = make_delta(tmp_path).grin_delta_sha256
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path, expected_sha256=digest.upper())
    assert loaded.peft_config["default"].base_model_fingerprint


@pytest.mark.parametrize("edit", ["values", "config"])
def test_a_tampered_delta_with_valid_checksum_and_manifest_fails_the_pin(tmp_path, edit):
    digest = make_delta(tmp_path).grin_delta_sha256
    if edit == "values":
        tamper_values(tmp_path)
    else:  # a config edit that changes what the delta means
        config = json.loads((tmp_path / CONFIG).read_text())
        config["forget_description"] = "nothing, honest"
        (tmp_path / CONFIG).write_text(json.dumps(config))
        write_manifest(tmp_path)
    PeftModel.from_pretrained(build("llama"), tmp_path)  # without a pin it loads: the checksum is no signature
    base = build("llama")
    before = state(base)
    with pytest.raises(GrinError, match="not the delta you pinned"):
        PeftModel.from_pretrained(base, tmp_path, expected_sha256=digest)
    assert not hasattr(base, "peft_config")
    assert all(torch.equal(v, before[k]) for k, v in state(base).items())


@pytest.mark.parametrize("bad", ["abc", "g" * 64, 12, "sha256:" + "0" * 63])
def test_a_malformed_pin_is_refused_before_loading(tmp_path, bad):
    make_delta(tmp_path)
    with pytest.raises(GrinError, match="expected_sha256=.*not a sha256 digest"):
        PeftModel.from_pretrained(build("llama"), tmp_path, expected_sha256=bad)


def test_load_adapter_takes_the_pin_too(tmp_path):
    digest = make_delta(tmp_path / "a").grin_delta_sha256
    make_delta(tmp_path / "b", seed=1)
    loaded = PeftModel.from_pretrained(build("llama"), tmp_path / "a")
    loaded.load_adapter(tmp_path / "a", "again", expected_sha256=digest)
    before = {k: v.clone() for k, v in loaded.state_dict().items()}
    with pytest.raises(GrinError, match="not the delta you pinned"):
        loaded.load_adapter(tmp_path / "b", "other", expected_sha256=digest)
    assert "other" not in loaded.peft_config
    assert all(torch.equal(v, before[k]) for k, v in loaded.state_dict().items())


def test_a_hub_commit_by_someone_else_fails_the_pin(hub, tmp_path, capsys):
    repo_id = unique_repo_id("grin-pinned")
    model = get_peft_model(build("llama"), GrinConfig(density=0.01, score="random", init_weights=False))
    model.push_to_hub(repo_id)
    digest = model.grin_delta_sha256
    assert f"delta sha256 {digest}" in capsys.readouterr().err  # printed by push
    card = ModelCard.load(repo_id)
    assert card.data.grin["delta_sha256"] == digest
    assert PeftModel.from_pretrained(build("llama"), repo_id, expected_sha256=digest) is not None

    other = get_peft_model(build("llama"), GrinConfig(density=0.01, score="random", init_weights=False, seed=9))
    other.push_to_hub(repo_id)  # a later commit to the same repo: the attacker's, or just another version
    with pytest.raises(GrinError, match="not the delta you pinned"):
        PeftModel.from_pretrained(build("llama"), repo_id, expected_sha256=digest)
    assert sha256_file(hf_hub_download(repo_id, MANIFEST_NAME)) == other.grin_delta_sha256


def test_revert_takes_the_pin_too(tmp_path):
    digest = make_delta(tmp_path).grin_delta_sha256
    merged = PeftModel.from_pretrained(build("llama"), tmp_path).merge_and_unload()
    tamper_values(tmp_path)
    with pytest.raises(GrinError, match="not the delta you pinned"):
        grin_peft.revert(merged, tmp_path, expected_sha256=digest)


# ---------------------------------------------------------------- item 7: a folder changes as one unit
def test_config_and_weights_of_different_saves_are_refused(tmp_path):
    make_delta(tmp_path / "a", seed=0)
    make_delta(tmp_path / "b", seed=1, forget_description="b")
    (tmp_path / "a" / CONFIG).write_bytes((tmp_path / "b" / CONFIG).read_bytes())  # a half-finished copy
    with pytest.raises(GrinError, match="come from different saves"):
        PeftModel.from_pretrained(build("llama"), tmp_path / "a")


def test_a_config_changed_between_the_checked_read_and_pefts_read_is_refused(tmp_path, monkeypatch):
    make_delta(tmp_path)
    original = GrinConfig.from_pretrained.__func__

    def racing_save(cls, *args, **kwargs):  # another process rewrites the config just before PEFT reads it
        config = json.loads((tmp_path / CONFIG).read_text())
        config["target_modules"] = ["q_proj"]
        (tmp_path / CONFIG).write_text(json.dumps(config))
        write_manifest(tmp_path)
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(GrinConfig, "from_pretrained", classmethod(racing_save))
    base = build("llama")
    with pytest.raises(GrinError, match="changed while the delta was being loaded .*target_modules"):
        PeftModel.from_pretrained(base, tmp_path)
    assert not hasattr(base, "peft_config")


def test_a_resave_replaces_the_folder_and_keeps_what_else_it_held(tmp_path):
    make_delta(tmp_path, seed=0)
    (tmp_path / "tokenizer.json").write_text("{}")
    first = sha256_file(tmp_path / WEIGHTS)
    make_delta(tmp_path, seed=1)
    assert sha256_file(tmp_path / WEIGHTS) != first
    assert (tmp_path / "tokenizer.json").read_text() == "{}"
    assert not [p for p in tmp_path.parent.iterdir() if TMP_MARK in p.name]


def test_saving_into_the_working_directory_or_through_a_symlink(tmp_path, monkeypatch):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    make_delta(tmp_path / "link")
    assert (tmp_path / "link").is_symlink() and (tmp_path / "real" / MANIFEST_NAME).exists()
    monkeypatch.chdir(tmp_path / "real")
    make_delta(".", seed=1)  # the folder the process stands in is written in place, never swapped away
    assert Path.cwd() == tmp_path / "real" and (tmp_path / "real" / WEIGHTS).exists()
    assert PeftModel.from_pretrained(build("llama"), ".") is not None
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link", "real"]


def test_a_failed_save_leaves_the_previous_folder_and_no_temporaries(tmp_path, monkeypatch):
    make_delta(tmp_path / "delta", seed=0)
    before = {p.name: p.read_bytes() for p in (tmp_path / "delta").iterdir()}
    model = get_peft_model(build("llama"), GrinConfig(density=0.01, score="random", init_weights=False, seed=1))
    import grin_peft.integrity as integrity

    def fail(folder):
        raise OSError("disk full")

    monkeypatch.setattr(integrity, "write_manifest", fail)
    monkeypatch.setattr(grin_peft.hub, "write_manifest", fail)
    with pytest.raises(OSError, match="disk full"):
        model.save_pretrained(tmp_path / "delta")
    assert {p.name: p.read_bytes() for p in (tmp_path / "delta").iterdir()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


def save_forever(target: Path, ready) -> None:
    """The child: save two different deltas into one folder, alternately, until killed."""
    torch.set_num_threads(1)
    models = [
        get_peft_model(build("llama"), GrinConfig(density=d, score="random", init_weights=False, seed=s))
        for s, d in ((0, 0.01), (1, 0.5))
    ]
    ready.set()
    i = 0
    while True:
        models[i % 2].save_pretrained(target)
        i += 1


def test_killed_during_saves_the_folder_is_always_one_whole_save(tmp_path):
    """SIGKILL a process that saves two different deltas into one folder in a loop, at 20 random moments."""
    target = tmp_path / "delta"
    generator = torch.Generator().manual_seed(0)
    context = multiprocessing.get_context("fork")  # no re-import per child: 20 kills in seconds
    completed = 0
    for _ in range(20):
        ready = context.Event()
        child = context.Process(target=save_forever, args=(target, ready))
        child.start()
        assert ready.wait(60)
        time.sleep(float(torch.rand(1, generator=generator)) * 0.1)
        os.kill(child.pid, signal.SIGKILL)
        child.join()
        if not target.exists():
            continue  # killed before the first save completed: nothing, not half of something
        completed += 1
        assert (target / MANIFEST_NAME).read_text().splitlines() == [
            f"{sha256_file(target / CONFIG)}  {CONFIG}",
            f"{sha256_file(target / WEIGHTS)}  {WEIGHTS}",
        ]
        PeftModel.from_pretrained(build("llama"), target)
    assert completed >= 10
    clean_stale(target)  # what the next save does first (each child above cleaned its killed predecessor's)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["delta"]


# ---------------------------------------------------------------- item 10: the user's umask
@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)])
def test_saved_files_and_folders_follow_the_umask(tmp_path, umask, file_mode, dir_mode):
    previous = os.umask(umask)
    try:
        make_delta(tmp_path / "delta")
    finally:
        os.umask(previous)
    assert (tmp_path / "delta").stat().st_mode & 0o777 == dir_mode
    for name in (CONFIG, WEIGHTS, MANIFEST_NAME, "README.md"):
        assert (tmp_path / "delta" / name).stat().st_mode & 0o777 == file_mode, name


# ---------------------------------------------------------------- item 17: the model card is all signal
@pytest.mark.filterwarnings("ignore:Could not find a config file")
def test_the_card_says_what_how_measured_and_how_to_revert_and_nothing_else(tmp_path):
    model = get_peft_model(
        build("llama"), GrinConfig(density=0.01, score="random", forget_description="the planted test facts")
    )
    model.grin_unlearn_summary = {
        "before": {"forget_prob": 0.91, "retain_prob": 0.88},
        "after": {"forget_prob": 0.12, "retain_prob": 0.86},
        "operating_point": None,
    }
    model.peft_config["default"].base_model_name_or_path = str(tmp_path)  # a local path: never the card's base
    model.save_pretrained(tmp_path / "delta")
    text = (tmp_path / "delta" / "README.md").read_text()
    card = ModelCard.load(tmp_path / "delta" / "README.md")
    assert "More Information Needed" not in text and "github.com/)" not in text
    assert "base_model" not in card.data.to_dict() and str(tmp_path) + "\n" not in text
    assert "the planted test facts" in text
    assert "forget answer probability: 0.9100 -> 0.1200" in text
    assert "grin_peft.revert(merged, delta)" in text and "grin-peft revert" in text
    assert f'expected_sha256="{model.grin_delta_sha256}"' in text
    assert len(text.splitlines()) < 80


def test_the_card_names_the_base_by_its_hub_id(tmp_path):
    model = get_peft_model(build("llama"), GrinConfig(density=0.01, score="random"))
    model.peft_config["default"].base_model_name_or_path = "meta-llama/Llama-3.2-1B"
    model.save_pretrained(tmp_path)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.base_model == "meta-llama/Llama-3.2-1B"
    assert "No before/after measurement" in card.text
