"""The TOFU benchmark's models and data: the cached tiny target/reference models, the model regimes, the task's
forget/retain/eval sets.

* A byte-level BPE tokenizer (3072 ids) trained on all TOFU text, cached.
* The **target** memorises ``full`` + ``real_authors`` + ``world_facts`` (every setting in :class:`TinySettings`);
  the **reference** the same minus the forget split (``retain90``/``retain95``/``retain99``). Both are cached in
  ``<cache>/<kind>-<key>`` (the key hashes the data bytes and every setting; built in a staging directory and
  renamed, so never half-written), so only the first run of a regime pays for them.
* **Model regimes** (parameters per memorised fact, :data:`REGIMES`): the default 1.3M-parameter model on all 200
  authors; a ~5.8M-parameter model (hidden 256, 4 layers) on all of them; the 1.3M model on a subset of the authors
  (``--authors N``, :func:`kept_authors`). A regime is a cache key of its own, so each is trained once.
* With ``--authors N`` every set is restricted consistently (:func:`task_data`): the target memorises the kept
  authors' items of ``full``, the reference the kept authors minus the forget ones, unlearning's retain set and the
  retain evaluation only hold kept authors; the forget set, holdout, real_authors and world_facts are unchanged.
"""

from __future__ import annotations

import dataclasses
import random
import subprocess
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from common import (  # benchmarks/ is on sys.path when run as a script
    HERE,
    REPO,
    cache_root,
    cached_dir,
    default_device,
    file_digest,
    log,
    quiet_transformers,
    settings_key,
    worker_env,
)
from unlearning_runs import memorise

import grin_peft  # noqa: F401,E402  (registers GRIN with PEFT)
from grin_peft.data import QAFormat, load_tofu  # noqa: E402

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
ITEMS_PER_AUTHOR = 20  # TOFU's ``full``: 200 fictitious authors x 20 QA pairs, author after author

# --regime presets: the options each sets (anything not named keeps its command-line value)
REGIMES: dict[str, dict[str, Any]] = {
    "1m": {"hidden": 128, "layers": 2, "authors": None},  # 1.31M parameters, 4,217 memorised items
    "5m": {"hidden": 256, "layers": 4, "authors": None},  # 5.8M parameters, same items
    "authors40": {"hidden": 128, "layers": 2, "authors": 40},  # 1.31M parameters, 800 + 217 items
    "authors100": {"hidden": 128, "layers": 2, "authors": 100},  # 1.31M parameters, 2,000 + 217 items
}


@dataclass(frozen=True)
class TinySettings:
    """Everything that determines a cached tiny TOFU model (the cache key hashes all of it and the data bytes).

    Adding a field changes every key (and so retrains every cached model): regime options that are not model
    settings (the author subset) join the key only when set, in :func:`model_key`."""

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


# ------------------------------------------------------------------------------------------------ authors


def _key(item: dict[str, Any]) -> tuple[str, str]:
    return item["question"], item["answer"]


def author_index(data: Path) -> dict[tuple[str, str], int]:
    """``(question, answer) -> author`` for every item of ``full`` (questions alone repeat across authors)."""
    return {_key(item): i // ITEMS_PER_AUTHOR for i, item in enumerate(load_tofu("full", data))}


def authors_of(items: Sequence[dict[str, Any]], index: dict[tuple[str, str], int]) -> set[int]:
    return {index[_key(item)] for item in items if _key(item) in index}


def kept_authors(data: Path, forget: str, count: int | None, seed: int) -> list[int] | None:
    """The authors a subset-regime model memorises: every author of the forget split, every author of the retain
    evaluation set (``retain_perturbed``, so retain probability is measured on facts the model learned, on the
    same items as in the other regimes), then a ``seed``-ed sample of the other authors up to ``count``.
    None (every author) when ``count`` is None."""
    if count is None:
        return None
    index = author_index(data)
    total = len(set(index.values()))
    must = authors_of(load_tofu(forget, data), index) | authors_of(load_tofu("retain_perturbed", data), index)
    if not len(must) <= count <= total:
        raise SystemExit(
            f"--authors {count}: between {len(must)} (the forget split's and retain evaluation's authors) and {total}"
        )
    others = sorted(set(range(total)) - must)
    return sorted(must | set(random.Random(seed).sample(others, count - len(must))))


def restrict(items: list[dict[str, Any]], keep: set[int] | None, index: dict[tuple[str, str], int]):
    """The items of kept authors; items outside ``full`` (real_authors, world_facts, holdout) all stay."""
    if keep is None:
        return items
    return [item for item in items if index.get(_key(item), -1) in keep or _key(item) not in index]


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
    """The cached BPE tokenizer and its key (part of every model key, so models never mix vocabularies). Every
    regime shares it: it is trained on all of TOFU's text."""
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


def model_key(
    kind: str, forget: str, data: Path, settings: TinySettings, tokenizer_key: str, authors: list[int] | None
) -> str:
    """The cache key of a tiny model; the author subset joins the payload only when set, so the all-authors
    regimes keep the keys they had before subsets existed."""
    splits = train_splits(kind, forget)
    payload: dict[str, Any] = {
        "protocol": PROTOCOL,
        "settings": dataclasses.asdict(settings),
        "tokenizer": tokenizer_key,
        "splits": splits,
        "data": file_digest(tofu_files(data, splits)),
    }
    if authors is not None:
        payload["authors"] = authors
    return settings_key(payload)


def load_or_train(
    kind: str,
    forget: str,
    data: Path,
    settings: TinySettings,
    root: Path,
    tokenizer: Any,
    tokenizer_key: str,
    authors: list[int] | None = None,
) -> tuple[torch.nn.Module, dict[str, Any]]:
    """A cached tiny model (``kind`` target or reference) in float32 eval mode, trained on first use; ``authors``
    restricts what it memorises (:func:`kept_authors`)."""
    from transformers import LlamaForCausalLM

    from grin_peft.tiny import build_model, tiny_llama_config

    splits = train_splits(kind, forget)
    key = model_key(kind, forget, data, settings, tokenizer_key, authors)

    def build(staging: Path) -> dict[str, Any]:
        keep = None if authors is None else set(authors)
        index = author_index(data) if authors is not None else {}
        items = [
            item for split in splits for item in restrict(load_tofu(split, data), keep, index)[: settings.max_items]
        ]
        config = tiny_llama_config(
            len(tokenizer),
            hidden_size=settings.hidden_size,
            num_layers=settings.num_layers,
            num_heads=settings.num_heads,
        )
        model = build_model(config, seed=settings.seed)
        log(f"training the {kind} model on {'+'.join(splits)} ({len(items)} items; cached afterwards)")
        info = memorise(
            model,
            QAFormat(tokenizer),
            items,
            epochs=settings.epochs,
            lr=settings.lr,
            batch_size=settings.batch_size,
            seed=settings.seed,
            bf16=settings.bf16,
            log=log,
        )
        info.update(
            kind=kind,
            splits=splits,
            settings=dataclasses.asdict(settings),
            num_parameters=sum(p.numel() for p in model.parameters()),
            torch_threads=torch.get_num_threads(),
            grin_peft_version=grin_peft.__version__,
        )
        if authors is not None:
            info["authors"] = authors
        with quiet_transformers():
            model.save_pretrained(staging)
        return info

    path, info, built = cached_dir(root / f"{kind}-{key}", build)
    info = {**info, "cache_dir": str(path), "trained_this_run": built}
    with quiet_transformers():
        model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return model, info


def tiny_settings(args: Any) -> TinySettings:
    if args.smoke:
        return TinySettings(
            vocab_size=512, hidden_size=32, num_layers=1, num_heads=2, epochs=1, batch_size=8,
            max_items=args.smoke_items,
        )  # fmt: skip
    return TinySettings(
        hidden_size=args.hidden, num_layers=args.layers, num_heads=args.heads, epochs=args.model_epochs,
        seed=args.model_seed,
    )  # fmt: skip


def tiny_setup(args: Any, data: Path) -> tuple[TinySettings, Path, Any, str, list[int] | None]:
    """The tiny models' settings, cache folder, tokenizer (trained and cached on first use), tokenizer key and
    author subset: the arguments of :func:`load_or_train` after ``kind, forget, data``."""
    settings = tiny_settings(args)
    root = Path(args.cache_dir) if args.cache_dir else cache_root("tofu")
    authors = kept_authors(data, args.forget, args.authors, args.model_seed)
    return (settings, root, *load_tokenizer(data, settings, root), authors)


def load_models(args: Any, data: Path) -> tuple[Any, QAFormat, Any, dict[str, Any]]:
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

    setup = tiny_setup(args, data)
    settings, tokenizer, authors = setup[0], setup[2], setup[4]
    helper = None
    if args.workers > 1 and not args.worker:
        # the two models train side by side on a cold cache: the reference in a helper process
        argv = [*args.argv, "--prepare", "reference", "--workers", "1"]
        helper = subprocess.Popen([sys.executable, str(HERE / "bench_tofu.py"), *argv], env=worker_env("ref"))
    target, target_info = load_or_train("target", args.forget, data, *setup)
    if helper is not None and helper.wait() != 0:
        raise SystemExit(f"training the reference model failed (exit code {helper.returncode})")
    reference, ref_info = load_or_train("reference", args.forget, data, *setup)
    info = {"settings": dataclasses.asdict(settings), "target": target_info, "reference": ref_info}
    if authors is not None:
        info["authors"] = authors
    return (lambda: copy.deepcopy(target)), QAFormat(tokenizer), reference, info


# ------------------------------------------------------------------------------------------------ task data


def eval_splits(data: Path | str, forget: str, limit: int | None) -> dict[str, list[dict[str, Any]]]:
    """open-unlearning's TOFU evaluation sets (perturbed variants, holdout of the same size), optionally cut."""
    from grin_peft.data import load_tofu_eval_splits

    splits = load_tofu_eval_splits(forget, data)
    return {name: items[:limit] for name, items in splits.items()}


def task_data(args: Any, data: Path) -> dict[str, Any]:
    """The unlearning task: forget and retain items, GRIN's/SSD's retain sample, the evaluation splits, all
    restricted to the regime's authors. The retain sample (GRIN's and the other selectors' scoring pass, SSD's
    Fisher of the training data) is a seeded sample of the retain set: per-example gradient statistics over all of
    retain90 would cost more than the unlearning itself (measured ~0.1 s per example on the tiny model)."""
    keep = None
    index: dict[tuple[str, str], int] = {}
    if args.authors is not None and not args.model:
        keep = set(kept_authors(data, args.forget, args.authors, args.model_seed) or [])
        index = author_index(data)
    splits = {name: restrict(items, keep, index) for name, items in eval_splits(data, args.forget, None).items()}
    splits = {name: items[: args.eval_limit] for name, items in splits.items()}
    forget_items = load_tofu(args.forget, data)
    retain_items = restrict(load_tofu(FORGET_TO_RETAIN[args.forget], data), keep, index)
    if args.smoke:
        forget_items, retain_items = forget_items[: args.smoke_items], retain_items[: args.smoke_items]
    return {
        "forget": forget_items,
        "retain": retain_items,
        "localize_retain": localize_sample(retain_items, args.localize_retain, args.seed),
        "splits": splits,
    }


def localize_sample(retain: list[dict[str, Any]], size: int, seed: int) -> list[dict[str, Any]]:
    """The seeded retain sample of the scoring passes (``size`` 0: all of it)."""
    return random.Random(seed).sample(retain, min(size or len(retain), len(retain)))
