"""Sharing deltas through a Hub: push, model card, load by repo id, revert by repo id (server on 127.0.0.1)."""

from __future__ import annotations

import torch
from hub_server import unique_repo_id
from huggingface_hub import ModelCard, hf_hub_download
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from tiny_models import build, example_input, output, state

import grin_peft
from grin_peft import GrinConfig


def test_push_to_hub_then_load_by_repo_id_gives_the_same_delta(hub):
    repo_id = unique_repo_id("grin-delta")
    config = GrinConfig(
        target_modules="all-linear",
        density=0.05,
        score="random",
        init_weights=False,
        forget_description="the planted test facts",
    )
    model = get_peft_model(build("llama"), config)
    model.push_to_hub(repo_id)

    pushed = {k: v for k, v in model.state_dict().items() if ".grin_" in k}
    loaded = PeftModel.from_pretrained(build("llama"), repo_id)
    for key, value in loaded.state_dict().items():
        if ".grin_" in key:
            assert torch.equal(value, pushed[key]), key
    inputs = example_input("llama")
    torch.testing.assert_close(output(loaded, inputs), output(model, inputs), rtol=0, atol=0)

    tensors = load_file(hf_hub_download(repo_id, "adapter_model.safetensors"))
    assert sum(t.numel() for k, t in tensors.items() if k.endswith("grin_values")) == sum(
        model.base_model.num_entries().values()
    )


def test_model_card_describes_the_delta(hub):
    repo_id = unique_repo_id("grin-card")
    model = get_peft_model(
        build("llama"), GrinConfig(density=0.05, score="random", forget_description="author biographies")
    )
    model.push_to_hub(repo_id)
    card = ModelCard.load(repo_id)
    assert card.data.library_name == "peft"
    assert {"grin", "unlearning"} <= set(card.data.tags)
    assert card.data.grin["trainable_entries"] == sum(model.base_model.num_entries().values())
    assert card.data.grin["density"] > 0
    assert "author biographies" in card.text


def test_revert_by_repo_id_after_merge(hub):
    repo_id = unique_repo_id("grin-revert")
    original = state(build("llama", torch.bfloat16))
    model = get_peft_model(
        build("llama", torch.bfloat16), GrinConfig(density=0.05, score="random", init_weights=False)
    )
    model.push_to_hub(repo_id)
    merged = PeftModel.from_pretrained(build("llama", torch.bfloat16), repo_id).merge_and_unload()
    grin_peft.revert(merged, repo_id)
    assert all(torch.equal(v, original[k]) for k, v in merged.state_dict().items())
