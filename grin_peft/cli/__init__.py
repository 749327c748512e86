"""`grin-peft`: unlearn, merge, revert, evaluate and demo from the command line.

Every failure is one line on stderr and a non-zero exit; outputs are written to a temporary sibling directory
and moved into place only when complete, so a failed run leaves nothing partial behind.

Parse first, import late: this module imports nothing heavy at the top, `build_parser` neither, and the console
entry point (`grin_peft_launcher`) loads it without running the package's `__init__` (which imports peft), so
`--help` and a mistyped flag answer at once. A command's function imports what it needs. A new command is one
`sub.add_parser(...)` block in `build_parser` ending in `p.set_defaults(func=cmd_<name>)`, the command's
function in a module of this package (:mod:`.unlearn`, :mod:`.commands`; shared checks in :mod:`.inputs`).
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import sys
import warnings
from collections.abc import Iterator, Sequence

from ..errors import GrinError, command_line_terms
from .commands import cmd_demo, cmd_eval, cmd_merge, cmd_revert
from .inputs import PIN_HELP, add_format_flags, add_load_flags
from .unlearn import cmd_unlearn

EXIT_USAGE, EXIT_ERROR = 2, 1

EPILOG = """examples:
  grin-peft demo
  grin-peft unlearn --model ./my-model --forget forget.jsonl --retain retain.jsonl --output delta/
  grin-peft merge --model ./my-model --delta delta/ --output merged/
  grin-peft revert --model merged/ --delta delta/ --output restored/
  grin-peft eval --model ./my-model --delta delta/ --data forget.jsonl --json scores.json
  grin-peft unlearn --model Qwen/Qwen2.5-0.5B-Instruct --chat --system-prompt "You are a helpful assistant." \
      --forget forget.jsonl --retain retain.jsonl --output delta/
  grin-peft eval --model ./my-model --delta delta/ --lm-eval wmdp_bio,mmlu,../shared/data/wmdp/wmdp-chem.jsonl

Data files are JSON Lines with one {"question": ..., "answer": ...} object per line (TOFU's field names), or a
Hub dataset id. Models are local directories or Hub ids.
"""


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, kept separate so the docs and tests can inspect it; imports nothing heavy."""
    from ..audit import cli as audit_cli
    from ..ledger.cli import add_parser as add_ledger_parser

    parser = argparse.ArgumentParser(
        prog="grin-peft",
        description="GRIN unlearning: localise the weights that hold what must be forgotten, train a sparse delta "
        "there, and share, merge or revert it.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser(
        "unlearn",
        help="make a model forget a data set; writes a GRIN delta",
        description="Localise with gradient ratios, inject noise, train the sparse delta. By default an automatic "
        "operating point picks the learning rate and stops when forget answer probability reaches the target while "
        "a held-out slice of the retain data stays above its floor; it prints before/after numbers and exits "
        "non-zero, writing nothing, when the target is missed (unless --allow-partial).",
    )
    p.add_argument("--model", required=True, help="base model directory or Hub id")
    p.add_argument("--forget", required=True, help="JSON Lines file (question/answer) or Hub dataset id to forget")
    p.add_argument("--retain", help="JSON Lines file or Hub dataset id to keep (needed by most objectives)")
    p.add_argument("--output", required=True, help="new directory for the delta (must not exist or be empty)")
    p.add_argument(
        "--objective", default="npo", help="grad_ascent, grad_diff, npo (default), simnpo, idk_nll, idk_dpo, ihl"
    )
    p.add_argument("--refusals", help="text file of refusal answers, one per line (idk_nll, idk_dpo)")
    p.add_argument(
        "--density",
        type=float,
        help="fraction of targeted entries to train; default 1e-3, and the automatic operating point retries at 5x "
        "(up to 0.25) when the target is missed; an explicit value is kept",
    )
    p.add_argument(
        "--score",
        default="gradient_ratio",
        help="entry score: gradient_ratio (default), leverage_ratio, retain_complement, paper (the paper's stated "
        "form: |sum of forget gradients| / (|sum of retain gradients| + eps)), random, magnitude, forget_gradient, "
        "ssd, wagle, squared_ratio",
    )
    p.add_argument("--target-modules", default="all-linear", help="modules to adapt (default all-linear)")
    p.add_argument("--noise-std", type=float, default=0.1, help="injected noise, times each tensor's std (0.1)")
    p.add_argument(
        "--forget-target",
        help="forgotten means forget answer probability <= this: 0.2 (default, absolute) or a share of the "
        "start such as 20%%",
    )
    p.add_argument(
        "--retain-floor",
        type=float,
        help="held-out retain answer probability must stay >= this fraction of the original's (0.85)",
    )
    p.add_argument("--max-epochs", type=float, help="step budget of the automatic search, in forget passes (20)")
    p.add_argument("--allow-partial", action="store_true", help="write the delta even when the target was not reached")
    p.add_argument("--lr", type=float, help="fixed learning rate: switches the automatic operating point off")
    p.add_argument("--epochs", type=float, help="fixed passes over the forget set: switches it off too")
    p.add_argument("--batch-size", type=int, default=8, help="forget (and retain) examples per step (8)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads",
        type=int,
        help="torch threads; default: 1 for a CPU model below 25M parameters unless OMP_NUM_THREADS is set, else "
        "torch's choice (grin_peft.threads)",
    )
    p.add_argument(
        "--sam-rho",
        type=float,
        default=0.0,
        help="sharpness-aware unlearning, a defence against relearning attacks (grin_peft.sharpness): the radius of "
        "the worst-case weight step the forget loss is trained against; ~2x the training time (0: off)",
    )
    p.add_argument("--forget-description", help="what is forgotten, for the model card")
    p.add_argument("--push-to-hub", metavar="REPO_ID", help="also push the delta to this Hub repo")
    p.add_argument(
        "--push-merged",
        action="store_true",
        help="push the merged model instead of the delta, which shows which entries unlearning changed",
    )
    add_format_flags(p)
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("merge", help="merge a delta into its base model for deployment")
    p.add_argument("--model", required=True, help="base model directory or Hub id")
    p.add_argument("--delta", required=True, help="delta directory or Hub repo id")
    p.add_argument("--output", required=True, help="new directory for the merged model")
    add_load_flags(p)
    p.set_defaults(func=cmd_merge)

    p = sub.add_parser("revert", help="undo a merge exactly (bit for bit)")
    p.add_argument("--model", required=True, help="merged model directory or Hub id")
    p.add_argument("--delta", required=True, help="the delta that was merged (directory or Hub repo id)")
    p.add_argument("--output", required=True, help="new directory for the restored model")
    p.add_argument("--force", action="store_true", help="revert even if the model does not contain the delta")
    p.add_argument("--expected-sha256", metavar="DIGEST", help=PIN_HELP)
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("eval", help="answer probability, ROUGE-L, truth ratio and more on a QA set; lm-eval tasks")
    p.add_argument("--model", required=True, help="model directory or Hub id")
    p.add_argument("--delta", help="optional GRIN delta to apply")
    p.add_argument("--data", help="JSON Lines file (question/answer[/perturbed_answer]) or Hub id")
    p.add_argument(
        "--lm-eval",
        metavar="TASKS",
        help="also run lm-evaluation-harness (pip install 'grin-peft[lm-eval]') on the model in memory: "
        "comma-separated task names (wmdp_bio,mmlu) or local multiple-choice .jsonl files in WMDP's layout",
    )
    p.add_argument("--truth-ratio-form", choices=("forget", "retain"), default="retain")
    p.add_argument("--max-new-tokens", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--json", help="also write every per-item number here")
    add_load_flags(p)
    add_format_flags(p)
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("demo", help="the whole pipeline on invented data, offline, in a few minutes on a CPU")
    p.add_argument("--output", default="runs/demo", help="where the delta and reports go (runs/demo)")
    p.add_argument("--cache-dir", help="where the memorised tiny model is cached (~/.cache/grin_peft/demo)")
    p.add_argument("--density", type=float, help="fraction of entries to train (the demo's default: 1e-2)")
    p.add_argument("--objective", help="unlearning objective (the demo's default: npo)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_demo)

    audit_cli.add_parser(sub)
    add_ledger_parser(sub)
    return parser


def _kernel_notice(record: logging.LogRecord) -> bool:
    return "gemm_4bit_forward" not in record.getMessage()


@contextlib.contextmanager
def _quiet_third_party_noise() -> Iterator[None]:
    """Within the block, silence what is not about the user's job: bitsandbytes' notice about an optional CPU kernel,
    FutureWarnings that transformers and peft raise about their own internals, and transformers' weight-loading
    bars. Other warnings still show."""
    from transformers.utils import logging as transformers_logging

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.addFilter(_kernel_notice)
    bars = transformers_logging.is_progress_bar_enabled()
    transformers_logging.disable_progress_bar()
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", category=FutureWarning, module=r"(transformers|peft)(\.|$)")
            yield
    finally:
        logger.removeFilter(_kernel_notice)
        if bars:
            transformers_logging.enable_progress_bar()


def _import_package() -> None:
    """Run the package's `__init__` (registering GRIN with PEFT) if the launcher deferred it until after parsing."""
    package = sys.modules[__name__.rpartition(".")[0]]
    if not hasattr(package, "__version__"):
        package.__spec__.loader.exec_module(package)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `grin-peft`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from ..progress import Heartbeat, line_progress_if_not_a_terminal

        with (
            command_line_terms(),
            _quiet_third_party_noise(),
            line_progress_if_not_a_terminal(),
            Heartbeat(f"grin-peft {args.command}"),
        ):
            _import_package()
            return args.func(args)
    except GrinError as exc:
        print(f"grin-peft {args.command}: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return EXIT_ERROR
    except (OSError, ValueError) as exc:
        print(
            f"grin-peft {args.command}: error: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}",
            file=sys.stderr,
        )
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"grin-peft {args.command}: interrupted; nothing was written.", file=sys.stderr)
        return 130
    except Exception as exc:  # a bad input no check above named: still one line, never a traceback
        first = str(exc).splitlines()[0] if str(exc).strip() else ""
        print(f"grin-peft {args.command}: error: {type(exc).__name__}: {first}".rstrip(": "), file=sys.stderr)
        return EXIT_ERROR
