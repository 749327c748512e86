"""The test Hub server must satisfy huggingface_hub's real client, so later Hub round-trip tests mean something.

Runs standalone (``pytest tests/test_hub_server.py``) or under the suite's conftest: ``start_session_hub`` is
idempotent, and if huggingface_hub was already imported unconfigured the module is skipped rather than going online.
Hub libraries are imported inside the tests: at module import time the server may not be configured yet.
"""

from __future__ import annotations

import os
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import hub_server  # noqa: E402  (stdlib-only helper living next to this file)

try:
    HUB: hub_server.HubServer | None = hub_server.start_session_hub()
    _SKIP_REASON = ""
except RuntimeError as err:  # huggingface_hub imported before anyone configured the test Hub
    HUB, _SKIP_REASON = None, str(err)

pytestmark = pytest.mark.skipif(HUB is None, reason=_SKIP_REASON)


@pytest.fixture
def hub() -> hub_server.HubServer:
    assert HUB is not None
    return HUB


@pytest.fixture
def api():
    from huggingface_hub import HfApi

    return HfApi()


def _payload(size: int, seed: int = 0) -> bytes:
    """Deterministic bytes covering all 256 values, so any re-encoding (text, base64 slip) would show."""
    return bytes((i * 131 + seed * 7 + (i >> 8)) % 256 for i in range(size))


def _new_requests(hub: hub_server.HubServer, start: int) -> list[tuple[str, str, int]]:
    return list(hub.state.request_log)[start:]


def test_environment_points_at_server(hub):
    from huggingface_hub import constants

    assert constants.ENDPOINT == hub.url
    assert constants.HF_HUB_DISABLE_XET
    assert not constants.is_offline_mode()
    assert Path(constants.HF_HUB_CACHE).is_relative_to(os.environ["HF_HOME"])


def test_whoami_and_create_repo_namespace(hub, api):
    assert api.whoami()["name"] == hub.user
    url = api.create_repo(hub_server.unique_repo_id().split("/")[1])  # no namespace: the server adds the user's
    assert url.repo_id.startswith(f"{hub.user}/")
    assert url.repo_type == "model"
    assert api.list_repo_files(url.repo_id) == [".gitattributes"]  # the Hub's initial commit


def test_upload_file_and_download_exact_bytes(hub, api):
    from huggingface_hub import hf_hub_download

    repo_id = hub_server.unique_repo_id("upload-file")
    api.create_repo(repo_id)
    data = _payload(4096)
    info = api.upload_file(path_or_fileobj=data, path_in_repo="sub/dir/blob.bin", repo_id=repo_id)
    assert len(info.oid) == 40
    assert info.repo_url.repo_id == repo_id

    path = hf_hub_download(repo_id, "sub/dir/blob.bin")
    assert Path(path).read_bytes() == data
    assert f"snapshots/{info.oid}/" in Path(path).as_posix()
    assert sorted(api.list_repo_files(repo_id)) == [".gitattributes", "sub/dir/blob.bin"]


def test_upload_folder_binary_roundtrip_without_lfs(hub, api, tmp_path):
    from huggingface_hub import hf_hub_download, snapshot_download

    repo_id = hub_server.unique_repo_id("upload-folder")
    api.create_repo(repo_id, private=True)
    folder = tmp_path / "folder"
    (folder / "nested").mkdir(parents=True)
    weights = _payload(300_000, seed=1)  # safetensors-sized binary: would be LFS on the real Hub
    (folder / "adapter_model.safetensors").write_bytes(weights)
    (folder / "adapter_config.json").write_text('{"peft_type": "GRIN"}')
    (folder / "nested" / "notes.txt").write_text("héllo\n")

    start = len(hub.state.request_log)
    api.upload_folder(folder_path=folder, repo_id=repo_id, commit_message="add adapter")
    assert not any("lfs" in path for _, path, _ in _new_requests(hub, start))

    assert sorted(api.list_repo_files(repo_id)) == [
        ".gitattributes",
        "adapter_config.json",
        "adapter_model.safetensors",
        "nested/notes.txt",
    ]
    assert Path(hf_hub_download(repo_id, "adapter_model.safetensors")).read_bytes() == weights
    snapshot = Path(snapshot_download(repo_id, local_dir=tmp_path / "snap"))
    assert (snapshot / "adapter_model.safetensors").read_bytes() == weights
    assert (snapshot / "nested" / "notes.txt").read_text() == "héllo\n"
    tree = {f.path: f for f in api.list_repo_tree(repo_id)}
    assert set(tree) == {".gitattributes", "adapter_config.json", "adapter_model.safetensors", "nested"}
    assert tree["adapter_model.safetensors"].size == len(weights)
    assert hub.state.unhandled == []


def test_missing_file_repo_and_revision_map_to_client_errors(hub, api):
    from huggingface_hub import file_exists, hf_hub_download, repo_exists
    from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError

    repo_id = hub_server.unique_repo_id("missing")
    api.create_repo(repo_id)
    assert repo_exists(repo_id)
    assert not repo_exists(hub_server.unique_repo_id("never-created"))
    assert file_exists(repo_id, ".gitattributes")
    assert not file_exists(repo_id, "nope.json")
    assert not api.revision_exists(repo_id, "no-such-branch")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "nope.json")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(hub_server.unique_repo_id("never-created"), "config.json")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")


def test_second_commit_overwrites_and_old_sha_keeps_old_bytes(hub, api):
    from huggingface_hub import file_exists, hf_hub_download

    repo_id = hub_server.unique_repo_id("history")
    api.create_repo(repo_id)
    old, new = _payload(1000, seed=2), _payload(1500, seed=3)
    first = api.upload_file(path_or_fileobj=old, path_in_repo="w.bin", repo_id=repo_id).oid
    api.upload_file(path_or_fileobj=b"keep", path_in_repo="other.txt", repo_id=repo_id)
    second = api.upload_file(path_or_fileobj=new, path_in_repo="w.bin", repo_id=repo_id).oid
    assert first != second

    assert Path(hf_hub_download(repo_id, "w.bin")).read_bytes() == new
    assert Path(hf_hub_download(repo_id, "w.bin", revision=first)).read_bytes() == old
    assert Path(hf_hub_download(repo_id, "w.bin", revision=first[:12])).read_bytes() == old
    assert api.model_info(repo_id).sha == second
    commits = api.list_repo_commits(repo_id)  # newest first, like git log
    assert [c.commit_id for c in commits][0] == second
    assert [c.commit_id for c in commits][2] == first
    assert commits[-1].title == "initial commit"

    # Re-uploading identical bytes is a client-side no-op (preupload reports the remote blob oid).
    assert api.upload_file(path_or_fileobj=new, path_in_repo="w.bin", repo_id=repo_id).oid == second

    api.delete_file("w.bin", repo_id)
    assert not file_exists(repo_id, "w.bin")
    assert file_exists(repo_id, "w.bin", revision=second)
    assert "other.txt" in api.list_repo_files(repo_id)


def test_dataset_repo_is_separate_from_model_repo(hub, api):
    from huggingface_hub import hf_hub_download

    repo_id = hub_server.unique_repo_id("data")
    url = api.create_repo(repo_id, repo_type="dataset")
    assert url.repo_type == "dataset"
    rows = b'{"text": "forget me"}\n' * 50
    api.upload_file(path_or_fileobj=rows, path_in_repo="forget.jsonl", repo_id=repo_id, repo_type="dataset")
    assert Path(hf_hub_download(repo_id, "forget.jsonl", repo_type="dataset")).read_bytes() == rows
    assert "forget.jsonl" in api.list_repo_files(repo_id, repo_type="dataset")
    assert api.dataset_info(repo_id).id == repo_id
    assert not api.repo_exists(repo_id)  # same name, model type: does not exist


def test_model_card_push_to_hub_validates_yaml(hub, api):
    from huggingface_hub import ModelCard, ModelCardData

    repo_id = hub_server.unique_repo_id("card")
    api.create_repo(repo_id)
    card = ModelCard.from_template(ModelCardData(license="apache-2.0", library_name="peft", tags=["unlearning"]))
    start = len(hub.state.request_log)
    card.push_to_hub(repo_id)
    assert any(path == "/api/validate-yaml" for _, path, _ in _new_requests(hub, start))
    loaded = ModelCard.load(repo_id)
    assert loaded.data.library_name == "peft"
    assert "unlearning" in loaded.data.tags


def test_raw_http_headers_range_and_error_codes(hub, api):
    repo_id = hub_server.unique_repo_id("raw")
    api.create_repo(repo_id)
    data = _payload(10_000, seed=4)
    sha = api.upload_file(path_or_fileobj=data, path_in_repo="a b/c.bin", repo_id=repo_id).oid
    url = f"{hub.url}/{repo_id}/resolve/main/a%20b/c.bin"

    with urllib.request.urlopen(urllib.request.Request(url, method="HEAD")) as resp:
        assert resp.headers["X-Repo-Commit"] == sha
        assert resp.headers["ETag"] == f'"{hub_server.git_blob_oid(data)}"'
        assert int(resp.headers["Content-Length"]) == len(data)
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Range": "bytes=100-"})) as resp:
        assert resp.status == 206
        assert resp.read() == data[100:]
        assert resp.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"

    for path, code in [
        (f"/{repo_id}/resolve/main/missing.bin", "EntryNotFound"),
        (f"/{repo_id}/resolve/not-a-branch/c.bin", "RevisionNotFound"),
        (f"/{hub_server.unique_repo_id('nope')}/resolve/main/c.bin", "RepoNotFound"),
    ]:
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(hub.url + path)
        info.value.close()  # an HTTPError holds the open response
        assert info.value.code == 404
        assert info.value.headers["X-Error-Code"] == code


def test_private_repo_hidden_from_anonymous_calls(hub, api):
    from huggingface_hub.errors import RepositoryNotFoundError

    repo_id = hub_server.unique_repo_id("private")
    api.create_repo(repo_id, private=True)
    assert api.model_info(repo_id).private
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id, token=False)


def test_repo_lifecycle_branches_tags_and_prs(hub, api):
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import HfHubHTTPError

    repo_id = hub_server.unique_repo_id("lifecycle")
    api.create_repo(repo_id)
    api.create_repo(repo_id, exist_ok=True)
    with pytest.raises(HfHubHTTPError) as info:
        api.create_repo(repo_id)
    assert info.value.response.status_code == 409

    api.create_branch(repo_id, branch="dev")
    api.upload_file(path_or_fileobj=b"dev", path_in_repo="x.txt", repo_id=repo_id, revision="dev")
    api.create_tag(repo_id, tag="v1", revision="dev")
    refs = api.list_repo_refs(repo_id)
    assert {b.name for b in refs.branches} == {"main", "dev"}
    assert [t.name for t in refs.tags] == ["v1"]
    assert Path(hf_hub_download(repo_id, "x.txt", revision="v1")).read_bytes() == b"dev"
    assert "x.txt" not in api.list_repo_files(repo_id)

    pr = api.upload_file(path_or_fileobj=b"pr", path_in_repo="y.txt", repo_id=repo_id, create_pr=True)
    assert pr.pr_revision == "refs/pr/1"
    assert Path(hf_hub_download(repo_id, "y.txt", revision=pr.pr_revision)).read_bytes() == b"pr"
    assert "y.txt" not in api.list_repo_files(repo_id)

    api.delete_repo(repo_id)
    assert not api.repo_exists(repo_id)
    api.delete_repo(repo_id, missing_ok=True)


def _tiny_llama():
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=32,
    )
    return AutoModelForCausalLM.from_config(config)


def test_transformers_push_to_hub_and_from_pretrained(hub):
    import torch
    from transformers import AutoModelForCausalLM

    repo_id = hub_server.unique_repo_id("tiny-llama")
    model = _tiny_llama()
    model.push_to_hub(repo_id)
    loaded = AutoModelForCausalLM.from_pretrained(repo_id)
    expected, actual = model.state_dict(), loaded.state_dict()
    assert expected.keys() == actual.keys()
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
    assert hub.state.unhandled == []


def test_peft_adapter_push_to_hub_and_from_pretrained(hub):
    import torch
    from peft import LoraConfig, PeftModel, get_peft_model

    repo_id = hub_server.unique_repo_id("tiny-lora")
    peft_model = get_peft_model(
        _tiny_llama(), LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    )
    peft_model.push_to_hub(repo_id)
    loaded = PeftModel.from_pretrained(_tiny_llama(), repo_id)
    expected = {k: v for k, v in peft_model.state_dict().items() if "lora_" in k}
    actual = {k: v for k, v in loaded.state_dict().items() if "lora_" in k}
    assert expected.keys() == actual.keys() and expected
    for name, tensor in expected.items():
        torch.testing.assert_close(actual[name], tensor, rtol=0, atol=0, msg=name)
