"""Does the forgetting hold? `grin_peft.audit` on every method of BENCHMARKS.md section 5, TOFU forget10.

Each method unlearns a fresh copy of the cached 1.31M-parameter TOFU target with the protocol of
``bench_tofu.py`` (NPO, 5 epochs, batch 32 + 32, constant rate, bf16 autocast, seed 0; GRIN localises on a
400-item retain sample), then :func:`grin_peft.audit` attacks it: bitsandbytes 8-bit / NF4 / FP4, relearning on 40
forget items (measured on the held-out rest) and on 40 retain items, paraphrased questions, a jailbreak answer
prefix, and MinK/MinK++/LOSS/ZLib membership inference against holdout10. Outputs
``benchmarks/results/<stem>.{json,md,png}``, rewritten after every method so an interrupted run keeps its rows.

Relearning is scaled to this model: its learning rates are ~100x the 7B models' (full NPO 1e-3 here vs 1e-5 in
the papers), so the published relearning rate (1e-5, batch 4, 15-150 steps) becomes 1e-3, batch 4, 50 steps.

    python benchmarks/bench_audit.py                          # every method
    python benchmarks/bench_audit.py --methods "full NPO lr=1e-4,GRIN 25%" --stem part1
    python benchmarks/bench_audit.py --merge part1.json part2.json --stem audit_forget10
    # SAM against plain controls at lower retain weights, on a second split too (audit_tradeoff.py):
    python benchmarks/bench_audit.py --methods "GRIN 1%" --attacks relearning --sam-rho 0 1 --relearn-splits 40:1
    python benchmarks/bench_audit.py --methods "GRIN 1%" --attacks relearning --retain-weight 0.5 0.25

GRIN rows are followed by the same delta after ``grin_peft.audit.floor_to_bin_width`` (``--mitigate``, default 1
bin), audited under quantization only.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import json
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import bench_tofu  # noqa: E402
import torch
from audit_tradeoff import plot_tradeoff, render_tradeoff
from common import REPO, atomic_write, environment, log  # benchmarks/ is on sys.path
from tofu_eval import generation_cap
from tofu_models import localize_sample
from unlearning_runs import Method, run_method

from grin_peft.audit import RelearnSettings, audit, floor_to_bin_width  # noqa: E402
from grin_peft.data import QAFormat, load_tofu  # noqa: E402

METHODS = (
    Method("full NPO lr=1e-4 (low)", "full", "npo", 1e-4),
    Method("full NPO lr=1e-3 (high)", "full", "npo", 1e-3),
    Method("LoRA r=8 NPO lr=3e-3", "lora", "npo", 3e-3),
    Method("GRIN 1% NPO lr=1e-2 (section 5 default)", "grin", "npo", 1e-2, grin={"density": 0.01, "seed": 0}),
    Method("GRIN 25% NPO lr=3e-3 (best frontier)", "grin", "npo", 3e-3, grin={"density": 0.25, "seed": 0}),
    Method("mask 1% random NPO lr=1e-2", "grin", "npo", 1e-2, grin={"density": 0.01, "score": "random", "seed": 0}),
)
COLUMNS = (  # (header, attack, variant prefix)
    ("8-bit", "quantization", "8bit"),
    ("NF4", "quantization", "nf4"),
    ("FP4", "quantization", "fp4"),
    ("relearn forget", "relearning", "forget"),
    ("relearn retain", "relearning", "related"),
    ("paraphrase", "paraphrase", ""),
    ("jailbreak", "jailbreak", ""),
)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default=None, help="comma-separated substrings of method names (default: all)")
    p.add_argument("--items", type=int, default=100, help="forget/retain/holdout items measured per attack")
    p.add_argument("--relearn-items", type=int, default=40)
    p.add_argument("--relearn-steps", type=int, default=50)
    p.add_argument("--relearn-lr", type=float, default=1e-3)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"))
    p.add_argument("--stem", default="audit_forget10")
    p.add_argument("--merge", nargs="+", default=None, metavar="JSON", help="combine saved parts, render, exit")
    p.add_argument(
        "--extra-full-lr", type=float, nargs="*", default=[], help="also full NPO at these rates (with --epochs)"
    )
    p.add_argument("--epochs", type=float, default=None, help="unlearning epochs of the extra rows (default 5)")
    p.add_argument(
        "--quantized-target", action="store_true", help="also measure the target itself under each quantization"
    )
    p.add_argument(
        "--mitigate", type=float, default=1.0, help="also audit GRIN deltas floored at this many bins (0: no)"
    )
    p.add_argument("--seed", type=int, default=0, help="training seed, and the GRIN rows' selection/noise seed")
    p.add_argument(
        "--sam-rho", type=float, nargs="+", default=[0.0],
        help="unlearn each GRIN row once per radius (UnlearningArguments.sam_rho; 0: plain, no SAM)",
    )  # fmt: skip
    p.add_argument(
        "--lr-scale", type=float, nargs="+", default=[1.0],
        help="unlearn each GRIN row once per factor on its learning rate (plain controls for the SAM rows)",
    )  # fmt: skip
    p.add_argument(
        "--retain-weight", type=float, nargs="+", default=[None],
        help="unlearn each GRIN row once per retain-term weight (default: the objective's own, 1)",
    )  # fmt: skip
    p.add_argument(
        "--relearn-splits", nargs="*", default=[], metavar="ITEMS:SEED",
        help="also attack each run by relearning on these forget-item counts and split seeds",
    )  # fmt: skip
    p.add_argument("--attacks", default=None, help="comma-separated attacks to run (default: all)")
    p.add_argument("--modes", default="8bit,nf4,fp4", help="comma-separated quantization modes (default: all)")
    p.add_argument(
        "--shrink", type=float, nargs="*", default=[],
        help="also audit, under quantization only, the original moved this fraction of the way to each row's model",
    )  # fmt: skip
    p.add_argument("--objective", default="npo", help="objective of the --extra-full-lr rows (npo, grad_ascent, ...)")
    p.add_argument("--smoke", action="store_true", help="tiny everything: checks the code path in seconds")
    return p.parse_args(argv)


def _row_for(report: dict[str, Any], attack: str, variant: str) -> dict[str, Any] | None:
    return next((r for r in report["rows"] if r["attack"] == attack and r["variant"].startswith(variant)), None)


def _cell(row: dict[str, Any] | None) -> str:
    """Recovered fraction of forget probability, and the worst of the three forget metrics in brackets."""
    if row is None:
        return "n/a"
    rec = row["recovered"]
    defined = [v for v in rec.values() if v is not None]
    prob = "-" if rec["probability"] is None else f"{rec['probability']:.0%}"
    return f"{prob} ({max(defined):.0%})" if defined else "not judged"


def _module_summary(changes: list[dict[str, Any]]) -> dict[str, float | None]:
    """Exact aggregates over modules: changed entries, share below half a bin, share a 4-bit copy keeps."""
    changed = sum(r["changed"] for r in changes)
    if not changed:
        return {"changed": 0, "below_half_bin": None, "kept_by_nf4": None, "kept_by_fp4": None}
    out: dict[str, float | None] = {"changed": changed}
    for key in ("below_half_bin", "kept_by_nf4", "kept_by_fp4"):
        out[key] = sum(r[key] * r["changed"] for r in changes if r["changed"]) / changed
    medians = [r["median_change_over_bin"] for r in changes if r["changed"]]
    out["median_of_module_medians"] = float(torch.tensor(medians).median())
    if all("change_sq" in r for r in changes if r["changed"]):  # rows measured before these fields existed lack them
        out["mean_change_over_bin"] = (
            sum(r["mean_change_over_bin"] * r["changed"] for r in changes if r["changed"]) / changed
        )
        total = sum(r["change_sq"] for r in changes if r["changed"])
        for qt in ("nf4", "fp4"):
            out[f"projection_kept_{qt}"] = (
                sum(r[f"projection_kept_{qt}"] * r["change_sq"] for r in changes if r["changed"]) / total
            )
    return out


def render(results: list[dict[str, Any]]) -> str:
    """One markdown table: a row per method, recovered fractions per attack, MIA and the change/bin summary."""
    head = ["method", "forget prob o -> u", "retain prob o -> u", *[c[0] for c in COLUMNS]]
    head += ["MinK AUC o -> u", "median |change|/NF4 bin", "changes kept by NF4 / FP4", "change kept as a whole"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        rep, base = res["report"], res["report"]["baseline"]
        mink = next((m for m in rep["membership"] if m["attack"] == "mink"), None)
        mods = _module_summary(rep["module_changes"])
        cells = [
            res["method"],
            f"{base['original']['forget']['probability']:.3f} -> {base['unlearned']['forget']['probability']:.3f}",
            f"{base['original']['retain']['probability']:.3f} -> {base['unlearned']['retain']['probability']:.3f}",
            *[_cell(_row_for(rep, attack, variant)) for _, attack, variant in COLUMNS],
            "n/a" if mink is None else f"{mink['auc_original']:.3f} -> {mink['auc_unlearned']:.3f}",
            "-" if mods.get("median_of_module_medians") is None else f"{mods['median_of_module_medians']:.3g}",
            "-" if mods["kept_by_nf4"] is None else f"{mods['kept_by_nf4']:.0%} / {mods['kept_by_fp4']:.0%}",
            "-"
            if "projection_kept_nf4" not in mods
            else f"{mods['projection_kept_nf4']:.0%} / {mods['projection_kept_fp4']:.0%}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(results: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(11, 4.5))
    width = 0.8 / max(1, len(results))
    for i, res in enumerate(results):
        values = []
        for _, attack, variant in COLUMNS:
            row = _row_for(res["report"], attack, variant)
            value = None if row is None else row["recovered"]["probability"]
            values.append(0.0 if value is None else value)
        ax.bar([j + (i - len(results) / 2 + 0.5) * width for j in range(len(COLUMNS))], values, width,
               label=res["method"])  # fmt: skip
    ax.axhline(0.1, color="grey", linestyle="--", linewidth=0.8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.set_xticks(range(len(COLUMNS)), [c[0] for c in COLUMNS])
    ax.set_ylabel("recovered fraction of forget probability")
    ax.set_title("TOFU forget10, 1.3M-parameter target: what each attack recovers (dashed: 10%)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def render_relearning(results: list[dict[str, Any]]) -> str:
    """The relearning attack in absolute numbers, a row per run: where unlearning left the model (forget and retain
    probability, the operating point a defence must not move) and what each attack brought back on the held-out
    forget items (answer probability: original / unlearned -> attacked, and the recovered fraction)."""
    head = ["method", "epochs", "forget prob u", "retain prob u"]
    head += ["relearn forget: o / u -> attacked", "recovered", "relearn retain: u -> attacked", "recovered", "train s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for res in results:
        rep = res["report"]
        rows = [_row_for(rep, "relearning", source) for source in ("forget", "related")]
        if None in rows:
            continue
        unlearned = rep["baseline"]["unlearned"]
        cells = [res["method"], f"{res['config'].get('epochs', '-')}", f"{unlearned['forget']['probability']:.3f}"]
        cells.append(f"{unlearned['retain']['probability']:.3f}")
        for row in rows:
            o, u, a = (row[k]["probability"] for k in ("original", "unlearned", "attacked"))
            cells += [f"{o:.3f} / {u:.3f} -> {a:.3f}" if row is rows[0] else f"{u:.3f} -> {a:.3f}", _cell(row)]
        cells.append("-" if res.get("train_seconds") is None else f"{res['train_seconds']:.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n" if len(lines) > 2 else ""


def write(results: list[dict[str, Any]], meta: dict[str, Any], out: Path, stem: str) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / f"{stem}.json", json.dumps({**meta, "results": results}, indent=2, default=str))
    relearning, tradeoff = render_relearning(results), render_tradeoff(results)
    extra = f"\nRelearning in absolute numbers:\n\n{relearning}" if relearning else ""
    if tradeoff:  # SAM runs beside plain runs of the same method and seed
        extra += f"\nSAM against the plain runs at equal retain ({stem}_tradeoff.png):\n\n{tradeoff}"
        plot_tradeoff(results, out / f"{stem}_tradeoff.png")
    atomic_write(out / f"{stem}.md", f"`{meta['command']}`\n\n" + render(results) + extra)
    plot(results, out / f"{stem}.png")


def moved_towards(model: torch.nn.Module, target: torch.nn.Module, alpha: float) -> torch.nn.Module:
    """A plain copy of ``target`` moved ``alpha`` of the way to ``model`` (adapters merged): the same change,
    ``alpha`` times as large."""
    from grin_peft.audit.quantization import plain_model

    moved = plain_model(model)
    start = target.state_dict()
    end = {k: v for k, v in moved.state_dict().items() if v.is_floating_point()}
    new = {k: start[k] + alpha * (v - start[k]) for k, v in end.items()}  # all first: tied weights share a tensor
    with torch.no_grad():
        for key, value in end.items():
            value.copy_(new[key])
    return moved


def shrunk(model, target, forget, retain, fmt, items, cap, method, alpha, modes) -> dict[str, Any]:
    """:func:`moved_towards` under the quantization attack only: where, in bin widths, a 4-bit copy starts to
    round the change away."""
    name = f"{method.name}, x{alpha:g} of the change"
    report = audit(
        moved_towards(model, target, alpha), forget, retain, tokenizer=fmt, original=copy.deepcopy(target),
        attacks=["quantization"], quantization_modes=modes, max_items=items, max_new_tokens=cap, batch_size=32,
        name=name, log=lambda m: log(f"  {m[:150]}"),
    )  # fmt: skip
    return {"method": name, "config": {**method.describe(), "shrink": alpha}, "report": report.to_dict()}


def with_sharpness(
    method: Method,
    radii: Sequence[float],
    seed: int,
    lr_scales: Sequence[float] = (1.0,),
    retain_weights: Sequence[float | None] = (None,),
) -> list[tuple[Method, dict[str, float]]]:
    """The runs of one method, each with its training overrides: a GRIN row once per learning-rate factor, retain
    weight (None: the objective's default) and SAM radius (0: plain), its selection seed set to ``seed``; any other
    row once, plain."""
    suffix = f", seed {seed}" if seed else ""
    if method.kind != "grin":
        return [(dataclasses.replace(method, name=method.name + suffix), {})]
    runs = []
    for scale in lr_scales:
        for weight in retain_weights:
            for rho in radii:
                name = method.name + suffix + (f", lr x{scale:g}" if scale != 1 else "")
                name += "" if weight is None else f", retain weight {weight:g}"
                name += f" + SAM rho={rho:g}" if rho else ""
                overrides = {"sam_rho": rho} if rho else {}
                overrides |= {} if weight is None else {"retain_weight": weight}
                grin = {**method.grin, "seed": seed}
                runs.append((dataclasses.replace(method, name=name, lr=method.lr * scale, grin=grin), overrides))
    return runs


def parse_splits(specs: Sequence[str], base: RelearnSettings) -> list[RelearnSettings]:
    """``ITEMS:SEED`` strings as relearning settings that differ from ``base`` only in items and split seed."""
    splits = []
    for spec in specs:
        items, _, seed = spec.partition(":")
        if not (items.isdigit() and seed.isdigit()):
            sys.exit(f"bench_audit: --relearn-splits takes ITEMS:SEED (two whole numbers); got {spec!r}")
        splits.append(dataclasses.replace(base, items=int(items), seed=int(seed)))
    return splits


def quantized_target(target, fmt, forget, modes, cap) -> dict[str, Any]:
    """The target's own forget metrics in full precision and under each quantization (how much 4-bit costs it)."""
    from grin_peft.audit.measure import measure
    from grin_peft.audit.quantization import quantize

    out = {"full precision": measure(target, fmt, forget, None, max_new_tokens=cap, batch_size=32)["forget"]}
    for mode in modes:
        out[mode] = measure(quantize(target, mode), fmt, forget, None, max_new_tokens=cap, batch_size=32)["forget"]
    log(f"target under quantization: {out}")
    return out


def mitigated(model, target, forget, retain, fmt, items, cap, method, factor, modes) -> dict[str, Any]:
    """The same delta after :func:`floor_to_bin_width`, under the quantization attack only."""
    floored = copy.deepcopy(model)
    info = floor_to_bin_width(floored, factor=factor)
    name = f"{method.name} + bin-width floor x{factor:g}"
    log(f"{name}: raised {info['raised']:,} of {info['entries']:,} entries")
    report = audit(
        floored, forget, retain, tokenizer=fmt, original=copy.deepcopy(target), attacks=["quantization"],
        quantization_modes=modes, max_items=items, max_new_tokens=cap, batch_size=32, name=name,
        log=lambda m: log(f"  {m[:150]}"),
    )  # fmt: skip
    return {"method": name, "config": {**method.describe(), "mitigation": info}, "report": report.to_dict()}


def main(argv: Sequence[str] | None = None) -> None:
    warnings.filterwarnings("ignore")  # transformers' deprecation notes, bitsandbytes' CPU-kernel note
    args = parse_args(argv)
    out = Path(args.out)
    meta = {"command": "python benchmarks/bench_audit.py " + " ".join(sys.argv[1:]), "environment": environment()}
    if args.merge:
        parts = [json.loads(Path(path).read_text()) for path in args.merge]
        for part in parts:  # rows saved before the config recorded the epochs ran the part's own
            for result in part["results"]:
                result.setdefault("config", {}).setdefault(
                    "epochs", part.get("settings", {}).get("train", {}).get("num_train_epochs")
                )
        meta["parts"] = [{k: v for k, v in part.items() if k != "results"} for part in parts]
        order = {m.name: i for i, m in enumerate(METHODS)}

        def rank(result: dict[str, Any]) -> tuple[int, bool]:  # variants (floor, seed, SAM) after their own row
            base = result["method"].split(" + ")[0].split(", ")[0]
            return order.get(base, len(order)), base != result["method"]

        write(sorted((r for part in parts for r in part["results"]), key=rank), meta, out, args.stem)
        return
    torch.set_num_threads(1)
    tofu_args = bench_tofu.parse_args(["--workers", "1", *(["--smoke"] if args.smoke else [])])
    data = Path(tofu_args.data)
    setup = bench_tofu.tiny_setup(tofu_args, data)
    target, _ = bench_tofu.load_or_train("target", "forget10", data, *setup)
    fmt = QAFormat(setup[2])
    train = bench_tofu.train_arguments(tofu_args, False, 1)
    forget, retain = load_tofu("forget10_perturbed", data), load_tofu("retain90", data)
    holdout = load_tofu("holdout10", data)
    items = 6 if args.smoke else args.items
    if args.smoke:
        forget, retain = forget[:12], retain[:12]
        train = {**train, "num_train_epochs": 1}
    modes = ("8bit",) if args.smoke else tuple(args.modes.split(","))  # the smoke model's rows are below a block
    relearn = RelearnSettings(
        items=min(args.relearn_items, len(forget) // 2), steps=args.relearn_steps, lr=args.relearn_lr
    )
    cap = generation_cap(fmt, {"forget": forget[:items], "retain": retain[:items]})
    wanted = [w.strip().lower() for w in (args.methods or "").split(",") if w.strip()]
    methods = [m for m in METHODS if wanted and any(w in m.name.lower() for w in wanted)]
    if not wanted and not args.extra_full_lr:
        methods = list(METHODS)
    epochs = args.epochs or train["num_train_epochs"]
    label = {"npo": "NPO", "grad_ascent": "GA", "grad_diff": "GradDiff"}.get(args.objective, args.objective)
    methods += [
        Method(f"full {label} lr={lr:g}, {epochs:g} epochs", "full", args.objective, lr) for lr in args.extra_full_lr
    ]
    if args.epochs:
        train = {**train, "num_train_epochs": args.epochs}
    train = {**train, "seed": args.seed}
    runs = [
        run for m in methods for run in with_sharpness(m, args.sam_rho, args.seed, args.lr_scale, args.retain_weight)
    ]
    splits = parse_splits(args.relearn_splits, relearn)
    attacks = None if args.attacks is None else [a.strip() for a in args.attacks.split(",") if a.strip()]
    meta["settings"] = {"train": train, "items": items, "relearn": vars(relearn), "max_new_tokens": cap}
    meta["settings"]["relearn_splits"] = [vars(s) for s in splits]
    results: list[dict[str, Any]] = []
    if args.quantized_target:
        meta["quantized_target"] = quantized_target(target, fmt, forget[:items], modes, cap)
    localize_retain = localize_sample(retain, 400, 0)

    def split_report(model: torch.nn.Module, original: torch.nn.Module | None, split: RelearnSettings):
        log(f"  relearning split: {split.items} items, seed {split.seed}")
        return audit(
            model, forget, retain, tokenizer=fmt, original=original, attacks=["relearning"], max_items=items,
            relearn_settings=split, max_new_tokens=cap, batch_size=32, name=f"split {split.items}:{split.seed}",
        )  # fmt: skip

    with tempfile.TemporaryDirectory(prefix="bench_audit_") as workdir:
        for method, overrides in runs:
            t0 = time.perf_counter()
            log(f"{method.name}: unlearning")
            method_train = {**train, **overrides}
            model, cost = run_method(
                method, lambda: copy.deepcopy(target), fmt, forget, retain, train=method_train, workdir=workdir,
                localize_retain=localize_retain, log=log,
            )  # fmt: skip
            original = copy.deepcopy(target) if method.kind == "full" else None
            report = audit(
                model, forget, retain, tokenizer=fmt, original=original, holdout=holdout, max_items=items,
                relearn_settings=relearn, max_new_tokens=cap, quantization_modes=modes, batch_size=32,
                name=method.name, attacks=attacks, log=lambda m: log(f"  {m[:150]}"),
            )  # fmt: skip
            results.append(
                {
                    "method": method.name,
                    "config": {
                        **method.describe(),
                        "sam_rho": overrides.get("sam_rho", 0.0),
                        "retain_weight": overrides.get("retain_weight"),
                        "seed": args.seed,
                        "epochs": train["num_train_epochs"],
                    },
                    "train_seconds": cost.get("wall_seconds"),
                    "audit_seconds": report.seconds,
                    "trainable_entries": cost.get("trainable_entries"),
                    "report": report.to_dict(),
                    "relearn_splits": [
                        {"items": s.items, "seed": s.seed, "report": split_report(model, original, s).to_dict()}
                        for s in splits
                    ],
                }
            )
            for alpha in args.shrink:
                results.append(shrunk(model, target, forget, retain, fmt, items, cap, method, alpha, modes))
                write(results, meta, out, args.stem)
            if method.kind == "grin" and args.mitigate:
                results.append(mitigated(model, target, forget, retain, fmt, items, cap, method, args.mitigate, modes))
            log(f"{method.name}: {time.perf_counter() - t0:.0f} s")
            write(results, meta, out, args.stem)
    write(results, meta, out, args.stem)  # also when no method ran (--methods none --quantized-target)
    print(render(results))


if __name__ == "__main__":
    main()
