"""What every `grin-peft` command reads and writes: data files, models, the output folder, shared flags.

Each check runs before anything heavy is loaded and fails with one :class:`~grin_peft.errors.GrinError` line;
outputs go to a temporary sibling folder that becomes the output only when the command succeeds. Heavy packages
are imported inside the functions, so the parser stays fast.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import GrinError


def fail(message: str) -> GrinError:
    """The one-line error a command fails with (main prints it as ``grin-peft CMD: error: ...``)."""
    return GrinError(message)


def check_output(path: str) -> None:
    """Refuse an --output that exists and is not an empty directory, before any model is loaded or trained."""
    target = Path(path)
    if target.exists() and (target.is_file() or any(target.iterdir())):
        raise fail(f"output {target} already exists and is not empty; choose another --output.")


def check_grin_delta(delta: str) -> None:
    """Refuse a delta that is not GRIN (peft_type), before the base model is loaded."""
    from ..delta_file import read_config_dict

    peft_type = read_config_dict(delta).get("peft_type")
    if peft_type != "GRIN":
        raise fail(f"{delta} is not a GRIN delta (peft_type={peft_type!r}); grin-peft only applies GRIN deltas.")


@contextlib.contextmanager
def atomic_output(path: str) -> Iterator[Path]:
    """A temporary directory beside `path` that becomes `path` only if the block succeeds."""
    target = Path(path)
    check_output(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    try:
        yield work
        from ..atomic_folder import apply_umask_tree

        apply_umask_tree(work)
        if target.exists():
            target.rmdir()
        os.replace(work, target)
    finally:
        if work.exists():
            shutil.rmtree(work, ignore_errors=True)


def read_items(source: str, what: str) -> list[dict[str, Any]]:
    """QA items from a JSON Lines file or a Hub dataset id; refuses empty sets before any model is loaded."""
    from ..data import load_qa_jsonl
    from ..delta_file import looks_local

    if os.path.exists(source) or looks_local(source):
        if not os.path.isfile(source):
            raise fail(f"{what} file {source}: no such file.")
        items = load_qa_jsonl(source)
    else:
        items = _hub_items(source, what)
    if not items:
        raise fail(f"{what} set {source} is empty.")
    return items


def _hub_items(repo_id: str, what: str) -> list[dict[str, Any]]:
    try:
        import datasets
    except ImportError:
        raise fail(
            f"{what}: {repo_id} is not a file, and loading Hub datasets needs `pip install datasets`."
        ) from None
    try:
        return [dict(row) for row in datasets.load_dataset(repo_id, split="train")]
    except Exception as exc:
        raise fail(f"{what}: cannot load dataset {repo_id}: {exc}") from exc


def load_model(name: str):
    """Model and tokenizer from a local folder or a Hub id; a path that does not exist fails before any Hub lookup."""
    from ..delta_file import looks_local

    if looks_local(name) and not os.path.isdir(name):
        what = "not a directory" if os.path.exists(name) else "no such file or directory"
        raise fail(f"model {name}: {what} (and not a Hub id).")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        model = AutoModelForCausalLM.from_pretrained(name)
        tokenizer = AutoTokenizer.from_pretrained(name)
    except Exception as exc:
        raise fail(f"cannot load model {name!r}: {str(exc).splitlines()[0]}") from exc
    return model, tokenizer


def add_format_flags(p: argparse.ArgumentParser) -> None:
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


def qa_format(args: argparse.Namespace, tokenizer):
    """The QAFormat the flags ask for; a flag that the resolved layout would ignore is an error, not a no-op."""
    from ..data import DEFAULT_TEMPLATE, QAFormat

    # a shell hands "\n" over as backslash-n: read it as the newline it means
    template = args.template.replace("\\n", "\n") if args.template else DEFAULT_TEMPLATE
    fmt = QAFormat(tokenizer, template=template, chat=args.chat, system_prompt=args.system_prompt)
    if args.template and fmt.chat:
        raise fail("--template lays out plain text, but the chat template is in use; add --no-chat to use it.")
    if args.system_prompt and not fmt.chat:
        raise fail(
            "--system-prompt needs the chat layout: the tokenizer has no chat template, or --no-chat was given."
        )
    return fmt


PIN_HELP = (
    "refuse the delta unless its sha256 (printed by unlearn and push, in the model card) is this one; detects "
    "tampering when the digest came to you by a channel you trust"
)


def add_load_flags(p: argparse.ArgumentParser) -> None:
    """Flags of every command that applies a delta to a base."""
    p.add_argument(
        "--fingerprint-check",
        choices=("error", "warn", "off"),
        help="a base other than the delta's own: refuse (error, the default), apply with a warning (warn), or "
        "apply silently (off)",
    )
    p.add_argument("--expected-sha256", metavar="DIGEST", help=PIN_HELP)


def load_options(args: argparse.Namespace) -> dict[str, Any]:
    """PeftModel.from_pretrained options from --fingerprint-check and --expected-sha256."""
    options = {}
    if args.fingerprint_check is not None:
        options["grin_fingerprint_check"] = args.fingerprint_check
    if args.expected_sha256 is not None:
        options["expected_sha256"] = args.expected_sha256
    return options
