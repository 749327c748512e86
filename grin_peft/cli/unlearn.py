"""`grin-peft unlearn`: localise, train and save a GRIN delta, and print what it achieved.

The flags become a :class:`~grin_peft.config.GrinConfig` and either a fixed schedule (``--lr``/``--epochs``) or the
automatic operating point (``--forget-target``, ``--retain-floor``, ``--max-epochs``); a missed target writes nothing
unless ``--allow-partial``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from pathlib import Path
from typing import Any

from .inputs import atomic_output, check_output, fail, load_model, qa_format, read_items


def cmd_unlearn(args: argparse.Namespace) -> int:
    """Every check that needs no model first (output, flags, data, refusals), then load, unlearn, report, save."""
    from ..config import GrinConfig
    from ..pipeline import unlearn
    from ..sharpness import check_rho

    check_output(args.output)
    if args.threads is not None and args.threads < 1:
        raise fail(f"--threads must be a positive integer, got {args.threads}.")
    check_rho(args.sam_rho)
    if args.push_merged and not args.push_to_hub:
        raise fail("--push-merged says what --push-to-hub pushes; give --push-to-hub REPO_ID too.")
    forget = read_items(args.forget, "forget")
    retain = read_items(args.retain, "retain") if args.retain else None
    refusals = _read_refusals(args)
    fields = {
        "target_modules": args.target_modules,
        "density": args.density,
        "seed": args.seed,
        "noise_std": args.noise_std,
        "forget_description": args.forget_description,
    }
    # "paper" is the paper's stated form as a preset (GrinConfig.paper), the others are GrinConfig scores
    config = GrinConfig.paper(**fields) if args.score == "paper" else GrinConfig(score=args.score, **fields)
    schedule = {}
    if args.lr is not None or args.epochs is not None:  # a fixed schedule: the controller is off
        schedule = {k: v for k, v in (("learning_rate", args.lr), ("num_train_epochs", args.epochs)) if v is not None}
        if args.forget_target is not None or args.retain_floor is not None or args.max_epochs is not None:
            raise fail("--lr/--epochs fix the schedule; --forget-target/--retain-floor/--max-epochs need neither.")
        point = False
    else:
        point = _operating_point(args)
    main_process = _join_process_group()
    model, tokenizer = load_model(args.model)
    fmt = qa_format(args, tokenizer)
    output = atomic_output(args.output) if main_process else contextlib.nullcontext()
    with output as work, warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="the unlearning target was not reached")  # said below instead
        result = unlearn(
            model,
            forget,
            retain,
            config=config,
            objective=args.objective,
            tokenizer=fmt,
            refusals=refusals,
            operating_point=point,
            seed=args.seed,
            per_device_train_batch_size=args.batch_size,
            sam_rho=args.sam_rho,
            disable_tqdm=True,
            verbose=main_process,
            **schedule,
            **({"num_threads": args.threads} if args.threads is not None else {}),
        )
        if not main_process:  # the other ranks trained the same delta; the main process reports and writes it
            return 0
        print(_before_after(result))
        if result.target_met is False and not args.allow_partial:
            raise fail(
                "the unlearning target was not reached (numbers above); nothing was written. Relax "
                "--forget-target/--retain-floor, raise --density or --max-epochs, or keep the partial result with "
                "--allow-partial."
            )
        result.peft_model.save_pretrained(work)
        tokenizer.save_pretrained(work)
        if result.localization is not None:
            result.localization.to_json(work / "localization.json")
        (work / "unlearn_summary.json").write_text(json.dumps(result.summary(), indent=2))
    status = {True: "target met", False: "TARGET NOT MET (--allow-partial)", None: "fixed schedule"}[result.target_met]
    print(
        f"delta written to {args.output} ({status}; {result.trainable_entries:,} trainable entries, "
        f"{result.wall_time:.1f}s; every decision in unlearn_summary.json)\n"
        f"delta sha256 {result.peft_model.grin_delta_sha256} (load it pinned: --expected-sha256 <this>)"
    )
    if args.push_to_hub:
        result.peft_model.push_to_hub(args.push_to_hub, merged=args.push_merged)
        print(f"pushed {'the merged model' if args.push_merged else 'the delta'} to {args.push_to_hub}")
    return 0


def _read_refusals(args: argparse.Namespace) -> list[str] | None:
    """The --refusals file's lines; an objective that trains towards refusals needs it, said before any work."""
    from ..objectives import get_objective

    needs = get_objective(args.objective).requirements
    if args.refusals is None:
        if needs.refusal or needs.reference_refusal:
            raise fail(f"--objective {args.objective} trains towards refusal answers: give --refusals FILE.")
        return None
    if not os.path.isfile(args.refusals):
        raise fail(f"--refusals {args.refusals}: no such file.")
    lines = [line.strip() for line in Path(args.refusals).read_text().splitlines() if line.strip()]
    if not lines:
        raise fail(f"--refusals {args.refusals} holds no refusal answers.")
    return lines


def _join_process_group() -> bool:
    """Under a multi-process launcher (``accelerate launch --multi_gpu``, ``torchrun``), join the process group
    before localising, so the scoring passes are dealt over the ranks; without a GPU the group is CPU/gloo (the
    Trainer then follows ``ACCELERATE_USE_CPU``). Returns whether this is the process that reports and writes."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return True
    import torch
    from accelerate import PartialState

    cpu = not torch.cuda.is_available()
    if cpu:
        os.environ["ACCELERATE_USE_CPU"] = "true"
    return PartialState(cpu=cpu).is_main_process


def _operating_point(args: argparse.Namespace):
    """The controller's settings from --forget-target ("0.2" absolute, "20%" of the start), --retain-floor and
    --max-epochs."""
    from ..operating_point import OperatingPoint

    options: dict[str, Any] = {}
    if args.forget_target is not None:
        text = args.forget_target.strip()
        try:
            if text.endswith("%"):
                options.update(forget_target=float(text[:-1]) / 100, relative=True)
            else:
                options["forget_target"] = float(text)
        except ValueError:
            raise fail(f"--forget-target {args.forget_target!r} is not a number like 0.2 or 20%.") from None
    if args.retain_floor is not None:
        options["retain_floor"] = args.retain_floor
    if args.max_epochs is not None:
        options["max_epochs"] = args.max_epochs
    return OperatingPoint(seed=args.seed, **options)


def _before_after(result) -> str:
    """The before/after table every unlearn run prints."""
    rows = [("forget answer probability", "forget_prob"), ("retain answer probability", "retain_prob")]
    if result.before and "heldout_retain_prob" in result.before:
        rows.append(("held-out retain answer probability", "heldout_retain_prob"))
    lines = ["| metric | original | unlearned |", "|---|---|---|"]
    for label, key in rows:
        if result.before and key in result.before:
            lines.append(f"| {label} | {result.before[key]:.4f} | {result.after[key]:.4f} |")
    record = result.operating_point
    if record is not None:
        lines.append(
            f"target: forget <= {record['target_forget_prob']:.4f} with held-out retain >= "
            f"{record['floor_heldout_retain_prob']:.4f}: {'met' if record['target_met'] else 'NOT met'} "
            f"(lr {record['learning_rate']:.3g}, step {record['steps']} of {record['steps_run']} run)"
        )
    return "\n".join(lines)
