"""Rebuild a frontier report from the log of a ``bench_tofu.py --frontier`` process stopped before it wrote one.

A one-process frontier benchmark rewrites its report after every run, but one that was stopped before that existed
(or killed by the machine) leaves only its log, which holds every finished run's trajectory (forget and retain
answer probability at each evaluated step, 3 decimals), its kept checkpoint, its training and trajectory seconds and
its delta file's bytes. This turns those runs into a report that ``bench_tofu.py --merge`` accepts. What the log
lacks comes from ``--like`` reports of the same protocol: the settings, and per family its kind, density, score and
trained entries. The report says it was rebuilt, from which log, and that its probabilities are rounded.

    python benchmarks/tofu_log.py run.log --like benchmarks/results/a.json --out benchmarks/results/b.json
"""

from __future__ import annotations

import argparse
import json
import re
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


def rebuild(log: Path, like: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """A frontier report of the log's finished runs, with the settings of ``like[0]`` and the family metadata of the
    first ``like`` report that has each family; a family none of them has is an error."""
    families: dict[str, dict[str, Any]] = {}
    for report in like:
        for run in report.get("runs", []):
            families.setdefault(run["family"], run)
    runs = runs_from_log(log.read_text(encoding="utf-8"))
    missing = sorted({r["family"] for r in runs} - set(families))
    if missing:
        raise SystemExit(f"tofu_log: no --like report has the families {missing}")
    for run in runs:
        known = families[run["family"]]
        run.update({key: known.get(key) for key in ("kind", "density", "score", "trainable_entries")})
    settings = dict(like[0]["settings"])
    settings["seeds"] = sorted({r["seed"] for r in runs}, key=str)
    names = {r["family"] for r in runs}
    kept: dict[str, dict[str, Any]] = {}
    for report in like:
        for fam in report["settings"].get("families", []):
            if fam["family"] in names:
                kept.setdefault(fam["family"], fam)
    settings["families"] = list(kept.values())
    note = f"rebuilt by benchmarks/tofu_log.py from {log} (probabilities rounded to 3 decimals)"
    rebuilt = {"command": note, "settings": settings, "runs": runs, "results": [], "rebuilt_from_log": str(log)}
    return {**like[0], **rebuilt}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("log", help="The stopped process's output (stdout + stderr).")
    p.add_argument("--like", nargs="+", required=True, help="Frontier reports of the same protocol and families.")
    p.add_argument("--out", required=True, help="The report to write (JSON; render it with bench_tofu.py --merge).")
    args = p.parse_args(argv)
    like = [json.loads(Path(path).read_text(encoding="utf-8")) for path in args.like]
    report = rebuild(Path(args.log), like)
    Path(args.out).write_text(json.dumps(report, indent=1), encoding="utf-8")
    print(f"{len(report['runs'])} finished runs from {args.log} -> {args.out}")
    return report


if __name__ == "__main__":
    main()
