"""`grin-peft`: unlearn, merge, revert, evaluate and demo from the command line.

Every failure is one line on stderr and a non-zero exit; outputs are written to a temporary sibling directory
and moved into place only when complete, so a failed run leaves nothing partial behind.

Parse first, import late: this module imports nothing heavy at the top, `build_parser` neither, and the console
entry point (`grin_peft_launcher`) loads it without running the package's `__init__` (which imports peft), so
`--help` and a mistyped flag answer at once. A command's function imports what it needs. A new command is one
`sub.add_parser(...)` block in `build_parser` ending in `p.set_defaults(func=cmd_<name>)`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import shutil
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from .errors import GrinError, command_line_terms

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


def _fail(message: str) -> GrinError:
    return GrinError(message)


def _check_output(path: str) -> None:
    """Refuse an --output that exists and is not an empty directory, before any model is loaded or trained."""
    target = Path(path)
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise _fail(f"output {target} already exists and is not empty; choose another --output.")


def _check_grin_delta(delta: str) -> None:
    """Refuse a delta that is not GRIN (peft_type), before the base model is loaded."""
    from .delta_file import read_config_dict

    peft_type = read_config_dict(delta).get("peft_type")
    if peft_type != "GRIN":
        raise _fail(f"{delta} is not a GRIN delta (peft_type={peft_type!r}); grin-peft only applies GRIN deltas.")


@contextlib.contextmanager
def _atomic_output(path: str) -> Iterator[Path]:
    """A temporary directory beside `path` that becomes `path` only if the block succeeds."""
    target = Path(path)
    _check_output(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield work
        from .atomic_folder import apply_umask_tree

        apply_umask_tree(work)
        if target.exists():
            target.rmdir()
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def _read_items(source: str, what: str) -> list[dict[str, Any]]:
    """QA items from a JSON Lines file or a Hub dataset id; refuses empty sets before any model is loaded."""
    from .data import load_qa_jsonl
    from .delta_file import looks_local

    if os.path.exists(source) or looks_local(source):
        if not os.path.isfile(source):
            raise _fail(f"{what} file {source}: no such file.")
        items = load_qa_jsonl(source)
    else:
        items = _hub_items(source, what)
    if not items:
        raise _fail(f"{what} set {source} is empty.")
    return items


def _hub_items(repo_id: str, what: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise _fail(
            f"{what}: {repo_id} is not a file, and loading Hub datasets needs `pip install datasets`."
        ) from None
    try:
        return [dict(row) for row in datasets.load_dataset(repo_id, split="train")]
    except Exception as exc:
        raise _fail(f"{what}: cannot load dataset {repo_id}: {exc}") from exc


def _load_model(name: str):
    """Model and tokenizer from a local folder or a Hub id; a path that does not exist fails before any Hub lookup."""
    from .delta_file import looks_local

    if looks_local(name) and not os.path.isdir(name):
        what = "not a directory" if os.path.exists(name) else "no such file or directory"
        raise _fail(f"model {name}: {what} (and not a Hub id).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise _fail(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


def _add_format_flags(p: argparse.ArgumentParser) -> None:
    """--template, --chat/--no-chat, --system-prompt: how a question and its answer become tokens (QAFormat)."""
    p.add_argument(
        "--template",
        help="plain-text layout with {question} and {answer} (default 'Question: {question}\\nAnswer: {answer}'); "
        "only without a chat template",
    )
    p.add_argument(
        "--chat",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="lay examples out with the tokenizer's chat template (default: when the tokenizer has one)",
    )
    p.add_argument("--system-prompt", help="system message before each question (chat layout only)")


def _qa_format(args: argparse.Namespace, tokenizer):
    """The QAFormat the flags ask for; a flag that the resolved layout would ignore is an error, not a no-op."""
    from .data import DEFAULT_TEMPLATE, QAFormat

    # a shell hands "\n" over as backslash-n: read it as the newline it means
    template = args.template.replace("\\n", "\n") if args.template else DEFAULT_TEMPLATE
    fmt = QAFormat(tokenizer, template=template, chat=args.chat, system_prompt=args.system_prompt)
    if args.template and fmt.chat:
        raise _fail("--template lays out plain text, but the chat template is in use; add --no-chat to use it.")
    if args.system_prompt and not fmt.chat:
        raise _fail(
            "--system-prompt needs the chat layout: the tokenizer has no chat template, or --no-chat was given."
        )
    return fmt


def cmd_unlearn(args: argparse.Namespace) -> int:
    from .config import GrinConfig
    from .pipeline import unlearn
    from .sharpness import check_rho

    _check_output(args.output)
    if args.threads is not None and args.threads < 1:
        raise _fail(f"--threads must be a positive integer, got {args.threads}.")
    check_rho(args.sam_rho)
    if args.push_merged and not args.push_to_hub:
        raise _fail("--push-merged says what --push-to-hub pushes; give --push-to-hub REPO_ID too.")
    forget = _read_items(args.forget, "forget")
    retain = _read_items(args.retain, "retain") if args.retain else None
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
            raise _fail("--lr/--epochs fix the schedule; --forget-target/--retain-floor/--max-epochs need neither.")
        point = False
    else:
        point = _operating_point(args)
    main_process = _join_process_group()
    model, tokenizer = _load_model(args.model)
    fmt = _qa_format(args, tokenizer)
    output = _atomic_output(args.output) if main_process else contextlib.nullcontext()
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
            raise _fail(
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
    from .objectives import get_objective

    needs = get_objective(args.objective).requirements
    if args.refusals is None:
        if needs.refusal or needs.reference_refusal:
            raise _fail(f"--objective {args.objective} trains towards refusal answers: give --refusals FILE.")
        return None
    if not os.path.isfile(args.refusals):
        raise _fail(f"--refusals {args.refusals}: no such file.")
    lines = [line.strip() for line in Path(args.refusals).read_text().splitlines() if line.strip()]
    if not lines:
        raise _fail(f"--refusals {args.refusals} holds no refusal answers.")
    return lines


def _load_options(args: argparse.Namespace) -> dict[str, Any]:
    """PeftModel.from_pretrained options from --fingerprint-check and --expected-sha256."""
    options = {}
    if args.fingerprint_check is not None:
        options["grin_fingerprint_check"] = args.fingerprint_check
    if args.expected_sha256 is not None:
        options["expected_sha256"] = args.expected_sha256
    return options


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
    from .operating_point import OperatingPoint

    options: dict[str, Any] = {}
    if args.forget_target is not None:
        text = args.forget_target.strip()
        try:
            if text.endswith("%"):
                options.update(forget_target=float(text[:-1]) / 100, relative=True)
            else:
                options["forget_target"] = float(text)
        except ValueError:
            raise _fail(f"--forget-target {args.forget_target!r} is not a number like 0.2 or 20%.") from None
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


def cmd_merge(args: argparse.Namespace) -> int:
    from peft import PeftModel

    _check_output(args.output)
    _check_grin_delta(args.delta)
    model, tokenizer = _load_model(args.model)
    peft_model = PeftModel.from_pretrained(model, args.delta, **_load_options(args))
    with _atomic_output(args.output) as work:
        merged = peft_model.merge_and_unload(safe_merge=True)
        merged.save_pretrained(work)
        tokenizer.save_pretrained(work)
    print(
        f"merged model written to {args.output}; undo with: grin-peft revert --model {args.output} "
        f"--delta {args.delta} --output <dir>"
    )
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    from .revert import revert

    _check_output(args.output)
    _check_grin_delta(args.delta)
    model, tokenizer = _load_model(args.model)
    revert(model, args.delta, force=args.force, expected_sha256=args.expected_sha256)
    with _atomic_output(args.output) as work:
        model.save_pretrained(work)
        tokenizer.save_pretrained(work)
    print(f"reverted model written to {args.output}")
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from .metrics import evaluate_qa

    if not args.data and not args.lm_eval:
        raise _fail("nothing to evaluate: give --data, --lm-eval, or both.")
    items = _read_items(args.data, "data") if args.data else None
    if args.delta:
        _check_grin_delta(args.delta)
    model, tokenizer = _load_model(args.model)
    fmt = _qa_format(args, tokenizer)
    if args.delta:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, args.delta, **_load_options(args))
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
        from .metrics import lm_eval

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
    from .demo import DEFAULTS, format_report, run_demo

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


def build_parser() -> argparse.ArgumentParser:
    """The argument parser, kept separate so the docs and tests can inspect it; imports nothing heavy."""
    from .audit import cli as audit_cli
    from .ledger.cli import add_parser as add_ledger_parser

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
        "--push-merged", action="store_true",
        help="push the merged model instead of the delta, which shows which entries unlearning changed",
    )  # fmt: skip
    _add_format_flags(p)
    p.set_defaults(func=cmd_unlearn)

    p = sub.add_parser("merge", help="merge a delta into its base model for deployment")
    p.add_argument("--model", required=True, help="base model directory or Hub id")
    p.add_argument("--delta", required=True, help="delta directory or Hub repo id")
    p.add_argument("--output", required=True, help="new directory for the merged model")
    _add_load_flags(p)
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
    _add_load_flags(p)
    _add_format_flags(p)
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


PIN_HELP = (
    "refuse the delta unless its sha256 (printed by unlearn and push, in the model card) is this one; detects "
    "tampering when the digest came to you by a channel you trust"
)


def _add_load_flags(p: argparse.ArgumentParser) -> None:
    """Flags of every command that applies a delta to a base."""
    p.add_argument(
        "--fingerprint-check",
        choices=("error", "warn", "off"),
        help="a base other than the delta's own: refuse (error, the default), apply with a warning (warn), or "
        "apply silently (off)",
    )
    p.add_argument("--expected-sha256", metavar="DIGEST", help=PIN_HELP)


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
    package = sys.modules[__package__]
    if not hasattr(package, "__version__"):
        package.__spec__.loader.exec_module(package)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of `grin-peft`; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        from .progress import Heartbeat, line_progress_if_not_a_terminal

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


if __name__ == "__main__":
    sys.exit(main())
