"""`grin-peft merge`, `revert`, `eval` and `demo`: the commands that apply, undo, score or show a delta."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from .inputs import (
    atomic_output,
    check_grin_delta,
    check_output,
    fail,
    load_model,
    load_options,
    qa_format,
    read_items,
)


def cmd_merge(args: argparse.Namespace) -> int:
    """Merge a GRIN delta into its base for deployment; the output is a plain transformers model folder."""
    from peft import PeftModel

    check_output(args.output)
    check_grin_delta(args.delta)
    model, tokenizer = load_model(args.model)
    peft_model = PeftModel.from_pretrained(model, args.delta, **load_options(args))
    with atomic_output(args.output) as work:
        merged = peft_model.merge_and_unload(safe_merge=True)
        merged.save_pretrained(work)
        tokenizer.save_pretrained(work)
    print(
        f"merged model written to {args.output}; undo with: grin-peft revert --model {args.output} "
        f"--delta {args.delta} --output <dir>"
    )
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    """Undo a merge bit for bit: every entry the delta changed gets its base value back, checked before any write."""
    from ..revert import revert

    check_output(args.output)
    check_grin_delta(args.delta)
    model, tokenizer = load_model(args.model)
    revert(model, args.delta, force=args.force, expected_sha256=args.expected_sha256)
    with atomic_output(args.output) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
    print(f"reverted model written to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    """Score a model (with a delta applied, if given) on a data file, and on lm-eval tasks if asked."""
    from ..metrics import evaluate_qa

    if not args.data and not args.lm_eval:
        raise fail("nothing to evaluate: give --data, --lm-eval, or both.")
    items = read_items(args.data, "data") if args.data else None
    if args.delta:
        check_grin_delta(args.delta)
    model, tokenizer = load_model(args.model)
    fmt = qa_format(args, tokenizer)
    if args.delta:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.delta, **load_options(args))
    report: dict[str, Any] = {}
    if items is not None:
        report = evaluate_qa(
            model,
            fmt,
            items,
            truth_ratio_form=args.truth_ratio_form,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
        )
        print("| metric | value |\n|---|---|")
        for key, value in report["summary"].items():
            print(f"| {key} | {'n/a' if value is None else f'{value:.4f}'} |")
    if args.lm_eval:
        from ..metrics import lm_eval

        # lm-eval's own default is plain text: its chat template only on an explicit --chat
        harness = lm_eval(
            model,
            tokenizer,
            args.lm_eval,
            batch_size=args.batch_size,
            apply_chat_template=args.chat is True,
            system_instruction=args.system_prompt,
        )
        report["lm_eval"] = harness["results"]
        print("| lm-eval task | acc |\n|---|---|")
        for task, values in harness["results"].items():
            print(f"| {task} | {values.get('acc,none', 'n/a')} |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"per-item results written to {args.json}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """The offline end-to-end run a new user starts with: a tiny memorised model, unlearned, before and after."""
    from ..demo import DEFAULTS, format_report, run_demo

    demo = run_demo(
        output_dir=args.output,
        cache_dir=args.cache_dir,
        density=DEFAULTS["density"] if args.density is None else args.density,
        objective=args.objective or DEFAULTS["objective"],
        seed=args.seed,
        progress=not args.quiet,
    )
    print(format_report(demo))
    return 0
