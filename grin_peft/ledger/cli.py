"""`grin-peft ledger apply|revert|show|verify`: the ledger from the command line (registered by grin_peft.cli)."""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict
from typing import Any

EPILOG = """examples:
  grin-peft ledger apply  --model deployed/ --delta delta-req17/ --description "request 17: author X"
  grin-peft ledger apply  --model deployed/ --delta me/forget-author-x --revision main
  grin-peft ledger show   --model deployed/
  grin-peft ledger revert --model deployed/ --request 2 --reason "made in error"
  grin-peft ledger verify --model deployed/      # exit 1 if the weights are not what the ledger says
"""


def cmd_apply(args: argparse.Namespace) -> int:
    from .ledger import Ledger

    request = Ledger(args.model, lock_timeout=args.wait).apply(
        args.delta,
        description=args.description,
        revision=args.revision,
        subfolder=args.subfolder,
        fingerprint_check=args.fingerprint_check,
    )
    print(
        f"request {request.id} applied to {args.model}: {request.entries:,} entries in {request.modules} modules "
        f"(delta sha256 {request.delta_sha256[:16]}); undo with: grin-peft ledger revert --model {args.model} "
        f"--request {request.id}"
    )
    return 0


def cmd_revert(args: argparse.Namespace) -> int:
    from .ledger import Ledger

    record = Ledger(args.model, lock_timeout=args.wait).revert(args.request, reason=args.reason)
    left = ", ".join(str(r.id) for r in record.requests) or "none"
    print(f"request {args.request} reverted in {args.model}; applied now, in order: {left}")
    return 0


def format_record(record: Any) -> str:
    """The ledger as a table, then its history."""
    lines = [
        f"architecture: {record.architecture}",
        f"original fingerprint: {record.original_fingerprint[:16]}  current: {record.model_fingerprint[:16]}",
        "",
        "| request | applied (UTC) | description | delta | sha256 | entries | fingerprint after |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in record.requests:
        lines.append(
            f"| {r.id} | {r.applied_at} | {r.description or '-'} | {r.delta.describe()} | {r.delta_sha256[:12]} | "
            f"{r.entries:,} | {r.fingerprint_after[:12]} |"
        )
    lines += ["", "history:"]
    for event in record.history:
        reason = f" ({event['reason']})" if event.get("reason") else ""
        lines.append(f"  {event.get('at')}  {event.get('op')} request {event.get('request')}{reason}")
    if record.pending is not None:
        lines.append("an operation was interrupted; the next apply or revert completes it")
    return "\n".join(lines)


def cmd_show(args: argparse.Namespace) -> int:
    from .ledger import Ledger
    from .record import to_dict

    record = Ledger(args.model, lock_timeout=args.wait).show()
    print(json.dumps(to_dict(record), indent=2) if args.json else format_record(record))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    from .ledger import Ledger

    report = Ledger(args.model, lock_timeout=args.wait).verify()
    if args.json:
        print(json.dumps({"ok": report.ok, **asdict(report)}, indent=2))
    else:
        print(report)
    return 0 if report.ok else 1


def add_parser(subparsers: Any) -> None:
    """Add `ledger` and its four commands to grin-peft's subcommands."""
    parser = subparsers.add_parser(
        "ledger",
        help="apply, revert (any one, exactly), show and verify the deltas merged into a deployed model",
        description="An unlearning ledger kept in the model folder (grin_ledger.json): every applied request's delta "
        "(location and sha256), description, time and the model's fingerprints; revert N gives bit for bit the "
        "weights of applying the other requests in order to the original model.",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="ledger_command", required=True, metavar="ACTION")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--model", required=True, help="the deployed model folder (save_pretrained, safetensors)")
        p.add_argument(
            "--wait", type=float, help="give up after this many seconds if another operation holds the lock"
        )

    p = sub.add_parser("apply", help="merge a GRIN delta into the model and record it")
    common(p)
    p.add_argument("--delta", required=True, help="delta folder or Hub repo id")
    p.add_argument("--description", help="what the request is (default: the delta's forget_description)")
    p.add_argument("--revision", help="Hub revision of the delta (the ledger records the commit it resolves to)")
    p.add_argument("--subfolder", help="subfolder of the delta in its folder or repo")
    p.add_argument(
        "--fingerprint-check",
        choices=("error", "warn", "off"),
        default="error",
        help="a delta made for another state of the model: refuse (default), warn, or apply silently",
    )
    p.set_defaults(func=cmd_apply)

    p = sub.add_parser("revert", help="remove request N exactly, as if it had never been applied")
    common(p)
    p.add_argument("--request", type=int, required=True, help="the request id (see show)")
    p.add_argument("--reason", default="", help="why, for the ledger's history")
    p.set_defaults(func=cmd_revert)

    p = sub.add_parser("show", help="the applied requests, in order, and the history")
    common(p)
    p.add_argument("--json", action="store_true", help="the ledger file's JSON instead of a table")
    p.set_defaults(func=cmd_show)

    p = sub.add_parser("verify", help="recompute digests, fingerprint and every ledger entry; exit 1 on drift")
    common(p)
    p.add_argument("--json", action="store_true", help="the report as JSON")
    p.set_defaults(func=cmd_verify)
