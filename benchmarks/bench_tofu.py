"""TOFU unlearning benchmark: GRIN against full-parameter, LoRA, SSD and other-selector baselines.

CPU-scale protocol (default). Everything is read in place from the real TOFU files (``--data``, default
``<repo>/../shared/data/tofu``; nothing is copied into the repository):

1. A byte-level BPE tokenizer (3072 ids) trained on all TOFU text (questions, answers, paraphrases, perturbations).
2. The **target**: a Llama built from a config (hidden 128, 2 layers, 4 heads, 1.3M parameters) trained from
   scratch to memorise ``full`` + ``real_authors`` + ``world_facts`` ("Question: q\\nAnswer: a</s>", loss on answer
   tokens; 30 epochs, batch 32, AdamW 2e-3 cosine, bf16 autocast), standing in for TOFU's finetuned Llama-2.
3. The **reference** for forget quality: the same recipe on ``retain90`` (``retain95``/``retain99`` for
   forget05/forget01) + ``real_authors`` + ``world_facts``. Both are cached in ``~/.cache/grin_peft/tofu/<key>``
   (keyed by data bytes and every setting; built in a staging directory and renamed, so never half-written).
4. Every method unlearns ``forget10`` (``--forget``) starting from the target, through the same
   :class:`~grin_peft.trainer.UnlearningTrainer`: same objective and hyper-parameters (NPO beta 0.1, retain weight 1),
   same number of steps (``--epochs`` passes over the forget set, batch 32 forget + 32 retain), same seed and so the
   same forget/retain pairing, same bf16 autocast. Only the parameterisation and its learning rate differ.
5. Evaluation with open-unlearning's definitions (:func:`grin_peft.metrics.evaluate_tofu`): forget quality, model
   utility, forget ROUGE-L, probability, truth ratio, keyword accuracy/confidence, MIA AUC and privleak.

Three modes:

* **Main table** (default): one learning rate per parameterisation (``--lr-full``/``--lr-lora``/``--lr-grin``, the
  pilot's choice), every method of ``--list``, full evaluation. ``--methods`` selects by name, ``--ablations`` /
  ``--no-selectors`` add or drop rows.
* **Learning-rate pilot** (``--lr-sweep``): NPO per parameterisation over ``--sweep-full/--sweep-lora/--sweep-grin``,
  teacher-forced evaluation, and the rate chosen by a rule declared before the runs.
* **Frontier** (``--frontier``): every method runs over its own learning-rate grid (>= 4 rates) and is scored
  along its training trajectory (forget and retain answer probability at step 0 and every ``--eval-every`` epochs
  or steps, by a ``TrainerCallback``; nothing is retrained). A method's frontier is the upper-left Pareto envelope
  of all its (forget prob, retain prob) checkpoints over all its rates; the **figure of merit** is its retain prob
  at forget prob ``--frontier-at`` (0.2), linearly interpolated between the two frontier points that bracket it
  ("not reached" when no checkpoint forgot that much; exact rule in ``benchmarks/frontier.py``). Also reported per
  method and seed: the best single (rate, epoch) checkpoint with forget <= 0.2, and the full evaluation (model
  utility etc.) of the operating checkpoint (that one, else the one that forgot the most), whose trainable values
  were kept in memory during its run (``--utility none`` skips it). Methods: full-parameter NPO, LoRA r=8 NPO,
  GRIN at each of ``--densities`` and a random mask of the same size (``--mask-scores`` adds other selectors),
  and one "auto" run per seed, ``grin_peft.unlearn`` called without learning rate or epochs (its own operating
  point). ``--seeds 0,1`` repeats everything per unlearning seed and reports each seed and the mean. The density
  table gives trained entries and the delta file's bytes (``save_pretrained``'s adapter_model.safetensors) beside
  the figure of merit. Grids: ``--grid-full``, ``--grid-lora``, ``--grid-fila``, ``--grid-mask`` (per density band
  by default; see ``benchmarks/tofu_methods.py``).

  Cost on the 2-core machine (2 workers, warm cache), measured end to end (BENCHMARKS.md section 6.4): the default
  (one seed; full NPO, LoRA, GRIN and a random mask at 1%, 25% and 50%, 4 rates each, plus the auto run: 33 runs and
  10 full evaluations) took 2,467 s (41 min) with other jobs running at lower priority. A fixed-rate run is 65 steps
  (5 epochs x 13) plus its trajectory points, ~60-145 s; the auto run took 30 min of one worker (its density
  attempts). The whole density sweep (``--densities 0.001,0.01,0.05,0.1,0.25,0.5``) adds 24 runs (~25 min);
  ``--utility none`` saves ~4 min; ``--seeds 0,1`` doubles everything.

**Model regimes** (parameters per memorised fact; ``--regime``, see ``benchmarks/tofu_models.py``): ``1m`` the
default 1.3M-parameter target on all 200 authors, ``5m`` a 5.8M-parameter one (hidden 256, 4 layers), ``authors40``
the 1.3M model memorising 40 authors only (the forget10 authors and the retain evaluation's 20), ``authors100``
the same with 60 more, a seeded sample (``--authors N`` for any other count), with retain, evaluation and reference
data restricted consistently. Each regime's models are cached under their own key, so only the first run of a
regime trains them. A list
(``--regime 1m,5m,authors40``) runs the protocol once per regime and writes ``<stem>_regimes.md`` side by side.

Runs go to ``--workers`` single-thread processes (default 2 on a CPU) that take the next unclaimed job from one
shared list (main-table methods, or frontier runs: seed x method x density x rate, then the full evaluations), so
long and short jobs balance; their reports are merged into one (a row's ``wall s`` is measured in its worker).
``--merge`` combines reports of separate runs, ``--render`` rewrites a saved report's tables and plot.

Code: ``tofu_models.py`` (tokenizer, cached models, regimes, task data), ``tofu_methods.py`` (what runs, grids),
``tofu_eval.py`` (evaluations, trajectory callback), ``tofu_runs.py`` (one job; the job queue and worker
processes), ``tofu_frontier.py`` (the frontier benchmark's phases), ``frontier.py`` (envelope and interpolation),
``tofu_reports.py`` (tables, JSON, plots), ``tofu_log.py`` (a stopped run's log back into a report); this file is
the command line, the main table's and the pilot's orchestration, and ``--merge``.

Outputs (``--out``, default ``benchmarks/results``): ``<stem>.json`` (settings, versions, everything measured),
``<stem>.md`` (tables), ``<stem>.png``; stems ``tofu_<forget>``, ``tofu_<forget>_lr_sweep``,
``tofu_<forget>_frontier[_<regime>]``, ``tofu_smoke`` with ``--smoke``.

    python benchmarks/bench_tofu.py                         # main table (forget10, main methods + selectors)
    python benchmarks/bench_tofu.py --lr-sweep              # the learning-rate pilot (teacher-forced metrics only)
    python benchmarks/bench_tofu.py --frontier              # frontiers at 1%, 25%, 50% (41 min, warm cache)
    python benchmarks/bench_tofu.py --frontier --seeds 0,1  # the same for two unlearning seeds (twice the time)
    python benchmarks/bench_tofu.py --frontier --regime 1m,5m,authors40 --densities 0.01,0.1 --utility none
    python benchmarks/bench_tofu.py --frontier --smoke --out /tmp/x   # seconds: every kind, tiny model
    python benchmarks/bench_tofu.py --smoke --out /tmp/x    # seconds: a handful of items, tiny model, 1 epoch
    # paper scale on a GPU: a TOFU-finetuned model and its retain-only counterpart (HF ids or local dirs)
    python benchmarks/bench_tofu.py --model open-unlearning/tofu_Llama-2-7b-chat-hf_full \\
        --reference-model open-unlearning/tofu_Llama-2-7b-chat-hf_retain90 --lr-full 1e-5 --lr-lora 1e-4 --lr-grin 1e-3
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from common import (  # benchmarks/ is on sys.path when run as a script
    REPO,
    default_device,
    environment,
    load_average,
    log,
    set_threads,
)
from tofu_eval import SUMMARY_KEYS, cheap_evaluate, evaluate, generation_cap, parse_eval_every
from tofu_frontier import frontier_benchmark
from tofu_frontier_report import write_regime_summary
from tofu_methods import (
    DEFAULT_DENSITIES,
    DEFAULT_GRID_FULL,
    DEFAULT_GRID_LORA,
    SCORE_LABELS,
    SELECTOR_LABELS,
    all_methods,
    build_methods,
    choose_learning_rates,
    keep_selected,
    select_methods,
    sweep_methods,
)
from tofu_models import (
    DEFAULT_DATA,
    FORGET_TO_RETAIN,
    REGIMES,
    TinySettings,
    load_models,
    load_or_train,
    task_data,
    tiny_setup,
)
from tofu_reports import (
    collateral,
    combine_reports,
    read_report,
    report_mode,
    write_report,
)
from tofu_runs import claim, run_and_evaluate, spawn_workers
from unlearning_runs import Method

from grin_peft.data import load_tofu
from grin_peft.metrics import MIA_ATTACKS

__all__ = [
    "SUMMARY_KEYS",
    "TinySettings",
    "build_methods",
    "choose_learning_rates",
    "collateral",
    "load_or_train",
    "load_tofu",
    "main",
    "parse_args",
    "sweep_methods",
    "tiny_setup",
]


# ------------------------------------------------------------------------------------------------ command line


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def _names(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip() and x.strip().lower() != "none"]


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(DEFAULT_DATA), help="TOFU folder (JSON Lines, Hub field names).")
    p.add_argument("--forget", default="forget10", choices=sorted(FORGET_TO_RETAIN))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results"), help="Output folder.")
    p.add_argument(
        "--stem",
        default=None,
        help="Output file stem (default tofu_<forget>[_lr_sweep|_frontier[_<regime>]], tofu_smoke in --smoke).",
    )
    p.add_argument("--cache-dir", default=None, help="Cache of tiny models (default ~/.cache/grin_peft/tofu).")
    p.add_argument("--model", default=None, help="Paper scale: a TOFU-finetuned causal LM (HF id or folder).")
    p.add_argument("--reference-model", default=None, help="Paper scale: the retain-only model (HF id or folder).")
    p.add_argument("--threads", type=int, default=1, help="torch threads on CPU (1 is fastest for tiny models).")
    p.add_argument("--epochs", type=float, default=5.0, help="Unlearning passes over the forget set.")
    p.add_argument("--batch-size", type=int, default=32, help="Forget (and retain) examples per step.")
    p.add_argument("--seed", type=int, default=0, help="Unlearning seed: pairing, noise, LoRA init, scoring sample.")
    p.add_argument("--model-seed", type=int, default=0, help="Seed of the cached tiny models (a new one trains them).")
    p.add_argument("--lr-full", type=float, default=1e-3, help="Learning rate of full-parameter methods.")
    p.add_argument("--lr-lora", type=float, default=3e-4, help="Learning rate of LoRA methods.")
    p.add_argument("--lr-grin", type=float, default=3e-3, help="Learning rate of GRIN and the other masks.")
    p.add_argument("--density", type=float, default=0.01, help="GRIN/mask budget: fraction of the linear weights.")
    p.add_argument("--selector-objective", default="npo", help="Objective of the selector and ablation rows.")
    p.add_argument("--ablation-densities", type=_floats, default=[1e-4, 1e-3, 5e-2])
    p.add_argument("--no-ablations", dest="ablations", action="store_false", help="Skip the ablation rows.")
    p.add_argument("--no-selectors", action="store_true", help="Skip the other-selector rows.")
    p.add_argument(
        "--methods",
        default=None,
        help="Comma-separated method names or name substrings to run (target always runs). With --frontier: "
        "family names or substrings (e.g. 'GRIN,random', 'full NPO', '1%%'); with --merge: the family or run names "
        "kept (exact).",
    )
    p.add_argument("--list", action="store_true", help="Print the method names (or frontier runs) and exit.")
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="Processes that share the jobs (one torch thread each; default: 2 on a CPU with >= 2 cores, else 1; "
        "1 with --model or --smoke). Each takes the next unclaimed job; their reports are merged into one.",
    )
    p.add_argument("--only", default=None, help=argparse.SUPPRESS)  # a hand-made share: indices into the methods
    p.add_argument("--worker-dir", default=None, help=argparse.SUPPRESS)  # a worker process: the shared folder
    p.add_argument("--worker-phase", default="runs", help=argparse.SUPPRESS)  # runs | utility
    p.add_argument("--prepare", choices=("reference",), default=None, help=argparse.SUPPRESS)  # train, cache, exit
    p.add_argument("--eval-batch-size", type=int, default=64)
    p.add_argument("--eval-limit", type=int, default=None, help="Evaluate only the first N items of every split.")
    p.add_argument(
        "--localize-retain", type=int, default=400, help="Retain sample for scoring passes and SSD (0 = all)."
    )
    p.add_argument("--hidden", type=int, default=TinySettings.hidden_size, help="Tiny model width.")
    p.add_argument("--layers", type=int, default=TinySettings.num_layers, help="Tiny model depth.")
    p.add_argument("--heads", type=int, default=TinySettings.num_heads, help="Tiny model attention heads.")
    p.add_argument("--model-epochs", type=int, default=TinySettings.epochs, help="Memorisation epochs.")
    p.add_argument(
        "--authors",
        type=int,
        default=None,
        help="Tiny models memorise only N of TOFU's 200 authors: the forget split's, the retain evaluation's, and a "
        "seeded (--model-seed) sample of the others; retain, evaluation and reference data follow. Default: all.",
    )
    p.add_argument(
        "--regime",
        type=_names,
        default=[],
        help=f"Model regime preset(s), comma-separated, of {', '.join(REGIMES)}: "
        + "; ".join(f"{name} = {preset}" for name, preset in REGIMES.items())
        + ". Several run one after the other, each with its own outputs, and a side-by-side summary.",
    )
    p.add_argument("--lr-sweep", action="store_true", help="Run the learning-rate pilot instead (NPO, cheap eval).")
    p.add_argument("--sweep-full", type=_floats, default=[3e-5, 1e-4, 3e-4, 1e-3], help="Pilot grid, full parameters.")
    p.add_argument("--sweep-lora", type=_floats, default=[3e-4, 1e-3, 3e-3, 1e-2], help="Pilot grid, LoRA.")
    p.add_argument("--sweep-grin", type=_floats, default=[3e-3, 1e-2, 3e-2, 0.1], help="Pilot grid, GRIN.")
    p.add_argument(
        "--sweep-scores",
        type=_names,
        default=[],
        help=f"Pilot: also these selectors on the GRIN grid (of {', '.join(SCORE_LABELS)}).",
    )
    f = p.add_argument_group("frontier benchmark (--frontier)")
    f.add_argument("--frontier", action="store_true", help="Run the frontier benchmark (see above).")
    f.add_argument(
        "--seeds", type=_ints, default=None, help="Unlearning seeds, each runs everything (default --seed)."
    )
    f.add_argument(
        "--densities",
        type=_floats,
        default=None,
        help=f"GRIN/mask budgets (default {','.join(f'{d:g}' for d in DEFAULT_DENSITIES)}; --smoke: 0.01,0.1).",
    )
    f.add_argument("--frontier-at", type=float, default=0.2, help="Forget answer probability of the figure of merit.")
    f.add_argument(
        "--eval-every",
        default="1",
        help="Trajectory evaluation every N epochs ('1', '0.5') or steps ('20steps'); always at step 0 and the end.",
    )
    f.add_argument(
        "--grid-full",
        type=_floats,
        default=list(DEFAULT_GRID_FULL),
        help=f"Full NPO learning rates (default {','.join(f'{lr:g}' for lr in DEFAULT_GRID_FULL)}).",
    )
    f.add_argument(
        "--grid-lora",
        type=_floats,
        default=list(DEFAULT_GRID_LORA),
        help=f"LoRA r=8 NPO learning rates (default {','.join(f'{lr:g}' for lr in DEFAULT_GRID_LORA)}).",
    )
    f.add_argument(
        "--grid-fila",
        type=_floats,
        default=None,
        help="FILA-initialised LoRA r=8 learning rates (--fila; default: the LoRA grid). FILA starts in the "
        "directions that matter most, so it forgets at lower rates than plain LoRA.",
    )
    f.add_argument(
        "--grid-mask",
        default=None,
        help="GRIN/mask learning rates: 'r1,r2,..' for every density or 'd1=r1,r2;d2=r3,..' per density; the "
        "others keep their density band's default (<=0.3%%: 0.03-1, <=3%%: 3e-3-0.1, <=15%%: 1e-3-3e-2, above: "
        "3e-4-1e-2; 4 half-decade steps each).",
    )
    f.add_argument(
        "--mask-scores",
        type=_names,
        default=["random"],
        help=f"Selectors run at every density beside GRIN, on its grid (of {', '.join(SELECTOR_LABELS)}; 'none'): "
        "score names, or the GRIN variants 'paper' (GrinConfig.paper()), 'relocalize' (relocalize_every 1 epoch).",
    )
    f.add_argument(
        "--objectives",
        type=_names,
        default=["npo"],
        help="Objectives: every family but the auto run, once per objective (default npo; e.g. npo,ihl).",
    )
    f.add_argument(
        "--fila",
        action="store_true",
        help="Add FILA-initialised LoRA r=8 per objective, on --grid-fila (with ihl: LoKU, BENCHMARKS.md §9).",
    )
    f.add_argument(
        "--utility",
        choices=("operating", "none"),
        default="operating",
        help="Full evaluation (generation, model utility) of each method's operating checkpoint per seed "
        "(default), or none.",
    )
    p.add_argument(
        "--merge",
        nargs="+",
        default=None,
        metavar="JSON",
        help="Combine reports of runs split over processes (--methods/--stem) into one output, and exit.",
    )
    p.add_argument("--render", default=None, metavar="JSON", help="Rewrite the .md/.png of a saved report, and exit.")
    p.add_argument("--smoke", action="store_true", help="Seconds-long check of the whole code path.")
    p.add_argument("--smoke-items", type=int, default=6, help="Items per split in --smoke.")
    args = p.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)
    args.worker = args.worker_dir is not None or args.only is not None
    if args.workers is None:
        cpu_scale = not (args.model or args.smoke or default_device().type == "cuda")
        args.workers = 2 if cpu_scale and (os.cpu_count() or 1) >= 2 else 1
    if args.workers < 1:
        p.error("--workers must be >= 1")
    unknown = sorted((set(args.sweep_scores) - set(SCORE_LABELS)) | (set(args.mask_scores) - set(SELECTOR_LABELS)))
    if unknown:
        p.error(f"--sweep-scores/--mask-scores: unknown {unknown}; choose from {sorted(SELECTOR_LABELS)}")
    unknown = sorted(set(args.regime) - set(REGIMES))
    if unknown:
        p.error(f"--regime: unknown {unknown}; choose from {sorted(REGIMES)}")
    if args.frontier and args.lr_sweep:
        p.error("--frontier and --lr-sweep are different modes; choose one")
    if len(args.regime) == 1:
        for key, value in REGIMES[args.regime[0]].items():
            setattr(args, key, value)
    try:
        args.eval_every_amount, args.eval_unit = parse_eval_every(args.eval_every)
    except ValueError as error:
        p.error(str(error))
    args.seeds = args.seeds or [args.seed]
    if args.densities is None:
        args.densities = [0.01, 0.1] if args.smoke else list(DEFAULT_DENSITIES)
    if args.smoke:
        args.epochs = min(args.epochs, 1.0)
        args.batch_size = min(args.batch_size, 4)
        args.eval_limit = args.eval_limit or args.smoke_items
        args.ablation_densities = [0.05]
    return args


def default_stem(args: argparse.Namespace) -> str:
    if args.smoke:
        return "tofu_smoke"
    if args.frontier:
        return f"tofu_{args.forget}_frontier" + (f"_{args.regime[0]}" if len(args.regime) == 1 else "")
    return f"tofu_{args.forget}" + ("_lr_sweep" if args.lr_sweep else "")


def train_arguments(args: argparse.Namespace, on_gpu: bool, threads: int) -> dict[str, Any]:
    """The :class:`UnlearningArguments` every trained method shares."""
    return {
        "num_train_epochs": args.epochs,
        "per_device_train_batch_size": args.batch_size,
        "per_device_eval_batch_size": args.eval_batch_size,
        "seed": args.seed,
        "lr_scheduler_type": "constant",
        "weight_decay": 0.0,
        "max_grad_norm": 1.0,
        "bf16": True,
        "use_cpu": not on_gpu,
        "num_threads": None if on_gpu else threads,
    }


# ------------------------------------------------------------------------------------------------ main


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    warnings.filterwarnings("ignore", category=FutureWarning)  # transformers' deprecation notes, once per model
    args = parse_args(argv)
    if len(args.regime) > 1 and not (args.list or args.render or args.merge or args.prepare or args.worker):
        return run_regimes(args)
    started = time.perf_counter()
    on_gpu = default_device().type == "cuda"
    threads = set_threads(None if on_gpu else args.threads)
    if args.merge:  # before selection: --methods then picks runs of the merged reports
        return merge_reports(args)
    methods = select_methods(all_methods(args), args)
    if args.list:
        for m in methods:
            print(f"{m.group:24s} {m.name}")
        return {}
    if args.render:
        report = read_report(args.render)
        write_report(report, Path(args.render).parent, Path(args.render).stem, args.lr_sweep)
        return report
    data = Path(args.data)
    if args.prepare:
        load_or_train(args.prepare, args.forget, data, *tiny_setup(args, data))
        return {}
    out = Path(args.out)
    stem = args.stem or default_stem(args)
    train = train_arguments(args, on_gpu, threads)
    if args.frontier:
        return frontier_benchmark(args, methods, data, out, stem, started, train)
    return table_benchmark(args, methods, data, out, stem, started, train)


def run_regimes(args: argparse.Namespace) -> dict[str, Any]:
    """``--regime a,b,..``: the same command once per regime (its own outputs ``<stem>_<regime>``), then one table
    of every family's figure of merit in every regime (``<stem>_regimes.md/.json``)."""
    argv, skip = [], False
    for token in args.argv:
        if skip:
            skip = False
            continue
        if token == "--regime":
            skip = True
            continue
        if token.startswith("--regime="):
            continue
        argv.append(token)
    base = args.stem or default_stem(args)  # no regime suffix: several regimes
    reports = {}
    for regime in args.regime:
        log(f"=== regime {regime}: {REGIMES[regime]}")
        reports[regime] = main([*argv, "--regime", regime, "--stem", f"{base}_{regime}"])
    if args.frontier:
        write_regime_summary(reports, Path(args.out), f"{base}_regimes")
        log(f"regimes side by side: {Path(args.out) / base}_regimes.md")
    return {"regimes": reports}


# ------------------------------------------------------------------------------------------------ main table, pilot


def table_benchmark(
    args: argparse.Namespace,
    methods: list[Method],
    data: Path,
    out: Path,
    stem: str,
    started: float,
    train: dict[str, Any],
) -> dict[str, Any]:
    """The main table or the learning-rate pilot: every method unlearns, then is evaluated (full or cheap)."""
    make_target, qa_format, reference_model, models_info = load_models(args, data)  # trains and caches once
    if args.workers > 1 and not args.worker:
        del make_target, reference_model
        return table_workers(args, methods, models_info, out, stem, started)
    task = task_data(args, data)
    splits = task["splits"]
    max_new_tokens = generation_cap(qa_format, splits)
    report: dict[str, Any] = {
        "mode": "lr_sweep" if args.lr_sweep else "table",
        "command": "python benchmarks/bench_tofu.py " + " ".join(args.argv),
        "environment": environment(),
        "settings": {
            "forget": args.forget,
            "retain": FORGET_TO_RETAIN[args.forget],
            "scale": "paper scale" if args.model else ("smoke" if args.smoke else "CPU scale"),
            "train": train,
            "lr_full": args.lr_full,
            "lr_lora": args.lr_lora,
            "lr_grin": args.lr_grin,
            "density": args.density,
            "selector_objective": args.selector_objective,
            "max_new_tokens": max_new_tokens,
            "eval_limit": args.eval_limit,
            "eval_sizes": {name: len(items) for name, items in splits.items()},
            "num_forget": len(task["forget"]),
            "num_retain": len(task["retain"]),
            "num_localize_retain": len(task["localize_retain"]),
            "seed": args.seed,
            "data": str(data),
        },
        "models": models_info,
        "results": [],
    }
    if args.authors is not None:
        report["settings"]["authors"] = args.authors
    if args.lr_sweep:
        report["settings"]["lr_grids"] = {"full": args.sweep_full, "lora": args.sweep_lora, "grin": args.sweep_grin}
        report["settings"]["sweep_scores"] = args.sweep_scores
        evaluator = lambda model, ref: cheap_evaluate(model, qa_format, splits, ref, args.eval_batch_size)  # noqa: E731
    else:
        eval_kw = {"max_new_tokens": max_new_tokens, "batch_size": args.eval_batch_size}
        evaluator = lambda model, ref: evaluate(model, qa_format, splits, ref, **eval_kw)  # noqa: E731
    log(f"evaluating the retain-only reference model ({FORGET_TO_RETAIN[args.forget]})")
    reference = evaluator(reference_model, None)
    reference["summary"]["forget_quality"] = 1.0  # KS test of a sample against itself
    report["results"].append(
        {
            "method": f"{FORGET_TO_RETAIN[args.forget]} model (reference)",
            "group": "reference",
            "summary": {**reference["summary"], **{f"privleak_{a}": 0.0 for a in MIA_ATTACKS}},
            "cost": {"eval_seconds": reference["eval_seconds"]},
            "forget_generations": reference.get("forget_generations"),
        }
    )
    del reference_model
    context = {"make_target": make_target, "qa_format": qa_format, "train": train, **task}
    claims = Path(args.worker_dir) / "claims-table" if args.worker_dir else None
    with tempfile.TemporaryDirectory(prefix="bench_tofu_") as workdir:
        for index, method in enumerate(methods):
            if not claim(claims, f"method{index}"):
                continue
            log(f"[{time.perf_counter() - started:.0f} s] {method.name}")
            try:
                row = run_and_evaluate(method, context, lambda model: evaluator(model, reference), workdir)
            except Exception as error:  # one failing method must not lose the others' numbers
                if args.smoke:
                    raise
                row = {"method": method.name, "group": method.group, "config": method.describe()}
                row["error"] = f"{type(error).__name__}: {error}"
                log(f"    FAILED: {row['error']}")
            report["results"].append(row)
            report["total_seconds"] = time.perf_counter() - started
            report["load_average_at_end"] = load_average()
            write_report(report, out, stem, args.lr_sweep)  # after every method: an interrupted run keeps its numbers
    report["total_seconds"] = time.perf_counter() - started
    report["load_average_at_end"] = load_average()
    write_report(report, out, stem, args.lr_sweep)
    log(f"done in {report['total_seconds']:.0f} s: {out / stem}.md / .json")
    return report


def table_workers(
    args: argparse.Namespace,
    methods: list[Method],
    models_info: dict[str, Any],
    out: Path,
    stem: str,
    started: float,
) -> dict[str, Any]:
    """Run the methods in ``args.workers`` processes side by side (one torch thread each) and merge their reports.

    The tiny models are trained and cached before the workers start, so each only loads them. Each worker takes
    the next method nobody has taken (in the benchmark's order) and re-runs its own copy of the reference
    evaluation. A row's ``wall s`` is what it cost in its worker, with the other worker busy on the second core;
    the total is this process's wall time, model training included when the cache was cold.
    """
    count = min(args.workers, len(methods))
    log(f"{count} workers share {len(methods)} methods")
    with tempfile.TemporaryDirectory(prefix="bench_tofu_workers_") as shared:
        reports, codes = spawn_workers(args, Path(shared), "table", count)
    if not reports:
        raise SystemExit(f"every worker failed (exit codes {codes}); nothing measured")
    merged = combine_reports(reports, [m.name for m in methods])
    merged["command"] = "python benchmarks/bench_tofu.py " + " ".join(args.argv)
    merged["models"] = models_info  # the workers only loaded what this process trained
    merged["workers"] = {"count": count, "exit_codes": codes, "threads_each": 1}
    merged["total_seconds"] = time.perf_counter() - started
    merged["load_average_at_end"] = load_average()
    write_report(merged, out, stem, args.lr_sweep)
    log(f"done in {merged['total_seconds']:.0f} s ({count} workers): {out / stem}.md / .json")
    if any(codes):
        raise SystemExit(f"a worker failed (exit codes {codes}); the merged report holds what the others measured")
    return merged


# ------------------------------------------------------------------------------------------------ merge


def merge_reports(args: argparse.Namespace) -> dict[str, Any]:
    """``--merge``: combine the reports of runs split by hand (``--methods``/``--stem``). ``total_seconds`` is the
    longest process's (they ran side by side); each row's ``wall s`` is what it cost in its own process. Frontier
    reports merge their runs (first occurrence of each) and full evaluations."""
    reports = [read_report(path) for path in args.merge]
    modes = {report_mode(r, args.lr_sweep) for r in reports}
    if len(modes) > 1:
        raise SystemExit(f"bench_tofu: cannot merge reports of different modes ({sorted(modes)})")
    if modes == {"frontier"}:
        merged = dict(reports[0])
        runs: dict[str, dict[str, Any]] = {}
        rows: dict[str, dict[str, Any]] = {}
        families = list(merged["settings"].get("families", []))
        for report in reports:
            for run in report.get("runs", []):
                runs.setdefault(run["run"], run)
            for row in report.get("results", []):
                rows.setdefault(row["method"], row)
            known = {f["family"] for f in families}
            families += [f for f in report["settings"].get("families", []) if f["family"] not in known]
        grids = {}  # each family's grid from the first report that has it, in report order
        for report in reversed(reports):
            grids = {**report["settings"].get("grids", {}), **grids}
        objectives = {o: 0 for r in reports for o in str(r["settings"].get("objective", "")).split(",") if o}
        merged["settings"] = {**merged["settings"], "families": families, "grids": grids}
        merged["settings"]["objective"] = ",".join(objectives)
        merged["runs"], merged["results"] = list(runs.values()), list(rows.values())
        if args.methods:
            merged = keep_selected(merged, args.methods)
    else:
        order = [m.name for m in all_methods(args)]
        merged = combine_reports(reports, order)
    merged["total_seconds"] = max(r.get("total_seconds", 0) for r in reports)
    merged["merged_from"] = [{"file": str(p), "command": r["command"]} for p, r in zip(args.merge, reports)]
    commands = [c for r in reports for c in r["command"].split(" ; ")]
    commands.append("python benchmarks/bench_tofu.py " + " ".join(args.argv))
    merged["command"] = " ; ".join(dict.fromkeys(commands))  # each once, in order: the runs, then this merge
    mode = modes.pop()
    stem = args.stem or (f"tofu_{merged['settings']['forget']}_frontier" if mode == "frontier" else default_stem(args))
    write_report(merged, Path(args.out), stem, args.lr_sweep)
    log(f"merged {len(reports)} reports into {Path(args.out) / stem}.md / .json / .png")
    return merged


if __name__ == "__main__":
    main()
