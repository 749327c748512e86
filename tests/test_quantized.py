"""GRIN on bitsandbytes 8-bit and 4-bit bases (CPU here): QLoRA-style training, save/load, merges."""

from __future__ import annotations

import warnings

import pytest
import torch
from peft import PeftModel, get_peft_model
from tiny_models import VOCAB

pytest.importorskip("bitsandbytes")
from transformers import AutoModelForCausalLM, BitsAndBytesConfig, LlamaConfig  # noqa: E402

from grin_peft import GrinConfig  # noqa: E402
from grin_peft.quantized import merge_dequantized, merge_quantized  # noqa: E402

QUANT = {
    "8bit": lambda: BitsAndBytesConfig(load_in_8bit=True),
    "4bit": lambda: BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
}
IDS = torch.randint(0, 97, (2, 10), generator=torch.Generator().manual_seed(0))


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    )  # 4-bit blocks are 64 wide
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def quantized(base_dir, kind):
    return AutoModelForCausalLM.from_pretrained(base_dir, quantization_config=QUANT[kind]())


def grin(base_dir, kind):
    config = GrinConfig(density=0.05, score="magnitude", init_weights=False)
    return get_peft_model(quantized(base_dir, kind), config)


def logits(model):
    with torch.no_grad():
        return model(input_ids=IDS).logits


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_training_step_changes_only_grin_values(base_dir, kind):
    model = grin(base_dir, kind)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    model(input_ids=IDS, labels=IDS).loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in trainable)
    optimizer.step()
    for key, value in model.state_dict().items():
        if ".grin_values." in key:
            continue
        assert torch.equal(value, before[key]), key
    assert any(not torch.equal(v, before[k]) for k, v in model.state_dict().items() if ".grin_values." in k)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_save_load_round_trip(base_dir, kind, tmp_path):
    model = grin(base_dir, kind)
    expected = logits(model)
    model.save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(quantized(base_dir, kind), tmp_path)
    torch.testing.assert_close(logits(loaded), expected, rtol=0, atol=0)


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_merge_reports_loss_and_unmerge_restores_exactly(base_dir, kind):
    model = grin(base_dir, kind)
    with model.disable_adapter():
        original = logits(model)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = merge_quantized(model, probe={"input_ids": IDS})
    assert report.relative_error and all(e >= 0 for e in report.relative_error.values())
    assert report.max_logit_diff is not None
    model.unmerge_adapter()
    with model.disable_adapter():
        torch.testing.assert_close(logits(model), original, rtol=0, atol=0)


def test_4bit_merge_warns_when_the_delta_is_rounded_away(base_dir):
    model = grin(base_dir, "4bit")
    with pytest.warns(UserWarning, match="merge_dequantized"):
        report = merge_quantized(model, probe={"input_ids": IDS})
    assert report.worst_relative_error > 0.05


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_dequantized_merge_keeps_the_delta(base_dir, kind, tmp_path):
    model = grin(base_dir, kind)
    expected = logits(model)
    merged = merge_dequantized(model, dtype=torch.float32)
    assert not any("bitsandbytes" in type(m).__module__ for m in merged.modules())
    torch.testing.assert_close(logits(merged), expected, rtol=0.05, atol=0.05)
    merged.save_pretrained(tmp_path)
