"""Specification of FILA (grin_peft.fila): a LoRA adapter initialised from the forget/retain Fisher ratio, with the
base weights moved so that the model computes exactly what it computed before."""

from __future__ import annotations

import copy

import pytest
import tiny_models
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from grin_peft import GrinConfig
from grin_peft.errors import GrinError
from grin_peft.fila import fila_factors, fila_initialize

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py

TARGETS = {"llama": "all-linear", "gpt2": ["c_attn", "c_proj", "c_fc"]}


def examples(lengths: tuple[int, ...], seed: int) -> list[dict[str, list[int]]]:
    generator = torch.Generator().manual_seed(seed)
    out = []
    for n in lengths:
        ids = torch.randint(3, tiny_models.VOCAB, (n,), generator=generator).tolist()
        out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
    return out


FORGET = examples((8, 10, 9), seed=1)
RETAIN = examples((7, 9, 11, 8), seed=2)


def lora(kind: str = "llama", r: int = 4, dtype: torch.dtype = torch.float32, **options) -> PeftModel:
    config = LoraConfig(r=r, lora_alpha=2 * r, target_modules=TARGETS[kind], fan_in_fan_out=kind == "gpt2", **options)
    return get_peft_model(tiny_models.build(kind, dtype), config)


def weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------ the factors


def test_factors_keep_the_rows_that_matter_not_the_largest_ones():
    """Row 0 is important, row 1 is larger: the rank-1 weighted approximation keeps row 0 (a plain SVD would keep
    row 1)."""
    weight = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    importance = torch.tensor([[50.0, 50.0], [1e-4, 1e-4]])  # row weights sqrt(100) = 10 and sqrt(2e-4)
    a, b = fila_factors(weight, importance, rank=1, scaling=2.0)
    assert a.shape == (1, 2) and b.shape == (2, 1)
    torch.testing.assert_close(2.0 * b @ a, torch.tensor([[1.0, 0.0], [0.0, 0.0]]), atol=1e-5, rtol=0)
    # split evenly: both factors carry sqrt(S / scaling), S = 10 the singular value of diag(w) W
    assert a.abs().max().item() == pytest.approx((10.0 / 2.0) ** 0.5, rel=1e-5)


def test_factors_are_the_best_row_weighted_rank_r_approximation():
    """Eckart-Young: the weighted error is exactly the singular values left out."""
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(12, 9, generator=generator)
    importance = torch.rand(12, 9, generator=generator) ** 4
    a, b = fila_factors(weight, importance, rank=3, scaling=0.5)
    w = importance.sum(dim=1).sqrt()[:, None]
    error = (w * (weight - 0.5 * b @ a)).norm() ** 2
    left_out = torch.linalg.svdvals(w * weight)[3:]
    assert error.item() == pytest.approx((left_out**2).sum().item(), rel=1e-4)


@pytest.mark.parametrize(
    ("shape", "rank", "scaling", "match"),
    [((4, 3), 4, 1.0, "rank 4"), ((4, 3), 0, 1.0, "rank 0"), ((4, 3), 2, 0.0, "scaling")],
)
def test_factors_refuse_bad_rank_and_scaling(shape, rank, scaling, match):
    with pytest.raises(GrinError, match=match):
        fila_factors(torch.ones(shape), torch.ones(shape), rank, scaling)


# ------------------------------------------------------------------------------------------------ the model


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_output_is_unchanged_at_initialisation(kind):
    model = lora(kind)
    inputs = tiny_models.example_input(kind)
    with model.disable_adapter():
        before = tiny_models.output(model, inputs).detach()
    base_before = {k: v for k, v in weights(model).items() if "base_layer" in k}
    report = fila_initialize(model, FORGET, RETAIN, batch_size=2, progress=False)
    torch.testing.assert_close(tiny_models.output(model, inputs).detach(), before, atol=1e-5, rtol=1e-5)
    # ... while the adapter holds a real share of W, taken out of the base weights
    assert len(report.modules) == len([k for k in base_before if k.endswith("weight")])
    assert all(0.05 < m.weighted_captured <= 1.0 and m.rank == 4 for m in report.modules)
    moved = [k for k, v in weights(model).items() if "base_layer" in k and not torch.equal(v, base_before[k])]
    assert moved and all(k.endswith("weight") for k in moved)
    assert all(bool(p.detach().any()) for n, p in model.named_parameters() if "lora_B" in n)


def test_bf16_base_output_is_unchanged_up_to_its_rounding():
    model = lora("llama", dtype=torch.bfloat16)
    inputs = tiny_models.example_input("llama")
    before = tiny_models.output(model, inputs).detach().float()
    fila_initialize(model, FORGET, RETAIN, batch_size=2, progress=False)
    after = tiny_models.output(model, inputs).detach().float()
    assert (after - before).abs().max().item() < 0.05 * before.abs().max().item()


def test_adapter_is_the_weighted_approximation_of_the_squared_fisher_ratio():
    """The importance is F_f / (F_r + 1e-5), F the mean over examples of (gradient of the example's mean answer
    loss)^2, computed here independently with autograd on a copy of the base model."""
    model = lora("llama")
    base = copy.deepcopy(model.get_base_model())
    fila_initialize(model, FORGET, RETAIN, batch_size=2, progress=False)

    name = "model.layers.0.self_attn.q_proj"
    target = base.get_submodule(name)
    target.weight.requires_grad_(True)

    def fisher(items):
        total = torch.zeros_like(target.weight)
        for item in items:
            ids, labels = torch.tensor([item["input_ids"]]), torch.tensor([item["labels"]])
            loss = base(input_ids=ids, labels=labels).loss  # mean over the example's answer tokens
            (grad,) = torch.autograd.grad(loss, target.weight)
            total += grad**2
        return total / len(items)

    importance = fisher(FORGET) / (fisher(RETAIN) + 1e-5)
    a, b = fila_factors(target.weight.detach(), importance, rank=4, scaling=2.0)
    layer = model.base_model.model.get_submodule(name)
    got = layer.lora_B["default"].weight @ layer.lora_A["default"].weight
    torch.testing.assert_close(got, b @ a, atol=1e-4, rtol=1e-3)  # the product: SVD signs are arbitrary


def test_batch_gradient_unit_gives_another_fisher():
    by_example, by_batch = lora("llama"), lora("llama")
    fila_initialize(by_example, FORGET, RETAIN, batch_size=3, progress=False)
    report = fila_initialize(by_batch, FORGET, RETAIN, batch_size=3, progress=False, grad_unit="batch")
    assert report.grad_unit == "batch" and report.data["forget"]["units"] == 1
    a1 = dict(by_example.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"]
    a2 = dict(by_batch.named_parameters())["base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight"]
    assert not torch.allclose(a1.abs(), a2.abs(), atol=1e-3)


def test_converted_adapter_reproduces_the_trained_model_on_the_original_base(tmp_path):
    """PEFT's PiSSA/OLoRA conversion makes a FILA adapter shareable: a plain LoRA on the unmodified base."""
    model = lora("llama")
    original = copy.deepcopy(model.get_base_model())
    fila_initialize(model, FORGET, RETAIN, batch_size=2, progress=False)
    model.save_pretrained(tmp_path / "initial")
    with torch.no_grad():  # stands in for training: move every adapter weight
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.add_(0.01 * torch.randn_like(param))
    inputs = tiny_models.example_input("llama")
    trained = tiny_models.output(model, inputs).detach()
    model.save_pretrained(tmp_path / "lora", path_initial_model_for_weight_conversion=str(tmp_path / "initial"))
    loaded = PeftModel.from_pretrained(original, tmp_path / "lora")
    assert loaded.peft_config["default"].r == 8  # rank 2r: [A | A0], [B | -B0]
    torch.testing.assert_close(tiny_models.output(loaded, inputs).detach(), trained, atol=1e-5, rtol=1e-5)


def test_fila_then_ihl_lowers_forget_probability(memorised, tmp_path):
    from grin_peft import metrics
    from grin_peft.trainer import UnlearningTrainer
    from grin_peft.unlearning_args import UnlearningArguments

    ds, tok = memorised.dataset, memorised.tokenizer
    model = get_peft_model(copy.deepcopy(memorised.model), LoraConfig(r=4, lora_alpha=8, target_modules="all-linear"))
    fila_initialize(model, ds.forget, ds.retain, tokenizer=tok, progress=False)
    before = sum(metrics.answer_probability(model, tok, ds.forget, progress=False))
    args = UnlearningArguments(
        output_dir=str(tmp_path / "out"),
        objective="ihl",
        learning_rate=1e-2,
        num_train_epochs=2,
        per_device_train_batch_size=4,
        use_cpu=True,
        num_threads=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )
    UnlearningTrainer(model, args, ds.forget, ds.retain, processing_class=tok).train()
    assert sum(metrics.answer_probability(model, tok, ds.forget, progress=False)) < before


# ------------------------------------------------------------------------------------------------ refusals


def test_refusals_leave_the_model_untouched():
    trained = lora("llama")
    with torch.no_grad():
        next(p for n, p in trained.named_parameters() if "lora_B" in n).fill_(0.1)
    cases = [
        (tiny_models.build("llama"), {}, "pass the PeftModel"),
        (get_peft_model(tiny_models.build("llama"), GrinConfig(score="random", density=0.1)), {}, "not a LoRA"),
        (lora("llama", use_dora=True), {}, "DoRA"),
        (trained, {}, "not fresh"),
        (lora("llama"), {"forget": []}, "forget data is empty"),
        (lora("llama"), {"retain": [{"input_ids": [1, 2], "labels": [-100, -100]}]}, "no answer token"),
        (lora("llama"), {"grad_unit": "token"}, "grad_unit"),
        (lora("llama"), {"batch_size": 0}, "batch_size"),
    ]
    for model, override, match in cases:
        before = weights(model)
        kwargs = {"forget": FORGET, "retain": RETAIN, "progress": False, **override}
        with pytest.raises(GrinError, match=match):
            fila_initialize(model, **kwargs)
        after = weights(model)
        assert all(torch.equal(after[k], v) for k, v in before.items())
