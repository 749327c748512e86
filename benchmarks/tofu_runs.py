"""Running the TOFU benchmark's jobs: one table row, one frontier run, one full evaluation of a kept checkpoint, and
the job queue that worker processes share.

* :func:`run_and_evaluate`: a main-table or pilot row: unlearn from a fresh target copy, evaluate, record costs.
* :func:`frontier_run`: one (seed, family, density, learning rate) run of the frontier benchmark. A
  :class:`tofu_eval.TrajectoryCallback` scores forget/retain answer probability at step 0 and every
  ``--eval-every``; the run's operating checkpoint (best with forget <= target, else the most forgetting) is kept in
  memory, written back into the model at the end and saved with ``save_pretrained`` into the shared work folder:
  its file's bytes are the delta size the report gives, and the full evaluation (:func:`evaluate_checkpoint`) loads
  it later, so no run is repeated. The "auto" run (``grin_peft.unlearn`` with its own defaults) is scored once at
  its end: its own operating point.
* :func:`spawn_workers` starts worker processes of the same command on one phase's job list; :func:`claim`: each
  takes the next job nobody has taken by creating its claim file (``O_CREAT | O_EXCL``: exactly one process
  succeeds), so fast and slow jobs balance over the workers without a scheduler.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import torch
from common import (  # benchmarks/ is on sys.path when run as a script
    HERE,
    log,
    quiet_transformers,
    worker_env,
)
from tofu_eval import TrajectoryCallback, answer_probabilities
from tofu_methods import selector_of
from tofu_models import localize_sample
from unlearning_runs import Method, run_method

PEFT_KINDS = ("lora", "fila", "grin", "auto")


def claim(directory: Path | None, job: str) -> bool:
    """Take ``job`` for this process: True for exactly one caller per job and folder (always True without one)."""
    if directory is None:
        return True
    directory.mkdir(parents=True, exist_ok=True)
    try:
        os.close(os.open(directory / job, os.O_CREAT | os.O_EXCL | os.O_WRONLY))
    except FileExistsError:
        return False
    return True


def spawn_workers(args: Any, shared: Path, phase: str, count: int) -> tuple[list[dict], list[int]]:
    """Run ``count`` worker processes of this command on one phase's job list (each takes unclaimed jobs, one torch
    thread each) and return the reports they wrote and their exit codes."""
    parts = shared / f"parts-{phase}"
    commands = [
        [sys.executable, str(HERE / "bench_tofu.py"), *args.argv, "--workers", "1", "--worker-dir", str(shared),
         "--worker-phase", phase, "--out", str(parts), "--stem", f"part{w}"]
        for w in range(count)
    ]  # fmt: skip
    procs = [subprocess.Popen(c, env=worker_env(str(w))) for w, c in enumerate(commands)]
    codes = [proc.wait() for proc in procs]
    reports = [
        json.loads((parts / f"part{w}.json").read_text(encoding="utf-8"))
        for w in range(count)
        if (parts / f"part{w}.json").is_file()
    ]
    return reports, codes


def _or_nan(value: float | None) -> float:
    return float("nan") if value is None else value


def summary_line(sm: dict[str, Any]) -> str:
    """One progress line of a full evaluation's headline numbers."""
    return (
        f"FQ {_or_nan(sm.get('forget_quality')):.3g}  MU {_or_nan(sm.get('model_utility')):.3f}  forget prob "
        f"{sm['forget_probability']:.3f}  retain prob {sm['retain_probability']:.3f}"
    )


def run_and_evaluate(method: Method, context: dict[str, Any], evaluator: Any, workdir: str) -> dict[str, Any]:
    """One table row: unlearn with ``method`` from a fresh target copy, evaluate, record costs."""
    model, cost = run_method(
        method,
        context["make_target"],
        context["qa_format"],
        context["forget"],
        context["retain"],
        train=context["train"],
        ssd_data=context["forget"] + context["localize_retain"],
        workdir=workdir,
        localize_retain=context["localize_retain"],
        log=log,
    )
    result = evaluator(model)
    del model
    row: dict[str, Any] = {"method": method.name, "group": method.group, "config": method.describe()}
    row["summary"] = result["summary"]
    row["forget_generations"] = result.get("forget_generations")
    row["cost"] = {
        "trainable_entries": cost.get("trainable_entries"),
        "wall_seconds": cost.get("wall_seconds"),
        "eval_seconds": result["eval_seconds"],
        "steps": cost.get("steps"),
        "timings": cost.get("timings"),
    }
    for key in ("localization", "train_metrics", "ssd_candidate_entries", "operating_point"):
        if key in cost:
            row[key] = cost[key]
    seconds = f"({cost.get('wall_seconds', 0):.0f} s + eval {result['eval_seconds']:.0f} s)"
    log(f"    {summary_line(row['summary'])}  {seconds}")
    return row


# ------------------------------------------------------------------------------------------------ frontier


def slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=-]+", "_", name).strip("_")


def save_checkpoint(
    model: torch.nn.Module, kind: str, directory: Path, fila_initial: str | None = None
) -> tuple[int, str]:
    """``save_pretrained`` into ``directory``; returns the bytes and name of the weight file(s) it wrote: the
    adapter (``adapter_model.safetensors``) of a PEFT model, the whole model (``model*.safetensors``) otherwise. A
    FILA adapter is converted against its initial state into a plain LoRA (rank 2r) for the original base."""
    options = {"path_initial_model_for_weight_conversion": fila_initial} if fila_initial else {}
    with quiet_transformers():
        model.save_pretrained(directory, **options)
    pattern = "adapter_model*.safetensors" if kind in PEFT_KINDS else "model*.safetensors"
    files = sorted(directory.glob(pattern))
    return sum(f.stat().st_size for f in files), ",".join(f.name for f in files)


def load_checkpoint(kind: str, directory: str | Path, make_target: Any) -> torch.nn.Module:
    """The model :func:`save_checkpoint` saved, rebuilt on a fresh target copy (adapters) or loaded whole."""
    base = make_target()
    with quiet_transformers():
        if kind in PEFT_KINDS:
            from peft import PeftModel

            model = PeftModel.from_pretrained(base, str(directory))
        else:
            param = next(base.parameters())
            model = type(base).from_pretrained(str(directory), dtype=param.dtype).to(param.device)
            del base
    return model.eval()


def frontier_run(method: Method, context: dict[str, Any], settings: dict[str, Any], ckpt_root: Path) -> dict[str, Any]:
    """One frontier run: its trajectory, its kept (operating) checkpoint saved under ``ckpt_root``, its costs."""
    grin = method.grin or {}
    record: dict[str, Any] = {
        "run": method.name,
        "family": method.group,
        "kind": method.kind,
        "seed": method.seed,
        "lr": method.lr,
        "density": grin.get("density", 1.0 if method.kind == "full" else None),
        "score": selector_of(grin) if grin else None,
        "config": method.describe(),
    }
    callback = None
    if method.kind != "auto":
        callback = TrajectoryCallback(
            context["qa_format"],
            context["splits"],
            every=settings["eval_every"],
            unit=settings["eval_unit"],
            target=settings["frontier_at"],
            batch_size=settings["eval_batch_size"],
            keep_state=settings["utility"] != "none",
            score_start=method.name in settings.get("score_start", (method.name,)),
        )
    seed = context["train"]["seed"] if method.seed is None else method.seed
    localize_retain = localize_sample(context["retain"], settings["localize_retain"], seed)
    model, cost = run_method(
        method,
        context["make_target"],
        context["qa_format"],
        context["forget"],
        context["retain"],
        train=context["train"],
        workdir=context["workdir"],
        localize_retain=localize_retain,
        log=log,
        callbacks=[callback] if callback is not None else (),
    )
    eval_seconds = 0.0
    if callback is not None:
        callback.restore(model)  # the kept checkpoint's values, so the saved delta is the operating checkpoint
        points, kept, eval_seconds = callback.points, callback.kept, callback.eval_seconds
    else:
        t0 = time.perf_counter()
        probs = answer_probabilities(model, context["qa_format"], context["splits"], settings["eval_batch_size"])
        eval_seconds = time.perf_counter() - t0
        points = [{"step": cost.get("steps") or 0, "epoch": None, **probs}]
        kept = points[0]
        log(f"    auto: forget {probs['forget']:.3f} retain {probs['retain']:.3f} after {cost.get('steps')} steps")
    directory = ckpt_root / slug(method.name)
    nbytes, files = save_checkpoint(model, method.kind, directory, cost.get("fila_initial"))
    del model
    record.update(
        points=points,
        kept=kept,
        checkpoint=str(directory),
        trainable_entries=cost.get("trainable_entries"),
        delta_bytes=nbytes,
        delta_file=files,
        steps=cost.get("steps"),
        wall_seconds=(cost.get("wall_seconds") or 0.0) - (eval_seconds if callback is not None else 0.0),
        trajectory_eval_seconds=eval_seconds,
        timings=cost.get("timings"),
    )
    for key in ("operating_point", "auto_learning_rate", "auto_epochs", "unlearn_keywords", "train_metrics", "fila"):
        if key in cost:
            record[key] = cost[key]
    mass = (cost.get("localization") or {}).get("mass")
    if mass:
        record["localization_mass"] = mass
    log(
        f"    {len(points)} points, lowest forget {min(p['forget'] for p in points):.3f}; kept forget "
        f"{kept['forget']:.3f} retain {kept['retain']:.3f}; {record['wall_seconds']:.0f} s training + "
        f"{eval_seconds:.0f} s trajectory; delta {nbytes:,} bytes"
    )
    return record


def evaluate_checkpoint(job: dict[str, Any], context: dict[str, Any], evaluator: Any) -> dict[str, Any]:
    """The full evaluation of one family's operating checkpoint (or of the target, ``job["kind"] == "none"``)."""
    if job["kind"] == "none":
        model = context["make_target"]()
    else:
        model = load_checkpoint(job["kind"], job["checkpoint"], context["make_target"])
    result = evaluator(model)
    del model
    row = {
        "method": job["name"],
        "group": job["group"],
        "summary": result["summary"],
        "cost": {"eval_seconds": result["eval_seconds"]},
        "forget_generations": result.get("forget_generations"),
    }
    for key in ("family", "seed", "run", "point"):
        if key in job:
            row[key] = job[key]
    log(f"    {job['name']}: {summary_line(result['summary'])}  (eval {result['eval_seconds']:.0f} s)")
    return row
