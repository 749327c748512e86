"""Rebuild a frontier report from the log of a ``bench_tofu.py --frontier`` process stopped before it wrote one.

A one-process frontier benchmark rewrites its report after every run, but one that was stopped before that existed
(or killed by the machine) leaves only its log, which holds every finished run's trajectory (forget and retain
answer probability at each evaluated step, 3 decimals), its kept checkpoint, its training and trajectory seconds and
its delta file's bytes. This turns those runs into a report that ``bench_tofu.py --merge`` accepts. What the log
lacks comes from the arguments that produced it (``--argv``: each family's kind, density, score and grid) and from
``--like`` reports of the same protocol (the settings, trained entries). The report says it was rebuilt, from which
log, and that its probabilities are rounded.

    python benchmarks/tofu_log.py run.log --argv "--frontier ..." --like results/a.json --out results/b.json
"""

from __future__ import annotations

import argparse
import json
import re
import shlex
from collections.abc import Sequence
from pathlib import Path
from typing import Any

RUN = re.compile(r"\] run \d+/\d+: (?P<name>(?P<family>.+) lr=(?P<lr>\S+) seed=(?P<seed>\S+))$")
POINT = re.compile(r"step (?P<step>\d+) \(epoch (?P<epoch>[\d.]+)\): forget (?P<f>[\d.]+) retain (?P<r>[\d.]+)")
DONE = re.compile(
    r"points, lowest forget [\d.]+; kept forget (?P<f>[\d.]+) retain (?P<r>[\d.]+); (?P<train>\d+) s training \+ "
    r"(?P<traj>\d+) s trajectory; delta (?P<bytes>[\d,]+) bytes"
)


def runs_from_log(text: str) -> list[dict[str, Any]]:
    """Every run the log shows finished (a run cut off before its summary line is left out), in log order."""
    runs, current = [], None
    for line in text.splitlines():
        if match := RUN.search(line):
            seed = match["seed"]
            current = {"run": match["name"], "family": match["family"], "lr": float(match["lr"]), "points": []}
            current["seed"] = int(seed) if seed.isdigit() else seed
        elif current and (match := POINT.search(line)):
            point = {"step": int(match["step"]), "epoch": float(match["epoch"])}
            current["points"].append(point | {"forget": float(match["f"]), "retain": float(match["r"])})
        elif current and (match := DONE.search(line)):
            kept = (float(match["f"]), float(match["r"]))
            current["kept"] = next(p for p in current["points"] if (p["forget"], p["retain"]) == kept)
            current["steps"] = current["points"][-1]["step"]
            current["wall_seconds"], current["trajectory_eval_seconds"] = float(match["train"]), float(match["traj"])
            current["delta_bytes"] = int(match["bytes"].replace(",", ""))
            runs.append(current)
            current = None
    return runs


def rebuild(log: Path, argv: str, like: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A frontier report of the log's finished runs: families (kind, density, score, grid) from the ``bench_tofu.py``
    arguments that produced the log, the settings of ``like[0]``, and trained entries from the first ``like`` run of
    the same kind and density (same adapter, same count); a family the arguments do not define is an error."""
    from bench_tofu import parse_args
    from tofu_methods import frontier_families

    defined = {f["family"]: f for f in frontier_families(parse_args(shlex.split(argv)))}
    runs = runs_from_log(log.read_text(encoding="utf-8"))
    missing = sorted({r["family"] for r in runs} - set(defined))
    if missing:
        raise SystemExit(f"tofu_log: the arguments define no family {missing}")
    entries = {}
    for report in like:
        for run in report.get("runs", []):
            entries.setdefault((run.get("kind"), run.get("density")), run.get("trainable_entries"))
    for run in runs:
        fam = defined[run["family"]]
        run.update({key: fam[key] for key in ("kind", "density", "score")})
        run["trainable_entries"] = entries.get((fam["kind"], fam["density"]))
    names = list(dict.fromkeys(r["family"] for r in runs))
    settings = {**like[0]["settings"], "families": [defined[n] for n in names]}
    settings["grids"] = {n: defined[n]["grid"] for n in names}
    settings["seeds"] = sorted({r["seed"] for r in runs}, key=str)
    note = (
        f"python benchmarks/bench_tofu.py {argv} (stopped; rebuilt by benchmarks/tofu_log.py from {log}, 3 decimals)"
    )
    rebuilt = {"command": note, "settings": settings, "runs": runs, "results": [], "rebuilt_from_log": str(log)}
    return {**like[0], **rebuilt}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="The stopped process's output (stdout + stderr).")
    p.add_argument("--argv", required=True, help="The bench_tofu.py arguments that produced the log (one string).")
    p.add_argument("--like", nargs="+", required=True, help="Frontier reports of the same protocol.")
    p.add_argument("--out", required=True, help="The report to write (JSON; render it with bench_tofu.py --merge).")
    args = p.parse_args(argv)
    like = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.like]
    report = rebuild(Path(args.log), args.argv, like)
    Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"{len(report['runs'])} finished runs from {args.log} -> {args.out}")
    return report


if __name__ == "__main__":
    main()
