"""What the TOFU benchmark runs: the methods of the main table, the learning-rate pilot, and the frontier runs.

* :func:`build_methods`: the main table (one learning rate per parameterisation, ``--lr-full/--lr-lora/--lr-grin``):
  full-parameter GradAscent/GradDiff/NPO, LoRA r=8 GradDiff/NPO, SSD, GRIN with GradDiff and NPO, GRIN's machinery
  with the other selectors (:data:`SCORE_LABELS`) and the ablations.
* :func:`sweep_methods`: the learning-rate pilot (NPO per parameterisation over ``--sweep-*`` grids), and
  :func:`choose_learning_rates`, its rule declared before it ran.
* :func:`frontier_methods`: the frontier benchmark's runs, one per (seed, method family, density, learning rate):
  full-parameter NPO, LoRA r=8 NPO, GRIN at each ``--densities`` budget, a random mask (and any other
  ``--mask-scores`` selector) of the same size at each density, and one "auto" run per seed
  (``grin_peft.unlearn`` with no learning rate or epochs). Every family has its own learning-rate grid
  (:func:`grid_for`). ``--objectives npo,ihl`` repeats every family but the auto run per objective, and ``--fila``
  adds FILA-initialised LoRA r=8 (:mod:`grin_peft.fila`) on ``--grid-fila`` (default: the LoRA grid): with IHL, that
  is LoKU (BENCHMARKS.md section 9).

Learning-rate grids of the frontier benchmark (``--grid-full``, ``--grid-lora``, ``--grid-mask``). A grid must
bracket the rates at which a family crosses the forget target within ``--epochs``; all its checkpoints join the
frontier, so a grid too wide costs time, not fairness. The defaults are 4 half-decade steps placed from the pilots
of BENCHMARKS.md section 5 (forget10, 5 epochs): full NPO reaches forget ~0.1 at 3e-4-1e-3, LoRA r=8 at 3e-3-1e-2,
GRIN 1% at 1e-2-0.1, GRIN 0.1% never below 0.22 up to 0.3, GRIN 5% at 3e-3-1e-2. A sparse mask's rate grows as its
budget shrinks (each entry must move further), so masks take the grid of their density band
(:data:`MASK_GRID_BANDS`, the same for GRIN and for every other selector at that density: same parameterisation).
``--grid-mask`` overrides a band for every density (``1e-3,3e-3``) or per density
(``0.001=0.1,0.3,1;0.5=1e-4,3e-4``).
"""

from __future__ import annotations

import math
import re
from typing import Any

from unlearning_runs import Method  # benchmarks/ is on sys.path when run as a script

from grin_peft.config import PAPER_PRESET

# the other selectors run in GRIN's machinery (same budget, noise, objective), by their GrinConfig score names
SCORE_LABELS = {
    "random": "random",
    "magnitude": "magnitude",
    "forget_gradient": "SalUn (forget gradient)",
    "wagle": "WAGLE",
    "squared_ratio": "LoKU/FILA (squared ratio)",
    "ssd": "SSD score",
    "leverage_ratio": "leverage ratio (pool 4)",
    "retain_complement": "retain complement",
}

# GRIN variants run like the other selectors (``--mask-scores``), by the GrinConfig fields they change
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "paper": ("paper preset", {**PAPER_PRESET}),
    "relocalize": ("re-localised every epoch", {"score": "gradient_ratio", "relocalize_every": 13}),
}
SELECTOR_LABELS = {**SCORE_LABELS, **{name: label for name, (label, _) in VARIANTS.items()}}


def selector_settings(selector: str) -> dict[str, Any]:
    """GrinConfig fields of a ``--mask-scores`` entry: a score name, or a variant's fields."""
    return dict(VARIANTS[selector][1]) if selector in VARIANTS else {"score": selector}


def selector_of(grin: dict[str, Any]) -> str | None:
    """The ``--mask-scores`` name a run's GrinConfig fields came from (the inverse of :func:`selector_settings`)."""
    for name, (_, fields) in VARIANTS.items():
        if all(grin.get(k) == v for k, v in fields.items()):
            return name
    return grin.get("score")


# the default run (one seed < 45 min on 2 cores); BENCHMARKS.md section 6.5 adds 0.001, 0.05, 0.1 by --densities
DEFAULT_DENSITIES = (0.01, 0.25, 0.5)
DEFAULT_GRID_FULL = (1e-4, 3e-4, 1e-3, 3e-3)
DEFAULT_GRID_LORA = (1e-3, 3e-3, 1e-2, 3e-2)
# (largest density of the band, its grid): GRIN and the other masks at that budget
MASK_GRID_BANDS: tuple[tuple[float, tuple[float, ...]], ...] = (
    (0.003, (3e-2, 0.1, 0.3, 1.0)),
    (0.03, (3e-3, 1e-2, 3e-2, 0.1)),
    (0.15, (1e-3, 3e-3, 1e-2, 3e-2)),
    (1.0, (3e-4, 1e-3, 3e-3, 1e-2)),
)
AUTO_FAMILY = "auto (unlearn defaults)"
# how family names spell the frontier's objectives (``--objectives``)
OBJECTIVE_LABELS = {"npo": "NPO", "ihl": "IHL", "grad_diff": "GradDiff", "simnpo": "SimNPO"}


def budget_label(density: float) -> str:
    return f"{density * 100:g}%"


def grin_settings(args: Any, **override: Any) -> dict[str, Any]:
    """GRIN's configuration in this benchmark: the package defaults (sum of squared per-example gradients, eps
    relative to the median retain statistic, noise 0.1 x tensor std) at the benchmark's budget."""
    return {"score": "gradient_ratio", "density": args.density, "seed": args.seed, **override}


# ------------------------------------------------------------------------------------------------ main table


def build_methods(args: Any) -> list[Method]:
    """Every method of the benchmark; ``group`` says which table it belongs to."""
    full, lora, grin = args.lr_full, args.lr_lora, args.lr_grin
    sel_obj = args.selector_objective
    budget = budget_label(args.density)
    methods = [
        Method("target (no unlearning)", "none", group="reference"),
        Method("full GradAscent", "full", "grad_ascent", full),
        Method("full GradDiff", "full", "grad_diff", full),
        Method("full NPO", "full", "npo", full),
        Method("LoRA r=8 GradDiff", "lora", "grad_diff", lora),
        Method("LoRA r=8 NPO", "lora", "npo", lora),
        Method("LoRA r=1 NPO (~GRIN 1% budget)", "lora", "npo", lora, lora={"r": 1, "lora_alpha": 2}),
        Method("SSD (a=10, l=1)", "ssd", ssd={"alpha": 10.0, "lam": 1.0}),
        Method("SSD (a=1, l=1)", "ssd", ssd={"alpha": 1.0, "lam": 1.0}),
        Method(f"GRIN {budget} GradDiff", "grin", "grad_diff", grin, grin=grin_settings(args)),
        Method(f"GRIN {budget} NPO", "grin", "npo", grin, grin=grin_settings(args)),
    ]
    obj_name = {"npo": "NPO", "grad_diff": "GradDiff"}.get(sel_obj, sel_obj)
    for score, label in SCORE_LABELS.items():
        methods.append(
            Method(
                f"mask {budget} {label} {obj_name}",
                "grin",
                sel_obj,
                grin,
                grin=grin_settings(args, score=score),
                group="selectors",
            )
        )

    def ablation(name: str, **override: Any) -> Method:
        return Method(name, "grin", sel_obj, grin, grin=grin_settings(args, **override), group="ablation")

    ab = f"GRIN {budget} {obj_name}"
    methods += [
        ablation(f"{ab} without noise", noise_std=0.0),
        ablation(f"{ab} per-module", selection="per_module"),
        ablation(f"{ab} eps=1 x median", eps=1.0),
    ]
    for density in args.ablation_densities:
        if not math.isclose(density, args.density):
            methods.append(ablation(f"GRIN {budget_label(density)} {obj_name}", density=density))
    return methods


def sweep_methods(args: Any) -> list[Method]:
    """NPO for each parameterisation at each learning rate of its grid (GRIN, and the ``--sweep-scores`` masks, at
    the benchmark's budget on the GRIN grid)."""
    methods = [Method("target (no unlearning)", "none", group="reference")]
    for lr in args.sweep_full:
        methods.append(Method(f"full NPO lr={lr:g}", "full", "npo", lr, group="full"))
    for lr in args.sweep_lora:
        methods.append(Method(f"LoRA r=8 NPO lr={lr:g}", "lora", "npo", lr, group="lora"))
    budget = budget_label(args.density)
    for score in ["gradient_ratio", *args.sweep_scores]:
        name = f"GRIN {budget}" if score == "gradient_ratio" else f"mask {budget} {SCORE_LABELS[score]}"
        group = "grin" if score == "gradient_ratio" else f"mask {score}"
        for lr in args.sweep_grin:
            grin = grin_settings(args, score=score)
            methods.append(Method(f"{name} NPO lr={lr:g}", "grin", "npo", lr, grin=grin, group=group))
    return methods


def choose_learning_rates(results: list[dict[str, Any]], keep: float = 0.9) -> dict[str, dict[str, Any]]:
    """The pre-declared rule: per parameterisation, the learning rate with the highest forget quality among those
    keeping retain probability >= ``keep`` x the target's; when none does, the one keeping the most."""
    target = next((r for r in results if r["method"].startswith("target") and "summary" in r), None)
    if target is None:
        return {}
    floor = keep * target["summary"]["retain_probability"]
    chosen = {}
    families = dict.fromkeys(r["group"] for r in results if r["group"] != "reference")
    for family in families:
        runs = [r for r in results if r["group"] == family and "summary" in r]
        if not runs:
            continue
        ok = [r for r in runs if r["summary"]["retain_probability"] >= floor]
        best = (
            max(ok, key=lambda r: (r["summary"]["forget_quality"], -r["summary"]["forget_probability"]))
            if ok
            else max(runs, key=lambda r: r["summary"]["retain_probability"])
        )
        chosen[family] = {"lr": best["config"]["lr"], "method": best["method"], "meets_floor": bool(ok)}
    return chosen


# ------------------------------------------------------------------------------------------------ frontier


def parse_mask_grids(text: str | None) -> dict[float | None, list[float]]:
    """``--grid-mask``: ``"r1,r2"`` (every density: key None) or ``"d1=r1,r2;d2=r3"`` (per density)."""
    if not text:
        return {}
    grids: dict[float | None, list[float]] = {}
    for part in text.split(";"):
        if not part.strip():
            continue
        density, _, rates = part.rpartition("=")
        values = [float(x) for x in rates.split(",") if x.strip()]
        if not values:
            raise ValueError(f"--grid-mask: no learning rates in {part!r}")
        grids[float(density) if density.strip() else None] = values
    return grids


def grid_for(density: float, overrides: dict[float | None, list[float]]) -> list[float]:
    """The learning-rate grid of a mask at ``density``: an override for that density, else one for every
    density, else its band's default (:data:`MASK_GRID_BANDS`)."""
    for key, rates in overrides.items():
        if key is not None and math.isclose(key, density):
            return list(rates)
    if None in overrides:
        return list(overrides[None])
    return next((list(rates) for top, rates in MASK_GRID_BANDS if density <= top), list(MASK_GRID_BANDS[-1][1]))


def objective_label(objective: str) -> str:
    return OBJECTIVE_LABELS.get(objective, objective)


def fila_family(objective: str) -> str:
    """LoKU is FILA-initialised LoRA trained with IHL; FILA with another objective is named as such."""
    label = objective_label(objective)
    return "LoKU (FILA LoRA r=8 IHL)" if objective == "ihl" else f"FILA LoRA r=8 {label}"


def frontier_families(args: Any) -> list[dict[str, Any]]:
    """The frontier benchmark's method families, in report order: ``{"family", "kind", "density", "score",
    "grid", "objective"}`` (``grid`` None for the auto run, which picks its own rate). Every family but the auto run
    exists once per ``--objectives`` entry (default NPO alone); ``--fila`` adds FILA-initialised LoRA r=8 on
    ``--grid-fila``, else the LoRA grid (LoKU with IHL)."""
    overrides = parse_mask_grids(args.grid_mask)
    trim = (lambda grid: list(grid)[-2:]) if args.smoke else list  # smoke: the two largest rates of each grid
    objectives = getattr(args, "objectives", None) or ["npo"]
    families = [
        {"family": AUTO_FAMILY, "kind": "auto", "density": None, "score": None, "grid": None, "objective": None}
    ]
    for obj in objectives:
        label = objective_label(obj)
        families += [
            {"family": f"full {label}", "kind": "full", "density": 1.0, "score": None, "grid": trim(args.grid_full),
             "objective": obj},
            {"family": f"LoRA r=8 {label}", "kind": "lora", "density": None, "score": None,
             "grid": trim(args.grid_lora), "objective": obj},
        ]  # fmt: skip
        if getattr(args, "fila", False):
            families.append(
                {"family": fila_family(obj), "kind": "fila", "density": None, "score": None,
                 "grid": trim(args.grid_fila or args.grid_lora), "objective": obj}
            )  # fmt: skip
    for density in args.densities:
        grid = trim(grid_for(density, overrides))
        budget = budget_label(density)
        for obj in objectives:
            label = objective_label(obj)
            families.append(
                {"family": f"GRIN {budget} {label}", "kind": "grin", "density": density, "score": "gradient_ratio",
                 "grid": grid, "objective": obj}
            )  # fmt: skip
            for score in args.mask_scores:
                kind = "GRIN" if score in VARIANTS else "mask"
                families.append(
                    {"family": f"{kind} {budget} {SELECTOR_LABELS[score]} {label}", "kind": "grin",
                     "density": density, "score": score, "grid": grid, "objective": obj}
                )  # fmt: skip
    return families


def frontier_methods(args: Any) -> list[Method]:
    """One :class:`Method` per run: every seed x family x learning rate (``group`` = the family; ``seed`` set),
    seed after seed so an interrupted benchmark holds whole seeds."""
    runs = []
    for seed in args.seeds:
        for fam in frontier_families(args):
            name = fam["family"]
            if fam["kind"] == "auto":
                runs.append(Method(f"{name} seed={seed}", "auto", group=name, seed=seed))
                continue
            for lr in fam["grid"]:
                grin = {}
                if fam["kind"] == "grin":
                    grin = {**selector_settings(fam["score"]), "density": fam["density"], "seed": seed}
                runs.append(
                    Method(
                        f"{name} lr={lr:g} seed={seed}",
                        fam["kind"],
                        fam["objective"],
                        lr,
                        grin=grin,
                        group=name,
                        seed=seed,
                    )
                )
    return runs


# ------------------------------------------------------------------------------------------------ selection


def split_names(text: str) -> list[str]:
    """Comma-separated names; commas inside parentheses belong to a name, as in "SSD (a=10, l=1)"."""
    return [m.strip().lower() for m in re.split(r",(?![^()]*\))", text) if m.strip()]


def keep_selected(report: dict[str, Any], text: str) -> dict[str, Any]:
    """``--merge --methods``: a merged frontier report cut down to the named families or runs (exact names: "LoRA r=8
    NPO" must not pick "FILA LoRA r=8 NPO") and their operating evaluations, so rows of a larger report can be
    compared with new ones without rerunning them; the reference rows stay."""
    wanted = set(split_names(text))
    runs = [r for r in report.get("runs", []) if {r["run"].lower(), str(r.get("family")).lower()} & wanted]
    if not runs:
        raise SystemExit(f"--methods matched no run of the merged reports: {text!r}")
    kept = {r["family"] for r in runs}
    results = [r for r in report.get("results", []) if r.get("group") == "reference" or r.get("family") in kept]
    s = report["settings"]
    families = [f for f in s.get("families", []) if f["family"] in kept]
    grids = {name: rates for name, rates in s.get("grids", {}).items() if name in kept}
    return {**report, "settings": {**s, "families": families, "grids": grids}, "runs": runs, "results": results}


def select_methods(methods: list[Method], args: Any) -> list[Method]:
    """The methods (or frontier runs) this invocation runs: ``--methods`` (a token equal to a method's name picks
    that method only, any other token every name containing it; the target always runs in the table modes),
    ``--smoke``'s one-of-each-kind pick, ``--no-ablations``/``--no-selectors``; ``--only`` (a worker's share by
    index, kept for hand-split runs)."""
    methods = _select(methods, args)
    if args.only is not None:
        return [methods[int(i)] for i in args.only.split(",")]
    return methods


def _select(methods: list[Method], args: Any) -> list[Method]:
    if args.frontier:
        if not args.methods:
            return methods
        wanted = split_names(args.methods)
        chosen = [m for m in methods if any(w in m.name.lower() or w == m.group.lower() for w in wanted)]
        if not chosen:
            raise SystemExit(f"--methods matched nothing; families: {list(dict.fromkeys(m.group for m in methods))}")
        return chosen
    if args.smoke and args.methods is None and not args.lr_sweep:
        # one of each kind: target, full (with and without reference), LoRA, SSD, GRIN, a selector, an ablation
        budget, other = budget_label(args.density), budget_label(args.ablation_densities[0])
        picks = {"target (no unlearning)", "full GradDiff", "full NPO", "LoRA r=8 NPO", "SSD (a=10, l=1)"}
        picks |= {f"GRIN {budget} NPO", f"mask {budget} random NPO", f"GRIN {other} NPO"}
        return [m for m in methods if m.name in picks]
    if args.methods:
        wanted = split_names(args.methods)
        names = {m.name.lower() for m in methods}

        def picked(name: str) -> bool:
            return any(name == w if w in names else w in name for w in wanted)

        chosen = [m for m in methods if picked(m.name.lower()) or m.kind == "none"]
        if len(chosen) <= 1:
            raise SystemExit(f"--methods matched nothing; names: {[m.name for m in methods]}")
        return chosen
    if not args.ablations:
        methods = [m for m in methods if m.group != "ablation"]
    if args.no_selectors:
        methods = [m for m in methods if m.group != "selectors"]
    return methods


def all_methods(args: Any) -> list[Method]:
    """The full list of the chosen mode, before selection (its order is the report's order)."""
    if args.frontier:
        return frontier_methods(args)
    return sweep_methods(args) if args.lr_sweep else build_methods(args)


def family_order(args: Any) -> list[str]:
    return [fam["family"] for fam in frontier_families(args)]
