"""`grin-peft ledger ...`, the lock that keeps operations from interleaving, and the model card of a ledgered model."""

from __future__ import annotations

import json
import subprocess
import sys
import threading

import pytest
from hub_server import unique_repo_id
from huggingface_hub import snapshot_download
from peft import get_peft_model
from test_ledger import apply_requests, assert_weights, deploy, load, make_delta, merged_with_peft, snapshot

from grin_peft import GrinConfig, GrinError
from grin_peft.cli import main
from grin_peft.ledger import Ledger, files
from grin_peft.ledger.card import HEADING

pytestmark = pytest.mark.usefixtures("one_thread")


def run(capsys, *argv) -> tuple[int, str, str]:
    code = main(["ledger", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def test_the_python_api_is_importable_from_the_package():
    import grin_peft

    assert grin_peft.Ledger is Ledger


def test_cli_apply_show_revert_verify(tmp_path, capsys):
    model = deploy(tmp_path)
    delta1 = make_delta(model, tmp_path / "d1", seed=1)
    code, out, _ = run(capsys, "apply", "--model", model, "--delta", delta1, "--description", "author A")
    assert code == 0 and "request 1 applied" in out and "revert --model" in out
    delta2 = make_delta(model, tmp_path / "d2", seed=2, description="author B (from the delta's config)")
    assert run(capsys, "apply", "--model", model, "--delta", delta2)[0] == 0
    code, out, _ = run(capsys, "show", "--model", model)
    assert code == 0 and "| 1 |" in out and "author A" in out and "| 2 |" in out and "author B (from" in out
    code, out, _ = run(capsys, "show", "--model", model, "--json")
    assert [r["id"] for r in json.loads(out)["requests"]] == [1, 2]
    code, out, _ = run(capsys, "revert", "--model", model, "--request", 1, "--reason", "made in error")
    assert code == 0 and "applied now, in order: 2" in out
    assert_weights(model, merged_with_peft(tmp_path / "original", [delta2]))
    code, out, _ = run(capsys, "verify", "--model", model)
    assert code == 0 and "the model is what its ledger says" in out
    assert "made in error" in run(capsys, "show", "--model", model)[1]


def test_cli_errors_are_one_line_and_verify_exits_1_on_drift(tmp_path, capsys):
    model, _ = apply_requests(tmp_path, 1)
    code, out, err = run(capsys, "revert", "--model", model, "--request", 9)
    assert code == 1 and err.count("\n") == 1 and err.startswith("grin-peft ledger: error: no applied request 9")
    code, _, err = run(capsys, "show", "--model", tmp_path / "original")
    assert code == 1 and err.count("\n") == 1 and "no grin_ledger.json" in err
    (model / "README.md").write_text("# hand-edited card\n")
    code, out, _ = run(capsys, "verify", "--model", model, "--json")
    report = json.loads(out)
    assert code == 1 and not report["ok"] and "model card out of date" in report["problems"][0]


def test_an_apply_waits_for_the_lock_of_another_process(tmp_path):
    model, _ = apply_requests(tmp_path, 1)
    delta = make_delta(model, tmp_path / "d2", seed=2)
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); fcntl.flock(f, fcntl.LOCK_EX); print('held', "
            "flush=True); time.sleep(60)",
            str(model / files.LOCK_NAME),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout.readline().strip() == "held"
        before = snapshot(model)
        with pytest.raises(GrinError, match="another ledger operation holds the lock"):
            Ledger(model, lock_timeout=0.3).apply(delta)
        with pytest.raises(GrinError, match="holds the lock"):
            Ledger(model, lock_timeout=0.3).verify()  # readers wait for writers too
        assert snapshot(model) == before
    finally:
        holder.kill()
        holder.wait()
    Ledger(model, lock_timeout=5).apply(delta)
    assert [r.id for r in Ledger(model).show().requests] == [1, 2]


def test_concurrent_applies_do_not_interleave(tmp_path):
    model = deploy(tmp_path)
    deltas = [make_delta(model, tmp_path / f"d{k}", seed=k) for k in range(4)]  # all made for the original
    errors = []

    def apply(delta):
        try:
            Ledger(model).apply(delta, fingerprint_check="off")
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=apply, args=(d,)) for d in deltas]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    record = Ledger(model).show()
    assert [r.id for r in record.requests] == [1, 2, 3, 4]
    order = [r.delta.path for r in record.requests]
    assert sorted(order) == sorted(str((tmp_path / f"d{k}").resolve()) for k in range(4))
    chain = [record.original_fingerprint] + [r.fingerprint_after for r in record.requests]
    assert all(r.fingerprint_before == chain[i] for i, r in enumerate(record.requests))
    assert_weights(model, merged_with_peft(tmp_path / "original", order))  # every apply built on the one before
    assert Ledger(model).verify().ok


def test_the_model_card_lists_the_applied_requests(tmp_path):
    model = deploy(tmp_path)
    (model / "README.md").write_text("---\nlicense: apache-2.0\n---\n# My model\n\nKept text.\n\n## Usage\n\nHere.\n")
    for k in range(3):
        Ledger(model).apply(make_delta(model, tmp_path / f"d{k}", seed=k), description=f"request about author {k}")
    Ledger(model).revert(2)
    card = (model / "README.md").read_text()
    assert card.startswith("---\nlicense: apache-2.0\n---\n# My model") and "## Usage\n\nHere." in card
    assert card.count(HEADING) == 1 and "hold 2 unlearning request(s)" in card
    section = card[card.index(HEADING) :]
    assert "request about author 0" in section and "request about author 2" in section
    assert "request about author 1" not in section
    record = Ledger(model).show()
    assert all(r.delta_sha256[:16] in section for r in record.requests)
    assert record.model_fingerprint in section


def test_a_hub_delta_is_pinned_to_its_commit_and_replayed_from_it(hub, tmp_path):
    model, _ = apply_requests(tmp_path, 1)
    repo_id = unique_repo_id("grin-ledger")
    config = GrinConfig(target_modules=["q_proj"], density=0.3, score="random", init_weights=False, seed=7)
    get_peft_model(load(model), config).push_to_hub(repo_id)
    request = Ledger(model).apply(repo_id, description="from the Hub")
    assert request.delta.repo_id == repo_id and request.delta.path is None
    assert len(request.delta.revision) == 40 and repo_id in request.delta.describe()
    pushed = get_peft_model(load(tmp_path / "original"), GrinConfig(target_modules=["q_proj"], density=0.05))
    pushed.push_to_hub(repo_id)  # a later commit to the repo does not change what the ledger replays
    Ledger(model).revert(1)
    local = tmp_path / "hub-copy"
    snapshot_download(repo_id, revision=request.delta.revision, local_dir=local)
    assert_weights(model, merged_with_peft(tmp_path / "original", [str(local)]))
    assert Ledger(model).verify().ok
