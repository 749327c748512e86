"""Sequential deletion requests and the ledger (issue 14), at CPU scale on the cached 1.3M-parameter TOFU target.

Five requests arrive one after another, each a forget01-sized group of authors (2 authors, 40 items; disjoint
groups, the last 10 authors of forget10), and each is unlearned from the model the previous ones produced:

* **GRIN sequential**: localise + NPO on the current model, save the delta, `Ledger.apply` it to the deployed
  folder (each delta's base is the ledgered model as it is then);
* **full NPO sequential**: all weights trained, the reference a frozen copy of the current model;
* **LoRA stacked**: one LoRA r=8 adapter per request, trained with the earlier ones active and frozen (reference:
  the current stack merged into a copy), kept unmerged.

After every step: forget answer probability, truth ratio, ROUGE-L recall and forget quality (KS against the
retain90 reference, which saw none of these authors) of every request so far, retain probability and model
utility (open-unlearning's harmonic mean on retain / real_authors / world_facts, each cut to --eval-limit items).
Then the cost of reverting request 2 of 5 each way (GRIN: `Ledger.revert(2)`, checked bit for bit against
merging deltas 1, 3, 4, 5 into the original with PEFT; full NPO: retrain requests 3-5 from a kept checkpoint after
request 1; LoRA: delete adapter 2, which is instant but is not the model without request 2, since 3-5 were trained
with it present). Finally the union of independently made GRIN deltas (`add_weighted_adapter`, all weights 1)
against sequential application.

    nice -n 10 python benchmarks/bench_ledger.py --workers 4   # one process per method
    python benchmarks/bench_ledger.py --smoke --out /tmp/x     # every code path in about a minute

Teacher-forced numbers after every step; greedy generation (forget ROUGE-L, model utility) after the last request,
after the revert and for the union, where it is worth its cost.
"""

from __future__ import annotations

import argparse
import copy
import json
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from common import atomic_write, log, quiet_transformers, set_threads  # benchmarks/ on sys.path
from tofu_models import DEFAULT_DATA, REPO, TinySettings, load_or_train, tiny_setup
from unlearning_runs import Method, run_method

from grin_peft.data import QAFormat, load_tofu, load_tofu_eval_splits  # noqa: E402
from grin_peft.ledger import Ledger  # noqa: E402
from grin_peft.metrics import evaluate_qa, evaluate_tofu, forget_quality  # noqa: E402

AUTHOR_ITEMS = 20


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--cache-dir", default=None, help="tiny TOFU model cache (default ~/.cache/grin_peft/tofu)")
    p.add_argument("--requests", type=int, default=5)
    p.add_argument("--authors-per-request", type=int, default=2, help="2 authors = forget01's size (40 items)")
    p.add_argument("--epochs", type=float, default=10.0, help="NPO passes over each request's forget items")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr-grin", type=float, default=3e-3)
    p.add_argument("--density", type=float, default=0.05)
    p.add_argument("--lr-full", type=float, default=3e-4)
    p.add_argument("--lr-lora", type=float, default=3e-3)
    p.add_argument("--localize-retain", type=int, default=64, help="retain items of GRIN's scoring pass")
    p.add_argument("--eval-limit", type=int, default=100, help="items of retain/real_authors/world_facts evaluated")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--workers", type=int, default=1, help="run the four methods in this many processes (1 or 4)")
    p.add_argument("--part", choices=["all", "grin", "union", "full", "lora"], default="all", help=argparse.SUPPRESS)
    p.add_argument("--smoke", action="store_true", help="tiny untrained-ish model, few items: code paths only")
    args = p.parse_args(argv)
    # what tofu_models.tiny_setup reads
    args.forget, args.authors, args.model_seed = "forget10", None, 0
    args.hidden, args.layers, args.heads = TinySettings.hidden_size, TinySettings.num_layers, TinySettings.num_heads
    args.model_epochs, args.smoke_items = TinySettings.epochs, 8
    return args


def setup(args: argparse.Namespace) -> dict[str, Any]:
    """Target, reference, QA format, the request groups and the evaluation splits."""
    data = Path(args.data)
    tiny = tiny_setup(args, data)
    target, _ = load_or_train("target", "forget10", data, *tiny)
    reference, _ = load_or_train("reference", "forget10", data, *tiny)
    fmt = QAFormat(tiny[2])
    splits = load_tofu_eval_splits("forget10", data)
    size = args.authors_per_request * AUTHOR_ITEMS
    forget = splits["forget"]
    groups = [forget[len(forget) - size * (args.requests - k) :][:size] for k in range(args.requests)]
    if args.smoke:
        groups = [g[: args.smoke_items] for g in groups]
    util = {
        name: splits[name][: 8 if args.smoke else args.eval_limit]
        for name in ("retain", "real_authors", "world_facts")
    }
    retain = load_tofu("retain90", data)[: 64 if args.smoke else None]
    ctx = {"target": target.eval(), "fmt": fmt, "groups": groups, "util": util, "retain": retain}
    ctx["localize_retain"] = random.Random(args.seed).sample(retain, min(args.localize_retain, len(retain)))
    ctx["cap"] = 8 if args.smoke else 48
    ctx["ref_ratios"] = [group_eval(reference, ctx, g, None)["truth_ratios"] for g in groups]
    ctx["train"] = {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "seed": args.seed,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": True,
        "use_cpu": True,
        "num_threads": args.threads,
    }
    return ctx


def group_eval(
    model: torch.nn.Module, ctx: dict[str, Any], items: list, ref: list | None, generate: bool = False
) -> dict[str, Any]:
    out = evaluate_qa(
        model,
        ctx["fmt"],
        items,
        truth_ratio_form="forget",
        generate=generate,
        max_new_tokens=ctx["cap"],
        batch_size=64,
        progress=False,
    )
    ratios = out["per_item"]["truth_ratio"]
    return {
        "probability": out["summary"]["probability"],
        "truth_ratio": out["summary"]["truth_ratio"],
        "rouge_l_recall": out["summary"].get("rouge_l_recall"),
        "forget_quality": None if ref is None else forget_quality(ratios, ref),
        "truth_ratios": ratios,
    }


def evaluate_state(model: torch.nn.Module, ctx: dict[str, Any], upto: int, full: bool = False) -> dict[str, Any]:
    """Requests 1..upto+1 (0-based `upto`): forget answer probability, truth ratio and forget quality, and retain
    answer probability, teacher-forced. `full` adds greedy generation: forget ROUGE-L and model utility."""
    model.eval()
    t0 = time.perf_counter()
    with torch.no_grad():
        shown = range(min(upto + 1, len(ctx["groups"])))
        groups = [group_eval(model, ctx, ctx["groups"][k], ctx["ref_ratios"][k], full) for k in shown]
        if full:
            util = evaluate_tofu(
                model, ctx["fmt"], ctx["util"], max_new_tokens=ctx["cap"], batch_size=64, progress=False
            )["summary"]
        else:
            retain = evaluate_qa(
                model, ctx["fmt"], ctx["util"]["retain"], generate=False, batch_size=64, progress=False
            )["summary"]
            util = {"retain_probability": retain["probability"], "model_utility": None}
    for g in groups:
        g.pop("truth_ratios")
    return {
        "requests": groups,
        "retain_probability": util["retain_probability"],
        "model_utility": util["model_utility"],
        "eval_seconds": time.perf_counter() - t0,
    }


def train(kind: str, make_base, ctx: dict[str, Any], k: int, args: argparse.Namespace, workdir: str):
    """One request's unlearning with run_method (GRIN or full NPO)."""
    lr = {"grin": args.lr_grin, "full": args.lr_full}[kind]
    grin = {"score": "gradient_ratio", "density": args.density, "seed": args.seed + k}
    method = Method(f"{kind} request {k + 1}", kind, "npo", lr, grin=grin if kind == "grin" else {})
    with quiet_transformers():
        return run_method(
            method,
            make_base,
            ctx["fmt"],
            ctx["groups"][k],
            ctx["retain"],
            train=ctx["train"],
            workdir=workdir,
            localize_retain=ctx["localize_retain"],
            log=log,
        )


def load_folder(path: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with quiet_transformers():
        return AutoModelForCausalLM.from_pretrained(path, dtype="auto").eval()


def grin_sequential(ctx: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """GRIN deltas applied through the ledger; then revert request 2 and check it bit for bit."""
    deployed, original = work / "deployed", work / "original"
    with quiet_transformers():
        ctx["target"].save_pretrained(deployed)
        ctx["target"].save_pretrained(original)
    ledger, steps, deltas = Ledger(str(deployed)), [], []
    for k in range(len(ctx["groups"])):
        peft_model, info = train("grin", lambda: load_folder(deployed), ctx, k, args, str(work / "tmp"))
        delta = work / f"grin-delta-{k + 1}"
        peft_model.save_pretrained(delta)
        t0 = time.perf_counter()
        request = ledger.apply(str(delta), description=f"request {k + 1}: forget {args.authors_per_request} authors")
        apply_s = time.perf_counter() - t0
        deltas.append(delta)
        state = evaluate_state(load_folder(deployed), ctx, k, full=k == len(ctx["groups"]) - 1)
        steps.append(
            {**state, "train_seconds": info["wall_seconds"], "apply_seconds": apply_s, "entries": request.entries}
        )
        log(f"GRIN step {k + 1}: {summary_line(state)}")
    revert = {}
    if len(deltas) >= 2:
        t0 = time.perf_counter()
        ledger.revert(2, reason="benchmark: made in error")
        revert["seconds"] = time.perf_counter() - t0
        reverted = load_folder(deployed)
        revert["after"] = evaluate_state(reverted, ctx, len(deltas) - 1, full=True)
        revert["bit_exact"] = replay_matches(reverted, original, [d for i, d in enumerate(deltas) if i != 1])
        t0 = time.perf_counter()
        report = ledger.verify()
        revert["verify_seconds"], revert["verify_ok"] = time.perf_counter() - t0, report.ok
        revert["overlap_entries"] = overlap(deltas)
    return {"steps": steps, "revert_2": revert, "deltas": [str(d) for d in deltas]}


def replay_matches(model: torch.nn.Module, original: Path, deltas: list[Path]) -> bool:
    """Whether `model` equals merging `deltas` in order into the original with PEFT (an independent path)."""
    from peft import PeftModel

    reference = load_folder(original)
    for delta in deltas:
        with quiet_transformers():
            reference = PeftModel.from_pretrained(
                reference, str(delta), grin_fingerprint_check="off"
            ).merge_and_unload()
    theirs = reference.state_dict()
    return all(torch.equal(v, theirs[k]) for k, v in model.state_dict().items())


def overlap(deltas: list[Path]) -> int:
    """Entries touched by more than one request's delta."""
    from grin_peft.delta_file import WEIGHTS_NAME, group_modules, read_tensors

    seen: dict[str, list[torch.Tensor]] = {}
    for delta in deltas:
        modules, _ = group_modules(read_tensors(str(delta / WEIGHTS_NAME)))
        for name, m in modules.items():
            if m.indices is not None:
                seen.setdefault(name, []).append(m.indices.long())
            else:
                bits = ((m.mask.unsqueeze(1) >> torch.arange(8, dtype=torch.uint8)) & 1).reshape(-1)
                seen.setdefault(name, []).append(bits.nonzero().squeeze(1))
    total = 0
    for parts in seen.values():
        _, counts = torch.unique(torch.cat(parts), return_counts=True)
        total += int((counts > 1).sum())
    return total


def full_sequential(ctx: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Full-parameter NPO, one request after another; revert 2 = retrain 3.. from the checkpoint after request 1."""
    current, steps, checkpoints = copy.deepcopy(ctx["target"]), [], []
    for k in range(len(ctx["groups"])):
        base = current
        current, info = train("full", lambda b=base: copy.deepcopy(b), ctx, k, args, str(work / "tmp"))
        checkpoints.append(current)
        state = evaluate_state(current, ctx, k, full=k == len(ctx["groups"]) - 1)
        steps.append({**state, "train_seconds": info["wall_seconds"]})
        log(f"full NPO step {k + 1}: {summary_line(state)}")
    revert = {}
    if len(checkpoints) >= 2:
        t0 = time.perf_counter()
        current = checkpoints[0]
        for k in range(2, len(ctx["groups"])):
            base = current
            current, _ = train("full", lambda b=base: copy.deepcopy(b), ctx, k, args, str(work / "tmp"))
        revert["seconds"] = time.perf_counter() - t0
        revert["after"] = evaluate_state(current, ctx, len(ctx["groups"]) - 1, full=True)
    return {"steps": steps, "revert_2": revert}


def lora_stacked(ctx: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """A LoRA adapter per request on top of the earlier ones (active, frozen); revert 2 = delete adapter 2."""
    from peft import LoraConfig, get_peft_model
    from transformers.trainer_callback import PrinterCallback

    from grin_peft.trainer import UnlearningTrainer
    from grin_peft.unlearning_args import UnlearningArguments

    config = LoraConfig(task_type="CAUSAL_LM", r=8, lora_alpha=16, lora_dropout=0.0, target_modules="all-linear")
    model, names, steps = None, [], []
    for k in range(len(ctx["groups"])):
        name = f"request{k + 1}"
        t0 = time.perf_counter()
        reference = copy.deepcopy(model).merge_and_unload() if model is not None else copy.deepcopy(ctx["target"])
        if model is None:
            model = get_peft_model(copy.deepcopy(ctx["target"]), config, adapter_name=name)
        else:
            model.add_adapter(name, config)
        names.append(name)
        model.base_model.set_adapter(names)
        for pname, param in model.named_parameters():
            param.requires_grad_(f".{name}." in pname)
        targs = UnlearningArguments(
            output_dir=str(work / "tmp"), objective="npo", learning_rate=args.lr_lora, save_strategy="no",
            report_to=[], disable_tqdm=True, logging_steps=10_000, **ctx["train"],
        )  # fmt: skip
        trainer = UnlearningTrainer(
            model, targs, ctx["groups"][k], ctx["retain"], qa_format=ctx["fmt"], ref_model=reference
        )
        trainer.remove_callback(PrinterCallback)  # it prints every log dict once tqdm is off
        with quiet_transformers():
            trainer.train()
        seconds = time.perf_counter() - t0
        state = evaluate_state(model, ctx, k, full=k == len(ctx["groups"]) - 1)
        steps.append({**state, "train_seconds": seconds})
        log(f"LoRA stacked step {k + 1}: {summary_line(state)}")
    revert = {}
    if len(names) >= 2:
        t0 = time.perf_counter()
        model.delete_adapter(names[1])
        model.base_model.set_adapter([n for n in names if n != names[1]])
        revert["seconds"] = time.perf_counter() - t0
        revert["after"] = evaluate_state(model, ctx, len(names) - 1, full=True)
    return {"steps": steps, "revert_2": revert}


def grin_union(ctx: dict[str, Any], args: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Each request's GRIN delta made from the original model, combined with add_weighted_adapter (weights 1)."""
    from peft import PeftModel

    names, seconds = [], 0.0
    for k in range(len(ctx["groups"])):
        peft_model, info = train("grin", lambda: copy.deepcopy(ctx["target"]), ctx, k, args, str(work / "tmp"))
        peft_model.save_pretrained(work / f"independent-{k + 1}")
        seconds += info["wall_seconds"]
        names.append(f"r{k + 1}")
    with quiet_transformers():
        model = PeftModel.from_pretrained(copy.deepcopy(ctx["target"]), str(work / "independent-1"), adapter_name="r1")
        for k in range(1, len(names)):
            model.load_adapter(str(work / f"independent-{k + 1}"), adapter_name=names[k])
    model.add_weighted_adapter(names, [1.0] * len(names), "union")
    model.set_adapter("union")
    merged = model.merge_and_unload(adapter_names=["union"])
    state = evaluate_state(merged, ctx, len(names) - 1, full=True)
    log(f"GRIN union: {summary_line(state)}")
    return {"final": state, "train_seconds": seconds}


def summary_line(state: dict[str, Any]) -> str:
    probs = " ".join(f"{g['probability']:.3f}" for g in state["requests"])
    retain, utility = state["retain_probability"], fmt(state["model_utility"])
    return f"forget prob per request [{probs}], retain {retain:.3f}, utility {utility}"


def fmt(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.2e}" if 0 < abs(value) < 1e-3 else f"{value:.3f}"
    return str(value)


def render(result: dict[str, Any]) -> str:
    """The markdown tables of BENCHMARKS.md §11."""
    lines = [f"Settings: {json.dumps(result['settings'])}", ""]
    target = result["target"]
    lines.append(
        "Target before any request: forget prob per request "
        f"{[round(g['probability'], 3) for g in target['requests']]}, retain {target['retain_probability']:.3f}, "
        f"utility {target['model_utility']:.3f}."
    )
    for method in ("grin", "full", "lora"):
        run = result[method]
        lines += ["", f"### {result['labels'][method]}", ""]
        n = len(run["steps"])
        head = " | ".join(f"req {k + 1} prob / ROUGE / FQ" for k in range(n))
        lines += [f"| after | {head} | retain prob | utility | train s |", "|---" * (n + 4) + "|"]
        for i, step in enumerate(run["steps"]):
            cells = []
            for k in range(n):
                if k < len(step["requests"]) and k <= i:
                    g = step["requests"][k]
                    cells.append(f"{fmt(g['probability'])} / {fmt(g['rouge_l_recall'])} / {fmt(g['forget_quality'])}")
                else:
                    cells.append("")
            lines.append(
                f"| request {i + 1} | {' | '.join(cells)} | {fmt(step['retain_probability'])} | "
                f"{fmt(step['model_utility'])} | {step['train_seconds']:.0f} |"
            )
        rev = run["revert_2"]
        if rev:
            after = rev["after"]
            probs = ", ".join(f"{g['probability']:.3f}" for g in after["requests"])
            lines.append(
                f"\nRevert request 2: {rev['seconds']:.2f} s; afterwards forget prob per request [{probs}], retain "
                f"{after['retain_probability']:.3f}, utility {fmt(after['model_utility'])}."
                + (f" Bit-exact vs merging deltas 1,3,4,5 into the original: {rev['bit_exact']}; entries shared by "
                   f"two or more deltas: {rev['overlap_entries']}; verify {rev['verify_seconds']:.2f} s, ok "
                   f"{rev['verify_ok']}." if "bit_exact" in rev else "")
            )  # fmt: skip
    union = result["union"]["final"]
    probs = ", ".join(f"{g['probability']:.3f}" for g in union["requests"])
    lines.append(
        f"\nGRIN union of independent deltas (add_weighted_adapter, weights 1): forget prob per request [{probs}], "
        f"retain {union['retain_probability']:.3f}, utility {union['model_utility']:.3f} "
        f"(training {result['union']['train_seconds']:.0f} s for the 5 deltas)."
    )
    return "\n".join(lines) + "\n"


PARTS = {"grin": grin_sequential, "union": grin_union, "full": full_sequential, "lora": lora_stacked}


def run_parts(args: argparse.Namespace, parts: list[str], out: Path, stem: str) -> None:
    """Run some methods in this process; each writes <stem>.<part>.json."""
    ctx = setup(args)
    for part in parts:
        started = time.perf_counter()
        with tempfile.TemporaryDirectory(prefix="bench-ledger-") as tmp:
            result = PARTS[part](ctx, args, Path(tmp))
        result.pop("deltas", None)
        if part == "grin":
            result["target"] = evaluate_state(ctx["target"], ctx, len(ctx["groups"]) - 1, full=True)
        result["wall_seconds"] = time.perf_counter() - started
        atomic_write(out / f"{stem}.{part}.json", json.dumps(result, indent=2))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    argv = list(sys.argv[1:] if argv is None else argv)
    set_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.perf_counter()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = "ledger_smoke" if args.smoke else "ledger_sequential"
    parts = list(PARTS) if args.part == "all" else [args.part]
    if args.workers > 1 and args.part == "all":  # one process per method: each gets its own share of the CPU
        procs = [subprocess.Popen([sys.executable, __file__, *argv, "--part", part]) for part in parts]
        if any(proc.wait() != 0 for proc in procs):
            raise SystemExit("a worker failed")
    else:
        run_parts(args, parts, out, stem)
    if args.part != "all":
        return {}
    result: dict[str, Any] = {
        "command": " ".join(["python", "benchmarks/bench_ledger.py", *argv]),
        "settings": {k: v for k, v in vars(args).items() if k not in ("data", "out", "cache_dir", "part")},
        "labels": {
            "grin": f"GRIN {args.density:g} density, NPO lr {args.lr_grin:g}, sequential deltas through the ledger",
            "full": f"full-parameter NPO lr {args.lr_full:g}, sequential",
            "lora": f"LoRA r=8 NPO lr {args.lr_lora:g}, stacked adapters",
        },
    }
    for part in parts:
        result[part] = json.loads((out / f"{stem}.{part}.json").read_text())
        (out / f"{stem}.{part}.json").unlink()
    result["target"] = result["grin"].pop("target")
    result["wall_seconds"] = time.perf_counter() - started
    atomic_write(out / f"{stem}.json", json.dumps(result, indent=2))
    atomic_write(
        out / f"{stem}.md", f"Command: `{result['command']}` ({result['wall_seconds']:.0f} s)\n\n" + render(result)
    )
    log(f"wrote {out / stem}.md/.json in {result['wall_seconds']:.0f} s")
    return result


if __name__ == "__main__":
    main()
