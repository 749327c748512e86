"""Localization: gradient statistics through output taps, every score formula, selection, distributed exactness,
bf16/checkpointing/quantized paths, the report, and bad input refused before any forward pass."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from gloo_ranks import run_ranks
from localize_dist_worker import PROMPT, VOCAB, planted_model, planted_sequences
from peft import get_peft_model
from torch.utils.data import DataLoader
from transformers import AutoModelForCausalLM, GPT2Config

from grin_peft import GrinConfig, GrinError
from grin_peft.data import QACollator, encode_items
from grin_peft.localize.pipeline import compute_scores
from grin_peft.localize.report import LocalizationReport, split_module_name
from grin_peft.localize.scores import LOKU_EPS, nonneg_quantiles
from grin_peft.noise import noise_values


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run fastest on one thread (and the thread-count test switches explicitly)."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def train(model: torch.nn.Module, examples: list[dict], steps: int = 150, lr: float = 1e-2) -> torch.nn.Module:
    ids = torch.tensor([x["input_ids"] for x in examples])
    labels = torch.tensor([x["labels"] for x in examples])
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


@pytest.fixture(scope="module")
def planted():
    """A tiny Llama that memorised 8 planted 'forget' sequences alongside 32 'retain' ones (a few seconds)."""
    generator = torch.Generator().manual_seed(0)
    forget, retain = planted_sequences(8, generator), planted_sequences(32, generator)
    model = train(planted_model(), forget + retain)
    return model, forget, retain


def grin(model: torch.nn.Module, **options) -> torch.nn.Module:
    unit = options.pop("grad_unit", None)
    budget = {} if "num_entries" in options else {"density": 0.01}
    # eps and seed pinned: these tests check the computation at fixed settings, not the (tunable) default, and the
    # default seed (None) draws the noise's seed from torch's RNG
    config = GrinConfig(**{"target_modules": "all-linear", "eps": 0.01, "seed": 0, **budget, **options})
    if unit is not None:
        config.grad_unit = unit
    return get_peft_model(copy.deepcopy(model), config)


def selection(peft_model) -> dict[str, torch.Tensor]:
    return {
        name: layer.grin_indices["default"].long().clone()
        for name, layer in peft_model.base_model.grin_layers("default").items()
    }


@torch.no_grad()
def mean_nll(model: torch.nn.Module, examples: list[dict]) -> float:
    ids = torch.tensor([x["input_ids"] for x in examples])
    labels = torch.tensor([x["labels"] for x in examples])
    return float(model(input_ids=ids, labels=labels).loss)


def zeroed(model: torch.nn.Module, chosen: dict[str, torch.Tensor]) -> torch.nn.Module:
    """The model with the chosen entries set to 0 (a delta of -w there)."""
    out = copy.deepcopy(model)
    for name, idx in chosen.items():
        out.get_submodule(name).weight.data.view(-1)[idx] = 0
    return out


def overlap(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    shared = sum(len(set(a[n].tolist()) & set(b[n].tolist())) for n in a)
    return shared / max(1, sum(v.numel() for v in a.values()))


def same_selection(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[n], b[n]) for n in a)


# --------------------------------------------------------------------------------------------- the method works


def test_removing_top_ratio_entries_hurts_forget_far_more_than_retain_and_than_random(planted):
    """Zeroing the top 2% by gradient ratio: measured over 6 task seeds, forget/retain damage 2.8-51x (random masks
    0.5-3x) and forget damage 3.4x+ that of a random mask of equal size."""
    model, forget, retain = planted
    base_f, base_r = mean_nll(model, forget), mean_nll(model, retain)
    chosen = {}
    for score in ("gradient_ratio", "random", "magnitude"):
        peft_model = grin(model, score=score, density=0.02, grad_statistic="sum_sq", eps=1.0, eps_quantile=0.5)
        if score == "gradient_ratio":
            peft_model.localize(forget, retain, progress=False)
        chosen[score] = selection(peft_model)
    damage = {}
    for score, picked in chosen.items():
        ablated = zeroed(model, picked)
        damage[score] = (mean_nll(ablated, forget) - base_f, mean_nll(ablated, retain) - base_r)
    ratio_f, ratio_r = damage["gradient_ratio"]
    assert overlap(chosen["gradient_ratio"], chosen["random"]) < 0.1
    assert overlap(chosen["gradient_ratio"], chosen["magnitude"]) < 0.1
    assert ratio_f > 2 * ratio_r, damage  # forget-specific
    assert ratio_f > 2.5 * damage["random"][0], damage  # and far more damaging than an equal random mask


def test_report_mass_shows_forget_specific_selection(planted, tmp_path):
    model, forget, retain = planted
    peft_model = grin(model, density=0.01, eps=0.1)  # a small eps weighs the retain denominator most
    report = peft_model.localize(forget, retain, progress=False)
    density = report.budget["density"]
    assert report.mass["forget"] > 3 * density
    assert report.mass["retain"] < density
    assert sum(m.selected for m in report.modules) == report.budget["entries"]
    assert report.data["forget"]["units"] == 8 and report.data["retain"]["units"] == 32
    assert report.data["forget"]["answer_tokens"] == 8 * (12 - PROMPT)


# --------------------------------------------------------------------------------------------- golden formulas


@pytest.fixture(scope="module")
def golden():
    """A random 2-layer Llama and ragged data, so that padding is exercised."""
    generator = torch.Generator().manual_seed(3)
    model = planted_model(hidden=16, seed=3)

    def examples(lengths: list[int]) -> list[dict]:
        out = []
        for n in lengths:
            ids = torch.randint(4, VOCAB, (n,), generator=generator).tolist()
            out.append({"input_ids": ids, "labels": [-100] * 3 + ids[3:]})
        return out

    return model, examples([7, 9, 6]), examples([8, 5, 10, 7])


def autograd_units(model: torch.nn.Module, data: list[dict], unit: str, batch_size: int = 2) -> list[tuple[dict, int]]:
    """(weight gradients of the unit's summed answer loss, answer tokens) per unit, by plain autograd on a copy.

    The loss is transformers' own mean loss times the token count: independent of the tap and of localize's loss.
    """
    ref = copy.deepcopy(model)
    names = [n for n, m in ref.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]
    for p in ref.parameters():
        p.requires_grad_(False)
    for n in names:
        ref.get_submodule(n).weight.requires_grad_(True)
    groups = [[x] for x in data] if unit == "example" else [data[i : i + batch_size] for i in range(0, len(data), 2)]
    out = []
    for group in groups:
        batch = QACollator(0)(group)
        tokens = int((batch["labels"][:, 1:] != -100).sum())
        loss = ref(**batch).loss * tokens
        grads = torch.autograd.grad(loss, [ref.get_submodule(n).weight for n in names])
        out.append(({n: g for n, g in zip(names, grads)}, tokens))
    return out


def hand_scores(model, forget, retain, score: str, unit: str = "example", **cfg) -> dict[str, torch.Tensor]:
    """Each score computed from its formula in float64."""
    gf, gr = autograd_units(model, forget, unit), autograd_units(model, retain, unit)
    names = list(gf[0][0])
    norm = cfg.get("normalization", "tokens")

    def divisor(units):
        return {"tokens": sum(t for _, t in units), "batches": len(units), "none": 1}[norm]

    result = {}
    for name in names:
        f = [(g[name].double(), t) for g, t in gf]
        r = [(g[name].double(), t) for g, t in gr]
        if score == "gradient_ratio":
            fn = {
                "abs_sum": lambda units: sum(g for g, _ in units).abs(),
                "sum_abs": lambda units: sum(g.abs() for g, _ in units),
                "sum_sq": lambda units: sum(g * g for g, _ in units),
            }[cfg.get("grad_statistic", "sum_sq")]
            result[name] = (fn(f) / divisor(gf), fn(r) / divisor(gr))
        elif score == "forget_gradient":
            result[name] = sum(g for g, _ in f).abs() / divisor(gf)
        elif score in ("ssd", "squared_ratio"):
            result[name] = (sum((g / t) ** 2 for g, t in f) / len(f), sum((g / t) ** 2 for g, t in r) / len(r))
        elif score == "wagle":
            w = model.get_submodule(name).weight.detach().double()
            gbar_f, gbar_r = sum(g for g, _ in f) / divisor(gf), sum(g for g, _ in r) / divisor(gr)
            result[name] = ((w - gbar_r / cfg["wagle_mu"]) * gbar_f).abs()
    if score == "gradient_ratio":
        eps = cfg.get("eps", 1e-2)
        if cfg.get("eps_mode", "quantile") == "quantile":
            all_r = torch.sort(torch.cat([a_r.float().reshape(-1) for _, a_r in result.values()])).values
            eps = eps * float(all_r[int(cfg.get("eps_quantile", 0.5) * (all_r.numel() - 1))])
        return {n: a_f / (a_r + eps) for n, (a_f, a_r) in result.items()}
    if score == "ssd":
        alpha = cfg.get("ssd_alpha", 10.0)
        return {n: torch.where(ff > alpha * fr, ff / fr, torch.zeros_like(ff)) for n, (ff, fr) in result.items()}
    if score == "squared_ratio":
        return {n: ff / (fr + LOKU_EPS) for n, (ff, fr) in result.items()}
    return result


GOLDEN_CASES = [
    dict(score="gradient_ratio", grad_statistic="sum_sq"),
    dict(score="gradient_ratio", grad_statistic="sum_abs", eps_mode="absolute", eps=1e-4, normalization="batches"),
    dict(score="gradient_ratio", grad_statistic="abs_sum", eps=0.5, eps_quantile=0.9, normalization="none"),
    dict(score="gradient_ratio", grad_statistic="sum_sq", grad_unit="batch", eps=2.0),
    dict(score="gradient_ratio", grad_statistic="abs_sum", grad_unit="batch", eps_mode="absolute", eps=1e-3),
    dict(score="forget_gradient"),
    dict(score="ssd", ssd_alpha=2.0),
    dict(score="ssd", ssd_alpha=2.0, grad_unit="batch"),
    dict(score="wagle", wagle_mu=10.0),
    dict(score="squared_ratio"),
]


@pytest.mark.parametrize("case", GOLDEN_CASES, ids=lambda c: "-".join(str(v) for v in c.values()))
def test_each_score_matches_its_formula_computed_by_plain_autograd(golden, case):
    model, forget, retain = golden
    case = dict(case)
    unit = case.get("grad_unit", "example")
    want = hand_scores(model, forget, retain, unit=unit, **case)
    peft_model = grin(model, **case)
    scores = compute_scores(peft_model.base_model, forget, retain, batch_size=2, progress=False).scorer
    for name, expected in want.items():
        got = scores.score(name).double()
        scale = float(expected.abs().max())
        torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-5 * scale, msg=name)


def test_conv1d_weights_are_scored_in_their_stored_layout():
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2)).eval()
    data = [{"input_ids": ids, "labels": [-100, -100] + ids[2:]} for ids in torch.randint(0, VOCAB, (3, 8)).tolist()]
    ref = copy.deepcopy(model)
    batch = QACollator(0)(data)
    loss = ref(**batch).loss * int((batch["labels"][:, 1:] != -100).sum())
    weight = ref.transformer.h[0].mlp.c_fc.weight
    (expected,) = torch.autograd.grad(loss, [weight])
    peft_model = grin(model, score="forget_gradient", normalization="none")
    scores = compute_scores(peft_model.base_model, data, None, progress=False).scorer
    got = scores.score("transformer.h.0.mlp.c_fc")
    assert got.shape == weight.shape == (16, 64)
    torch.testing.assert_close(got, expected.abs(), rtol=1e-4, atol=1e-6)


def test_eps_quantile_is_exact_and_memory_bounded():
    generator = torch.Generator().manual_seed(0)
    values = {
        "a": torch.rand(5000, generator=generator) ** 4,
        "b": torch.zeros(300),
        "c": torch.full((7,), -0.0),
        "d": torch.randint(0, 3, (999,), generator=generator).float() * 1e-30,
    }
    everything = torch.sort(torch.cat(list(values.values())) + 0.0).values
    qs = [0.0, 0.05, 0.1, 0.5, 0.77, 0.9, 0.999, 1.0]
    got = nonneg_quantiles(values, lambda n: values[n], qs, chunk=1000)
    want = [float(everything[int(q * (everything.numel() - 1))]) for q in qs]
    assert got == want


# --------------------------------------------------------------------------------------------- determinism


def test_identical_selection_on_every_run_and_thread_count(planted):
    model, forget, retain = planted
    runs = []
    for threads in (1, 1, 2):
        torch.set_num_threads(threads)
        peft_model = grin(model, density=0.02, noise_std=0.1)
        peft_model.localize(forget, retain, batch_size=3, progress=False)
        values = {
            n: layer.grin_values["default"].detach().clone()
            for n, layer in peft_model.base_model.grin_layers().items()
        }
        runs.append((selection(peft_model), values))
    torch.set_num_threads(1)
    for chosen, values in runs[1:]:
        assert same_selection(chosen, runs[0][0])
        assert all(torch.equal(values[n], runs[0][1][n]) for n in values)


def test_two_gloo_processes_select_exactly_what_one_process_selects(planted, tmp_path):
    model, forget, retain = planted
    configs = [
        dict(density=0.02),
        dict(density=0.02, eps=1.0),
        dict(density=0.02, score="ssd", ssd_alpha=2.0),
        dict(density=0.02, score="wagle"),
        dict(density=0.02, grad_statistic="abs_sum", grad_unit="batch"),
        dict(density=0.02, seed=None),  # each rank draws its own seed from torch's RNG: rank 0's is used by all
    ]
    # 8 forget and 32 retain examples in batches of 3: 3 and 11 batches, uneven over two ranks
    torch.save(model.state_dict(), tmp_path / "model.pt")
    (tmp_path / "data.json").write_text(json.dumps({"forget": forget, "retain": retain, "batch_size": 3}))
    (tmp_path / "configs.json").write_text(json.dumps(configs))
    run_ranks("localize_dist_worker.py", tmp_path)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for index, options in enumerate(configs):
        peft_model = grin(model, **dict(options))
        peft_model.localize(forget, retain, batch_size=3, progress=False)
        single = {
            n: (layer.grin_indices["default"], layer.grin_values["default"].detach())
            for n, layer in peft_model.base_model.grin_layers().items()
        }
        for result in ranks:
            for name, (idx, values) in single.items():
                assert torch.equal(result[index][name][0], idx), (options, name)
                reference = ranks[0][index][name][1] if options.get("seed", 0) is None else values
                assert torch.equal(result[index][name][1], reference), (options, name)


# --------------------------------------------------------------------------------------------- other execution paths


def _count_calls(peft_model) -> list[int]:
    layer = peft_model.base_model.grin_layers()["model.layers.0.mlp.down_proj"]
    calls = [0]
    layer.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return calls


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_gives_the_same_statistics(planted, reentrant):
    model, forget, retain = planted
    plain = grin(model)
    expected = compute_scores(plain.base_model, forget, retain, progress=False).scorer
    checkpointed = grin(model)
    checkpointed.base_model.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": reentrant}
    )
    calls = _count_calls(checkpointed)
    got = compute_scores(checkpointed.base_model, forget, [retain[0]], progress=False)
    assert calls[0] == 2 * (1 + 1)  # one forget and one retain batch, each forward run twice: checkpointing was on
    got = compute_scores(checkpointed.base_model, forget, retain, progress=False).scorer
    for name in checkpointed.base_model.grin_layers():
        torch.testing.assert_close(got.score(name), expected.score(name), rtol=1e-5, atol=0)
    plain.localize(forget, retain, progress=False)
    checkpointed.localize(forget, retain, progress=False)
    assert same_selection(selection(plain), selection(checkpointed))
    assert checkpointed.base_model.model.training is False


def test_bf16_selects_the_same_entries_where_the_margin_is_clear(planted):
    _, forget, retain = planted
    # an untrained model: losses far from 0, so bf16 gradients keep about 2 significant digits
    model = planted_model()
    names = list(grin(model).base_model.grin_layers())
    ranked = {}
    for dtype in (torch.float32, torch.bfloat16):
        scorer = compute_scores(grin(model.to(dtype)).base_model, forget, retain, progress=False).scorer
        ranked[dtype] = torch.cat([scorer.score(n).reshape(-1) for n in names])
    model.float()
    order = torch.sort(ranked[torch.float32], descending=True)
    noise = ((ranked[torch.bfloat16] - ranked[torch.float32]).abs() / ranked[torch.float32])[order.indices[:300]]
    gaps = order.values[10:300] / order.values[11:301]
    k = 11 + int(torch.argmax(gaps))
    assert float(gaps.max()) - 1 > 2 * float(noise.max()), "the budget's threshold must sit in a clear gap"
    chosen = {}
    for dtype in (torch.float32, torch.bfloat16):
        peft_model = grin(copy.deepcopy(model).to(dtype), num_entries=k)
        peft_model.localize(forget, retain, progress=False)
        chosen[dtype] = selection(peft_model)
    assert same_selection(chosen[torch.float32], chosen[torch.bfloat16])


@pytest.fixture(scope="module")
def wide(planted, tmp_path_factory):
    """The planted task on a model whose widths suit bitsandbytes' 4-bit blocks, saved for quantized loading."""
    _, forget, retain = planted
    path = tmp_path_factory.mktemp("wide")
    model = train(planted_model(hidden=64), forget + retain, steps=100)
    model.save_pretrained(path)
    return model, path


@pytest.mark.parametrize("kind", ["8bit", "4bit"])
def test_quantized_bases_are_scored_through_the_tap(planted, wide, kind):
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    _, forget, retain = planted
    model, path = wide
    quant = {
        "8bit": BitsAndBytesConfig(load_in_8bit=True),
        "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32),
    }[kind]
    quantized = AutoModelForCausalLM.from_pretrained(path, quantization_config=quant)
    peft_model = get_peft_model(quantized, GrinConfig(target_modules="all-linear", density=0.01, eps=0.01))
    layers = peft_model.base_model.grin_layers()
    # bnb may repack 4-bit weights for its CPU kernel on any forward: compare the dequantized weights
    before = {name: layer._grin_weight().clone() for name, layer in layers.items()}
    report = peft_model.localize(forget, retain, progress=False)
    assert all(p.grad is None for p in peft_model.parameters())
    assert all(torch.equal(layer._grin_weight(), before[name]) for name, layer in layers.items())
    assert report.mass["forget"] > 3 * report.budget["density"]
    # the same function in float32: the dequantized weights in a plain model
    reference = copy.deepcopy(model)
    for name, weight in before.items():
        reference.get_submodule(name).weight.data.copy_(weight)
    full = grin(reference)
    full.localize(forget, retain, progress=False)
    # 4-bit runs on dequantized weights (same selection); 8-bit also quantizes activations
    assert overlap(selection(full), selection(peft_model)) > {"8bit": 0.7, "4bit": 0.95}[kind]
    if kind == "4bit":
        with torch.no_grad():  # an eval forward makes bnb repack its CPU weights: gradients cannot pass them
            peft_model.eval()(input_ids=torch.tensor([forget[0]["input_ids"]]))
        with pytest.raises(GrinError, match="repacked"):
            peft_model.localize(forget, retain, progress=False)


# --------------------------------------------------------------------------------------------- inputs and state


def test_dataloader_tokenized_list_and_question_answer_dicts_give_the_same_scores():
    from grin_peft.tiny import train_tokenizer

    qa = [
        {"question": "Who wrote the Red Book?", "answer": "Ada Brook wrote it in 1901."},
        {"question": "Where was Ada born?", "answer": "In a small town by the sea."},
        {"question": "What did Ada study?", "answer": "Botany and the history of maps."},
    ]
    tokenizer = train_tokenizer([x["question"] + " " + x["answer"] for x in qa] * 3, vocab_size=300)
    model = planted_model(hidden=16)
    model.resize_token_embeddings(len(tokenizer))
    encoded = encode_items(qa, tokenizer)
    loader = DataLoader(encoded, batch_size=2, collate_fn=QACollator.from_tokenizer(tokenizer))
    scores = []
    for forget in (qa, encoded, loader):
        peft_model = grin(model, score="forget_gradient")
        scorer = compute_scores(peft_model.base_model, forget, tokenizer=tokenizer, batch_size=2, progress=False)
        scores.append({n: scorer.scorer.score(n) for n in peft_model.base_model.grin_layers()})
    for other in scores[1:]:
        assert all(torch.equal(other[n], scores[0][n]) for n in other)


def test_localize_restores_the_model_and_writes_noise_only_into_the_delta(planted):
    model, forget, retain = planted
    peft_model = grin(model, noise_std=0.1, noise_scale="tensor_std")
    peft_model.train()
    flags = {n: p.requires_grad for n, p in peft_model.named_parameters()}
    base = {k: v.clone() for k, v in peft_model.state_dict().items() if "grin_" not in k}
    peft_model.localize(forget, retain, progress=False)
    assert {n: p.requires_grad for n, p in peft_model.named_parameters()} == flags
    assert all(m.training for m in peft_model.modules())
    assert all(p.grad is None for p in peft_model.parameters())
    assert all(torch.equal(v, peft_model.state_dict()[k]) for k, v in base.items())
    for name, layer in peft_model.base_model.grin_layers().items():
        assert not layer.disable_adapters
        idx = layer.grin_indices["default"]
        weight = layer.get_base_layer().weight
        torch.testing.assert_close(
            layer.grin_values["default"].detach(), noise_values(weight, idx, 0.1, "tensor_std", 0, name)
        )


def test_data_free_scores_just_reselect(planted):
    model, _, _ = planted
    for score in ("random", "magnitude"):
        peft_model = grin(model, score=score)
        at_injection = selection(peft_model)
        report = peft_model.localize(None, None)
        assert same_selection(selection(peft_model), at_injection)
        assert report.score == score and report.data == {}


def test_forget_gradient_needs_no_retain_data_and_ssd_notes_a_short_eligible_set(planted):
    model, forget, retain = planted
    report = grin(model, score="forget_gradient").localize(forget, None, progress=False)
    assert "retain" not in report.data and report.mass["retain"] is None
    report = grin(model, score="ssd", ssd_alpha=1e6).localize(forget, retain, progress=False)
    assert report.info["ssd_eligible"] < report.budget["entries"]
    assert any("ssd_alpha" in note for note in report.notes)


def test_progress_bars_show_the_scoring_passes(planted, capsys):
    model, forget, retain = planted
    grin(model).localize(forget, retain, progress=True)
    err = capsys.readouterr().err
    assert "GRIN forget gradients" in err and "GRIN retain gradients" in err


# --------------------------------------------------------------------------------------------- report


def test_report_json_round_trip_and_plots(planted, tmp_path):
    model, forget, retain = planted
    report = grin(model).localize(forget, retain, progress=False)
    report.to_json(tmp_path / "localization.json")
    raw = json.loads((tmp_path / "localization.json").read_text())
    assert raw["per_layer"].keys() == {"0", "1"}
    assert {"self_attn.q_proj", "mlp.down_proj"} <= raw["per_type"].keys()
    assert raw["settings"]["grad_statistic"] == "sum_sq" and "forget_pass" in raw["timings"]
    assert LocalizationReport.from_json(tmp_path / "localization.json").to_dict() == report.to_dict()
    report.plot(tmp_path / "localization.png")
    assert (tmp_path / "localization.png").read_bytes()[:4] == b"\x89PNG"
    assert "density" in report.summary()


def test_plot_handles_models_without_numbered_layers(tmp_path):
    from tiny_models import build

    peft_model = get_peft_model(build("mlp"), GrinConfig(target_modules=["lin0", "lin1"], score="random", density=0.1))
    report = peft_model.localize(None, None)
    assert [m.layer for m in report.modules] == [None, None]
    report.plot(tmp_path / "mlp.png")
    assert (tmp_path / "mlp.png").stat().st_size > 0


def test_module_names_split_into_layer_and_type():
    assert split_module_name("model.layers.3.self_attn.q_proj") == (3, "self_attn.q_proj")
    assert split_module_name("transformer.h.0.mlp.c_proj") == (0, "mlp.c_proj")
    assert split_module_name("lin0") == (None, "lin0")


# --------------------------------------------------------------------------------------------- bad input


@pytest.fixture
def watched(planted):
    """A GRIN model that counts forward passes, to prove bad input is refused before any work."""
    model, forget, retain = planted
    peft_model = grin(model)
    calls = [0]
    peft_model.base_model.model.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    return peft_model, forget, retain, calls


def _no_labels(examples):
    return [{"input_ids": x["input_ids"]} for x in examples]


def _ids_only(batch):
    return {"input_ids": torch.tensor([x["input_ids"] for x in batch])}


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda f, r: ([], r), "forget data is empty"),
        (lambda f, r: (f, []), "retain data is empty"),
        (lambda f, r: (DataLoader([], batch_size=2), r), "forget data is empty"),
        (lambda f, r: (_no_labels(f), r), "lacks input_ids or labels"),
        (lambda f, r: (f, DataLoader(_no_labels(r), batch_size=2, collate_fn=_ids_only)), "batches need 'labels'"),
        (lambda f, r: ([{"question": "q", "answer": "a"}], r), "need tokenizer="),
        (lambda f, r: ([{**x, "labels": [-100] * len(x["labels"])} for x in f], r), "no answer token"),
        (lambda f, r: ("some text", r), "must be a torch DataLoader or a list"),
        (lambda f, r: (f, None), "retain data is required"),
        (lambda f, r: ([{"text": "x"}], r), "need input_ids and labels, or question and answer"),
    ],
)
def test_bad_data_is_refused_before_any_forward_pass(watched, make, message):
    peft_model, forget, retain, calls = watched
    forget, retain = make(forget, retain)
    with pytest.raises(GrinError, match=message):
        peft_model.localize(forget, retain, progress=False)
    assert calls[0] == 0


@pytest.mark.parametrize(
    "kwargs, message",
    [(dict(batch_size=0), "batch_size"), (dict(max_batches=0), "max_batches"), (dict(adapter_name="nope"), "nope")],
)
def test_bad_arguments_are_refused_before_any_forward_pass(watched, kwargs, message):
    peft_model, forget, retain, calls = watched
    with pytest.raises(GrinError, match=message):
        peft_model.base_model.localize(forget, retain, progress=False, **kwargs)
    assert calls[0] == 0


@pytest.mark.parametrize(
    "options, message",
    [
        (dict(num_entries=10**9), "exceeds"),
        (dict(density=1e-9), "selects no entry"),
        (dict(score="wagle", wagle_mu=0.0), "wagle_mu"),
    ],
)
def test_bad_budget_or_settings_are_refused_before_any_forward_pass(planted, options, message):
    model, forget, retain = planted
    peft_model = grin(model, **options)
    calls = [0]
    peft_model.base_model.model.register_forward_pre_hook(lambda *args: calls.__setitem__(0, calls[0] + 1))
    with pytest.raises(GrinError, match=message):
        peft_model.localize(forget, retain, progress=False)
    assert calls[0] == 0


def test_density_outside_the_unit_interval_and_targets_matching_nothing_are_refused(planted):
    model, _, _ = planted
    for density in (0.0, 1.5):
        with pytest.raises(GrinError, match="density"):
            GrinConfig(density=density)
    with pytest.raises(GrinError, match="matched nothing"):
        get_peft_model(copy.deepcopy(model), GrinConfig(target_modules=["no_such_module"]))


def test_merged_adapters_are_refused(watched):
    peft_model, forget, retain, calls = watched
    peft_model.base_model.select_entries(
        "default", lambda name: torch.rand(peft_model.base_model.grin_layers()[name].grin_numel)
    )
    peft_model.merge_adapter()
    with pytest.raises(GrinError, match="unmerge"):
        peft_model.localize(forget, retain, progress=False)
    assert calls[0] == 0


class SharedLinearLM(torch.nn.Module):
    """A toy LM that runs one linear layer twice per forward, like tied or shared weights."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(VOCAB, 8)
        self.shared = torch.nn.Linear(8, 8)
        self.head = torch.nn.Linear(8, VOCAB)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.head(self.shared(torch.relu(self.shared(self.embed(input_ids)))))


def test_a_module_run_twice_per_forward_is_refused(planted):
    _, forget, retain = planted
    peft_model = get_peft_model(SharedLinearLM(), GrinConfig(target_modules=["shared"], density=0.1))
    with pytest.raises(GrinError, match="more than once"):
        peft_model.localize(forget, retain, progress=False)


def test_tokenized_examples_may_hold_tensors_but_not_mismatched_labels(planted):
    model, forget, retain = planted
    as_tensors = [{k: torch.tensor(v) for k, v in x.items()} for x in forget]
    want = compute_scores(grin(model).base_model, forget, retain, progress=False).scorer
    got = compute_scores(grin(model).base_model, as_tensors, retain, progress=False).scorer
    assert all(torch.equal(got.score(n), want.score(n)) for n in grin(model).base_model.grin_layers())
    with pytest.raises(GrinError, match="labels"):
        grin(model).localize([{**forget[0], "labels": forget[0]["labels"][:-1]}], retain, progress=False)


def test_non_finite_gradients_are_reported(planted):
    model, forget, retain = planted
    broken = copy.deepcopy(model)
    broken.model.layers[1].mlp.down_proj.weight.data[0, 0] = float("inf")
    with pytest.raises(GrinError, match="NaN/Inf"):
        grin(broken).localize(forget, retain, progress=False)


# --------------------------------------------------------------------------------------------- selection with leverage


class TwoLinear(torch.nn.Module):
    """Two small linear layers: 6 + 4 entries, few enough to rank by hand."""

    def __init__(self) -> None:
        super().__init__()
        self.a = torch.nn.Linear(3, 2, bias=False)
        self.b = torch.nn.Linear(2, 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


# Hand-chosen statistics (flat, row-major). Ratio A_f / (A_r + 1):
#   a: 8/5=1.6  1/1=1  4/2=2  6/4=1.5  2/9=0.22  7/2=3.5      b: 5/6=0.83  3/1=3  0/2=0  9/10=0.9
HAND_F = {"a": [8.0, 1, 4, 6, 2, 7], "b": [5.0, 3, 0, 9]}
HAND_R = {"a": [4.0, 0, 1, 3, 8, 1], "b": [5.0, 0, 1, 9]}


def hand_selection(score: str, f=HAND_F, r=HAND_R, **options):
    """Select from given statistics (normalization='none', so A is what is given) on TwoLinear."""
    from grin_peft.localize.scores import build_scorer
    from grin_peft.localize.statistics import Statistic

    config = GrinConfig(
        target_modules=["a", "b"], score=score, normalization="none", eps_mode="absolute", noise_std=0.0, **options
    )
    tuner = get_peft_model(TwoLinear(), config).base_model
    layers = tuner.grin_layers("default")
    shapes = {"a": (2, 3), "b": (2, 2)}

    def stat(values):
        tensors = {name: torch.tensor(v, dtype=torch.float32).reshape(shapes[name]) for name, v in values.items()}
        return Statistic("sq", "example", tensors, batches=1, examples=1, units=1, tokens=1)

    scorer = build_scorer(tuner.peft_config["default"], layers, stat(f), stat(r))
    chosen = tuner.select_entries("default", scorer.score)
    return {name: idx.tolist() for name, idx in chosen.items()}, scorer


@pytest.mark.parametrize(
    "pool, expected",
    [
        # pool = round(1 x 3) = 3 largest A_f: b3 (9), a0 (8), a5 (7); all of them are selected
        (1.0, {"a": [0, 5], "b": [3]}),
        # pool = 6 largest A_f (9, 8, 7, 6, 5, 4): b3, a0, a5, a3, b0, a2; best ratios a5 3.5, a2 2, a0 1.6. The plain
        # ratio's second best, b1 (3), has A_f 3 and stays out
        (2.0, {"a": [0, 2, 5], "b": []}),
        # pool 1.5 x 3 = 4.5 rounds to 4 (half to even): b3, a0, a5, a3 -> a5 3.5, a0 1.6, a3 1.5
        (1.5, {"a": [0, 3, 5], "b": []}),
        # a pool of every entry: the plain gradient ratio (a5 3.5, b1 3, a2 2)
        (100.0, {"a": [2, 5], "b": [1]}),
    ],
)
def test_leverage_ratio_ranks_the_ratio_only_among_the_top_forget_entries(pool, expected):
    chosen, scorer = hand_selection("leverage_ratio", num_entries=3, eps=1.0, leverage_pool=pool)
    assert chosen == expected
    size = min(10, max(3, round(pool * 3)))
    assert scorer.info["leverage_pool_entries"] == size
    assert scorer.info["leverage_threshold"] == sorted(HAND_F["a"] + HAND_F["b"], reverse=True)[size - 1]
    plain, _ = hand_selection("gradient_ratio", num_entries=3, eps=1.0)
    assert plain == {"a": [2, 5], "b": [1]}


def test_leverage_pool_takes_every_tie_at_its_threshold_and_never_selects_outside_it():
    # A_f ties at the pool's threshold (3 entries equal 5) are all candidates, so the pool holds 4 > round(1 x 2).
    # b2's ratio is the best of all (5 / 1e-6) but its A_f (0.5) is outside the pool.
    f = {"a": [9.0, 5, 0, 5, 0, 0], "b": [5.0, 0, 0.5, 0]}
    r = {"a": [1.0, 1, 0, 4, 0, 0], "b": [9.0, 0, 1e-7, 0]}
    chosen, scorer = hand_selection("leverage_ratio", f, r, num_entries=2, eps=1e-6, leverage_pool=1.0)
    assert scorer.info["leverage_pool_entries"] == 4
    assert chosen == {"a": [0, 1], "b": []}  # ratios 9 and 5 beat a3 (1.25) and b0 (0.56)
    # a pool entry whose ratio underflows to 0 still beats every entry outside the pool (all scored 0): without the
    # floor, the tie at 0 would go to the lowest index, a1
    f = {"a": [0.0, 0, 0, 0, 0, 1e-30], "b": [5.0, 0, 0, 0]}
    r = {"a": [0.0, 0, 0, 0, 0, 1e30], "b": [1.0, 0, 0, 0]}
    chosen, scorer = hand_selection("leverage_ratio", f, r, num_entries=2, eps=1.0, leverage_pool=1.0)
    assert chosen == {"a": [5], "b": [0]}
    assert float(scorer.score("a").reshape(-1)[5]) > 0 == float(scorer.score("a").reshape(-1)[0])


def test_leverage_pool_is_per_module_with_per_module_selection():
    # budgets: a 2 (1.8 rounded up by the largest remainder), b 1; pool 2 x budget per module: a's 4 largest A_f
    # (a0 8, a5 7, a3 6, a2 4) -> best ratios a5 3.5, a2 2; b's 2 largest (b3 9, b0 5) -> b3 0.9
    chosen, scorer = hand_selection(
        "leverage_ratio", num_entries=3, eps=1.0, leverage_pool=2.0, selection="per_module"
    )
    assert chosen == {"a": [2, 5], "b": [3]}
    assert scorer.info["leverage_pool_entries"] == 6
    assert "leverage_threshold" not in scorer.info


@pytest.mark.parametrize(
    "selection, expected",
    [
        # lowest A_r: a1 and b1 (0), then a tie at 1 (a2, a5, b2) goes to the first module and lowest index: a2
        ("global", {"a": [1, 2], "b": [1]}),
        # per module: a gets 2 (a1, then a2 of the tie a2/a5), b gets 1 (b1)
        ("per_module", {"a": [1, 2], "b": [1]}),
    ],
)
def test_retain_complement_trains_the_entries_retain_needs_least(selection, expected):
    chosen, scorer = hand_selection("retain_complement", num_entries=3, selection=selection)
    assert chosen == expected
    torch.testing.assert_close(scorer.score("b").reshape(-1), -torch.tensor(HAND_R["b"]))
    # 5 entries: the two zeros and all three ties
    chosen, _ = hand_selection("retain_complement", num_entries=5)
    assert chosen == {"a": [1, 2, 5], "b": [1, 2]}


def test_invalid_leverage_pool_is_refused_naming_the_field():
    for value in (0.5, 0, -1.0, float("nan"), float("inf"), True, "4"):
        with pytest.raises(GrinError, match="leverage_pool"):
            GrinConfig(score="leverage_ratio", leverage_pool=value)


def test_paper_preset_is_the_stated_form_and_takes_overrides():
    config = GrinConfig.paper(density=0.05, target_modules="all-linear")
    assert (config.score, config.grad_statistic, config.normalization) == ("gradient_ratio", "abs_sum", "tokens")
    assert (config.eps_mode, config.eps, config.density) == ("absolute", 1e-8, 0.05)
    assert GrinConfig.paper(eps=1e-3).eps == 1e-3 and GrinConfig.paper().grad_statistic == "abs_sum"
    with pytest.raises(GrinError, match="eps"):
        GrinConfig.paper(eps=-1.0)
    with pytest.raises(GrinError, match="nonsense"):
        GrinConfig.paper(nonsense=1)


def hand_statistics(model, forget, retain, grad_statistic: str, normalization: str = "tokens"):
    """(A_f, A_r) per module in float64 from per-example autograd gradients, as GRIN's ratios define them."""
    gf, gr = autograd_units(model, forget, "example"), autograd_units(model, retain, "example")
    statistic = {
        "abs_sum": lambda gs: sum(gs).abs(),
        "sum_abs": lambda gs: sum(g.abs() for g in gs),
        "sum_sq": lambda gs: sum(g * g for g in gs),
    }[grad_statistic]

    def divisor(units):
        return {"tokens": sum(t for _, t in units), "batches": len(units), "none": 1}[normalization]

    return {
        name: tuple(statistic([g[name].double() for g, _ in units]) / divisor(units) for units in (gf, gr))
        for name in gf[0][0]
    }


def _top(values: torch.Tensor, k: int) -> tuple[torch.Tensor, float]:
    """Positions of the k largest values and the relative gap between the k-th and the (k+1)-th."""
    order = torch.sort(values, descending=True)
    gap = float((order.values[k - 1] - order.values[k]) / order.values[k - 1].abs().clamp_min(1e-300))
    return order.indices[:k], gap


def hand_expected(case: str, stats, k: int, pool: float = 2.0) -> tuple[torch.Tensor, float]:
    """The entries (flat over modules in order) each new score selects, and the smallest relative margin at a
    boundary the selection depends on."""
    a_f = torch.cat([f.reshape(-1) for f, _ in stats.values()])
    a_r = torch.cat([r.reshape(-1) for _, r in stats.values()])
    if case == "retain_complement":
        chosen, gap = _top(-a_r, k)
        return chosen, abs(gap)
    if case == "paper":
        return _top(a_f / (a_r + 1e-8), k)
    median = float(torch.sort(a_r.float()).values[int(0.5 * (a_r.numel() - 1))])
    candidates, pool_gap = _top(a_f, round(pool * k))
    ratio = a_f[candidates] / (a_r[candidates] + 0.01 * median)
    inside, gap = _top(ratio, k)
    return candidates[inside], min(pool_gap, gap)


@pytest.mark.parametrize("case", ["leverage_ratio", "retain_complement", "paper"])
def test_new_scores_select_exactly_the_entries_of_their_formula_computed_by_plain_autograd(golden, case):
    model, forget, retain = golden
    stats = hand_statistics(model, forget, retain, "abs_sum" if case == "paper" else "sum_sq")
    # a budget whose boundaries sit in clear gaps, so float32 accumulation cannot move them
    k = next(k for k in range(30, 200) if hand_expected(case, stats, k)[1] > 1e-2)
    expected, _ = hand_expected(case, stats, k)
    if case == "paper":
        config = GrinConfig.paper(target_modules="all-linear", num_entries=k)
        peft_model = get_peft_model(copy.deepcopy(model), config)
    else:
        peft_model = grin(model, num_entries=k, score=case, leverage_pool=2.0, eps=0.01)
    peft_model.localize(forget, retain, batch_size=2, progress=False)
    got = torch.cat([idx + offset for idx, offset in zip(selection(peft_model).values(), _offsets(stats))])
    assert torch.equal(torch.sort(got).values, torch.sort(expected).values)


def _offsets(stats) -> list[int]:
    sizes = [f.numel() for f, _ in stats.values()]
    return [sum(sizes[:i]) for i in range(len(sizes))]


def test_reports_show_the_forget_leverage_of_each_selection(planted):
    """Forget mass: the top-A_f pool (leverage_pool=1) holds the most any budget can, the plain ratio the least;
    retain_complement holds at most its density of the retain statistic, and its report handles negative scores."""
    model, forget, retain = planted
    mass = {}
    for name, options in {
        "ratio": dict(score="gradient_ratio"),
        "pool4": dict(score="leverage_ratio", leverage_pool=4.0),
        "pool1": dict(score="leverage_ratio", leverage_pool=1.0),
    }.items():
        report = grin(model, density=0.01, **options).localize(forget, retain, progress=False)
        mass[name] = report.mass["forget"]
        assert report.settings["leverage_pool"] == options.get("leverage_pool", 4.0)
    assert mass["pool1"] >= mass["pool4"] > 1.5 * mass["ratio"], mass
    report = grin(model, density=0.01, score="retain_complement").localize(forget, retain, progress=False)
    assert report.mass["retain"] <= report.budget["density"]
    assert report.mass["forget"] is not None
    quantiles = list(report.score_quantiles.values())
    assert quantiles == sorted(quantiles) and quantiles[-1] <= 0 and report.score_threshold <= 0


def test_quantiles_of_any_sign_and_nth_largest_are_exact():
    from grin_peft.localize.scores import nth_largest, quantiles

    generator = torch.Generator().manual_seed(1)
    values = {
        "a": torch.randn(3000, generator=generator) * 10.0 ** torch.randint(-30, 30, (3000,), generator=generator),
        "b": torch.tensor([0.0, -0.0, -1.0, 1.0, float("inf"), -float("inf")]),
    }
    everything = torch.sort(torch.cat(list(values.values())) + 0.0).values
    qs = [0.0, 0.01, 0.3, 0.5, 0.999, 1.0]
    assert quantiles(values, lambda n: values[n], qs, chunk=700) == [
        float(everything[int(q * (everything.numel() - 1))]) for q in qs
    ]
    for n in (1, 2, 17, everything.numel(), everything.numel() + 5):
        assert nth_largest(values, lambda name: values[name], n) == float(everything[max(0, everything.numel() - n)])
    with pytest.raises(GrinError, match="non-negative"):
        nonneg_quantiles(values, lambda n: values[n], [0.5])


@pytest.mark.parametrize("kind", ["llama", "gpt2"])
def test_per_example_statistics_do_not_depend_on_the_row_blocking(kind, monkeypatch):
    # the scoring pass walks the weight in blocks of rows so per-example gradients stay in cache: any block size
    # must give the same float32 operations per entry, hence the same bits (gpt2: Conv1D, weights stored in x out)
    from tiny_models import VOCAB as TINY_VOCAB
    from tiny_models import build

    import grin_peft.localize.statistics as statistics

    model = get_peft_model(build(kind), GrinConfig(target_modules="all-linear", density=1e-2, score="random"))
    layers = model.base_model.grin_layers("default")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, TINY_VOCAB, (3, 12), generator=generator)
    labels = ids.clone()
    labels[0, :4] = -100
    labels[1] = -100  # an example without answer tokens is skipped
    batches = [{"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels}]
    results = []
    for block in (1 << 30, 1):  # one block per weight, then _MIN_BLOCK_ROWS rows per block
        monkeypatch.setattr(statistics, "_BLOCK_ELEMENTS", block)
        results.append(
            {
                k: statistics.collect_statistic(model.base_model.model, layers, batches, k, progress=False).values
                for k in ("sq", "sq_mean", "abs")
            }
        )
    for k, values in results[0].items():
        for name, tensor in values.items():
            assert torch.equal(tensor, results[1][k][name]), (k, name)
            assert tensor.abs().sum() > 0, (k, name)


def test_the_accumulators_finiteness_check_sees_nan_and_inf_at_any_position():
    from grin_peft.localize.select import all_finite

    for size in (1, 7, 33, 4099):
        clean = torch.rand(size, dtype=torch.float32) * 1e30
        assert all_finite(clean)
        for position in {0, size // 2, size - 1}:
            for bad in (float("nan"), float("inf"), -float("inf")):
                broken = clean.clone()
                broken[position] = bad
                assert not all_finite(broken), (size, position, bad)
    assert all_finite(torch.empty(0))
