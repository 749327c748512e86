"""The main job: forget invented people's facts from a tiny model that memorised them, and show what changed.

Runs offline on a fresh machine: the project's own generator makes a TOFU-like data set, a tiny Llama memorises it
(cached after the first run), GRIN localises, injects noise and trains a sparse delta with an unlearning objective,
and a before/after table reports forget and retain answer probability, ROUGE-L recall and truth ratio.
"""

from __future__ import annotations

import copy
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .config import GrinConfig
from .metrics import evaluate_qa
from .pipeline import unlearn
from .tiny import load_or_train_memorised_model

TABLE_METRICS = (
    ("probability", "answer probability"),
    ("rouge_l_recall", "ROUGE-L recall"),
    ("truth_ratio", "truth ratio"),
)
DEFAULTS = {
    "density": 1e-2,
    "objective": "npo",
    "learning_rate": 5e-2,
    "num_train_epochs": 30,
    "per_device_train_batch_size": 4,
}


@dataclass
class DemoResult:
    """Everything the demo measured and wrote."""

    before: dict[str, dict[str, float]]
    after: dict[str, dict[str, float]]
    delta_dir: Path
    report_json: Path
    report_plot: Path
    trainable_entries: int
    seconds: dict[str, float] = field(default_factory=dict)

    def table(self) -> str:
        """The before/after table as markdown."""
        lines = ["| split | metric | before | after | change |", "|---|---|---|---|---|"]
        for split in ("forget", "retain"):
            for key, label in TABLE_METRICS:
                before, after = self.before[split].get(key), self.after[split].get(key)
                if before is None or after is None:
                    continue
                lines.append(f"| {split} | {label} | {before:.3f} | {after:.3f} | {after - before:+.3f} |")
        return "\n".join(lines)


def _summary(model, tokenizer, items, form: str, progress: bool) -> dict[str, float]:
    result = evaluate_qa(model, tokenizer, items, truth_ratio_form=form, max_new_tokens=64, progress=progress)
    return {k: v for k, v in result["summary"].items() if v is not None}


def run_demo(
    output_dir: str | Path = "runs/demo",
    cache_dir: str | Path | None = None,
    density: float = DEFAULTS["density"],
    objective: str = DEFAULTS["objective"],
    learning_rate: float = DEFAULTS["learning_rate"],
    num_train_epochs: float = DEFAULTS["num_train_epochs"],
    seed: int = 0,
    progress: bool = True,
) -> DemoResult:
    """Memorise (or load the cached model), unlearn the forget people with GRIN, measure before and after.

    Why these defaults: they were chosen by measurement on this demo (BENCHMARKS.md); the cached target model is
    the same on every run, so the table is reproducible for a seed and thread count.
    """
    seconds: dict[str, float] = {}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a model this small runs several times faster on one thread (BENCHMARKS.md)
    try:
        return _run(
            output_dir, cache_dir, density, objective, learning_rate, num_train_epochs, seed, progress, seconds
        )
    finally:
        torch.set_num_threads(threads)


def _run(output_dir, cache_dir, density, objective, learning_rate, num_train_epochs, seed, progress, seconds):
    started = time.perf_counter()
    memorised = load_or_train_memorised_model(cache_dir, progress=progress)
    seconds["target model (train or load)"] = time.perf_counter() - started
    data, tokenizer = memorised.dataset, memorised.tokenizer
    model = copy.deepcopy(memorised.model)

    t0 = time.perf_counter()
    before = {
        "forget": _summary(model, tokenizer, data.forget, "forget", progress),
        "retain": _summary(model, tokenizer, data.retain, "retain", progress),
    }
    seconds["evaluate before"] = time.perf_counter() - t0

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    config = GrinConfig(
        target_modules="all-linear",
        density=density,
        seed=seed,
        forget_description=f"{len(data.forget)} facts about {len({i['person'] for i in data.forget})}"
        " invented people (grin-peft demo)",
    )
    t0 = time.perf_counter()
    result = unlearn(
        model,
        data.forget,
        data.retain,
        config=config,
        objective=objective,
        tokenizer=tokenizer,
        learning_rate=learning_rate,
        num_train_epochs=num_train_epochs,
        seed=seed,
        per_device_train_batch_size=DEFAULTS["per_device_train_batch_size"],
        disable_tqdm=not progress,
        localize_kwargs={"progress": progress},
    )
    seconds["localize + train"] = time.perf_counter() - t0
    peft_model = result.peft_model

    t0 = time.perf_counter()
    after = {
        "forget": _summary(peft_model, tokenizer, data.forget, "forget", progress),
        "retain": _summary(peft_model, tokenizer, data.retain, "retain", progress),
    }
    seconds["evaluate after"] = time.perf_counter() - t0

    delta_dir = output_dir / "delta"
    peft_model.save_pretrained(delta_dir)
    report_json, report_plot = output_dir / "localization.json", output_dir / "localization.png"
    if result.localization is not None:
        result.localization.to_json(report_json)
        result.localization.plot(report_plot)
    demo = DemoResult(before, after, delta_dir, report_json, report_plot, result.trainable_entries, seconds)
    (output_dir / "demo_results.json").write_text(
        json.dumps(
            {
                "before": before,
                "after": after,
                "trainable_entries": demo.trainable_entries,
                "seconds": seconds,
                "settings": {
                    "density": density,
                    "objective": objective,
                    "learning_rate": learning_rate,
                    "num_train_epochs": num_train_epochs,
                    "seed": seed,
                    "torch_threads": torch.get_num_threads(),
                },
            },
            indent=2,
        )
    )
    return demo


def format_report(demo: DemoResult, extra: dict[str, Any] | None = None) -> str:
    """What `grin-peft demo` prints after the progress bars."""
    lines = [
        "",
        "GRIN unlearning demo: before vs after",
        "",
        demo.table(),
        "",
        f"trainable entries: {demo.trainable_entries:,}",
        f"delta written to:  {demo.delta_dir}",
        f"localization:      {demo.report_json} and {demo.report_plot}",
        "time: " + ", ".join(f"{k} {v:.1f}s" for k, v in demo.seconds.items()),
    ]
    for key, value in (extra or {}).items():
        lines.append(f"{key}: {value}")
    return "\n".join(lines)
