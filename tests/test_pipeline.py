"""Specification of `grin_peft.pipeline.unlearn`: one call wraps, localises, trains and reports.

Runs on the memorised tiny Llama of :mod:`grin_peft.tiny` (shared cache in pytest's session directory) with one
torch thread.
"""

from __future__ import annotations

import copy
import os

import pytest
import torch
from peft import LoraConfig, PeftModel, get_peft_model

from grin_peft import GrinConfig, metrics
from grin_peft.data import QAFormat, encode_items
from grin_peft.errors import GrinError
from grin_peft.pipeline import UnlearnResult, unlearn
from grin_peft.trainer import UnlearningTrainer
from grin_peft.unlearning_args import UnlearningArguments

# Settings measured to unlearn the 10 forget items of the tiny target in 60 steps (~5 s on one thread).
FAST = dict(
    learning_rate=5e-2,
    num_train_epochs=20,
    per_device_train_batch_size=4,
    retain_weight=5.0,
    lr_scheduler_type="constant",
    num_threads=1,
    use_cpu=True,
    disable_tqdm=True,
)
FAST_ARGS = {k: v for k, v in FAST.items() if k != "num_train_epochs"}


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def mean_probability(model, tokenizer, items) -> float:
    return sum(metrics.answer_probability(model, tokenizer, items, progress=False)) / len(items)


def base_state(model) -> dict[str, torch.Tensor]:
    return {k.replace("base_layer.", ""): v.clone() for k, v in model.state_dict().items() if "grin_" not in k}


def check_unlearned(result: UnlearnResult, memorised, base: dict[str, torch.Tensor]) -> None:
    """Forget probability down at least 20-fold, retain within 0.1 of the memorised target's, base untouched."""
    ds, tok = memorised.dataset, memorised.tokenizer
    forget_before = mean_probability(memorised.model, tok, ds.forget)
    retain_before = mean_probability(memorised.model, tok, ds.retain)
    forget_after = mean_probability(result.peft_model, tok, ds.forget)
    retain_after = mean_probability(result.peft_model, tok, ds.retain)
    assert forget_after < forget_before / 20
    assert retain_after > retain_before - 0.1
    assert result.eval_metrics["eval_forget_prob"] == pytest.approx(forget_after, rel=1e-5)
    assert result.eval_metrics["eval_retain_prob"] == pytest.approx(retain_after, rel=1e-5)
    after = base_state(result.peft_model.base_model.model)
    assert after.keys() == base.keys() and all(torch.equal(base[k], after[k]) for k in base)


def test_unlearn_with_a_data_free_score(memorised):
    ds, tok = memorised.dataset, memorised.tokenizer
    model = copy.deepcopy(memorised.model)
    base = base_state(model)
    result = unlearn(model, ds.forget, ds.retain, GrinConfig(score="random", density=0.01), tokenizer=tok, **FAST)
    assert isinstance(result.peft_model, PeftModel) and result.peft_model.base_model.model is model
    assert result.localization is None  # selected at injection, no data pass
    targeted = sum(layer.grin_numel for layer in result.peft_model.base_model.grin_layers().values())
    assert result.trainable_entries == round(0.01 * targeted)
    assert result.trainable_entries == sum(p.numel() for p in result.peft_model.parameters() if p.requires_grad)
    assert result.train_metrics["train_loss"] > 0 and result.wall_time >= result.timings["train"] > 0
    assert any("forget_log_ratio" in entry for entry in result.log_history)  # NPO is the default objective
    assert isinstance(result.trainer, UnlearningTrainer)
    check_unlearned(result, memorised, base)


def test_unlearn_with_the_default_gradient_ratio_score(memorised):
    pytest.importorskip("grin_peft.localize.pipeline")
    ds, tok = memorised.dataset, memorised.tokenizer
    model = copy.deepcopy(memorised.model)
    base = base_state(model)
    config = GrinConfig(density=0.01)
    assert config.score == "gradient_ratio"
    result = unlearn(model, ds.forget, ds.retain, config, tokenizer=tok, localize_kwargs={"progress": False}, **FAST)
    report = result.localization
    assert report is not None and report.score == "gradient_ratio"
    assert sum(m.selected for m in report.modules) == result.trainable_entries > 0
    assert result.timings["localize"] > 0
    check_unlearned(result, memorised, base)


def test_unlearn_trains_an_existing_grin_model_and_accepts_encoded_data(memorised, tmp_path):
    ds, tok = memorised.dataset, memorised.tokenizer
    peft_model = get_peft_model(copy.deepcopy(memorised.model), GrinConfig(score="magnitude", density=0.01))
    args = UnlearningArguments(
        output_dir=str(tmp_path / "out"), objective="grad_diff", num_train_epochs=1, save_strategy="no", **FAST_ARGS
    )
    result = unlearn(peft_model, encode_items(ds.forget, tok), encode_items(ds.retain, tok), training_args=args)
    assert result.peft_model is peft_model
    assert result.train_metrics["train_retain_nll"] > 0  # GradDiff's parts, averaged over the run


def test_unlearn_with_refusals_and_a_qa_format(memorised):
    ds, tok = memorised.dataset, memorised.tokenizer
    fmt = QAFormat(tok, template="Q: {question}\nA: {answer}")
    result = unlearn(
        copy.deepcopy(memorised.model),
        ds.forget,
        ds.retain,
        GrinConfig(score="random", density=0.01),
        objective="idk_dpo",
        tokenizer=fmt,
        refusals=list(ds.refusals),
        **{**FAST, "num_train_epochs": 1},
    )
    assert "train_dpo_margin" in result.train_metrics and "train_refusal_nll" in result.train_metrics
    assert result.trainer.train_dataset.forget[0] == fmt.encode(ds.forget[0]["question"], ds.forget[0]["answer"])


def test_unlearn_output_dir_keeps_checkpoints_and_the_best_adapter(memorised, tmp_path):
    ds, tok = memorised.dataset, memorised.tokenizer
    out = tmp_path / "run"
    result = unlearn(
        copy.deepcopy(memorised.model),
        ds.forget,
        ds.retain,
        GrinConfig(score="random", density=0.01),
        tokenizer=tok,
        output_dir=str(out),
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
        save_total_limit=1,
        **{**FAST, "num_train_epochs": 3},
    )
    assert os.path.isfile(out / "adapter_model.safetensors") and os.path.isfile(out / "adapter_config.json")
    assert result.trainer.state.best_model_checkpoint.startswith(str(out))
    reloaded = PeftModel.from_pretrained(copy.deepcopy(memorised.model), str(out))
    assert mean_probability(reloaded, tok, ds.forget) == pytest.approx(result.eval_metrics["eval_forget_prob"])


def test_unlearn_without_output_dir_writes_nothing(memorised, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    ds = memorised.dataset
    unlearn(
        copy.deepcopy(memorised.model),
        ds.forget,
        ds.retain,
        GrinConfig(score="random", density=0.01),
        tokenizer=memorised.tokenizer,
        **{**FAST, "num_train_epochs": 1},
    )
    assert os.listdir(tmp_path) == []


def test_unlearn_bad_input_raises_before_touching_the_model(memorised, tmp_path):
    ds, tok = memorised.dataset, memorised.tokenizer
    model = copy.deepcopy(memorised.model)
    modules_before = [type(m) for m in model.modules()]
    random_config = GrinConfig(score="random", density=0.01)
    args = UnlearningArguments(output_dir=str(tmp_path / "o"), use_cpu=True)
    cases = [
        ("forget set is empty", dict(forget=[])),
        ("unknown objective", dict(objective="forget_everything")),
        ("refusals=", dict(objective="idk_nll")),
        ("retain term", dict(retain=None, objective="grad_diff")),
        ("tokenizer", dict(tokenizer=None)),
        ("unknown training setting", dict(learning_rat=1e-3)),
        ("need an output_dir", dict(save_strategy="epoch")),
        ("not both", dict(training_args=args, learning_rate=1e-3)),
        ("disagrees", dict(training_args=args, objective="simnpo")),
        ("localize_kwargs", dict(localize_kwargs=["progress"])),
        ("GrinConfig", dict(config=LoraConfig())),
        ("batch_size", dict(config=GrinConfig(density=0.01), localize_kwargs={"batch_size": 0})),
    ]
    for message, overrides in cases:
        kwargs = dict(forget=ds.forget, retain=ds.retain, config=random_config, tokenizer=tok, **FAST)
        if "training_args" in overrides:
            kwargs = {k: v for k, v in kwargs.items() if k not in FAST}
        kwargs.update(overrides)
        with pytest.raises(GrinError, match=message):
            unlearn(model, **kwargs)
        assert [type(m) for m in model.modules()] == modules_before, message  # not wrapped, or unwrapped again
    peft_model = get_peft_model(copy.deepcopy(memorised.model), random_config)
    with pytest.raises(GrinError, match="own config"):
        unlearn(peft_model, ds.forget, ds.retain, random_config, tokenizer=tok, **FAST)
    lora = get_peft_model(copy.deepcopy(memorised.model), LoraConfig(target_modules=["q_proj"]))
    with pytest.raises(GrinError, match="not a GRIN adapter"):
        unlearn(lora, ds.forget, ds.retain, tokenizer=tok, **FAST)
