"""Sharing an unlearned model without its delta: ``push_to_hub(repo_id, merged=True)`` pushes the merged weights
(server on 127.0.0.1), and the delta's own model card says why one would."""

from __future__ import annotations

import torch
from hub_server import unique_repo_id
from huggingface_hub import ModelCard, list_repo_files
from peft import get_peft_model
from tiny_models import build, example_input, output
from transformers import AutoModelForCausalLM

from grin_peft import GrinConfig


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
