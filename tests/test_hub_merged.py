"""Sharing an unlearned model without its delta: ``push_to_hub(repo_id, merged=True)`` pushes the merged weights
(server on 127.0.0.1), and the delta's own model card says why one would."""

from __future__ import annotations

import pytest
import torch
from cli_workspace import write_workspace
from hub_server import unique_repo_id
from huggingface_hub import ModelCard, list_repo_files
from peft import get_peft_model
from tiny_models import build, example_input, output
from transformers import AutoModelForCausalLM

from grin_peft import GrinConfig
from grin_peft.cli import main


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A tiny model folder and forget/retain JSON Lines for the command line."""
    root = tmp_path_factory.mktemp("cli_merged")
    write_workspace(root)
    return root


def test_push_merged_uploads_the_merged_model_and_no_delta(hub):
    repo_id = unique_repo_id("grin-merged")
    model = get_peft_model(build("llama"), GrinConfig(density=0.05, score="random", init_weights=False))
    model.push_to_hub(repo_id, merged=True)
    files = set(list_repo_files(repo_id))
    assert "model.safetensors" in files and not any(f.startswith("adapter_") for f in files)
    loaded = AutoModelForCausalLM.from_pretrained(repo_id)
    inputs = example_input("llama")
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=1e-5, atol=1e-5)
    assert model.base_model.num_entries()  # the local model keeps its delta
    assert "not published" in ModelCard.load(repo_id).text


def test_delta_card_warns_that_a_delta_reveals_the_changed_entries(hub):
    repo_id = unique_repo_id("grin-disclosure")
    get_peft_model(build("llama"), GrinConfig(density=0.05, score="random")).push_to_hub(repo_id)
    text = ModelCard.load(repo_id).text
    assert "which weights unlearning changed" in text and "merged=True" in text


def test_unlearn_command_pushes_the_merged_model_when_asked(hub, workspace, capsys, tmp_path):
    repo_id = unique_repo_id("grin-cli-merged")
    argv = ["unlearn", "--model", workspace / "model", "--forget", workspace / "forget.jsonl", "--retain",
            workspace / "retain.jsonl", "--density", "0.05", "--epochs", "1", "--output", tmp_path / "delta",
            "--push-to-hub", repo_id, "--push-merged"]  # fmt: skip
    assert main([str(a) for a in argv]) == 0, capsys.readouterr().err
    assert f"pushed the merged model to {repo_id}" in capsys.readouterr().out
    files = set(list_repo_files(repo_id))
    assert "model.safetensors" in files and not any(f.startswith("adapter_") for f in files)


def test_push_merged_without_a_repo_is_one_line_before_anything_loads(workspace, capsys, tmp_path):
    argv = ["unlearn", "--model", "no/such-model", "--forget", workspace / "forget.jsonl", "--output",
            tmp_path / "never", "--push-merged"]  # fmt: skip
    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err.strip()
    assert "give --push-to-hub REPO_ID too" in err and "\n" not in err
    assert not (tmp_path / "never").exists()
