"""`grin-peft audit`: the audit from the command line (the subcommand's parser and handler live here, so
``grin_peft/cli.py`` only registers them)."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import GrinError
from .names import ATTACKS, MODES

DESCRIPTION = (
    "Attack an unlearned model with bitsandbytes quantization (8-bit, NF4, FP4), relearning, paraphrased questions, "
    "a jailbreak answer prefix and membership inference, against the original model as reference. Writes "
    "audit.md, audit.json and audit.png; prints the table and one verdict line per attack with its thresholds."
)


def _names(text: str, allowed: tuple[str, ...], option: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in allowed]
    if unknown or not names:
        raise GrinError(f"{option}: unknown or no name(s) {unknown}; choose from {', '.join(allowed)}.")
    return names


def add_parser(subparsers: Any) -> None:
    """Register ``audit`` on the ``grin-peft`` subcommand parsers."""
    p = subparsers.add_parser(
        "audit", help="does the forgetting hold? quantization, relearning, prompt and MIA attacks"
    )
    p.description = DESCRIPTION
    p.add_argument(
        "--model", required=True, help="model directory or Hub id: the unlearned model, or the base of --delta"
    )
    p.add_argument("--delta", help="a GRIN delta or LoRA adapter on --model (then --model is the original)")
    p.add_argument("--original", help="the model before unlearning, when --model is a plain unlearned model")
    p.add_argument("--forget", required=True, help="JSON Lines (question/answer[/paraphrased_question]) or Hub id")
    p.add_argument("--retain", required=True, help="JSON Lines or Hub id of data that must be kept")
    p.add_argument("--holdout", help="never-trained items of the same kind, for membership inference")
    p.add_argument("--output", required=True, help="new directory for audit.md, audit.json, audit.png")
    p.add_argument("--attacks", help=f"comma-separated subset of {','.join(ATTACKS)} (default: all the data allows)")
    p.add_argument("--quantization", default=",".join(MODES), help="bitsandbytes modes (8bit,nf4,fp4)")
    p.add_argument("--relearn-items", type=int, default=10, help="forget items the attacker fine-tunes on (10)")
    p.add_argument("--relearn-steps", type=int, default=50, help="optimizer steps of relearning (50)")
    p.add_argument("--relearn-lr", type=float, default=1e-5, help="relearning learning rate (1e-5)")
    p.add_argument("--relearn-method", choices=("full", "lora"), default="full")
    p.add_argument(
        "--relearn-data", help="JSON Lines of related data without forget items, for the second relearning attack "
        "(default: --retain)",
    )  # fmt: skip
    p.add_argument("--jailbreak-prefix", default=None, help="answer opener (default 'Sure, here is the answer:')")
    p.add_argument("--max-items", type=int, help="measure at most this many forget/retain/holdout items")
    p.add_argument("--max-new-tokens", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8)
    p.set_defaults(func=cmd_audit)


def cmd_audit(args: argparse.Namespace) -> int:
    """Check every input, load the models, audit, write the report atomically, print table and verdicts."""
    from ..cli.inputs import atomic_output, check_output, load_model, read_items
    from .core import audit
    from .prompts import JAILBREAK_PREFIX
    from .relearning import RelearnSettings

    check_output(args.output)
    if args.delta and args.original:
        raise GrinError("give --delta (then --model is the original) or --original, not both.")
    if not args.delta and not args.original:
        raise GrinError("a plain unlearned --model needs --original (the model before unlearning) as reference.")
    attacks = _names(args.attacks, ATTACKS, "--attacks") if args.attacks else None
    modes = _names(args.quantization, MODES, "--quantization")
    settings = RelearnSettings(
        items=args.relearn_items, steps=args.relearn_steps, lr=args.relearn_lr, method=args.relearn_method
    )
    forget = read_items(args.forget, "forget")
    retain = read_items(args.retain, "retain")
    holdout = read_items(args.holdout, "holdout") if args.holdout else None
    related = read_items(args.relearn_data, "relearning") if args.relearn_data else None
    model, tokenizer = load_model(args.model)
    original = None
    if args.delta:
        from peft import PeftModel

        try:
            model = PeftModel.from_pretrained(model, args.delta)
        except Exception as exc:
            raise GrinError(f"cannot load adapter {args.delta!r}: {str(exc).splitlines()[0]}") from exc
    else:
        original, _ = load_model(args.original)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    with atomic_output(args.output) as work:
        report = audit(
            model,
            forget,
            retain,
            tokenizer=tokenizer,
            original=original,
            holdout=holdout,
            attacks=attacks,
            quantization_modes=modes,
            relearn_settings=settings,
            relearn_data=related,
            jailbreak_prefix=args.jailbreak_prefix or JAILBREAK_PREFIX,
            max_items=args.max_items,
            max_new_tokens=args.max_new_tokens,
            batch_size=args.batch_size,
            name=args.model if not args.delta else f"{args.model} + {args.delta}",
        )
        report.save(work)
    print(report.to_markdown())
    print(f"report written to {args.output} (audit.md, audit.json, audit.png)")
    return 0
