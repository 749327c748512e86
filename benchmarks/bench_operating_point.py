"""The automatic operating point, as users meet it: `grin-peft unlearn` with no tuning flags, and the controller
driving each parameterisation to the same target.

Two parts (both on the cached models of ``bench_tofu.py`` and of ``grin-peft demo``; nothing is downloaded):

* ``--cli``: ``grin-peft unlearn --model M --forget F --retain R --output D`` with no tuning flag, on (a) the
  TOFU target of BENCHMARKS.md section 5 (forget10 / retain90) and (b) the demo's smaller memorised model (10
  forget, 90 retain items). Records the exit code, the before/after table and the time.
* ``--methods``: :func:`grin_peft.operating_point.search` driving full-parameter NPO, LoRA r=8 NPO and GRIN at
  given densities (``grin:0.05``) on the TOFU target, at ``--batch-size`` forget + retain examples per step, to the
  default target (forget answer probability <= 0.2, held-out retain >= 0.85 x the start). The same held-out slice
  (10% of retain90, at most 200 items, seed 0) for every method; GRIN localises on a seeded 400-item sample of the
  training retain items. So the methods are compared where a user would stop them, not at a fixed step count.

Outputs ``benchmarks/results/operating_point.{json,md}`` (``--out``).

    python benchmarks/bench_operating_point.py --cli --seeds 0,1
    python benchmarks/bench_operating_point.py --methods full,lora,grin:0.05,grin:0.25 --batch-size 32
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import json
import math
import random
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import bench_tofu  # noqa: E402
import torch
from common import (  # benchmarks/ is on sys.path as a script
    REPO,
    atomic_write,
    cache_root,
    environment,
    quiet_transformers,
)

from grin_peft.cli import main as cli_main  # noqa: E402
from grin_peft.data import QAFormat, load_tofu  # noqa: E402
from grin_peft.operating_point import OperatingPoint, search, split_heldout  # noqa: E402
from grin_peft.paired_data import encode_dataset  # noqa: E402
from grin_peft.synthetic import write_jsonl  # noqa: E402
from grin_peft.trainer import UnlearningTrainer  # noqa: E402
from grin_peft.unlearning_args import UnlearningArguments  # noqa: E402

MODEL_LABELS = {
    "demo": "demo (10 forget / 90 retain)",
    "tofu": "TOFU target",
    "hazard": "WMDP-style (100 forget / 417 general)",
}
LR_GRIDS = {"full": (3e-5, 1e-4, 3e-4, 1e-3, 3e-3), "lora": (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)}


def tofu_target(work: Path) -> tuple[Any, Any, Path]:
    """The cached TOFU target (trained once by bench_tofu) and its tokenizer, also saved as a model folder."""
    args = bench_tofu.parse_args(["--workers", "1"])
    data = Path(args.data)
    setup = bench_tofu.tiny_setup(args, data)  # settings, cache root, tokenizer, its key, author subset
    tokenizer = setup[2]
    target, _ = bench_tofu.load_or_train("target", "forget10", data, *setup)
    folder = work / "tofu"
    if not (folder / "model").exists():
        target.save_pretrained(folder / "model")
        tokenizer.save_pretrained(folder / "model")
        write_jsonl(load_tofu("forget10", data), folder / "forget.jsonl")
        write_jsonl(load_tofu("retain90", data), folder / "retain.jsonl")
    return target, tokenizer, folder


def demo_target(work: Path) -> Path:
    """The demo's memorised model (cached by `grin-peft demo`), saved as a model folder with its data."""
    from grin_peft.tiny import load_or_train_memorised_model

    memorised = load_or_train_memorised_model(progress=False)
    folder = work / "demo"
    if not (folder / "model").exists():
        memorised.model.save_pretrained(folder / "model")
        memorised.tokenizer.save_pretrained(folder / "model")
        write_jsonl(memorised.dataset.forget, folder / "forget.jsonl")
        write_jsonl(memorised.dataset.retain, folder / "retain.jsonl")
    return folder


def hazard_target(work: Path) -> Path:
    """The WMDP-style task of bench_hazard.py (its cached model): forget the memorised WMDP-bio answers, retain the
    general items, saved as a model folder with its data."""
    import bench_hazard

    settings = bench_hazard.HazardSettings()
    data = bench_hazard.DEFAULT_DATA
    model, fmt, _ = bench_hazard.load_or_train(data, settings, cache_root("hazard"))
    corpus = bench_hazard.build_corpus(data, settings)
    folder = work / "hazard"
    if not (folder / "model").exists():
        model.save_pretrained(folder / "model")
        fmt.tokenizer.save_pretrained(folder / "model")
        write_jsonl(bench_hazard.wmdp_qa(corpus["wmdp_forget"]), folder / "forget.jsonl")
        write_jsonl(corpus["general"], folder / "retain.jsonl")
    return folder


def run_cli(folder: Path, seed: int) -> dict[str, Any]:
    """`grin-peft unlearn` with no tuning flag (but the seed); the summary it wrote (or what it printed)."""
    output = folder / f"delta-{time.time_ns()}"
    argv = ["unlearn", "--model", str(folder / "model"), "--forget", str(folder / "forget.jsonl")]
    argv += ["--retain", str(folder / "retain.jsonl"), "--output", str(output), "--seed", str(seed)]
    stdout, stderr = io.StringIO(), io.StringIO()
    started = time.perf_counter()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = cli_main(argv)
    row: dict[str, Any] = {
        "command": "grin-peft " + " ".join(argv),
        "exit_code": code,
        "seconds": time.perf_counter() - started,
        "stdout": stdout.getvalue().splitlines(),
        "error": [line for line in stderr.getvalue().splitlines() if "error:" in line],
    }
    summary_file = output / "unlearn_summary.json"
    if summary_file.exists():
        summary = json.loads(summary_file.read_text())
        row.update(before=summary["before"], after=summary["after"], target_met=summary["target_met"])
        record = summary["operating_point"]
        row.update(learning_rate=record["learning_rate"], retain_weight=record["retain_weight"])
        row["density_attempts"] = record.get("density_attempts")
    else:  # a missed target writes nothing: read the before/after table the command printed
        row.update(_printed_table(row["stdout"]), target_met=False)
    print(json.dumps({k: v for k, v in row.items() if k != "stdout"}, default=str), flush=True)
    return row


@contextlib.contextmanager
def _original_weights(model: torch.nn.Module, reference: torch.nn.Module):
    """A fully trained model behaves as the original inside this block."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    model.load_state_dict(reference.state_dict())
    try:
        yield
    finally:
        model.load_state_dict(state)


def run_method(name: str, target: Any, tokenizer: Any, batch: int, max_epochs: float, seed: int) -> dict[str, Any]:
    """The controller driving one parameterisation on TOFU forget10 / retain90 (``seed``: the held-out split, the
    localisation sample, GRIN's noise and the data order)."""
    from peft import LoraConfig, get_peft_model

    import grin_peft

    data = bench_tofu.DEFAULT_DATA
    qa = QAFormat(tokenizer)
    forget = encode_dataset(load_tofu("forget10", data), "forget", qa)[0]
    retain = encode_dataset(load_tofu("retain90", data), "retain", qa)[0]
    point = OperatingPoint(max_epochs=max_epochs, seed=seed)
    train_retain, heldout = split_heldout(retain, point)
    model, ref = copy.deepcopy(target), None
    started = time.perf_counter()
    if name == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        ref = copy.deepcopy(target).eval()
        point.lr_grid, original = LR_GRIDS["full"], (lambda: _original_weights(model, ref))
    elif name == "lora":
        model = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules="all-linear"))
        point.lr_grid, original = LR_GRIDS["lora"], model.disable_adapter
    elif name.startswith("grin:"):
        model = get_peft_model(model, grin_peft.GrinConfig(density=float(name.split(":", 1)[1]), seed=seed))
        model.localize(forget, random.Random(seed).sample(train_retain, 400), progress=False)
        original = model.disable_adapter
    else:
        raise SystemExit(f"unknown method {name!r}: full, lora or grin:<density>")
    point.validate()
    scratch = tempfile.mkdtemp(prefix="bench_op_")

    def make(lr: float, steps: int, segment: int, retain_weight: float | None) -> UnlearningTrainer:
        args = UnlearningArguments(
            output_dir=scratch, objective="npo", learning_rate=lr, max_steps=steps, per_device_train_batch_size=batch,
            save_strategy="no", report_to=[], disable_tqdm=True, use_cpu=True, bf16=True, lr_scheduler_type="constant",
            weight_decay=0.0, seed=100 * seed + segment, dataloader_pin_memory=False,
            **({"retain_weight": retain_weight} if retain_weight else {}),
        )  # fmt: skip
        trainer = UnlearningTrainer(model, args, forget, train_retain, qa_format=qa, ref_model=ref)
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)
        return trainer

    with quiet_transformers():
        record = search(
            model, make, point, forget_eval=forget, heldout=heldout, retain_eval=heldout,
            steps_per_epoch=math.ceil(len(forget) / batch), original=original, retain_weight=1.0,
        )  # fmt: skip
    row = {
        "method": name,
        "seed": seed,
        "batch_size": batch,
        "seconds": time.perf_counter() - started,
        "trainable": int(sum(p.numel() for p in model.parameters() if p.requires_grad)),
        **{k: record[k] for k in ("target_met", "learning_rate", "retain_weight", "steps", "steps_run", "gave_up")},
        "before": record["before"],
        "after": record["after"],
        "record": record,
    }
    print(json.dumps({k: v for k, v in row.items() if k != "record"}, default=str), flush=True)
    return row


PRINTED_ROWS = {
    "forget answer probability": "forget_prob",
    "retain answer probability": "retain_prob",
    "held-out retain answer probability": "heldout_retain_prob",
}


def _printed_table(lines: list[str]) -> dict[str, Any]:
    """``before``/``after`` from the last before/after table in the printed output."""
    before, after = {}, {}
    for line in lines:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) == 3 and cells[0] in PRINTED_ROWS:
            before[PRINTED_ROWS[cells[0]]], after[PRINTED_ROWS[cells[0]]] = float(cells[1]), float(cells[2])
    return {"before": before, "after": after} if before else {}


def render(report: dict[str, Any]) -> str:
    lines = [f"`{report['command']}`", ""]
    if report.get("cli"):
        lines += [
            "| model | seed | exit | target met | forget prob | retain prob | held-out retain prob | lr | "
            "retain weight | densities tried | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in report["cli"]:
            b, a = row.get("before") or {}, row.get("after") or {}

            def pair(key: str, b=b, a=a) -> str:
                return f"{b[key]:.3f} -> {a[key]:.3f}" if key in b and key in a else "-"

            tried = ", ".join(f"{t['density']:g}" for t in row.get("density_attempts") or []) or "-"
            lines.append(
                f"| {row['model']} | {row.get('seed', 0)} | {row['exit_code']} | {row.get('target_met')} | "
                f"{pair('forget_prob')} | "
                f"{pair('retain_prob')} | {pair('heldout_retain_prob')} | {row.get('learning_rate', '-')} | "
                f"{row.get('retain_weight', '-')} | {tried} | {row['seconds']:.0f} |"
            )
        lines.append("")
    if report.get("methods"):
        lines += [
            "| method | seed | batch | target met | forget prob | held-out retain prob | lr | retain weight | "
            "kept step | steps run | trainable | s |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in report["methods"]:
            b, a = row["before"], row["after"]
            lines.append(
                f"| {row['method']} | {row.get('seed', 0)} | {row['batch_size']} | {row['target_met']} | "
                f"{b['forget_prob']:.3f} -> "
                f"{a['forget_prob']:.3f} | {b['heldout_retain_prob']:.3f} -> {a['heldout_retain_prob']:.3f} | "
                f"{row['learning_rate']:.3g} | {row['retain_weight']} | {row['steps']} | {row['steps_run']} | "
                f"{row['trainable']:,} | {row['seconds']:.0f} |"
            )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cli", action="store_true", help="grin-peft unlearn with no tuning flag on both models")
    p.add_argument("--seeds", default="0", type=lambda t: [int(x) for x in t.split(",")], help="seeds of every run")
    p.add_argument(
        "--models", default="demo,tofu", type=lambda t: t.split(","), help="--cli models: demo, tofu, hazard"
    )
    p.add_argument("--methods", default="", help="comma list: full, lora, grin:<density>")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-epochs", type=float, default=20.0, help="the controller's budget (its default: 20)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--stem", default="operating_point")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_op_work_"))
    report: dict[str, Any] = {
        "command": "python benchmarks/bench_operating_point.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "environment": environment(),
        "cli": [],
        "methods": [],
    }
    target, tokenizer, tofu_folder = tofu_target(work)
    if args.cli:
        for seed in args.seeds:
            for label in args.models:
                folder = {"demo": demo_target, "tofu": lambda w: tofu_folder, "hazard": hazard_target}[label](work)
                report["cli"].append({"model": MODEL_LABELS[label], "seed": seed, **run_cli(folder, seed)})
    for name in filter(None, args.methods.split(",")):
        for seed in args.seeds:
            row = run_method(name.strip(), target, tokenizer, args.batch_size, args.max_epochs, seed)
            report["methods"].append(row)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{args.stem}.json", json.dumps(report, indent=2, default=str))
    atomic_write(out / f"{args.stem}.md", render(report))
    print(render(report))
    return report


if __name__ == "__main__":
    main()
