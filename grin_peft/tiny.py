"""A tiny local causal LM that memorises the synthetic facts, so the demo runs offline on a CPU in minutes.

No small pretrained model can be downloaded offline, so the demo builds everything itself: a byte-level BPE
tokenizer trained on the data set's text, a two-layer Llama built from a config, and a short training run that
memorises the forget and retain items (the "target" model of TOFU). The result is cached on disk keyed by every
setting, so only the first run pays for training.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from tqdm.auto import tqdm
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast, get_cosine_schedule_with_warmup
from transformers.utils import logging as transformers_logging

from . import __version__
from .data import DEFAULT_TEMPLATE, IGNORE_INDEX, QAFormat
from .errors import GrinError
from .synthetic import SyntheticDataset, generate_dataset, load_splits, save_splits

__all__ = [
    "MemorisationSettings",
    "MemorisedModel",
    "answer_nll",
    "build_model",
    "default_cache_dir",
    "greedy_answers",
    "load_or_train_memorised_model",
    "memorise",
    "tiny_llama_config",
    "train_tokenizer",
]

logger = logging.getLogger(__name__)

_SPECIAL_TOKENS = {"pad_token": "<pad>", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}
_COMPLETE_MARKER = "complete.json"
_DATA_SUBDIR = "data"


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE tokenizer in well under a second.

    Byte-level BPE decodes back to exactly the input text (spaces, punctuation, any Unicode), which ROUGE and
    exact-match metrics on generated answers rely on. Merges need two occurrences, so a small corpus stops
    below ``vocab_size`` instead of spending ids on one-off strings. Ids 0-3 are pad, bos, eos, unk; encoding
    prepends bos (as Llama tokenizers do) unless ``add_special_tokens=False``. Deterministic for the same texts.
    """
    if not isinstance(vocab_size, int) or vocab_size < 300:
        raise GrinError(f"vocab_size must be an int >= 300 (256 bytes + special tokens + merges), got {vocab_size!r}")
    tokenizer = Tokenizer(models.BPE(unk_token=_SPECIAL_TOKENS["unk_token"]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(_SPECIAL_TOKENS.values()),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    bos = _SPECIAL_TOKENS["bos_token"]
    tokenizer.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokenizer.token_to_id(bos))]
    )
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, clean_up_tokenization_spaces=False, **_SPECIAL_TOKENS)


def tiny_llama_config(
    vocab_size: int,
    hidden_size: int = 128,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int | None = None,
    max_position_embeddings: int = 512,
    pad_token_id: int = 0,
    bos_token_id: int = 1,
    eos_token_id: int = 2,
) -> LlamaConfig:
    """A Llama config small enough to train in a minute on 2 CPU cores.

    The defaults (ids included) match :func:`train_tokenizer`. Embeddings stay untied, as in Llama-2-7B, so the
    model has the same module layout GRIN localises in on real models. ``intermediate_size`` defaults to
    4 x hidden.
    """
    if hidden_size % num_heads:
        raise GrinError(f"hidden_size ({hidden_size}) must be divisible by num_heads ({num_heads})")
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size or 4 * hidden_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        pad_token_id=pad_token_id,
        bos_token_id=bos_token_id,
        eos_token_id=eos_token_id,
        tie_word_embeddings=False,
    )


def build_model(config: LlamaConfig, seed: int = 0) -> LlamaForCausalLM:
    """A randomly initialised model, the same for the same seed, without touching the global RNG state."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = LlamaForCausalLM(config)
    return model.eval()


def _encode_qa(tokenizer: PreTrainedTokenizerFast, question: str, answer: str | None) -> tuple[list[int], list[int]]:
    """Prompt ids and answer ids (eos included) in the package's plain QA layout, :class:`~grin_peft.data.QAFormat`.

    Training, scoring and generation here go through this one function, so the cached demo model sees exactly the
    tokens that ``grin-peft unlearn`` and the metrics give it. ``answer=None`` gives the generation prompt.
    """
    qa_format = QAFormat(tokenizer, chat=False)
    if answer is None:
        return qa_format.encode_prompt(question), []
    encoded = qa_format.encode(question, answer)
    start = next(i for i, label in enumerate(encoded["labels"]) if label != IGNORE_INDEX)
    return encoded["input_ids"][:start], encoded["input_ids"][start:]


def _qa_batch(
    tokenizer: PreTrainedTokenizerFast, items: Sequence[Mapping[str, Any]], answer_key: str = "answer"
) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask and labels (-100 except on answer tokens)."""
    encoded = [_encode_qa(tokenizer, item["question"], item[answer_key]) for item in items]
    length = max(len(prompt) + len(answer) for prompt, answer in encoded)
    input_ids = torch.full((len(encoded), length), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), length), -100)
    attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
    for row, (prompt, answer) in enumerate(encoded):
        ids = prompt + answer
        input_ids[row, : len(ids)] = torch.tensor(ids)
        labels[row, len(prompt) : len(ids)] = torch.tensor(answer)
        attention_mask[row, : len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


@torch.no_grad()
def answer_nll(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    items: Sequence[Mapping[str, Any]],
    batch_size: int = 32,
) -> list[float]:
    """Per item, the mean NLL of the answer tokens (eos included) given the question, in float32."""
    was_training = model.training
    model.eval()
    losses: list[float] = []
    for start in range(0, len(items), batch_size):
        batch = _qa_batch(tokenizer, items[start : start + batch_size])
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        labels = batch["labels"][:, 1:]
        token_nll = F.cross_entropy(logits[:, :-1].transpose(1, 2), labels, ignore_index=-100, reduction="none")
        mask = labels != -100
        losses += ((token_nll * mask).sum(1) / mask.sum(1)).tolist()
    model.train(was_training)
    return losses


def memorise(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    items: Sequence[Mapping[str, Any]],
    epochs: int = 30,
    lr: float = 3e-3,
    batch_size: int = 8,
    warmup_ratio: float = 0.05,
    seed: int = 0,
    bf16_autocast: bool = True,
    num_threads: int | None = 1,
    progress: bool = True,
) -> float:
    """Fine-tune ``model`` in place until it has memorised the items' answers; return their mean answer NLL.

    Trains on the plain QA format with loss on answer tokens only (AdamW, linear warmup then cosine decay, the
    order of items reshuffled each epoch from ``seed``). The result is bit-identical for the same seed and number
    of threads. bf16 autocast trained 1.7-2.6x faster for TOFU-sized runs on a CPU, but makes no difference for
    the demo's short items. The returned NLL is measured in float32.

    ``num_threads`` sets torch's intra-op threads for the call (restored afterwards; ``None`` keeps the caller's).
    The default of one suits tiny models, whose matrices are too small to split across threads: on a busy 2-core
    machine two threads ran 10-50x slower than one (they spin waiting for each other). One thread also makes the
    result independent of the machine's core count.
    """
    if not items:
        raise GrinError("memorise needs at least one item")
    for name, value in (("epochs", epochs), ("batch_size", batch_size)):
        if not isinstance(value, int) or value < 1:
            raise GrinError(f"{name} must be an int >= 1, got {value!r}")
    if not lr > 0 or not 0 <= warmup_ratio < 1:
        raise GrinError(f"need lr > 0 and 0 <= warmup_ratio < 1, got lr={lr!r}, warmup_ratio={warmup_ratio!r}")
    previous_threads = torch.get_num_threads()
    if num_threads is not None:
        torch.set_num_threads(num_threads)
    try:
        return _train(model, tokenizer, items, epochs, lr, batch_size, warmup_ratio, seed, bf16_autocast, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _train(
    model: torch.nn.Module,
    tokenizer: PreTrainedTokenizerFast,
    items: Sequence[Mapping[str, Any]],
    epochs: int,
    lr: float,
    batch_size: int,
    warmup_ratio: float,
    seed: int,
    bf16_autocast: bool,
    progress: bool,
) -> float:
    generator = torch.Generator().manual_seed(seed)
    total_steps = epochs * math.ceil(len(items) / batch_size)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    scheduler = get_cosine_schedule_with_warmup(optimizer, round(warmup_ratio * total_steps), total_steps)
    model.train()
    bar = tqdm(range(epochs), desc="memorising", unit="epoch", disable=not progress)
    for _ in bar:
        order = torch.randperm(len(items), generator=generator).tolist()
        epoch_loss = 0.0
        for start in range(0, len(items), batch_size):
            batch = _qa_batch(tokenizer, [items[i] for i in order[start : start + batch_size]])
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16_autocast):
                loss = model(**batch).loss
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            epoch_loss += loss.item() * len(batch["input_ids"])
        bar.set_postfix(loss=f"{epoch_loss / len(items):.3f}")
    model.eval()
    return sum(answer_nll(model, tokenizer, items)) / len(items)


@torch.no_grad()
def greedy_answers(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    questions: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 32,
) -> list[str]:
    """Greedy answers to ``questions`` in the training prompt format, decoded without special tokens."""
    was_training = model.training
    model.eval()
    answers: list[str] = []
    for start in range(0, len(questions), batch_size):
        prompts = [_encode_qa(tokenizer, question, None)[0] for question in questions[start : start + batch_size]]
        length = max(map(len, prompts))
        # Left padding, so every row's generated tokens start at the same column.
        input_ids = torch.tensor([[tokenizer.pad_token_id] * (length - len(p)) + p for p in prompts])
        attention_mask = torch.tensor([[0] * (length - len(p)) + [1] * len(p) for p in prompts])
        output = model.generate(
            input_ids=input_ids,
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=False,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        answers += [text.strip() for text in tokenizer.batch_decode(output[:, length:], skip_special_tokens=True)]
    model.train(was_training)
    return answers


@dataclasses.dataclass(frozen=True)
class MemorisationSettings:
    """Everything that determines the cached demo model; the cache key hashes all of it.

    The defaults memorise 100 items (20 people x 5 facts) to a mean answer NLL under 0.01, every greedy answer
    exact, in 15-25 s on one busy CPU core; 20 epochs is where memorisation becomes complete, so 30 leaves a
    margin for other data seeds. bf16 autocast is off: at this size it is no faster on a CPU, and float32 keeps
    the cached weights closer to identical across CPUs.
    """

    data_seed: int = 0
    num_people: int = 20
    questions_per_person: int = 5
    forget_fraction: float = 0.1
    num_holdout_people: int | None = None
    num_perturbed: int = 3
    vocab_size: int = 1024
    hidden_size: int = 128
    num_layers: int = 2
    num_heads: int = 4
    model_seed: int = 0
    epochs: int = 30
    lr: float = 3e-3
    batch_size: int = 8
    bf16_autocast: bool = False

    def cache_key(self) -> str:
        """A short hash of every setting and the package version (a new release retrains rather than reuses)."""
        payload = json.dumps({"settings": dataclasses.asdict(self), "version": __version__}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


@dataclasses.dataclass
class MemorisedModel:
    """What :func:`load_or_train_memorised_model` returns.

    ``trained`` says whether this call trained (``False``: loaded from ``path``); ``info`` holds the first run's
    measurements (final answer NLL, seconds per stage, parameter count).
    """

    model: LlamaForCausalLM
    tokenizer: PreTrainedTokenizerFast
    dataset: SyntheticDataset
    path: Path
    trained: bool
    info: dict[str, Any]


def default_cache_dir() -> Path:
    """``$XDG_CACHE_HOME/grin_peft/demo``, falling back to ``~/.cache/grin_peft/demo``."""
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "grin_peft" / "demo"


def _tokenizer_corpus(dataset: SyntheticDataset) -> list[str]:
    """All text the demo will tokenise, with prompts in their trained format so the template's words merge."""
    texts = list(dataset.refusals)
    for item in dataset.forget + dataset.retain + dataset.holdout:
        texts.append(DEFAULT_TEMPLATE.format(question=item["question"], answer=item["answer"]))
        texts += [item["paraphrased_question"], item["paraphrased_answer"], *item["perturbed_answer"]]
    return texts


def _train_into(directory: Path, settings: MemorisationSettings, progress: bool) -> dict[str, Any]:
    """Generate, train and save everything into ``directory``; return the measurements."""
    started = time.perf_counter()
    dataset = generate_dataset(
        num_people=settings.num_people,
        questions_per_person=settings.questions_per_person,
        forget_fraction=settings.forget_fraction,
        num_holdout_people=settings.num_holdout_people,
        num_perturbed=settings.num_perturbed,
        seed=settings.data_seed,
    )
    tokenizer = train_tokenizer(_tokenizer_corpus(dataset), vocab_size=settings.vocab_size)
    prepared = time.perf_counter()
    config = tiny_llama_config(
        len(tokenizer), hidden_size=settings.hidden_size, num_layers=settings.num_layers, num_heads=settings.num_heads
    )
    model = build_model(config, seed=settings.model_seed)
    nll = memorise(
        model,
        tokenizer,
        dataset.train,
        epochs=settings.epochs,
        lr=settings.lr,
        batch_size=settings.batch_size,
        seed=settings.model_seed,
        bf16_autocast=settings.bf16_autocast,
        progress=progress,
    )
    info = {
        "train_answer_nll": nll,
        "num_train_items": len(dataset.train),
        "num_parameters": sum(p.numel() for p in model.parameters()),
        "prepare_seconds": prepared - started,
        "memorise_seconds": time.perf_counter() - prepared,
        "settings": dataclasses.asdict(settings),
        "grin_peft_version": __version__,
    }
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    save_splits(dataset, directory / _DATA_SUBDIR)
    # Written last: a directory without it is an unfinished build and is never loaded.
    (directory / _COMPLETE_MARKER).write_text(json.dumps(info, indent=2), encoding="utf-8")
    return info


@contextlib.contextmanager
def _without_transformers_bars() -> Iterator[None]:
    """Hide transformers' own bars while saving and loading: the files are a few MB and take milliseconds."""
    was_enabled = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            transformers_logging.enable_progress_bar()


def _load(directory: Path) -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast, SyntheticDataset, dict[str, Any]]:
    model = LlamaForCausalLM.from_pretrained(directory, dtype=torch.float32).eval()
    tokenizer = PreTrainedTokenizerFast.from_pretrained(directory)
    info = json.loads((directory / _COMPLETE_MARKER).read_text(encoding="utf-8"))
    return model, tokenizer, load_splits(directory / _DATA_SUBDIR), info


def load_or_train_memorised_model(
    cache_dir: str | Path | None = None,
    settings: MemorisationSettings | None = None,
    progress: bool = True,
    **overrides: Any,
) -> MemorisedModel:
    """The demo's target model, tokenizer and data set: loaded from the cache, or built once and cached.

    The cache entry is ``<cache_dir>/<settings.cache_key()>`` (``cache_dir`` defaults to
    :func:`default_cache_dir`). It is built in a temporary sibling directory and moved into place with one
    ``os.replace``, so an interrupted run never leaves an entry that looks complete; an entry without its
    completion marker is deleted and rebuilt. ``overrides`` replace single settings, e.g. ``data_seed=1``.
    Training runs on one thread (see :func:`memorise`); the returned model is float32, in eval mode.
    """
    settings = settings or MemorisationSettings()
    try:
        settings = dataclasses.replace(settings, **overrides)
    except TypeError as error:
        names = ", ".join(field.name for field in dataclasses.fields(MemorisationSettings))
        raise GrinError(f"unknown setting in {sorted(overrides)}; known: {names}") from error
    root = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    with _without_transformers_bars():
        return _load_or_train(root / settings.cache_key(), settings, progress)


def _load_or_train(final: Path, settings: MemorisationSettings, progress: bool) -> MemorisedModel:
    if (final / _COMPLETE_MARKER).is_file():
        logger.info("loading the memorised demo model from %s", final)
        model, tokenizer, dataset, info = _load(final)
        return MemorisedModel(model, tokenizer, dataset, path=final, trained=False, info=info)
    if final.exists():
        logger.warning("discarding an unfinished cache entry at %s", final)
        shutil.rmtree(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    logger.info("training the memorised demo model (first run only; cached at %s)", final)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        info = _train_into(staging, settings, progress)
        try:
            os.replace(staging, final)
        except OSError:
            # Another process finished the same entry first: keep theirs.
            if not (final / _COMPLETE_MARKER).is_file():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    model, tokenizer, dataset, _ = _load(final)
    return MemorisedModel(model, tokenizer, dataset, path=final, trained=True, info=info)
