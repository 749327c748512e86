"""TOFU unlearning benchmark: GRIN against full-parameter, LoRA, SSD and other-selector baselines.

CPU-scale protocol (default; research notes section 7). Everything is read in place from the real TOFU files
(``--data``, default ``<repo>/../shared/data/tofu``; nothing is copied into the repository):

1. A byte-level BPE tokenizer (3072 ids) trained on all TOFU text (questions, answers, paraphrases, perturbations).
2. The **target**: a Llama built from a config (hidden 128, 2 layers, 4 heads, 1.3M parameters) trained from
   scratch to memorise ``full`` + ``real_authors`` + ``world_facts`` ("Question: q\\nAnswer: a</s>", loss on answer
   tokens; 30 epochs, batch 32, AdamW 2e-3 cosine, bf16 autocast), standing in for TOFU's finetuned Llama-2.
3. The **reference** for forget quality: the same recipe on ``retain90`` (``retain95``/``retain99`` for
   forget05/forget01) + ``real_authors`` + ``world_facts``. Both are cached in ``~/.cache/grin_peft/tofu/<key>``
   (keyed by data bytes and every setting; built in a staging directory and renamed, so never half-written).
4. Every method unlearns ``forget10`` (``--forget``) starting from the target, through the same
   :class:`~grin_peft.trainer.UnlearningTrainer`: same objective and hyper-parameters (NPO beta 0.1, retain weight 1),
   same number of steps (``--epochs`` passes over the forget set, batch 32 forget + 32 retain), same seed and so the
   same forget/retain pairing, same bf16 autocast. Only the parameterisation and its learning rate differ
   (``--lr-full``/``--lr-lora``/``--lr-grin``: a learning rate is a property of a parameterisation, a 1% sparse
   delta needs far larger steps than full fine-tuning; the defaults come from the pilot sweep recorded in
   ``benchmarks/results/tofu_forget10_lr_sweep.*``, chosen by the rule in :func:`choose_learning_rates`).
5. Evaluation with open-unlearning's definitions (:func:`grin_peft.metrics.evaluate_tofu`) on forget, retain
   (``retain_perturbed``), real_authors, world_facts and holdout: forget quality (KS test of forget truth ratios
   against the reference model's), model utility (harmonic mean of 9 numbers), forget ROUGE-L recall, probability,
   truth ratio, keyword accuracy/confidence, MIA AUC and privleak (reference AUC = the retain model's). Greedy
   generation is capped at the longest gold answer of the evaluated splits plus 8 tokens (no gold answer is cut;
   a babbling unlearned model stops there instead of at 200).

Methods (``--methods`` selects by name; ``--list`` prints them): full-parameter GradAscent/GradDiff/NPO, LoRA r=8
GradDiff/NPO, SSD (alpha 10, lambda 1; no training), GRIN (gradient ratio, 1% of the linear weights, noise 0.1 x
tensor std) with GradDiff and NPO, and GRIN's machinery with the other selectors at the same budget (random,
magnitude, forget_gradient = SalUn, wagle, squared_ratio = LoKU/FILA, ssd score). Ablations (``--ablations``):
noise off, per-module selection, eps 1 x median A_r (default 0.01 x), densities 0.01% .. 5%.

Runs in ``--workers`` single-thread processes (default 2 on a CPU) that share the methods; their reports are
merged into one (a row's ``wall s`` is measured in its worker). ``--merge`` combines reports of separate runs,
``--render`` rewrites a saved report's tables and plot.

Outputs (``--out``, default ``benchmarks/results``): ``tofu_<forget>.json`` (settings, versions, per-method
metrics and timings), ``tofu_<forget>.md`` (tables) and ``tofu_<forget>.png`` (forget quality vs model utility).

    python benchmarks/bench_tofu.py                         # default CPU run (forget10, main methods + ablations)
    python benchmarks/bench_tofu.py --lr-sweep              # the learning-rate pilot (teacher-forced metrics only)
    python benchmarks/bench_tofu.py --lr-sweep --sweep-scores random,wagle --methods mask   # selectors' pilot
    python benchmarks/bench_tofu.py --forget forget05 --no-ablations
    python benchmarks/bench_tofu.py --smoke --out /tmp/x    # seconds: a handful of items, tiny model, 1 epoch
    # paper scale on a GPU: a TOFU-finetuned model and its retain-only counterpart (HF ids or local dirs)
    python benchmarks/bench_tofu.py --model open-unlearning/tofu_Llama-2-7b-chat-hf_full \\
        --reference-model open-unlearning/tofu_Llama-2-7b-chat-hf_retain90 --lr-full 1e-5 --lr-lora 1e-4 --lr-grin 1e-3
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import random
import re
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (  # benchmarks/ is on sys.path when run as a script
    REPO,
    Method,
    atomic_write,
    cache_root,
    cached_dir,
    default_device,
    environment,
    file_digest,
    json_safe,
    load_average,
    markdown_table,
    memorise,
    quiet_transformers,
    run_method,
    set_threads,
    settings_key,
)

import grin_peft  # noqa: F401,E402  (registers GRIN with PEFT)
from grin_peft.data import QAFormat, load_tofu  # noqa: E402
from grin_peft.metrics import MIA_ATTACKS, evaluate_qa, evaluate_tofu, forget_quality  # noqa: E402

PROTOCOL = "tofu-cpu-v1"  # bump to invalidate cached target/reference models
DEFAULT_DATA = REPO.parent / "shared" / "data" / "tofu"
TOKENIZER_SPLITS = (
    "full",
    "real_authors",
    "world_facts",
    "forget10_perturbed",
    "retain_perturbed",
    "real_authors_perturbed",
    "world_facts_perturbed",
    "holdout10",
)
FORGET_TO_RETAIN = {"forget01": "retain99", "forget05": "retain95", "forget10": "retain90"}


@dataclass(frozen=True)
class TinySettings:
    """Everything that determines a cached tiny TOFU model (the cache key hashes all of it and the data bytes)."""

    vocab_size: int = 3072
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    epochs: int = 30
    lr: float = 2e-3
    batch_size: int = 32
    seed: int = 0
    bf16: bool = True
    max_items: int | None = None  # smoke runs only: the first N items of every training split


def _log(message: str) -> None:
    tag = os.environ.get("BENCH_TOFU_WORKER")
    print(f"[worker {tag}] {message}" if tag else message, flush=True)


# ------------------------------------------------------------------------------------------------ tiny models


def tofu_files(data: Path, splits: Sequence[str]) -> list[Path]:
    return [data / f"{split}.json" for split in splits]


def tokenizer_corpus(data: Path) -> list[str]:
    """Every string the benchmark tokenises, prompts in their trained layout so template words merge."""
    texts: list[str] = []
    for split in TOKENIZER_SPLITS:
        for item in load_tofu(split, data):
            texts.append(f"Question: {item['question']}\nAnswer: {item['answer']}")
            if "paraphrased_answer" in item:
                texts.append(item["paraphrased_answer"])
            texts += list(item.get("perturbed_answer", []))
    return texts


def load_tokenizer(data: Path, settings: TinySettings, root: Path) -> tuple[Any, str]:
    """The cached BPE tokenizer and its key (part of every model key, so models never mix vocabularies)."""
    from transformers import PreTrainedTokenizerFast

    from grin_peft.tiny import train_tokenizer

    key = settings_key(
        {
            "protocol": PROTOCOL,
            "what": "tokenizer",
            "vocab": settings.vocab_size,
            "data": file_digest(tofu_files(data, TOKENIZER_SPLITS)),
        }
    )

    def build(staging: Path) -> dict[str, Any]:
        tokenizer = train_tokenizer(tokenizer_corpus(data), vocab_size=settings.vocab_size)
        tokenizer.save_pretrained(staging)
        return {"vocab_size": len(tokenizer)}

    path, _, _ = cached_dir(root / f"tokenizer-{key}", build)
    return PreTrainedTokenizerFast.from_pretrained(path), key


def train_splits(kind: str, forget: str) -> list[str]:
    """The splits a cached model memorises: the target sees everything, the reference all but the forget set."""
    main = "full" if kind == "target" else FORGET_TO_RETAIN[forget]
    return [main, "real_authors", "world_facts"]


def load_or_train(
    kind: str, forget: str, data: Path, settings: TinySettings, root: Path, tokenizer: Any, tokenizer_key: str
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A cached tiny model (``kind`` target or reference) in float32 eval mode, trained on first use."""
    from transformers import LlamaForCausalLM

    from grin_peft.tiny import build_model, tiny_llama_config

    splits = train_splits(kind, forget)
    key = settings_key(
        {
            "protocol": PROTOCOL,
            "settings": dataclasses.asdict(settings),
            "tokenizer": tokenizer_key,
            "splits": splits,
            "data": file_digest(tofu_files(data, splits)),
        }
    )

    def build(staging: Path) -> dict[str, Any]:
        items = [item for split in splits for item in load_tofu(split, data)[: settings.max_items]]
        config = tiny_llama_config(
            len(tokenizer),
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            num_heads=settings.num_heads,
        )
        model = build_model(config, seed=settings.seed)
        _log(f"training the {kind} model on {'+'.join(splits)} ({len(items)} items; cached afterwards)")
        info = memorise(
            model,
            QAFormat(tokenizer),
            items,
            epochs=settings.epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            seed=settings.seed,
            bf16=settings.bf16,
            log=_log,
        )
        info.update(
            kind=kind,
            splits=splits,
            settings=dataclasses.asdict(settings),
            num_parameters=sum(p.numel() for p in model.parameters()),
            torch_threads=torch.get_num_threads(),
            grin_peft_version=grin_peft.__version__,
        )
        with quiet_transformers():
            model.save_pretrained(staging)
        return info

    path, info, built = cached_dir(root / f"{kind}-{key}", build)
    info = {**info, "cache_dir": str(path), "trained_this_run": built}
    with quiet_transformers():
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, info


# ------------------------------------------------------------------------------------------------ evaluation


def eval_splits(data: Path | str, forget: str, limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """open-unlearning's TOFU evaluation sets (perturbed variants, holdout of the same size), optionally cut."""
    from grin_peft.data import load_tofu_eval_splits

    splits = load_tofu_eval_splits(forget, data)
    return {name: items[:limit] for name, items in splits.items()}


def generation_cap(qa_format: QAFormat, splits: dict[str, list[dict[str, Any]]], margin: int = 8) -> int:
    """Longest gold answer (tokens, EOS included) over the generated splits, plus ``margin``.

    No gold answer is cut, so ROUGE-L recall equals open-unlearning's 200-token setting for a model that stops at
    its EOS; an unlearned model that babbles is stopped here instead of at 200 tokens, which bounds evaluation time.
    """
    longest = 0
    for name in ("forget", "retain", "real_authors", "world_facts"):
        for item in splits.get(name, []):
            enc = qa_format.encode(item["question"], item["answer"])
            longest = max(longest, sum(1 for label in enc["labels"] if label != -100))
    return longest + margin


SUMMARY_KEYS = (
    "forget_quality",
    "model_utility",
    "forget_rouge_l_recall",
    "forget_probability",
    "forget_truth_ratio",
    "forget_keyword_accuracy",
    "forget_keyword_confidence",
    "forget_extraction_strength",
    "retain_probability",
    "retain_rouge_l_recall",
    "retain_truth_ratio",
    "real_authors_rouge_l_recall",
    "world_facts_rouge_l_recall",
)


def evaluate(
    model: torch.nn.Module,
    qa_format: QAFormat,
    splits: dict[str, list[dict[str, Any]]],
    reference: dict[str, Any] | None,
    *,
    max_new_tokens: int,
    batch_size: int,
) -> dict[str, Any]:
    """TOFU's table for one model; ``reference`` (the retain model's own evaluation) gives the KS reference truth
    ratios and the MIA reference AUCs (privleak 0 = as identifiable as for a model that never saw the forget set)."""
    t0 = time.perf_counter()
    result = evaluate_tofu(
        model,
        qa_format,
        splits,
        None if reference is None else reference["forget_truth_ratios"],
        reference_mia_auc=None if reference is None else reference["mia_auc"],
        max_new_tokens=max_new_tokens,
        batch_size=batch_size,
        progress=False,
    )
    summary = result["summary"]
    return {
        "summary": summary,
        "forget_truth_ratios": result["per_item"]["forget"]["truth_ratio"],
        "mia_auc": {attack: summary[f"mia_{attack}_auc"] for attack in MIA_ATTACKS},
        "forget_generations": result["generations"]["forget"][:5],
        "eval_seconds": time.perf_counter() - t0,
    }


# ------------------------------------------------------------------------------------------------ methods


def grin_settings(args: argparse.Namespace, **override: Any) -> dict[str, Any]:
    """GRIN's configuration in this benchmark: the package defaults (sum of squared per-example gradients, eps
    relative to the median retain statistic, noise 0.1 x tensor std) at the benchmark's budget."""
    return {"score": "gradient_ratio", "density": args.density, "seed": args.seed, **override}


# the other selectors run in GRIN's machinery (same budget, noise, objective), by their GrinConfig score names
SCORE_LABELS = {
    "random": "random",
    "magnitude": "magnitude",
    "forget_gradient": "SalUn (forget gradient)",
    "wagle": "WAGLE",
    "squared_ratio": "LoKU/FILA (squared ratio)",
    "ssd": "SSD score",
}


def build_methods(args: argparse.Namespace) -> list[Method]:
    """Every method of the benchmark; ``group`` says which table it belongs to."""
    full, lora, grin = args.lr_full, args.lr_lora, args.lr_grin
    sel_obj = args.selector_objective
    budget = f"{args.density * 100:g}%"
    methods = [
        Method("target (no unlearning)", "none", group="reference"),
        Method("full GradAscent", "full", "grad_ascent", full),
        Method("full GradDiff", "full", "grad_diff", full),
        Method("full NPO", "full", "npo", full),
        Method("LoRA r=8 GradDiff", "lora", "grad_diff", lora),
        Method("LoRA r=8 NPO", "lora", "npo", lora),
        Method("LoRA r=1 NPO (~GRIN 1% budget)", "lora", "npo", lora, lora={"r": 1, "lora_alpha": 2}),
        Method("SSD (a=10, l=1)", "ssd", ssd={"alpha": 10.0, "lam": 1.0}),
        Method("SSD (a=1, l=1)", "ssd", ssd={"alpha": 1.0, "lam": 1.0}),
        Method(f"GRIN {budget} GradDiff", "grin", "grad_diff", grin, grin=grin_settings(args)),
        Method(f"GRIN {budget} NPO", "grin", "npo", grin, grin=grin_settings(args)),
    ]
    obj_name = {"npo": "NPO", "grad_diff": "GradDiff"}.get(sel_obj, sel_obj)
    for score, label in SCORE_LABELS.items():
        methods.append(
            Method(
                f"mask {budget} {label} {obj_name}",
                "grin",
                sel_obj,
                grin,
                grin=grin_settings(args, score=score),
                group="selectors",
            )
        )

    def ablation(name: str, **override: Any) -> Method:
        return Method(name, "grin", sel_obj, grin, grin=grin_settings(args, **override), group="ablation")

    ab = f"GRIN {budget} {obj_name}"
    methods += [
        ablation(f"{ab} without noise", noise_std=0.0),
        ablation(f"{ab} per-module", selection="per_module"),
        ablation(f"{ab} eps=1 x median", eps=1.0),
    ]
    for density in args.ablation_densities:
        if not math.isclose(density, args.density):
            methods.append(ablation(f"GRIN {density * 100:g}% {obj_name}", density=density))
    return methods


def select_methods(methods: list[Method], args: argparse.Namespace) -> list[Method]:
    methods = _select(methods, args)
    if args.only is not None:
        return [methods[int(i)] for i in args.only.split(",")]
    return methods


def _select(methods: list[Method], args: argparse.Namespace) -> list[Method]:
    if args.smoke and args.methods is None and not args.lr_sweep:
        # one of each kind: target, full (with and without reference), LoRA, SSD, GRIN, a selector, an ablation
        budget, other = f"{args.density * 100:g}%", f"{args.ablation_densities[0] * 100:g}%"
        picks = {"target (no unlearning)", "full GradDiff", "full NPO", "LoRA r=8 NPO", "SSD (a=10, l=1)"}
        picks |= {f"GRIN {budget} NPO", f"mask {budget} random NPO", f"GRIN {other} NPO"}
        return [m for m in methods if m.name in picks]
    if args.methods:
        # a token equal to a method's name picks that method only; any other token picks every name containing it
        # commas inside parentheses belong to a name, as in "SSD (a=10, l=1)"
        wanted = [m.strip().lower() for m in re.split(r",(?![^()]*\))", args.methods) if m.strip()]
        names = {m.name.lower() for m in methods}

        def picked(name: str) -> bool:
            return any(name == w if w in names else w in name for w in wanted)

        chosen = [m for m in methods if picked(m.name.lower()) or m.kind == "none"]
        if len(chosen) <= 1:
            raise SystemExit(f"--methods matched nothing; names: {[m.name for m in methods]}")
        return chosen
    if not args.ablations:
        methods = [m for m in methods if m.group != "ablation"]
    if args.no_selectors:
        methods = [m for m in methods if m.group != "selectors"]
    return methods


# ------------------------------------------------------------------------------------------------ output

TABLE_COLUMNS = (
    ("method", "method", "g"),
    ("forget_quality", "forget quality", "e"),
    ("model_utility", "model utility", "g"),
    ("forget_rouge_l_recall", "forget ROUGE-L", "g"),
    ("forget_probability", "forget prob", "g"),
    ("forget_truth_ratio", "forget TR", "g"),
    ("forget_keyword_accuracy", "kw acc", "g"),
    ("forget_keyword_confidence", "kw conf", "g"),
    ("retain_probability", "retain prob", "g"),
    ("retain_rouge_l_recall", "retain ROUGE-L", "g"),
    ("collateral", "retain lost / forget removed", "g"),
    ("privleak_mink", "privleak (MinK)", "g"),
    ("trainable_entries", "trained entries", "g"),
    ("wall_seconds", "wall s", "s"),
)
# Selection diagnostics for the mask tables: the share of the forget / retain gradient statistic (GRIN's A_f, A_r;
# sums of squared per-example gradients by default) that the selected entries hold. A random 1% mask holds ~1%.
MASK_COLUMNS = (*TABLE_COLUMNS, ("mass_forget", "forget mass", "g"), ("mass_retain", "retain mass", "e"))


def collateral(summary: Mapping[str, Any], target: Mapping[str, Any], min_drop: float = 0.05) -> float | None:
    """Retain answer probability lost per unit of forget answer probability removed, both against the target: a
    first-order trade-off that compares methods landing at different amounts of forgetting (lower is better; 0 =
    forgetting for free). None when the forget probability fell by less than ``min_drop`` (a ratio of noise)."""
    drop = target["forget_probability"] - summary["forget_probability"]
    if drop < min_drop:
        return None
    return (target["retain_probability"] - summary["retain_probability"]) / drop


def table_rows(results: list[dict[str, Any]], groups: Sequence[str]) -> list[dict[str, Any]]:
    target = next((r["summary"] for r in results if r["method"].startswith("target") and "summary" in r), None)
    rows = []
    for r in results:
        if r["group"] not in groups:
            continue
        mass = (r.get("localization") or {}).get("mass") or {}
        extra = {"mass_forget": mass.get("forget"), "mass_retain": mass.get("retain")}
        if target is not None and "summary" in r and r["group"] != "reference":
            extra["collateral"] = collateral(r["summary"], target)
        rows.append({"method": r["method"], **r.get("summary", {}), **r.get("cost", {}), **extra})
    return rows


def write_plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Left: forget quality (log) against model utility, the field's headline plot (ideal: top right). Right: forget
    ROUGE-L recall against model utility (ideal: bottom right), which still separates methods where forget
    quality saturates near 0, as it does for tiny models. One marker per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    markers = {"reference": "*", "main": "o", "selectors": "s", "ablation": "^"}
    fig, axes = plt.subplots(1, 2, figsize=(16, 6))
    for r in results:
        s = r.get("summary") or {}
        mu = s.get("model_utility")
        if mu is None:
            continue
        for ax, y in zip(axes, (s.get("forget_quality"), s.get("forget_rouge_l_recall"))):
            if y is None:
                continue
            y = max(y, 1e-300)
            ax.scatter(mu, y, marker=markers.get(r["group"], "o"), s=60)
            ax.annotate(r["method"], (mu, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    axes[0].set_yscale("log")
    axes[0].set_ylabel("forget quality (KS p-value vs retain-only model, log)")
    axes[1].set_ylabel("forget ROUGE-L recall (greedy answer vs gold)")
    for ax in axes:
        ax.set_xlabel("model utility (harmonic mean of 9 retain/real-authors/world-facts metrics)")
        ax.grid(True, which="both", alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_sweep_plot(results: list[dict[str, Any]], path: Path, title: str) -> None:
    """Forget against retain answer probability, one line per parameterisation through its learning rates: the
    trade-off each can reach (ideal: bottom right)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 6))
    for family in dict.fromkeys(r["group"] for r in results):
        runs = sorted(
            (r for r in results if r["group"] == family and "summary" in r),
            key=lambda r: (r.get("config") or {}).get("lr") or 0,
        )
        if not runs:
            continue
        xs = [r["summary"]["retain_probability"] for r in runs]
        ys = [r["summary"]["forget_probability"] for r in runs]
        line = "" if family == "reference" else "-"  # the two reference points are not a trajectory
        ax.plot(xs, ys, marker="*" if family == "reference" else "o", linestyle=line, label=family)
        for r, x, y in zip(runs, xs, ys):
            lr = (r.get("config") or {}).get("lr")
            label = r["method"] if lr is None else f"{lr:g}"  # the legend names the family
            ax.annotate(label, (x, y), fontsize=7, xytext=(4, 2), textcoords="offset points")
    ax.set_xlabel("retain answer probability")
    ax.set_ylabel("forget answer probability")
    ax.legend(title="learning rate rising along each line")
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(report: dict[str, Any], out: Path, stem: str) -> None:
    results = report["results"]
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps(json_safe(report), indent=2))
    s = report["settings"]
    lines = [
        f"# TOFU {s['forget']} unlearning benchmark ({s['scale']})",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Total wall time {report['total_seconds']:.0f} s on {report['environment'].get('cpu_count')} CPU cores, "
        f"{report.get('workers', {}).get('count', 1)} process(es) of "
        f"{report['environment'].get('torch_threads')} torch thread(s); torch {report['environment']['torch']}, "
        f"transformers {report['environment']['transformers']}, peft {report['environment']['peft']}.",
        "",
        f"Models: {json.dumps(report.get('models', {}).get('settings', {}))}",
        "",
        f"Unlearning: {json.dumps(s['train'])}; learning rates full {s['lr_full']}, LoRA {s['lr_lora']}, "
        f"GRIN/masks {s['lr_grin']}; budget {s['density'] * 100:g}% of the linear weights; "
        f"generation cap {s.get('max_new_tokens')} tokens.",
        "",
        "forget quality: KS p-value of forget truth ratios vs the retain-only model (higher = closer to never "
        "trained; the retain model scores 1). model utility: harmonic mean over retain/real_authors/world_facts of "
        "probability, ROUGE-L and truth ratio. privleak: MinK (k=0.4) MIA forget vs holdout, relative to the "
        "retain model's AUC (0 = like the retain model; strongly negative = forget set still identifiable). "
        "kw acc/conf: keyword accuracy of the greedy answer / teacher-forced keyword-token probability on forget. "
        "wall s: localisation + training (or dampening), evaluation excluded.",
        "",
    ]
    titles = {
        "reference": "Reference models",
        "main": "Methods",
        "selectors": f"Other selectors in GRIN's machinery ({s['selector_objective']}, same budget, noise, steps)",
        "ablation": "Ablations",
    }
    for group, title in titles.items():
        rows = table_rows(results, [group])
        if rows:
            columns = MASK_COLUMNS if group in ("selectors", "ablation") else TABLE_COLUMNS
            lines += [f"## {title}", "", markdown_table(rows, columns), ""]
    failures = [r for r in results if r.get("error")]
    if failures:
        lines += ["## Failures", ""] + [f"- {r['method']}: {r['error']}" for r in failures] + [""]
    atomic_write(out / f"{stem}.md", "\n".join(lines))
    try:
        write_plot(results, out / f"{stem}.png", f"TOFU {s['forget']} ({s['scale']}): forget quality vs utility")
    except Exception as error:  # a missing matplotlib must not lose the numbers
        print(f"plot skipped: {error}", file=sys.stderr)


# ------------------------------------------------------------------------------------------------ main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="TOFU folder (JSON Lines, Hub field names).")
    p.add_argument("--forget", default="forget10", choices=sorted(FORGET_TO_RETAIN))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="Output folder.")
    p.add_argument("--stem", default=None, help="Output file stem (default tofu_<forget>, tofu_smoke in --smoke).")
    p.add_argument("--cache-dir", default=None, help="Cache of tiny models (default ~/.cache/grin_peft/tofu).")
    p.add_argument("--model", default=None, help="Paper scale: a TOFU-finetuned causal LM (HF id or folder).")
    p.add_argument("--reference-model", default=None, help="Paper scale: the retain-only model (HF id or folder).")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 is fastest for tiny models).")
    p.add_argument("--epochs", type=float, default=5.0, help="Unlearning passes over the forget set.")
    p.add_argument("--batch-size", type=int, default=32, help="Forget (and retain) examples per step.")
    p.add_argument("--seed", type=int, default=0, help="Unlearning seed: pairing, noise, LoRA init, scoring sample.")
    p.add_argument("--model-seed", type=int, default=0, help="Seed of the cached tiny models (a new one trains them).")
    p.add_argument("--lr-full", type=float, default=1e-3, help="Learning rate of full-parameter methods.")
    p.add_argument("--lr-lora", type=float, default=3e-4, help="Learning rate of LoRA methods.")
    p.add_argument("--lr-grin", type=float, default=3e-3, help="Learning rate of GRIN and the other masks.")
    p.add_argument("--density", type=float, default=0.01, help="GRIN/mask budget: fraction of the linear weights.")
    p.add_argument("--selector-objective", default="npo", help="Objective of the selector and ablation rows.")
    p.add_argument("--ablation-densities", type=lambda s: [float(x) for x in s.split(",")], default=[1e-4, 1e-3, 5e-2])
    p.add_argument("--no-ablations", dest="ablations", action="store_false", help="Skip the ablation rows.")
    p.add_argument("--no-selectors", action="store_true", help="Skip the other-selector rows.")
    p.add_argument(
        "--methods", default=None, help="Comma-separated method names or name substrings to run (target always runs)."
    )
    p.add_argument("--list", action="store_true", help="Print the method names and exit.")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Processes that share the methods (one torch thread each; default: 2 on a CPU with >= 2 cores, else 1; "
        "1 with --model or --smoke). Their reports are merged into one.",
    )
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a worker's share: indices into the methods
    p.add_argument("--prepare", choices=("reference",), default=None, help=argparse.SUPPRESS)  # train, cache, exit
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-limit", type=int, default=None, help="Evaluate only the first N items of every split.")
    p.add_argument(
        "--localize-retain", type=int, default=400, help="Retain sample for scoring passes and SSD (0 = all)."
    )
    p.add_argument("--hidden", type=int, default=TinySettings.hidden_size, help="Tiny model width.")
    p.add_argument("--layers", type=int, default=TinySettings.num_layers, help="Tiny model depth.")
    p.add_argument("--model-epochs", type=int, default=TinySettings.epochs, help="Memorisation epochs.")
    p.add_argument("--lr-sweep", action="store_true", help="Run the learning-rate pilot instead (NPO, cheap eval).")
    floats = lambda text: [float(x) for x in text.split(",") if x.strip()]  # noqa: E731
    p.add_argument("--sweep-full", type=floats, default=[3e-5, 1e-4, 3e-4, 1e-3], help="Pilot grid, full parameters.")
    p.add_argument("--sweep-lora", type=floats, default=[3e-4, 1e-3, 3e-3, 1e-2], help="Pilot grid, LoRA.")
    p.add_argument("--sweep-grin", type=floats, default=[3e-3, 1e-2, 3e-2, 0.1], help="Pilot grid, GRIN.")
    p.add_argument(
        "--sweep-scores",
        type=lambda text: [x.strip() for x in text.split(",") if x.strip()],
        default=[],
        help=f"Pilot: also these selectors on the GRIN grid (of {', '.join(SCORE_LABELS)}).",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Combine reports of runs split over processes (--methods/--stem) into one output, and exit.",
    )
    p.add_argument("--render", default=None, metavar="JSON", help="Rewrite the .md/.png of a saved report, and exit.")
    p.add_argument("--smoke", action="store_true", help="Seconds-long check of the whole code path.")
    p.add_argument("--smoke-items", type=int, default=6, help="Items per split in --smoke.")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.workers is None:
        cpu_scale = not (args.model or args.smoke or default_device().type == "cuda")
        args.workers = 2 if cpu_scale and (os.cpu_count() or 1) >= 2 else 1
    if args.workers < 1:
        p.error("--workers must be >= 1")
    unknown = sorted(set(args.sweep_scores) - set(SCORE_LABELS))
    if unknown:
        p.error(f"--sweep-scores: unknown {unknown}; choose from {sorted(SCORE_LABELS)}")
    if args.smoke:
        args.epochs = min(args.epochs, 1.0)
        args.batch_size = min(args.batch_size, 4)
        args.eval_limit = args.eval_limit or args.smoke_items
        args.ablation_densities = [0.05]
    return args


def tiny_settings(args: argparse.Namespace) -> TinySettings:
    if args.smoke:
        return TinySettings(
            vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, epochs=1, batch_size=8,
            max_items=args.smoke_items,
        )  # fmt: skip
    return TinySettings(
        hidden_size=args.hidden, num_layers=args.layers, epochs=args.model_epochs, seed=args.model_seed
    )


def tiny_setup(args: argparse.Namespace, data: Path) -> tuple[TinySettings, Path, Any, str]:
    """The tiny models' settings, cache folder, tokenizer (trained and cached on first use) and tokenizer key."""
    settings = tiny_settings(args)
    root = Path(args.cache_dir) if args.cache_dir else cache_root("tofu")
    return (settings, root, *load_tokenizer(data, settings, root))


def load_models(args: argparse.Namespace, data: Path) -> tuple[Any, QAFormat, Any, dict[str, Any]]:
    """``(make_target, qa_format, reference_model, info)``: a factory of fresh target copies (each method gets its
    own), the QA layout, the retain-only model and what they are."""
    if args.model:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        device = default_device()
        dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        if tokenizer.pad_token is None:
            tokenizer.pad_token = tokenizer.eos_token

        def load(name: str) -> torch.nn.Module:
            with quiet_transformers():
                return AutoModelForCausalLM.from_pretrained(name, dtype=dtype).to(device).eval()

        if not args.reference_model:
            raise SystemExit("--model needs --reference-model (the retain-only model) for forget quality.")
        info = {"target": args.model, "reference": args.reference_model, "dtype": str(dtype), "device": str(device)}
        return (lambda: load(args.model)), QAFormat(tokenizer), load(args.reference_model), info
    import copy

    settings, root, tokenizer, tok_key = tiny_setup(args, data)
    helper = None
    if args.workers > 1 and args.only is None:
        # the two models train side by side on a cold cache: the reference in a helper process
        argv = [*args.argv, "--prepare", "reference", "--workers", "1"]
        helper = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], env=_worker_env("ref"))
    target, target_info = load_or_train("target", args.forget, data, settings, root, tokenizer, tok_key)
    if helper is not None and helper.wait() != 0:
        raise SystemExit(f"training the reference model failed (exit code {helper.returncode})")
    reference, ref_info = load_or_train("reference", args.forget, data, settings, root, tokenizer, tok_key)
    info = {"settings": dataclasses.asdict(settings), "target": target_info, "reference": ref_info}
    return (lambda: copy.deepcopy(target)), QAFormat(tokenizer), reference, info


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per model
    args = parse_args(argv)
    started = time.perf_counter()
    on_gpu = default_device().type == "cuda"
    threads = set_threads(None if on_gpu else args.threads)
    methods = select_methods((sweep_methods if args.lr_sweep else build_methods)(args), args)
    if args.list:
        for m in methods:
            print(f"{m.group:10s} {m.name}")
        return {}
    if args.render:
        report = read_report(args.render)
        write_report(report, Path(args.render).parent, Path(args.render).stem, args)
        return report
    if args.merge:
        return merge_reports(args, [m.name for m in (sweep_methods if args.lr_sweep else build_methods)(args)])
    data = Path(args.data)
    if args.prepare:
        load_or_train(args.prepare, args.forget, data, *tiny_setup(args, data))
        return {}
    out = Path(args.out)
    stem = args.stem or (
        "tofu_smoke" if args.smoke else f"tofu_{args.forget}" + ("_lr_sweep" if args.lr_sweep else "")
    )
    make_target, qa_format, reference_model, models_info = load_models(args, data)  # trains and caches once
    if args.workers > 1 and args.only is None:
        del make_target, reference_model
        return run_workers(args, methods, models_info, out, stem, started)
    splits = eval_splits(data, args.forget, args.eval_limit)
    forget_items = load_tofu(args.forget, data)
    retain_items = load_tofu(FORGET_TO_RETAIN[args.forget], data)
    if args.smoke:
        forget_items, retain_items = forget_items[: args.smoke_items], retain_items[: args.smoke_items]
    # GRIN's (and the other selectors') scoring pass and SSD's Fisher of the training data read a seeded random
    # sample of the retain set: per-example gradient statistics over all of retain90 would cost more than the
    # unlearning itself (measured ~0.1 s per example on the tiny model).
    n_local = min(args.localize_retain or len(retain_items), len(retain_items))
    localize_retain = random.Random(args.seed).sample(retain_items, n_local)
    max_new_tokens = generation_cap(qa_format, splits)
    train = {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.eval_batch_size,
        "seed": args.seed,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": True,
        "use_cpu": not on_gpu,
        "num_threads": None if on_gpu else threads,
    }
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_tofu.py " + " ".join(sys.argv[1:] if argv is None else list(argv)),
        "environment": environment(),
        "settings": {
            "forget": args.forget,
            "retain": FORGET_TO_RETAIN[args.forget],
            "scale": "paper scale" if args.model else ("smoke" if args.smoke else "CPU scale"),
            "train": train,
            "lr_full": args.lr_full,
            "lr_lora": args.lr_lora,
            "lr_grin": args.lr_grin,
            "density": args.density,
            "selector_objective": args.selector_objective,
            "max_new_tokens": max_new_tokens,
            "eval_limit": args.eval_limit,
            "eval_sizes": {name: len(items) for name, items in splits.items()},
            "num_forget": len(forget_items),
            "num_retain": len(retain_items),
            "num_localize_retain": len(localize_retain),
            "seed": args.seed,
            "data": str(data),
        },
        "models": models_info,
        "results": [],
    }
    if args.lr_sweep:
        report["settings"]["lr_grids"] = {"full": args.sweep_full, "lora": args.sweep_lora, "grin": args.sweep_grin}
        report["settings"]["sweep_scores"] = args.sweep_scores
        evaluator = lambda model, ref: cheap_evaluate(model, qa_format, splits, ref, args.eval_batch_size)  # noqa: E731
    else:
        eval_kw = {"max_new_tokens": max_new_tokens, "batch_size": args.eval_batch_size}
        evaluator = lambda model, ref: evaluate(model, qa_format, splits, ref, **eval_kw)  # noqa: E731
    _log(f"evaluating the retain-only reference model ({FORGET_TO_RETAIN[args.forget]})")
    reference = evaluator(reference_model, None)
    reference["summary"]["forget_quality"] = 1.0  # KS test of a sample against itself
    report["results"].append(
        {
            "method": f"{FORGET_TO_RETAIN[args.forget]} model (reference)",
            "group": "reference",
            "summary": {**reference["summary"], **{f"privleak_{a}": 0.0 for a in MIA_ATTACKS}},
            "cost": {"eval_seconds": reference["eval_seconds"]},
            "forget_generations": reference.get("forget_generations"),
        }
    )
    del reference_model
    context = {
        "make_target": make_target,
        "qa_format": qa_format,
        "forget": forget_items,
        "retain": retain_items,
        "localize_retain": localize_retain,
        "train": train,
    }
    with tempfile.TemporaryDirectory(prefix="bench_tofu_") as workdir:
        for method in methods:
            _log(f"[{time.perf_counter() - started:.0f} s] {method.name}")
            try:
                row = run_and_evaluate(method, context, lambda model: evaluator(model, reference), workdir)
            except Exception as error:  # one failing method must not lose the others' numbers
                if args.smoke:
                    raise
                row = {"method": method.name, "group": method.group, "config": method.describe()}
                row["error"] = f"{type(error).__name__}: {error}"
                _log(f"    FAILED: {row['error']}")
            report["results"].append(row)
            report["total_seconds"] = time.perf_counter() - started
            report["load_average_at_end"] = load_average()
            write_report(report, out, stem, args)  # after every method: an interrupted run keeps what it measured
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = load_average()
    write_report(report, out, stem, args)
    _log(f"done in {report['total_seconds']:.0f} s: {out / stem}.md / .json")
    return report


def run_and_evaluate(method: Method, context: dict[str, Any], evaluator: Any, workdir: str) -> dict[str, Any]:
    """One table row: unlearn with ``method`` from a fresh target copy, evaluate, record costs."""
    model, cost = run_method(
        method,
        context["make_target"],
        context["qa_format"],
        context["forget"],
        context["retain"],
        train=context["train"],
        ssd_data=context["forget"] + context["localize_retain"],
        workdir=workdir,
        localize_retain=context["localize_retain"],
        log=_log,
    )
    result = evaluator(model)
    del model
    row: dict[str, Any] = {"method": method.name, "group": method.group, "config": method.describe()}
    row["summary"] = result["summary"]
    row["forget_generations"] = result.get("forget_generations")
    row["cost"] = {
        "trainable_entries": cost.get("trainable_entries"),
        "wall_seconds": cost.get("wall_seconds"),
        "eval_seconds": result["eval_seconds"],
        "steps": cost.get("steps"),
        "timings": cost.get("timings"),
    }
    for key in ("localization", "train_metrics", "ssd_candidate_entries"):
        if key in cost:
            row[key] = cost[key]
    sm = row["summary"]
    _log(
        f"    FQ {sm['forget_quality']:.3g}  MU {_or_nan(sm.get('model_utility')):.3f}  forget prob "
        f"{sm['forget_probability']:.3f}  retain prob {sm['retain_probability']:.3f}  "
        f"({cost.get('wall_seconds', 0):.0f} s + eval {result['eval_seconds']:.0f} s)"
    )
    return row


def combine_reports(reports: list[dict[str, Any]], order: list[str]) -> dict[str, Any]:
    """One report from several processes' reports (same settings, disjoint methods): the first report's settings
    and reference row, every method once (first occurrence), in the benchmark's order."""
    merged = dict(reports[0])
    rows: dict[str, dict[str, Any]] = {}
    for report in reports:
        for row in report["results"]:
            rows.setdefault(row["method"], row)
    rank = {name: i for i, name in enumerate(order)}
    merged["results"] = sorted(rows.values(), key=lambda r: (r["group"] != "reference", rank.get(r["method"], -1)))
    return merged


def read_report(path: str | Path) -> dict[str, Any]:
    """A saved report, or one clear line and exit 2 when the file is missing or not a report."""
    try:
        report = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise SystemExit(f"bench_tofu: cannot read report {path}: {error}") from None
    if not isinstance(report, dict) or "results" not in report:
        raise SystemExit(f"bench_tofu: {path} is not a bench_tofu report (no 'results').")
    return report


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def merge_reports(args: argparse.Namespace, order: list[str]) -> dict[str, Any]:
    """``--merge``: combine the reports of runs split by hand (``--methods``/``--stem``). ``total_seconds`` is the
    longest process's (they ran side by side); each row's ``wall s`` is what it cost in its own process."""
    reports = [read_report(path) for path in args.merge]
    merged = combine_reports(reports, order)
    merged["total_seconds"] = max(r.get("total_seconds", 0) for r in reports)
    merged["merged_from"] = [{"file": str(p), "command": r["command"]} for p, r in zip(args.merge, reports)]
    commands = [c for r in reports for c in r["command"].split(" ; ")]
    commands.append("python benchmarks/bench_tofu.py " + " ".join(args.argv))
    merged["command"] = " ; ".join(dict.fromkeys(commands))  # each once, in order: the runs, then this merge
    stem = args.stem or f"tofu_{args.forget}" + ("_lr_sweep" if args.lr_sweep else "")
    write_report(merged, Path(args.out), stem, args)
    _log(f"merged {len(reports)} reports into {Path(args.out) / stem}.md / .json / .png")
    return merged


def _worker_env(tag: str) -> dict[str, str]:
    return {**os.environ, "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY", "PASSIVE"), "BENCH_TOFU_WORKER": tag}


def run_workers(
    args: argparse.Namespace,
    methods: list[Method],
    models_info: dict[str, Any],
    out: Path,
    stem: str,
    started: float,
) -> dict[str, Any]:
    """Run the methods in ``args.workers`` processes side by side (one torch thread each) and merge their reports.

    The tiny models are trained and cached before the workers start, so each only loads them. Methods are dealt
    out round robin in the benchmark's order, which mixes the costly kinds (full, LoRA, GRIN) over the workers.
    Each worker re-runs its own copy of the reference evaluation. A row's ``wall s`` is what it cost in its
    worker, with the other worker busy on the second core; the total is this process's wall time, model training
    included when the cache was cold.
    """
    argv = args.argv
    shares = [list(range(w, len(methods), args.workers)) for w in range(args.workers)]
    shares = [share for share in shares if share]
    with tempfile.TemporaryDirectory(prefix="bench_tofu_workers_") as parts:
        commands = [
            [sys.executable, str(Path(__file__).resolve()), *argv, "--workers", "1", "--only",
             ",".join(map(str, share)), "--out", parts, "--stem", f"part{w}"]
            for w, share in enumerate(shares)
        ]  # fmt: skip
        _log(f"{len(commands)} workers: " + " | ".join(", ".join(methods[i].name for i in s) for s in shares))
        procs = [subprocess.Popen(c, env=_worker_env(str(w))) for w, c in enumerate(commands)]
        codes = [proc.wait() for proc in procs]
        reports = [
            json.loads((Path(parts) / f"part{w}.json").read_text(encoding="utf-8"))
            for w in range(len(commands))
            if (Path(parts) / f"part{w}.json").is_file()
        ]
    if not reports:
        raise SystemExit(f"every worker failed (exit codes {codes}); nothing measured")
    merged = combine_reports(reports, [m.name for m in methods])
    merged["command"] = "python benchmarks/bench_tofu.py " + " ".join(argv)
    merged["models"] = models_info  # the workers only loaded what this process trained
    merged["workers"] = {"count": len(commands), "exit_codes": codes, "threads_each": 1}
    merged["total_seconds"] = time.perf_counter() - started
    merged["load_average_at_end"] = load_average()
    write_report(merged, out, stem, args)
    _log(f"done in {merged['total_seconds']:.0f} s ({len(commands)} workers): {out / stem}.md / .json")
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}); the merged report holds what the others measured")
    return merged


def cheap_evaluate(
    model: torch.nn.Module,
    qa_format: QAFormat,
    splits: dict[str, list[dict[str, Any]]],
    reference: dict[str, Any] | None,
    batch_size: int,
) -> dict[str, Any]:
    """Teacher-forced numbers only (no generation): forget quality, forget/retain probability and truth ratio.
    About a fifth of the full evaluation's cost; used by the learning-rate pilot."""
    t0 = time.perf_counter()
    kw = {"generate": False, "batch_size": batch_size, "progress": False}
    forget = evaluate_qa(model, qa_format, splits["forget"], truth_ratio_form="forget", **kw)
    retain = evaluate_qa(model, qa_format, splits["retain"], truth_ratio_form="retain", **kw)
    ratios = forget["per_item"]["truth_ratio"]
    summary = {
        "forget_quality": None if reference is None else forget_quality(ratios, reference["forget_truth_ratios"]),
        "forget_probability": forget["summary"]["probability"],
        "forget_truth_ratio": forget["summary"]["truth_ratio"],
        "retain_probability": retain["summary"]["probability"],
        "retain_truth_ratio": retain["summary"]["truth_ratio"],
    }
    return {"summary": summary, "forget_truth_ratios": ratios, "eval_seconds": time.perf_counter() - t0}


def sweep_methods(args: argparse.Namespace) -> list[Method]:
    """NPO for each parameterisation at each learning rate of its grid (GRIN, and the ``--sweep-scores`` masks, at
    the benchmark's budget on the GRIN grid)."""
    methods = [Method("target (no unlearning)", "none", group="reference")]
    for lr in args.sweep_full:
        methods.append(Method(f"full NPO lr={lr:g}", "full", "npo", lr, group="full"))
    for lr in args.sweep_lora:
        methods.append(Method(f"LoRA r=8 NPO lr={lr:g}", "lora", "npo", lr, group="lora"))
    budget = f"{args.density * 100:g}%"
    for score in ["gradient_ratio", *args.sweep_scores]:
        name = f"GRIN {budget}" if score == "gradient_ratio" else f"mask {budget} {SCORE_LABELS[score]}"
        group = "grin" if score == "gradient_ratio" else f"mask {score}"
        for lr in args.sweep_grin:
            grin = grin_settings(args, score=score)
            methods.append(Method(f"{name} NPO lr={lr:g}", "grin", "npo", lr, grin=grin, group=group))
    return methods


def choose_learning_rates(results: list[dict[str, Any]], keep: float = 0.9) -> dict[str, dict[str, Any]]:
    """The pre-declared rule: per parameterisation, the learning rate with the highest forget quality among those
    keeping retain probability >= ``keep`` x the target's; when none does, the one keeping the most."""
    target = next((r for r in results if r["method"].startswith("target") and "summary" in r), None)
    if target is None:
        return {}
    floor = keep * target["summary"]["retain_probability"]
    chosen = {}
    families = dict.fromkeys(r["group"] for r in results if r["group"] != "reference")
    for family in families:
        runs = [r for r in results if r["group"] == family and "summary" in r]
        if not runs:
            continue
        ok = [r for r in runs if r["summary"]["retain_probability"] >= floor]
        best = (
            max(ok, key=lambda r: (r["summary"]["forget_quality"], -r["summary"]["forget_probability"]))
            if ok
            else max(runs, key=lambda r: r["summary"]["retain_probability"])
        )
        chosen[family] = {"lr": best["config"]["lr"], "method": best["method"], "meets_floor": bool(ok)}
    return chosen


def write_report(report: dict[str, Any], out: Path, stem: str, args: argparse.Namespace) -> None:
    if not args.lr_sweep:
        write_outputs(report, out, stem)
        return
    report["chosen_learning_rates"] = choose_learning_rates(report["results"])
    atomic_write(out / f"{stem}.json", json.dumps(json_safe(report), indent=2))
    cols = (
        ("method", "method", "g"),
        ("forget_quality", "forget quality", "e"),
        ("forget_probability", "forget prob", "g"),
        ("forget_truth_ratio", "forget TR", "g"),
        ("retain_probability", "retain prob", "g"),
        ("retain_truth_ratio", "retain TR", "g"),
        ("collateral", "retain lost / forget removed", "g"),
        ("wall_seconds", "wall s", "s"),
    )
    rows = table_rows(report["results"], dict.fromkeys(r["group"] for r in report["results"]))
    lines = [
        f"# Learning-rate pilot, TOFU {args.forget} (NPO, teacher-forced evaluation only)",
        "",
        f"Command: `{report['command']}`",
        "",
        f"Total wall time {report.get('total_seconds', 0):.0f} s. "
        f"Unlearning: {json.dumps(report['settings']['train'])}.",
        "",
        "Rule, declared before the runs: per parameterisation, the learning rate with the highest forget quality "
        "among those keeping retain probability >= 0.9 x the target's (else the one keeping the most).",
        "",
        markdown_table(rows, cols),
        "",
        f"Chosen: {json.dumps(report['chosen_learning_rates'])}",
        "",
    ]
    atomic_write(out / f"{stem}.md", "\n".join(lines))
    try:
        write_sweep_plot(report["results"], out / f"{stem}.png", f"TOFU {args.forget}: NPO learning-rate pilot")
    except Exception as error:  # a missing matplotlib must not lose the numbers
        print(f"plot skipped: {error}", file=sys.stderr)


if __name__ == "__main__":
    main()
