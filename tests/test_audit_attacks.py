"""The attack families one by one: the 4-bit bin width, the jailbreak layout, relearning, and the bin-width floor
that defends a sparse delta against quantization."""

from __future__ import annotations

import copy

import bitsandbytes.functional as bnb_functional
import pytest
import torch
from peft import get_peft_model
from test_audit import FORGET, RETAIN, make_tokenizer, tiny_llama, train
from torch import nn

from grin_peft import GrinConfig
from grin_peft.audit import RelearnSettings, floor_to_bin_width
from grin_peft.audit.prompts import JAILBREAK_PREFIX, paraphrased, with_prefix
from grin_peft.audit.quantization import _roundtrip, bin_width, change_vs_bin_width, plain_model
from grin_peft.audit.relearning import relearn, split_forget
from grin_peft.data import IGNORE_INDEX, QAFormat
from grin_peft.errors import GrinError

pytest.importorskip("bitsandbytes")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def model(tok):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield train(tiny_llama(len(tok)), tok, FORGET + RETAIN, steps=60, lr=2e-2)
    torch.set_num_threads(threads)


def test_bin_width_is_the_gap_between_the_levels_around_each_entry_times_the_block_scale():
    levels = [-1.0, -0.6961928, -0.5250731, -0.3949175, -0.2844414, -0.1847734, -0.0910500, 0.0]
    levels += [0.0795803, 0.1609302, 0.2461123, 0.3379152, 0.4407098, 0.5626170, 0.7229568, 1.0]
    block = torch.zeros(64)
    block[0], block[1], block[2], block[3] = 2.0, 0.5, -0.05, 0.1  # scale 2: normalised 1, 0.25, -0.025, 0.05
    width = bin_width(torch.cat([block, 10 * block]).view(2, 64))
    assert width[0, 0] == pytest.approx(2 * (1.0 - 0.7229568), rel=1e-5)
    assert width[0, 1] == pytest.approx(2 * (levels[11] - levels[10]), rel=1e-5)  # 0.25 lies in (0.2461, 0.3379]
    assert width[0, 2] == pytest.approx(2 * (levels[7] - levels[6]), rel=1e-5)
    assert width[0, 3] == pytest.approx(2 * (levels[8] - levels[7]), rel=1e-5)
    assert float(width[1, 1]) == pytest.approx(10 * float(width[0, 1]), rel=1e-5)  # each block has its own scale


def test_change_vs_bin_width_counts_what_a_4bit_copy_keeps(model):
    before = copy.deepcopy(model)
    after = copy.deepcopy(model)
    name = "model.layers.0.mlp.up_proj"
    with torch.no_grad():
        weight = after.get_submodule(name).weight
        weight[0, 1:5] += 5 * bin_width(weight)[0, 1:5]  # far past the boundary: kept
    (row,) = change_vs_bin_width(before, after, [name])
    assert row["changed"] == 4 and row["median_change_over_bin"] == pytest.approx(5.0, rel=1e-4)
    assert row["below_half_bin"] == 0.0
    assert row["kept_by_nf4"] == 1.0
    assert torch.equal(_roundtrip(before.get_submodule(name).weight, "nf4")[1:], _roundtrip(weight, "nf4")[1:])


def _on_levels() -> nn.Module:
    """One linear layer whose two 64-entry blocks have scale 1 and hold the 15 lowest NF4 levels exactly."""
    layer = nn.Sequential(nn.Linear(64, 2, bias=False))
    with torch.no_grad():
        layer[0].weight.zero_()
        layer[0].weight[:, 0] = 1.0  # the block maximum, never changed: the scale stays 1
        layer[0].weight[:, 1:16] = bnb_functional.get_4bit_type("nf4", device="cpu").float().sort().values[:15]
    return layer


def test_projection_kept_is_zero_when_no_entry_crosses_a_rounding_boundary_and_one_when_each_lands_on_a_level():
    before = _on_levels()
    levels = bnb_functional.get_4bit_type("nf4", device="cpu").float().sort().values
    small, onto_next = copy.deepcopy(before), copy.deepcopy(before)
    with torch.no_grad():
        small[0].weight[:, 2:10] += 0.1 * bin_width(before[0].weight)[:, 2:10]  # a tenth of a bin: rounds back
        onto_next[0].weight[:, 2:10] = levels[2:10]  # each of entries 2..9 (level i-1) moves up one level
    (row,) = change_vs_bin_width(before, small, ["0"])
    assert row["projection_kept_nf4"] == 0.0 and row["kept_by_nf4"] == 0.0
    assert row["mean_change_over_bin"] == pytest.approx(0.1, rel=1e-5)
    (row,) = change_vs_bin_width(before, onto_next, ["0"])
    assert row["projection_kept_nf4"] == pytest.approx(1.0, rel=1e-5) and row["kept_by_nf4"] == 1.0


def test_rounding_keeps_a_sub_bin_change_on_average_when_weights_sit_anywhere_in_their_bins():
    """Entries spread over their bins: a change of 0.05 or 0.2 bins survives in only some entries, but those
    carry a whole bin, so the 4-bit copies keep the change as a whole (the dither argument of BENCHMARKS.md 10)."""
    generator = torch.Generator().manual_seed(0)
    before = nn.Sequential(nn.Linear(256, 256, bias=False))
    with torch.no_grad():
        before[0].weight.copy_(0.02 * torch.randn(256, 256, generator=generator))
    for fraction in (0.05, 0.2):
        after = copy.deepcopy(before)
        signs = torch.sign(torch.randn(256, 256, generator=generator))
        with torch.no_grad():
            after[0].weight.add_(fraction * bin_width(before[0].weight) * signs)
        (row,) = change_vs_bin_width(before, after, ["0"])
        assert row["below_half_bin"] == 1.0
        assert 0.9 < row["projection_kept_nf4"] < 1.1 and 0.9 < row["projection_kept_fp4"] < 1.15


def test_jailbreak_prefix_belongs_to_the_prompt_and_is_never_scored(tok):
    fmt = QAFormat(tok)
    prefixed = with_prefix(fmt, JAILBREAK_PREFIX)
    prompt = tok.decode(prefixed.encode_prompt("Where is it?"))
    assert prompt.endswith("Answer: Sure, here is the answer:")
    encoded = prefixed.encode("Where is it?", "In Paris.")
    answer = [t for t, label in zip(encoded["input_ids"], encoded["labels"]) if label != IGNORE_INDEX]
    assert tok.decode(answer, skip_special_tokens=True) == " In Paris."
    assert encoded["labels"][: len(prefixed.encode_prompt("Where is it?"))] == [IGNORE_INDEX] * len(
        prefixed.encode_prompt("Where is it?")
    )


def test_paraphrased_keeps_only_items_with_a_paraphrase():
    items = [{**FORGET[0]}, {"question": "Q?", "answer": "A."}, {**FORGET[1], "paraphrased_question": " "}]
    plain, rephrased = paraphrased(items)
    assert plain == [items[0]] and rephrased[0]["question"] == FORGET[0]["paraphrased_question"]


def test_relearning_trains_a_copy_and_holds_the_rest_out(model, tok):
    settings = RelearnSettings(items=2, steps=20, lr=1e-2, batch_size=2)
    trained, held_out = split_forget(FORGET, settings)
    assert len(trained) == 2 and len(held_out) == 1 and held_out[0] not in trained
    unlearned = train(copy.deepcopy(model), tok, FORGET, steps=6, lr=1e-2, sign=-1.0)
    before = {k: v.clone() for k, v in unlearned.state_dict().items()}
    attacked = relearn(unlearned, QAFormat(tok), trained, settings)
    assert all(torch.equal(v, unlearned.state_dict()[k]) for k, v in before.items())
    batch = QAFormat(tok).encode(trained[0]["question"], trained[0]["answer"])
    ids = torch.tensor([batch["input_ids"]])
    labels = torch.tensor([batch["labels"]])
    with torch.no_grad():
        assert attacked(input_ids=ids, labels=labels).loss < unlearned(input_ids=ids, labels=labels).loss
    lora = relearn(unlearned, QAFormat(tok), trained, RelearnSettings(items=2, steps=2, method="lora", lora_r=4))
    assert any("lora_" in name for name, _ in lora.named_parameters())
    with pytest.raises(GrinError, match="'full' or 'lora'"):
        RelearnSettings(method="qlora")


def test_bin_width_floor_makes_trained_entries_survive_4bit(model):
    peft_model = get_peft_model(copy.deepcopy(model), GrinConfig(density=0.1, score="random", init_weights=False))
    with torch.no_grad():
        for layer in peft_model.base_model.grin_layers().values():
            values = layer.grin_values["default"]
            values.copy_(torch.where(torch.arange(values.numel()) % 2 == 0, 1e-6, -1e-6))
    modules = list(peft_model.base_model.grin_layers())
    weak = change_vs_bin_width(model, plain_model(peft_model), modules)
    info = floor_to_bin_width(peft_model, factor=1.0)
    assert info["raised"] == info["entries"] == sum(peft_model.base_model.num_entries().values())
    strong = change_vs_bin_width(model, plain_model(peft_model), modules)
    kept = lambda rows: sum(r["kept_by_nf4"] * r["changed"] for r in rows) / sum(r["changed"] for r in rows)  # noqa: E731
    assert kept(weak) < 0.2 and kept(strong) > 0.9  # 93% measured: a bin is not always a boundary
    for layer in peft_model.base_model.grin_layers().values():
        values = layer.grin_values["default"]
        floor = bin_width(layer._grin_weight()).reshape(-1)[layer.grin_indices["default"].long()]
        assert torch.all(values.abs() >= floor * (1 - 1e-6))
        assert torch.equal(torch.sign(values[::2]), torch.ones_like(values[::2]))  # signs kept
    again = floor_to_bin_width(peft_model, factor=1.0)
    assert again["raised"] <= info["entries"] // 100  # idempotent up to float rounding at the floor


def test_bin_width_floor_refuses_what_it_cannot_do(model):
    with pytest.raises(GrinError, match="GRIN PeftModel"):
        floor_to_bin_width(model)
    peft_model = get_peft_model(copy.deepcopy(model), GrinConfig(density=0.1, score="magnitude", init_weights=False))
    with pytest.raises(GrinError, match="positive"):
        floor_to_bin_width(peft_model, factor=0)
    peft_model.merge_adapter()
    with pytest.raises(GrinError, match="unmerged"):
        floor_to_bin_width(peft_model)
