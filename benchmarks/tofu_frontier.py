"""The frontier benchmark's orchestration (``bench_tofu.py --frontier``): its settings, its two phases and what
each worker process does in them.

Phase 1 trains every run (seed x method family x density x learning rate, :func:`tofu_methods.frontier_methods`):
each worker takes the next unclaimed run (:func:`claim_order`: seed after seed, long runs first) and records its
trajectory and kept checkpoint (:func:`tofu_runs.frontier_run`). Phase 2 gives the target and every family's
operating checkpoint per seed the full evaluation (:func:`utility_jobs`), again shared over the workers; each worker
first evaluates the reference model itself, since every other evaluation needs its truth ratios and MIA AUCs.
With one worker both phases run in this process. The report is written by :mod:`tofu_reports`.
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import atomic_write, environment, json_safe, load_average, log  # benchmarks/ is on sys.path
from tofu_eval import answer_probabilities, evaluate, generation_cap
from tofu_frontier_report import frontier_summary
from tofu_methods import frontier_families
from tofu_models import FORGET_TO_RETAIN, load_models, task_data
from tofu_reports import write_report
from tofu_runs import claim, evaluate_checkpoint, frontier_run, spawn_workers
from unlearning_runs import Method

from grin_peft.metrics import MIA_ATTACKS


def frontier_settings(
    args: argparse.Namespace, runs: list[Method], train: dict[str, Any], task: dict[str, Any]
) -> dict[str, Any]:
    selected = {run.group for run in runs}
    families = [fam for fam in frontier_families(args) if fam["family"] in selected]
    return {
        "forget": args.forget,
        "retain": FORGET_TO_RETAIN[args.forget],
        "scale": "paper scale" if args.model else ("smoke" if args.smoke else "CPU scale"),
        "regime": args.regime[0] if len(args.regime) == 1 else None,
        "authors": args.authors,
        "train": train,
        "objective": ",".join(args.objectives),
        "frontier_at": args.frontier_at,
        "eval_every": args.eval_every_amount,
        "eval_unit": args.eval_unit,
        "eval_batch_size": args.eval_batch_size,
        "localize_retain": args.localize_retain,
        "utility": args.utility,
        "seeds": args.seeds,
        "densities": args.densities,
        "mask_scores": args.mask_scores,
        "grids": {fam["family"]: fam["grid"] for fam in families if fam["grid"] is not None},
        "families": families,
        "eval_limit": args.eval_limit,
        "eval_sizes": {name: len(items) for name, items in task["splits"].items()},
        "num_forget": len(task["forget"]),
        "num_retain": len(task["retain"]),
        "data": str(args.data),
    }


def frontier_benchmark(
    args: argparse.Namespace,
    runs: list[Method],
    data: Path,
    out: Path,
    stem: str,
    started: float,
    train: dict[str, Any],
) -> dict[str, Any]:
    """The frontier benchmark: phase 1 trains every run and records its trajectory and kept checkpoint; phase 2
    gives the target and each family's operating checkpoint (per seed) the full evaluation. Both phases share their
    jobs over the workers."""
    make_target, qa_format, reference_model, models_info = load_models(args, data)  # trains and caches once
    task = task_data(args, data)
    context = {"make_target": make_target, "qa_format": qa_format, "train": train, **task}
    if args.worker:
        return frontier_worker(args, runs, context, reference_model, out, stem)
    target = make_target()
    models_info["num_parameters"] = sum(p.numel() for p in target.parameters())
    report: dict[str, Any] = {
        "mode": "frontier",
        "command": "python benchmarks/bench_tofu.py " + " ".join(args.argv),
        "environment": environment(),
        "settings": frontier_settings(args, runs, train, task),
        "models": models_info,
        "points": {
            "target": answer_probabilities(target, qa_format, task["splits"], args.eval_batch_size),
            f"{FORGET_TO_RETAIN[args.forget]} model": answer_probabilities(
                reference_model, qa_format, task["splits"], args.eval_batch_size
            ),
        },
        "runs": [],
        "results": [],
    }
    report["settings"]["max_new_tokens"] = generation_cap(qa_format, task["splits"])
    del target
    log(f"{len(runs)} runs over {len(args.seeds)} seed(s); target {report['points']['target']}")
    with tempfile.TemporaryDirectory(prefix="bench_tofu_frontier_") as shared_name:
        shared = Path(shared_name)
        if args.workers > 1:
            del make_target, reference_model
            context = {}
            count = min(args.workers, len(runs))
            reports, codes = spawn_workers(args, shared, "runs", count)
            report["workers"] = {"count": count, "exit_codes": codes, "threads_each": 1}
            order = {m.name: i for i, m in enumerate(runs)}
            report["runs"] = sorted((r for p in reports for r in p["runs"]), key=lambda r: order.get(r["run"], -1))
        else:
            context["workdir"] = str(shared / "scratch")

            def save(records: list[dict[str, Any]]) -> None:  # after every run: a killed benchmark keeps them
                report["runs"], report["total_seconds"] = records, time.perf_counter() - started
                write_report(report, out, stem)

            report["runs"] = frontier_runs(args, runs, context, shared, None, save)
        report["total_seconds"] = time.perf_counter() - started
        write_report(report, out, stem)
        if args.utility != "none":
            jobs = utility_jobs(report)
            atomic_write(shared / "utility_jobs.json", json.dumps(json_safe(jobs)))
            log(f"full evaluation of {len(jobs)} checkpoint(s)")
            if args.workers > 1:
                count = min(args.workers, len(jobs))
                reports, codes = spawn_workers(args, shared, "utility", count)
                report["workers"]["utility_exit_codes"] = codes
                rows = {r["method"]: r for p in reports for r in p["results"]}
                reference_rows = [p["reference"] for p in reports if p.get("reference")]
            else:
                part = frontier_utility(args, jobs, context, reference_model, shared, None)
                rows = {r["method"]: r for r in part["results"]}
                reference_rows = [part["reference"]]
            report["results"] = reference_rows[:1] + [rows[j["name"]] for j in jobs if j["name"] in rows]
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = load_average()
    write_report(report, out, stem)
    log(f"done in {report['total_seconds']:.0f} s: {out / stem}.md / .json / .png")
    codes = report.get("workers", {}).get("exit_codes", []) + report.get("workers", {}).get("utility_exit_codes", [])
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}); the report holds what the others measured")
    return report


def frontier_worker(
    args: argparse.Namespace,
    runs: list[Method],
    context: dict[str, Any],
    reference_model: Any,
    out: Path,
    stem: str,
) -> dict[str, Any]:
    """A worker process of the frontier benchmark: one phase's unclaimed jobs, its part report after each."""
    shared = Path(args.worker_dir)
    part = out / f"{stem}.json"
    context["workdir"] = str(shared / f"scratch-{os.getpid()}")
    if args.worker_phase == "utility":
        jobs = json.loads((shared / "utility_jobs.json").read_text(encoding="utf-8"))
        return frontier_utility(args, jobs, context, reference_model, shared, part)
    return {"runs": frontier_runs(args, runs, context, shared, part)}


def frontier_runs(
    args: argparse.Namespace,
    runs: list[Method],
    context: dict[str, Any],
    shared: Path,
    part: Path | None,
    saved: Callable[[list[dict[str, Any]]], None] | None = None,
) -> list[dict[str, Any]]:
    """Phase 1: every unclaimed run, in order; ``part`` (a worker's report) is rewritten after each, or ``saved``
    (the single process's report writer) is called with the runs so far."""
    settings = {
        "eval_every": args.eval_every_amount,
        "eval_unit": args.eval_unit,
        "frontier_at": args.frontier_at,
        "eval_batch_size": args.eval_batch_size,
        "utility": args.utility,
        "localize_retain": args.localize_retain,
        "score_start": start_scorers(runs),
    }
    records: list[dict[str, Any]] = []
    started = time.perf_counter()
    for index in claim_order(runs):
        run = runs[index]
        if not claim(shared / "claims-runs", f"run{index}"):
            continue
        log(f"[{time.perf_counter() - started:.0f} s] run {index + 1}/{len(runs)}: {run.name}")
        try:
            record = frontier_run(run, context, settings, shared / "checkpoints")
        except Exception as error:  # one failing run must not lose the others' numbers
            if args.smoke:
                raise
            record = {"run": run.name, "family": run.group, "kind": run.kind, "seed": run.seed, "lr": run.lr}
            record["error"] = f"{type(error).__name__}: {error}"
            log(f"    FAILED: {record['error']}")
        records.append(record)
        if part is not None:
            atomic_write(part, json.dumps(json_safe({"runs": records}), indent=1))
        if saved is not None:
            saved(records)
    return records


def claim_order(runs: list[Method]) -> list[int]:
    """The order in which workers take the runs: seed after seed (an interrupted benchmark holds whole seeds), and
    within a seed the longest first (the auto run, then masks by falling density: the sparse op costs more per
    step at high density; then full and LoRA), so the last job, which one worker runs alone, is a short one."""

    def cost(index: int) -> float:
        run = runs[index]
        if run.kind == "auto":
            return 10.0
        return 1.0 + (run.grin or {}).get("density", 0.0)

    seeds = list(dict.fromkeys(run.seed for run in runs))
    return sorted(range(len(runs)), key=lambda i: (seeds.index(runs[i].seed), -cost(i)))


def start_scorers(runs: list[Method]) -> set[str]:
    """The runs that score step 0: the first of each method family and seed (the start does not depend on the
    learning rate; see :class:`tofu_eval.TrajectoryCallback`)."""
    first: dict[tuple[str, Any], str] = {}
    for run in runs:
        first.setdefault((run.group, run.seed), run.name)
    return set(first.values())


def utility_jobs(report: dict[str, Any]) -> list[dict[str, Any]]:
    """Phase 2's jobs: the target, then per family and seed the run whose kept checkpoint is the family's
    operating checkpoint (each run kept its own by the same rule, so the family's is one of them)."""
    jobs: list[dict[str, Any]] = [{"name": "target (no unlearning)", "group": "reference", "kind": "none"}]
    runs = {r["run"]: r for r in report["runs"] if not r.get("error")}
    for fam in frontier_summary(report):
        for seed, summary in fam["seeds"].items():
            point = summary["operating"]
            run = runs.get((point or {}).get("run"))
            if run is None or not run.get("checkpoint"):
                continue
            kept = run.get("kept") or point
            jobs.append(
                {"name": f"{fam['family']} seed={seed}", "group": "operating", "kind": run["kind"],
                 "checkpoint": run["checkpoint"], "family": fam["family"], "seed": seed, "run": run["run"],
                 "point": {**kept, "lr": run.get("lr")}}
            )  # fmt: skip
    return jobs


def frontier_utility(
    args: argparse.Namespace,
    jobs: list[dict[str, Any]],
    context: dict[str, Any],
    reference_model: Any,
    shared: Path,
    part: Path | None,
) -> dict[str, Any]:
    """Phase 2: the reference model's full evaluation (each process its own: every other one needs its truth
    ratios and MIA AUCs), then every unclaimed job's."""
    splits, qa_format = context["splits"], context["qa_format"]
    eval_kw = {"max_new_tokens": generation_cap(qa_format, splits), "batch_size": args.eval_batch_size}
    log(f"evaluating the retain-only reference model ({FORGET_TO_RETAIN[args.forget]})")
    reference = evaluate(reference_model, qa_format, splits, None, **eval_kw)
    reference["summary"]["forget_quality"] = 1.0  # KS test of a sample against itself
    out: dict[str, Any] = {
        "reference": {
            "method": f"{FORGET_TO_RETAIN[args.forget]} model (reference)",
            "group": "reference",
            "summary": {**reference["summary"], **{f"privleak_{a}": 0.0 for a in MIA_ATTACKS}},
            "cost": {"eval_seconds": reference["eval_seconds"]},
            "forget_generations": reference.get("forget_generations"),
        },
        "results": [],
    }
    evaluator = lambda model: evaluate(model, qa_format, splits, reference, **eval_kw)  # noqa: E731
    for index, job in enumerate(jobs):
        if not claim(shared / "claims-utility", f"job{index}"):
            continue
        try:
            row = evaluate_checkpoint(job, context, evaluator)
        except Exception as error:
            if args.smoke:
                raise
            row = {"method": job["name"], "group": job["group"], "error": f"{type(error).__name__}: {error}"}
            log(f"    FAILED: {row['error']}")
        out["results"].append(row)
        if part is not None:
            atomic_write(part, json.dumps(json_safe(out), indent=1))
    return out
