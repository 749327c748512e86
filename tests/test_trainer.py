"""Specification of UnlearningTrainer: pairing, reference, what trains, logging, evaluation, checkpoints, errors.

Most tests run on the memorised tiny Llama of :mod:`grin_peft.tiny` (100 synthetic facts, 10 to forget, trained
once per session into pytest's temporary directory, ~15 s). Training runs use one torch thread: on a busy 2-core
machine two threads made tiny-model steps an order of magnitude slower.
"""

from __future__ import annotations

import copy
import math
import os
from dataclasses import dataclass, field

import pytest
import tiny_models
import torch
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import TrainerCallback, TrainingArguments

from grin_peft import GrinConfig, metrics
from grin_peft.data import IGNORE_INDEX, QAFormat, encode_items
from grin_peft.errors import GrinError
from grin_peft.losses import sequence_nll
from grin_peft.objectives import NPO, ObjectiveInputs
from grin_peft.trainer import UnlearningTrainer
from grin_peft.unlearning_args import UnlearningArguments, unlearn_score

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def grin_model(memorised, score: str = "random", density: float = 0.01, **config) -> PeftModel:
    """A fresh GRIN model on a copy of the memorised target (get_peft_model wraps in place)."""
    return get_peft_model(copy.deepcopy(memorised.model), GrinConfig(score=score, density=density, **config))


def make_args(tmp_path, **kw) -> UnlearningArguments:
    settings = dict(
        output_dir=str(tmp_path / "out"),
        use_cpu=True,
        num_threads=1,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        num_train_epochs=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )
    settings.update(kw)
    return UnlearningArguments(**settings)


def mean_probability(model, tokenizer, items) -> float:
    return sum(metrics.answer_probability(model, tokenizer, items, progress=False)) / len(items)


def trained_values(model: PeftModel) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}


# ------------------------------------------------------------------------------------------------ pairing


def test_train_batches_pair_one_forget_and_one_retain_batch(memorised, tmp_path):
    ds, tok = memorised.dataset, memorised.tokenizer
    args = make_args(tmp_path, train_sampling_strategy="sequential")
    trainer = UnlearningTrainer(grin_model(memorised), args, ds.forget, ds.retain, processing_class=tok)
    loader = trainer.get_train_dataloader()
    batches = list(loader)
    assert len(batches) == math.ceil(len(ds.forget) / 4)  # epoch length follows the forget set
    fmt = QAFormat(tok)
    for index, batch in enumerate(batches):
        assert set(batch) == {"forget", "retain"}  # NPO reads no refusal batch
        rows = range(4 * index, min(4 * index + 4, len(ds.forget)))
        for part, items in (("forget", ds.forget), ("retain", ds.retain)):
            assert batch[part]["input_ids"].shape[0] == len(rows)
            for row, item_index in enumerate(rows):
                expected = fmt.encode(items[item_index]["question"], items[item_index]["answer"])
                n = len(expected["input_ids"])
                assert batch[part]["input_ids"][row, :n].tolist() == expected["input_ids"]
                assert batch[part]["labels"][row, :n].tolist() == expected["labels"]  # loss on answer tokens only
                assert (batch[part]["labels"][row, n:] == IGNORE_INDEX).all()
                assert batch[part]["attention_mask"][row].sum() == n


def test_objective_without_retain_term_needs_no_retain_set(memorised, tmp_path):
    ds = memorised.dataset
    trainer = UnlearningTrainer(
        grin_model(memorised),
        make_args(tmp_path, objective="grad_ascent"),
        ds.forget,
        None,
        processing_class=memorised.tokenizer,
    )
    assert set(next(iter(trainer.get_train_dataloader()))) == {"forget"}
    trainer.train()


@pytest.mark.parametrize("objective", ["idk_dpo", "idk_nll"])
def test_refusal_batches_ask_the_forget_questions_with_refusal_answers(memorised, tmp_path, objective):
    ds, tok = memorised.dataset, memorised.tokenizer
    args = make_args(tmp_path, objective=objective, train_sampling_strategy="sequential", logging_steps=1)
    trainer = UnlearningTrainer(
        grin_model(memorised), args, ds.forget, ds.retain, processing_class=tok, refusals=ds.refusals
    )
    batch = next(iter(trainer.get_train_dataloader()))
    # IdkDPO contrasts refusal with forget answer row by row; IdkNLL never reads the true forget answers.
    assert set(batch) == ({"forget", "refusal", "retain"} if objective == "idk_dpo" else {"refusal", "retain"})
    fmt = QAFormat(tok)
    refusal = batch["refusal"]
    for row in range(refusal["input_ids"].shape[0]):
        expected = fmt.encode(ds.forget[row]["question"], ds.refusals[row % len(ds.refusals)])
        n = len(expected["input_ids"])
        assert refusal["input_ids"][row, :n].tolist() == expected["input_ids"]
        assert refusal["labels"][row, :n].tolist() == expected["labels"]
        answer = [t for t in refusal["labels"][row].tolist() if t != IGNORE_INDEX]
        assert tok.decode(answer, skip_special_tokens=True).strip() == ds.refusals[row % len(ds.refusals)]
        if objective == "idk_dpo":  # the same prompt as the forget row it is contrasted with
            n_prompt = next(i for i, label in enumerate(expected["labels"]) if label != IGNORE_INDEX)
            forget_ids = batch["forget"]["input_ids"][row].tolist()
            assert expected["input_ids"][:n_prompt] == forget_ids[:n_prompt]
    trainer.train()
    assert any("refusal_nll" in entry for entry in trainer.state.log_history)


def test_chat_template_format_trains_on_assistant_tokens_only(memorised, tmp_path):
    tok = copy.deepcopy(memorised.tokenizer)
    tok.chat_template = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}assistant:{% endif %}"
    )
    ds = memorised.dataset
    trainer = UnlearningTrainer(grin_model(memorised), make_args(tmp_path), ds.forget, ds.retain, processing_class=tok)
    example = trainer.train_dataset.forget[0]
    expected = QAFormat(tok, chat=True).encode(ds.forget[0]["question"], ds.forget[0]["answer"])
    assert example == expected
    prompt_len = len(QAFormat(tok, chat=True).encode_prompt(ds.forget[0]["question"]))
    assert example["labels"][:prompt_len] == [IGNORE_INDEX] * prompt_len
    assert all(label != IGNORE_INDEX for label in example["labels"][prompt_len:])
    trainer.train()


# ------------------------------------------------------------------------------------------------ the loss


@dataclass(frozen=True, kw_only=True)
class RecordingNPO(NPO):
    """NPO that keeps every ObjectiveInputs it is given."""

    seen: list = field(default_factory=list, compare=False, repr=False)

    def compute(self, inputs: ObjectiveInputs):
        self.seen.append(inputs)
        return super().compute(inputs)


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_reference_is_the_base_model_with_the_adapter_disabled(tmp_path, kind):
    """NPO's reference NLL and the KL reference logits equal a separate, fresh base model's outputs, even in train
    mode with dropout (GPT-2 has dropout 0.1): the reference runs in eval mode."""
    base = tiny_models.build(kind)
    fresh = copy.deepcopy(base).eval()
    # init_weights=False: non-zero random delta values, so the adapted model differs from the base.
    model = get_peft_model(base, GrinConfig(score="random", density=0.05, init_weights=False))
    generator = torch.Generator().manual_seed(0)
    examples = []
    for length in (6, 9, 7, 8):
        ids = torch.randint(3, tiny_models.VOCAB, (length,), generator=generator).tolist()
        examples.append({"input_ids": ids, "labels": [IGNORE_INDEX] * 3 + ids[3:]})
    objective = RecordingNPO(kl_weight=1.0)
    trainer = UnlearningTrainer(
        model,
        make_args(tmp_path, train_sampling_strategy="sequential", per_device_train_batch_size=2),
        examples,
        examples[::-1],
        objective=objective,
    )
    batch = next(iter(trainer.get_train_dataloader()))
    model.train()
    trainer.compute_loss(model, batch)
    assert model.training  # restored after the reference passes
    seen = objective.seen[-1]
    forget, retain = batch["forget"], batch["retain"]
    with torch.no_grad():
        ref_forget = fresh(input_ids=forget["input_ids"], attention_mask=forget["attention_mask"]).logits
        ref_retain = fresh(input_ids=retain["input_ids"], attention_mask=retain["attention_mask"]).logits
    torch.testing.assert_close(seen.ref_forget_nll, sequence_nll(ref_forget, forget["labels"], "sum"), rtol=0, atol=0)
    torch.testing.assert_close(seen.ref_retain_logits, ref_retain, rtol=0, atol=0)
    # ... and the trained pass is the adapted model, which differs from the base.
    assert not torch.allclose(seen.forget_logits.detach(), ref_forget, atol=1e-4)
    assert seen.forget_logits.requires_grad and not seen.ref_retain_logits.requires_grad


@pytest.mark.parametrize(
    "settings",
    [{}, {"bf16": True}, {"gradient_accumulation_steps": 2, "per_device_train_batch_size": 2}],
    ids=["fp32", "bf16-autocast", "grad-accumulation"],
)
def test_only_grin_values_train(memorised, tmp_path, settings):
    ds = memorised.dataset
    model = grin_model(memorised)
    base_before = {k: v.clone() for k, v in model.base_model.model.state_dict().items() if "grin_" not in k}
    values_before = trained_values(model)
    assert values_before and all("grin_values" in name for name in values_before)

    threads = []

    class ThreadProbe(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            threads.append(torch.get_num_threads())

    torch.set_num_threads(2)
    args = make_args(tmp_path, num_train_epochs=2, logging_steps=1, **settings)
    trainer = UnlearningTrainer(
        model, args, ds.forget, ds.retain, processing_class=memorised.tokenizer, callbacks=[ThreadProbe()]
    )
    trainer.train()
    assert threads and set(threads) == {1} and torch.get_num_threads() == 2  # num_threads, then restored

    optimized = {id(p) for group in trainer.optimizer.param_groups for p in group["params"]}
    assert optimized == {id(p) for p in model.parameters() if p.requires_grad}
    base_after = {k: v for k, v in model.base_model.model.state_dict().items() if "grin_" not in k}
    assert base_after.keys() == base_before.keys()
    for key, value in base_before.items():  # byte-identical base weights
        assert value.dtype == base_after[key].dtype and torch.equal(value, base_after[key]), key
    values_after = trained_values(model)
    assert all(torch.isfinite(v).all() for v in values_after.values())
    assert any(not torch.equal(values_before[k], values_after[k]) for k in values_before)
    train_logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert train_logs and all(math.isfinite(entry["loss"]) for entry in train_logs)


def test_objective_parts_are_logged(memorised, tmp_path):
    ds = memorised.dataset
    args = make_args(tmp_path, num_train_epochs=2, logging_steps=2)
    trainer = UnlearningTrainer(
        grin_model(memorised), args, ds.forget, ds.retain, processing_class=memorised.tokenizer
    )
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    assert len(logs) == 3  # 6 steps, every 2
    for entry in logs:
        for key in ("forget_term", "forget_nll", "forget_log_ratio", "retain_nll", "grad_norm", "learning_rate"):
            assert math.isfinite(entry[key]), key
    summary = trainer.state.log_history[-1]  # the whole run's averages join Trainer's final summary
    assert summary["train_forget_term"] == pytest.approx(sum(e["forget_term"] for e in logs) / 3, rel=1e-6)
    # At step 2 the delta holds only noise: NPO's forget term is (2/beta) log 2 up to that small change.
    assert logs[0]["forget_term"] == pytest.approx(2 / 0.1 * math.log(2), rel=0.05)


# ------------------------------------------------------------------------------------------------ evaluation


@pytest.mark.parametrize("criterion", ["difference", "harmonic"])
def test_evaluate_reports_answer_probabilities_and_the_criterion(memorised, tmp_path, criterion):
    ds, tok = memorised.dataset, memorised.tokenizer
    model = grin_model(memorised, init_weights=False)  # a visibly perturbed model
    args = make_args(tmp_path, unlearn_criterion=criterion, per_device_eval_batch_size=7)
    trainer = UnlearningTrainer(model, args, ds.forget, ds.retain, processing_class=tok)
    result = trainer.evaluate()
    forget, retain = mean_probability(model, tok, ds.forget), mean_probability(model, tok, ds.retain)
    assert result["eval_forget_prob"] == pytest.approx(forget, rel=1e-5)
    assert result["eval_retain_prob"] == pytest.approx(retain, rel=1e-5)
    assert result["eval_unlearn_score"] == pytest.approx(unlearn_score(forget, retain, criterion), rel=1e-5)
    assert math.isfinite(result["eval_forget_nll"]) and math.isfinite(result["eval_retain_nll"])
    # Other sets, given raw, under another prefix.
    other = trainer.evaluate({"forget": ds.holdout, "retain": ds.retain[:5]}, metric_key_prefix="test")
    assert other["test_forget_prob"] == pytest.approx(mean_probability(model, tok, ds.holdout), rel=1e-5)
    assert trainer.state.log_history[-1]["test_retain_prob"] == other["test_retain_prob"]


def test_end_to_end_forgets_the_forget_set_and_keeps_the_retain_set(memorised, tmp_path):
    """NPO on a random 1% delta: forget-answer probability falls at least 20-fold, retain probability stays within
    0.1 of where it started (measured: 0.994 -> 0.014 forget, 0.994 -> 0.956 retain, ~10 s)."""
    ds, tok = memorised.dataset, memorised.tokenizer
    model = grin_model(memorised)
    forget_before, retain_before = mean_probability(model, tok, ds.forget), mean_probability(model, tok, ds.retain)
    assert forget_before > 0.95 and retain_before > 0.95  # the target has memorised both
    args = make_args(tmp_path, num_train_epochs=20, retain_weight=5.0, lr_scheduler_type="constant")
    trainer = UnlearningTrainer(model, args, ds.forget, ds.retain, processing_class=tok)
    trainer.train()
    forget_after, retain_after = mean_probability(model, tok, ds.forget), mean_probability(model, tok, ds.retain)
    assert forget_after < forget_before / 20
    assert retain_after > retain_before - 0.1


# ------------------------------------------------------------------------------------------------ checkpoints


def test_checkpoints_and_load_best_model_at_end(memorised, tmp_path):
    """Every epoch is evaluated and saved; at the end the best checkpoint's delta (by eval_unlearn_score) is loaded
    back. The run overshoots on purpose (high lr, weak retain term), so the best epoch is not the last."""
    ds, tok = memorised.dataset, memorised.tokenizer
    model = grin_model(memorised)
    args = make_args(
        tmp_path,
        learning_rate=1e-1,
        num_train_epochs=4,
        eval_strategy="epoch",
        save_strategy="epoch",
        load_best_model_at_end=True,
    )
    assert args.metric_for_best_model == "unlearn_score" and args.greater_is_better
    trainer = UnlearningTrainer(model, args, ds.forget, ds.retain, processing_class=tok)
    trainer.train()
    scores = {e["step"]: e["eval_unlearn_score"] for e in trainer.state.log_history if "eval_unlearn_score" in e}
    best_step = max(scores, key=scores.get)
    best = trainer.state.best_model_checkpoint
    assert best == os.path.join(args.output_dir, f"checkpoint-{best_step}")
    assert best_step != max(scores), "the run did not overshoot: the test needs a best epoch before the last"
    assert trainer.state.best_metric == pytest.approx(scores[best_step])

    # The model now holds the best checkpoint's values ...
    saved = load_file(os.path.join(best, "adapter_model.safetensors"))
    for name, value in trained_values(model).items():
        assert torch.equal(saved[name.replace(".default", "")], value), name
    assert trainer.evaluate()["eval_unlearn_score"] == pytest.approx(scores[best_step], rel=1e-5)
    # ... and the checkpoint loads into a fresh base as a plain PEFT adapter.
    reloaded = PeftModel.from_pretrained(copy.deepcopy(memorised.model), best)
    assert mean_probability(reloaded, tok, ds.forget) == pytest.approx(mean_probability(model, tok, ds.forget))


def test_resume_mid_epoch_replays_the_same_run(memorised, tmp_path):
    """Checkpoint at step 4 (inside epoch 2 of 3-step epochs), resume in a new trainer: bit-identical values."""
    ds, tok = memorised.dataset, memorised.tokenizer

    def run(output_dir, resume=None):
        model = grin_model(memorised)
        args = make_args(tmp_path, output_dir=str(output_dir), num_train_epochs=3, save_strategy="steps", save_steps=4)
        UnlearningTrainer(model, args, ds.forget, ds.retain, processing_class=tok).train(resume_from_checkpoint=resume)
        return trained_values(model)

    full = run(tmp_path / "full")
    resumed = run(tmp_path / "full", resume=str(tmp_path / "full" / "checkpoint-4"))
    assert full.keys() == resumed.keys()
    assert all(torch.equal(full[k], resumed[k]) for k in full)


# ------------------------------------------------------------------------------------------------ bad input


def test_bad_input_raises_grin_error(memorised, tmp_path):
    ds, tok = memorised.dataset, memorised.tokenizer
    model = grin_model(memorised)

    def trainer(forget=ds.forget, retain=ds.retain, **kw):
        args = kw.pop("args", None) or make_args(tmp_path, **kw.pop("arg_kw", {}))
        kw.setdefault("processing_class", tok)
        return UnlearningTrainer(kw.pop("model", model), args, forget, retain, **kw)

    with pytest.raises(GrinError, match="forget set is empty"):
        trainer(forget=[])
    with pytest.raises(GrinError, match="refusals="):
        trainer(arg_kw={"objective": "idk_nll"})
    with pytest.raises(GrinError, match="list of strings"):
        trainer(arg_kw={"objective": "idk_dpo"}, refusals="I don't know.")
    encoded = encode_items(ds.forget, tok)
    with pytest.raises(GrinError, match="forget question"):
        trainer(forget=encoded, arg_kw={"objective": "idk_dpo"}, refusals=list(ds.refusals))
    with pytest.raises(GrinError, match="tokenizer"):
        trainer(processing_class=None)
    with pytest.raises(GrinError, match="retain term"):
        trainer(retain=None, arg_kw={"objective": "grad_diff"})
    with pytest.raises(GrinError, match="no answer token"):
        trainer(forget=[{"input_ids": [5, 6, 7], "labels": [IGNORE_INDEX] * 3}])
    with pytest.raises(GrinError, match="neither"):
        trainer(forget=[{"text": "hello"}])
    with pytest.raises(GrinError, match="PEFT adapter"):
        trainer(model=copy.deepcopy(memorised.model))
    with pytest.raises(GrinError, match="localize"):
        trainer(model=grin_model(memorised, score="gradient_ratio"))
    with pytest.raises(GrinError, match="UnlearningArguments"):
        trainer(args=TrainingArguments(output_dir=str(tmp_path / "x"), use_cpu=True))
    with pytest.warns(UserWarning, match="refusals are ignored"):
        trainer(refusals=list(ds.refusals))


# ------------------------------------------------------------------------------------------------ IHL


@pytest.mark.parametrize(("kind", "lr"), [("grin", 5e-2), ("lora", 1e-2), ("full", 1e-3)])
def test_ihl_trains_a_grin_delta_a_lora_adapter_and_all_weights_alike(memorised, tmp_path, kind, lr):
    """The inverted hinge loss reads no reference, so a plain model trains in full without ``ref_model``."""
    from peft import LoraConfig

    ds, tok = memorised.dataset, memorised.tokenizer
    if kind == "grin":
        model = grin_model(memorised, density=0.05)
    elif kind == "lora":
        model = get_peft_model(copy.deepcopy(memorised.model), LoraConfig(r=4, target_modules="all-linear"))
    else:
        model = copy.deepcopy(memorised.model).requires_grad_(True)
    before = mean_probability(model, tok, ds.forget)
    args = make_args(tmp_path, objective="ihl", learning_rate=lr, num_train_epochs=2)
    UnlearningTrainer(model, args, ds.forget, ds.retain, processing_class=tok).train()
    assert mean_probability(model, tok, ds.forget) < before
