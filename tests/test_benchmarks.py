"""Smoke runs of the unlearning benchmarks and the pieces they add (full-parameter training, SSD, the frontier
mode's trajectories, workers, merging and model regimes).

The TOFU smoke run uses a TOFU-format folder written from the synthetic generator, so it runs anywhere, offline,
without the real data; the hazard smoke run needs the real WMDP/PKU files and is skipped without them. Both train a
one-layer model for one epoch on a handful of items and check that every output exists with finite numbers.
"""

from __future__ import annotations

import copy
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from grin_peft.data import QAFormat
from grin_peft.errors import GrinError
from grin_peft.synthetic import generate_dataset, write_jsonl
from grin_peft.tiny import build_model, tiny_llama_config, train_tokenizer
from grin_peft.trainer import UnlearningTrainer
from grin_peft.unlearning_args import UnlearningArguments

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
sys.path.insert(0, str(BENCHMARKS))

import bench_hazard  # noqa: E402
import bench_tofu  # noqa: E402
import unlearning_runs  # noqa: E402

SHARED_DATA = BENCHMARKS.parent.parent / "shared" / "data"


pytestmark = pytest.mark.usefixtures("one_thread")  # conftest.py


def write_tofu_like(directory: Path) -> Path:
    """The TOFU files the benchmark reads (forget10 protocol), in TOFU's format, from the synthetic generator."""
    ds = generate_dataset(num_people=12, questions_per_person=4, forget_fraction=0.25, num_perturbed=3, seed=0)
    forget, retain, holdout = ds.forget, ds.retain, ds.holdout
    authors = retain[:6]
    splits = {
        "full": forget + retain,
        "retain90": retain,
        "forget10": forget,
        "forget10_perturbed": forget,
        "retain_perturbed": retain,
        "holdout10": holdout,
        "real_authors": authors,
        "real_authors_perturbed": authors,
        "world_facts": authors,
        "world_facts_perturbed": authors,
    }
    directory.mkdir(parents=True)
    for name, items in splits.items():
        write_jsonl(items, directory / f"{name}.json")
    return directory


def assert_finite_numbers(summary: dict, keys: list[str]) -> None:
    for key in keys:
        value = summary[key]
        assert isinstance(value, float | int) and math.isfinite(value), (key, value)


def test_tofu_smoke_run_writes_every_output(tmp_path):
    data = write_tofu_like(tmp_path / "tofu")
    out = tmp_path / "out"
    argv = ["--smoke", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    report = bench_tofu.main(argv)
    for suffix in ("json", "md", "png"):
        assert (out / f"tofu_smoke.{suffix}").is_file()
    saved = json.loads((out / "tofu_smoke.json").read_text())
    assert saved["settings"]["forget"] == "forget10" and saved["environment"]["torch_threads"] == 1
    assert {"settings", "target", "reference"} <= set(saved["models"])
    methods = {row["method"]: row for row in saved["results"]}
    kinds = {row["config"]["kind"] for row in saved["results"] if "config" in row}
    assert kinds == {"none", "full", "lora", "ssd", "grin"}
    assert not [row for row in saved["results"] if row.get("error")]
    for name, row in methods.items():
        assert_finite_numbers(row["summary"], list(bench_tofu.SUMMARY_KEYS) + ["privleak_mink"])
        if row["group"] != "reference":
            assert row["cost"]["trainable_entries"] >= 0 and row["cost"]["wall_seconds"] >= 0, name
    grin = methods["GRIN 1% NPO"]
    assert grin["cost"]["trainable_entries"] > 0 and "localization" in grin
    assert methods["full NPO"]["cost"]["trainable_entries"] > methods["LoRA r=8 NPO"]["cost"]["trainable_entries"]
    assert report["results"][0]["summary"]["forget_quality"] == 1.0  # the reference against itself
    table = (out / "tofu_smoke.md").read_text()
    assert "| method | forget quality | model utility |" in table and "GRIN 1% NPO" in table


def test_paper_scale_path_loads_target_and_reference_from_folders(tmp_path):
    from grin_peft.tiny import build_model, tiny_llama_config, train_tokenizer

    data = write_tofu_like(tmp_path / "tofu")
    texts = [f"{item['question']} {item['answer']}" for item in bench_tofu.load_tofu("full", data)]
    tokenizer = train_tokenizer(texts, vocab_size=400)
    for name, seed in (("target", 0), ("reference", 1)):
        model = build_model(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2), seed=seed)
        model.save_pretrained(tmp_path / name)
        tokenizer.save_pretrained(tmp_path / name)
    out = tmp_path / "out"
    argv = ["--smoke", "--data", str(data), "--out", str(out), "--methods", "GRIN 1% NPO,LoRA r=8 NPO"]
    models = ["--model", str(tmp_path / "target"), "--reference-model", str(tmp_path / "reference")]
    report = bench_tofu.main([*argv, *models])
    assert report["settings"]["scale"] == "paper scale"
    assert report["models"] == {
        "target": str(tmp_path / "target"), "reference": str(tmp_path / "reference"), "dtype": "torch.float32",
        "device": "cpu",
    }  # fmt: skip
    rows = {row["method"]: row for row in report["results"]}
    assert set(rows) == {"retain90 model (reference)", "target (no unlearning)", "GRIN 1% NPO", "LoRA r=8 NPO"}
    assert not [row for row in report["results"] if row.get("error")]
    assert rows["GRIN 1% NPO"]["cost"]["trainable_entries"] > 0


def test_learning_rate_pilot_applies_its_declared_rule(tmp_path):
    data = write_tofu_like(tmp_path / "tofu")
    out = tmp_path / "out"
    argv = ["--smoke", "--lr-sweep", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    bench_tofu.main([*argv, "--sweep-full", "1e-4", "--sweep-lora", "1e-3", "--sweep-grin", "1e-2,3e-2"])
    saved = json.loads((out / "tofu_smoke.json").read_text())
    assert [r["method"] for r in saved["results"]][2:] == [
        "full NPO lr=0.0001", "LoRA r=8 NPO lr=0.001", "GRIN 1% NPO lr=0.01", "GRIN 1% NPO lr=0.03"
    ]  # fmt: skip
    assert (out / "tofu_smoke.png").is_file()
    assert saved["chosen_learning_rates"] == bench_tofu.choose_learning_rates(saved["results"])
    assert saved["chosen_learning_rates"]["full"]["lr"] == 1e-4
    (out / "tofu_smoke.md").unlink()
    bench_tofu.main(["--lr-sweep", "--render", str(out / "tofu_smoke.json")])
    assert "retain lost / forget removed" in (out / "tofu_smoke.md").read_text()
    with pytest.raises(SystemExit, match="cannot read report"):
        bench_tofu.main(["--render", str(out / "missing.json")])


def test_choose_learning_rates_prefers_forget_quality_above_the_retain_floor():
    def row(group, lr, fq, forget, retain):
        summary = {"forget_quality": fq, "forget_probability": forget, "retain_probability": retain}
        return {"method": f"{group} {lr}", "group": group, "config": {"lr": lr}, "summary": summary}

    target = {"method": "target (no unlearning)", "group": "reference", "summary": {"retain_probability": 1.0}}
    results = [target, row("full", 1, 0.5, 0.1, 0.95), row("full", 2, 0.9, 0.1, 0.5), row("full", 3, 0.4, 0.1, 0.99)]
    results += [row("grin", 1, 0.9, 0.1, 0.5), row("grin", 2, 0.9, 0.1, 0.7)]
    chosen = bench_tofu.choose_learning_rates(results)
    assert chosen["full"] == {"lr": 1, "method": "full 1", "meets_floor": True}  # lr 2 forgets more but breaks retain
    assert chosen["grin"] == {"lr": 2, "method": "grin 2", "meets_floor": False}  # none keeps 0.9: the most kept


def test_collateral_is_retain_lost_per_forget_removed_and_undefined_without_forgetting():
    target = {"forget_probability": 0.9, "retain_probability": 0.95}
    unlearned = {"forget_probability": 0.1, "retain_probability": 0.75}
    assert bench_tofu.collateral(unlearned, target) == pytest.approx(0.25)
    assert bench_tofu.collateral({"forget_probability": 0.88, "retain_probability": 0.5}, target) is None


def test_tofu_run_split_over_two_workers_gives_one_report_with_every_method(tmp_path):
    data = write_tofu_like(tmp_path / "tofu")
    out = tmp_path / "out"
    argv = ["--smoke", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    methods = "target (no unlearning),full NPO,GRIN 1% NPO,SSD (a=10, l=1)"
    report = bench_tofu.main([*argv, "--workers", "2", "--methods", methods])
    saved = json.loads((out / "tofu_smoke.json").read_text())
    assert saved["workers"] == {"count": 2, "exit_codes": [0, 0], "threads_each": 1}
    names = [row["method"] for row in saved["results"]]
    assert names == [
        "retain90 model (reference)", "target (no unlearning)", "full NPO", "SSD (a=10, l=1)", "GRIN 1% NPO"
    ]  # fmt: skip
    assert not [row for row in saved["results"] if row.get("error")]
    assert report["total_seconds"] > 0 and "2 process(es)" in (out / "tofu_smoke.md").read_text()
    # on a cold cache the target trained here and the reference in a helper process, side by side
    assert saved["models"]["target"]["trained_this_run"] and not saved["models"]["reference"]["trained_this_run"]
    assert Path(saved["models"]["reference"]["cache_dir"]).parent == tmp_path / "cache"


def test_frontier_smoke_run_scores_trajectories_and_evaluates_operating_checkpoints(tmp_path):
    data = write_tofu_like(tmp_path / "tofu")
    out = tmp_path / "out"
    argv = ["--frontier", "--smoke", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    report = bench_tofu.main([*argv, "--eval-every", "1steps"])
    for suffix in ("json", "md", "png"):
        assert (out / f"tofu_smoke.{suffix}").is_file()
    saved = json.loads((out / "tofu_smoke.json").read_text())
    assert saved["mode"] == "frontier" and saved["settings"]["densities"] == [0.01, 0.1]
    runs = saved["runs"]
    assert not [r for r in runs if r.get("error")]
    assert {r["kind"] for r in runs} == {"auto", "full", "lora", "grin"}
    families = [f["family"] for f in saved["frontiers"]]
    assert families == [
        "auto (unlearn defaults)", "full NPO", "LoRA r=8 NPO", "GRIN 1% NPO", "mask 1% random NPO", "GRIN 10% NPO",
        "mask 10% random NPO",
    ]  # fmt: skip
    first_rates = {f["family"]: f["grid"][0] for f in saved["settings"]["families"] if f["grid"]}
    for run in runs:
        assert run["delta_bytes"] > 0 and run["trainable_entries"] > 0, run["run"]
        if run["kind"] != "auto":  # every step (--eval-every 1steps) of one training run; step 0 in the first rate's
            start = 0 if run["lr"] == first_rates[run["family"]] else 1
            assert [p["step"] for p in run["points"]] == list(range(start, run["steps"] + 1)), run["run"]
            assert run["kept"] in run["points"]
    by_kind = {r["kind"]: r for r in runs}
    # the auto row is unlearn() with its defaults: the automatic operating point, whose record the report keeps
    auto = by_kind["auto"]["operating_point"]
    assert {"target_met", "learning_rate", "probes", "evaluations", "before", "after"} <= set(auto)
    assert auto["before"]["forget_prob"] > 0 and auto["settings"]["forget_target"] == 0.2
    assert by_kind["full"]["delta_file"] == "model.safetensors"
    assert by_kind["grin"]["delta_file"] == "adapter_model.safetensors"
    grin1, grin10 = (next(r for r in runs if r["family"] == f"GRIN {b} NPO") for b in ("1%", "10%"))
    assert grin10["trainable_entries"] > grin1["trainable_entries"] and grin10["delta_bytes"] > grin1["delta_bytes"]
    # one full evaluation per family and seed, of the checkpoint its frontier summary names
    operating = [r for r in saved["results"] if r["group"] == "operating"]
    assert [r["family"] for r in operating] == families
    for row, fam in zip(operating, saved["frontiers"]):
        kept = fam["seeds"]["0"]["operating"]
        assert (row["point"]["forget"], row["point"]["retain"]) == (kept["forget"], kept["retain"])
        assert_finite_numbers(row["summary"], ["model_utility", "forget_quality", "forget_probability"])
        # the saved checkpoint is the kept one: its full evaluation gives the trajectory's probability back
        assert row["summary"]["forget_probability"] == pytest.approx(kept["forget"], rel=1e-4), row["method"]
    assert [r["method"] for r in saved["results"][:2]] == ["retain90 model (reference)", "target (no unlearning)"]
    table = (out / "tofu_smoke.md").read_text()
    assert "retain @ 0.2, seed 0" in table and "## Density regime" in table and "## Operating checkpoints" in table
    assert report["frontiers"][0]["family"] == "auto (unlearn defaults)"
    (out / "tofu_smoke.md").unlink()
    bench_tofu.main(["--render", str(out / "tofu_smoke.json")])
    assert (out / "tofu_smoke.md").read_text() == table


def test_one_process_frontier_report_keeps_the_finished_runs_when_stopped(tmp_path, monkeypatch):
    import tofu_frontier

    finished = []

    def run_then_stop(run, context, settings, checkpoints):
        if finished:
            raise KeyboardInterrupt  # the process is stopped during its second run
        finished.append(run.name)
        point = {"step": 0, "epoch": 0.0, "forget": 0.9, "retain": 0.9}
        record = {"run": run.name, "family": run.group, "kind": run.kind, "seed": run.seed, "lr": run.lr}
        return record | {"points": [point], "kept": point, "trainable_entries": 1, "delta_bytes": 1}

    monkeypatch.setattr(tofu_frontier, "frontier_run", run_then_stop)
    data, out = write_tofu_like(tmp_path / "tofu"), tmp_path / "out"
    argv = ["--frontier", "--smoke", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    with pytest.raises(KeyboardInterrupt):
        bench_tofu.main([*argv, "--workers", "1", "--methods", "full NPO"])
    saved = json.loads((out / "tofu_smoke.json").read_text())
    assert [r["run"] for r in saved["runs"]] == finished and len(finished) == 1


def test_frontier_runs_shared_by_two_workers_cover_every_seed(tmp_path):
    data = write_tofu_like(tmp_path / "tofu")
    out = tmp_path / "out"
    argv = ["--frontier", "--smoke", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    argv += ["--workers", "2", "--seeds", "0,1", "--densities", "0.1", "--methods", "full NPO,GRIN"]
    bench_tofu.main(argv)
    saved = json.loads((out / "tofu_smoke.json").read_text())
    assert saved["workers"]["count"] == 2 and saved["workers"]["exit_codes"] == [0, 0]
    assert saved["workers"]["utility_exit_codes"] == [0, 0]
    names = [r["run"] for r in saved["runs"]]
    assert names == [
        f"{family} lr={lr} seed={seed}"
        for seed in (0, 1)
        for family, grid in (("full NPO", ("0.001", "0.003")), ("GRIN 10% NPO", ("0.01", "0.03")))
        for lr in grid
    ]
    assert not [r for r in saved["runs"] + saved["results"] if r.get("error")]
    for fam in saved["frontiers"]:
        assert set(fam["seeds"]) == {"0", "1"} and fam["num_seeds"] == 2
        merits = [fam["seeds"][s]["retain_at"] for s in ("0", "1")]
        if None not in merits:
            assert fam["retain_at_mean"] == pytest.approx(sum(merits) / 2)
    operating = [r["method"] for r in saved["results"] if r["group"] == "operating"]
    assert operating == ["full NPO seed=0", "full NPO seed=1", "GRIN 10% NPO seed=0", "GRIN 10% NPO seed=1"]
    assert "seed 1" in (out / "tofu_smoke.md").read_text()


def test_regime_list_runs_each_regime_and_writes_them_side_by_side(tmp_path):
    data = write_tofu_like(tmp_path / "tofu")
    out = tmp_path / "out"
    argv = ["--frontier", "--smoke", "--data", str(data), "--out", str(out), "--cache-dir", str(tmp_path / "cache")]
    result = bench_tofu.main([*argv, "--regime", "1m,5m", "--methods", "full NPO", "--utility", "none"])
    assert set(result["regimes"]) == {"1m", "5m"}
    for regime in ("1m", "5m"):
        saved = json.loads((out / f"tofu_smoke_{regime}.json").read_text())
        assert saved["settings"]["regime"] == regime and [f["family"] for f in saved["frontiers"]] == ["full NPO"]
        assert saved["results"] == []  # --utility none: no full evaluation
    summary = (out / "tofu_smoke_regimes.md").read_text()
    assert "| full NPO |" in summary and "1m (" in summary and "5m (" in summary


def test_frontier_reports_merge_by_run(tmp_path):
    def report(runs):
        fams = [{"family": r["family"], "kind": "full", "density": 1.0, "score": None} for r in runs]
        settings = {"forget": "forget10", "scale": "CPU scale", "frontier_at": 0.2, "families": fams, "train": {}}
        settings |= {"seeds": [0], "eval_every": 1.0, "eval_unit": "epochs"}
        return {"mode": "frontier", "command": "c", "settings": settings, "runs": runs, "results": []}

    def run(lr, points):
        points = [{"step": i, "epoch": i, "forget": f, "retain": r} for i, (f, r) in enumerate(points)]
        return {"run": f"full NPO lr={lr} seed=0", "family": "full NPO", "kind": "full", "seed": 0, "lr": lr,
                "points": points, "kept": points[-1], "trainable_entries": 10, "delta_bytes": 100}  # fmt: skip

    a = report([run(1e-3, [(0.99, 0.99), (0.1, 0.4)])])
    b = report([run(3e-3, [(0.99, 0.99), (0.3, 0.8)])])
    for name, rep in (("a", a), ("b", b)):
        (tmp_path / f"{name}.json").write_text(json.dumps(rep))
    reports = [str(tmp_path / "a.json"), str(tmp_path / "b.json")]
    merged = bench_tofu.main(["--frontier", "--merge", *reports, "--out", str(tmp_path), "--stem", "m"])
    assert len(merged["runs"]) == 2
    fam = merged["frontiers"][0]
    assert fam["seeds"][0]["retain_at"] == pytest.approx(0.6)  # (0.1, 0.4)-(0.3, 0.8) across the two rates
    assert fam["seeds"][0]["best_point"]["lr"] == 1e-3
    assert "0.600" in (tmp_path / "m.md").read_text()


def test_frontier_merge_keeps_only_the_selected_families(tmp_path):
    def report(objective, families):
        runs, settings = [], {"forget": "forget10", "scale": "CPU scale", "frontier_at": 0.2, "train": {}}
        points = [
            {"step": i, "epoch": i, "forget": f, "retain": r} for i, (f, r) in enumerate([(0.9, 0.9), (0.1, 0.5)])
        ]
        for family in families:
            run = {"run": f"{family} lr=0.001 seed=0", "family": family, "kind": "full", "seed": 0, "lr": 1e-3}
            runs.append(run | {"points": points, "kept": points[-1], "trainable_entries": 10, "delta_bytes": 10})
        settings |= {"seeds": [0], "eval_every": 1.0, "eval_unit": "epochs", "objective": objective}
        settings |= {"families": [{"family": f, "kind": "full", "density": None, "score": None} for f in families]}
        settings["grids"] = {f: [1e-3] for f in families}
        evaluated = [{"method": f"{f} seed=0", "group": "operating", "family": f, "seed": 0} for f in families]
        reference = [{"method": "target (no unlearning)", "group": "reference"}]
        return {
            "mode": "frontier",
            "command": "c",
            "settings": settings,
            "runs": runs,
            "results": reference + evaluated,
        }

    (tmp_path / "new.json").write_text(json.dumps(report("ihl", ["LoRA r=8 IHL"])))
    (tmp_path / "old.json").write_text(
        json.dumps(report("npo", ["full NPO", "GRIN 1% NPO", "GRIN 25% NPO", "x full NPO"]))
    )
    argv = ["--frontier", "--merge", str(tmp_path / "new.json"), str(tmp_path / "old.json"), "--out", str(tmp_path)]
    merged = bench_tofu.main([*argv, "--methods", "LoRA r=8 IHL,full NPO,GRIN 25% NPO", "--stem", "m"])
    kept = ["LoRA r=8 IHL", "full NPO", "GRIN 25% NPO"]
    assert [f["family"] for f in merged["frontiers"]] == kept
    assert list(merged["settings"]["grids"]) == kept and merged["settings"]["objective"] == "ihl,npo"
    assert [r["method"] for r in merged["results"]] == ["target (no unlearning)"] + [f"{f} seed=0" for f in kept]
    assert "GRIN 1% NPO" not in (tmp_path / "m.md").read_text()
    with pytest.raises(SystemExit, match="matched no run"):
        bench_tofu.main([*argv, "--methods", "SimNPO", "--stem", "x"])


def test_mask_grids_follow_the_density_band_unless_overridden():
    import tofu_methods

    assert tofu_methods.grid_for(0.001, {}) == [3e-2, 0.1, 0.3, 1.0]
    assert tofu_methods.grid_for(0.01, {}) == [3e-3, 1e-2, 3e-2, 0.1]
    assert tofu_methods.grid_for(0.5, {}) == [3e-4, 1e-3, 3e-3, 1e-2]
    grids = tofu_methods.parse_mask_grids("0.001=0.1,0.3;1e-2,3e-2")
    assert grids == {0.001: [0.1, 0.3], None: [1e-2, 3e-2]}
    assert tofu_methods.grid_for(0.001, grids) == [0.1, 0.3] and tofu_methods.grid_for(0.25, grids) == [1e-2, 3e-2]
    args = bench_tofu.parse_args(["--frontier", "--seeds", "0,1", "--mask-scores", "random,wagle"])
    runs = tofu_methods.frontier_methods(args)
    per_seed = 1 + 4 + 4 + 3 * 3 * 4  # auto, full, LoRA, and GRIN + two masks at the 3 default densities, 4 rates
    assert len(runs) == 2 * per_seed and {r.seed for r in runs} == {0, 1}
    assert bench_tofu.parse_args(["--frontier", "--eval-every", "20steps"]).eval_unit == "steps"


@pytest.mark.skipif(not (SHARED_DATA / "tofu" / "full.json").is_file(), reason="needs the TOFU files")
def test_author_subset_regime_keeps_forget_and_retain_evaluation_authors():
    import tofu_models

    data = SHARED_DATA / "tofu"
    kept = tofu_models.kept_authors(data, "forget10", 40, seed=0)
    assert kept == list(range(20)) + list(range(180, 200))  # retain_perturbed's authors and forget10's
    more = tofu_models.kept_authors(data, "forget10", 60, seed=0)
    assert set(kept) < set(more) and len(more) == 60 and more == tofu_models.kept_authors(data, "forget10", 60, 0)
    args = bench_tofu.parse_args(["--frontier", "--regime", "authors40", "--data", str(data)])
    assert (args.authors, args.hidden, args.layers) == (40, 128, 2)
    task = tofu_models.task_data(args, data)
    assert len(task["forget"]) == 400 and len(task["retain"]) == 400  # 20 kept retain authors x 20
    assert len(task["splits"]["retain"]) == 400 and len(task["splits"]["holdout"]) == 400
    settings = tofu_models.tiny_settings(args)
    keys = {tofu_models.model_key("target", "forget10", data, settings, "t", a) for a in (None, kept, more)}
    assert len(keys) == 3  # a regime is a cache entry of its own
    with pytest.raises(SystemExit, match="between 40"):
        tofu_models.kept_authors(data, "forget10", 30, seed=0)


@pytest.mark.skipif(not (SHARED_DATA / "wmdp").is_dir(), reason="needs the WMDP/PKU files in ../shared/data")
def test_hazard_smoke_run_writes_both_tasks(tmp_path):
    out = tmp_path / "out"
    bench_hazard.main(
        ["--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--methods", "before,GRIN 1% NPO"]
    )
    saved = json.loads((out / "hazard_smoke.json").read_text())
    assert {row["task"] for row in saved["results"]} == {"wmdp", "pku"}
    for row in saved["results"]:
        assert "error" not in row
        keys = ["general_mcq_accuracy", "general_probability"]
        keys += (
            ["wmdp_forget_accuracy", "wmdp_heldout_accuracy"]
            if row["task"] == "wmdp"
            else ["unsafe_forget_probability"]
        )
        assert_finite_numbers(row["summary"], keys)
    assert "WMDP" in (out / "hazard_smoke.md").read_text()


@pytest.mark.skipif(not (SHARED_DATA / "wmdp").is_dir(), reason="needs the WMDP/PKU files in ../shared/data")
def test_hazard_families_run_the_tofu_frontier_families_over_their_grids_and_read_the_wmdp_merit(tmp_path):
    out = tmp_path / "out"
    argv = ["--smoke", "--out", str(out), "--cache-dir", str(tmp_path / "cache"), "--tasks", "wmdp"]
    families = "LoKU (FILA LoRA r=8 IHL),GRIN 25% NPO"
    bench_hazard.main([*argv, "--families", families, "--seeds", "1", "--grid-fila", "1e-3,1e-2"])
    saved = json.loads((out / "hazard_smoke.json").read_text())
    runs = [(r["method"], r["config"]["kind"], r["config"]["objective"]) for r in saved["results"]]
    assert runs == [
        ("before unlearning", "none", None),
        ("LoKU (FILA LoRA r=8 IHL) lr=0.001 seed=1", "fila", "ihl"),
        ("LoKU (FILA LoRA r=8 IHL) lr=0.01 seed=1", "fila", "ihl"),
        ("GRIN 25% NPO lr=0.001 seed=1", "grin", "npo"),  # smoke: the two largest rates of 3e-4,1e-3,3e-3
        ("GRIN 25% NPO lr=0.003 seed=1", "grin", "npo"),
    ]
    assert all("error" not in r for r in saved["results"])
    assert saved["results"][3]["config"]["grin"] == {"score": "gradient_ratio", "density": 0.25, "seed": 1}
    points = saved["results"][1]["points"]  # step 0 and the end of the one epoch, the end as evaluated after it
    assert [p["step"] for p in points][0] == 0 and len(points) == 2
    assert points[-1]["forget"] == pytest.approx(saved["results"][1]["summary"]["wmdp_forget_probability"])
    assert "general prob at WMDP forget prob 0.2" in (out / "hazard_smoke.md").read_text()
    with pytest.raises(SystemExit, match="no family"):
        bench_hazard.main([*argv, "--families", "LoKU"])


def test_hazard_merit_reads_each_family_and_seed_on_the_envelope_of_its_end_points():
    def row(family, seed, lr, forget, general, task="wmdp"):
        summary = {"wmdp_forget_probability": forget, "general_probability": general}
        return {"task": task, "config": {"kind": "lora", "group": family, "seed": seed, "lr": lr}, "summary": summary}

    results = [
        {"task": "wmdp", "config": {"kind": "none"}, "summary": {}},  # before unlearning: not a run
        row("A", 0, 1e-3, 0.6, 0.8),
        row("A", 0, 3e-3, 0.1, 0.6),
        row("A", 0, 1e-2, 0.05, 0.3),
        row("A", 0, 3e-2, 0.5, 0.5, task="pku"),  # another task's row
        row("A", 1, 1e-3, 0.3, 0.9),  # never reaches 0.2
        {
            **row("B", 0, 1e-3, 0.15, 0.2),
            "points": [
                {"epoch": 0, "forget": 0.8, "retain": 0.8},
                {"epoch": 1, "forget": 0.1, "retain": 0.7},
                {"epoch": 2, "forget": 0.15, "retain": 0.2},
            ],
        },
    ]
    merit = {(r["family"], r["seed"]): r for r in bench_hazard.family_frontiers(results, 0.2)}
    assert merit["A", 0]["rates"] == 3
    assert merit["A", 0]["retain_at"] == pytest.approx(0.6 + 0.2 * (0.1 / 0.5))  # between (0.1, 0.6) and (0.6, 0.8)
    assert merit["A", 0]["best"] == "0.003, end: 0.100 / 0.600" and merit["A", 0]["min_forget"] == 0.05
    assert merit["A", 1]["retain_at"] is None and merit["A", 1]["best"] is None
    # a run's trajectory replaces its end point: the epoch-1 checkpoint (0.1, 0.7) makes the frontier
    assert merit["B", 0]["rates"] == 1 and merit["B", 0]["best"] == "0.001, epoch 1: 0.100 / 0.700"
    assert merit["B", 0]["retain_at"] == pytest.approx(0.7 + 0.1 * (0.1 / 0.7))


# ------------------------------------------------------------------------------------------------ full-parameter


@pytest.fixture(scope="module")
def tiny():
    texts = [f"Question: What is item {i}?\nAnswer: Item {i} is a thing number {i * 7}." for i in range(40)]
    tokenizer = train_tokenizer(texts, vocab_size=300)
    model = build_model(tiny_llama_config(len(tokenizer), hidden_size=32, num_layers=1, num_heads=2), seed=0)
    items = [{"question": f"What is item {i}?", "answer": f"Item {i} is a thing number {i * 7}."} for i in range(16)]
    return model, QAFormat(tokenizer), items[:8], items[8:]


def full_args(tmp_path, objective: str) -> UnlearningArguments:
    return UnlearningArguments(
        output_dir=str(tmp_path / "out"),
        objective=objective,
        use_cpu=True,
        num_threads=1,
        per_device_train_batch_size=4,
        learning_rate=1e-3,
        num_train_epochs=1,
        save_strategy="no",
        disable_tqdm=True,
        report_to="none",
    )


def test_full_parameter_training_needs_no_reference_for_grad_diff(tiny, tmp_path):
    base, fmt, forget, retain = tiny
    model = copy.deepcopy(base)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    calls = []
    trainer = UnlearningTrainer(
        model, full_args(tmp_path, "grad_diff"), forget, retain, qa_format=fmt, ref_model=lambda: calls.append(1)
    )
    trainer.train()
    assert not calls and trainer.ref_model is None  # GradDiff reads no reference: the factory is never called
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) == len(before)  # every weight is trained


def test_full_parameter_npo_uses_the_frozen_reference(tiny, tmp_path):
    base, fmt, forget, retain = tiny
    with pytest.raises(GrinError, match="ref_model"):
        UnlearningTrainer(copy.deepcopy(base), full_args(tmp_path, "npo"), forget, retain, qa_format=fmt)
    model, reference = copy.deepcopy(base), copy.deepcopy(base)
    trainer = UnlearningTrainer(model, full_args(tmp_path, "npo"), forget, retain, qa_format=fmt, ref_model=reference)
    metrics = trainer.train().metrics
    assert trainer.ref_model is reference and not any(p.requires_grad for p in reference.parameters())
    assert all(torch.equal(p, q) for p, q in zip(reference.parameters(), base.parameters()))  # never trained
    assert any(not torch.equal(p, q) for p, q in zip(model.parameters(), base.parameters()))
    # at the first step the model equals its reference, so NPO's log-ratio starts at 0 and moves away from it
    assert math.isfinite(metrics["train_loss"]) and metrics["train_forget_log_ratio"] != 0
    with pytest.raises(GrinError, match="separate"):
        UnlearningTrainer(model, full_args(tmp_path, "npo"), forget, retain, qa_format=fmt, ref_model=model)


def test_ssd_dampens_only_forget_specific_weights(tiny):
    base, fmt, forget, retain = tiny
    model = copy.deepcopy(base)
    info = unlearning_runs.ssd_dampen(model, fmt, forget, forget + retain, alpha=1.0, lam=1.0)
    assert 0 < info["ssd_dampened_entries"] < info["ssd_candidate_entries"]
    ratios = torch.cat(
        [
            (p.detach() / q.detach()).flatten()[q.detach().flatten() != 0]
            for p, q in zip(model.parameters(), base.parameters())
        ]
    )
    assert bool((ratios <= 1 + 1e-6).all()) and bool((ratios >= 0).all())  # only ever shrunk, never flipped
    assert int((ratios < 1 - 1e-6).sum()) <= info["ssd_dampened_entries"]


# ------------------------------------------------------------------------------------------------ LoKU (§7)


def test_frontier_objectives_and_fila_add_families_and_leave_the_default_alone():
    import tofu_methods

    default = tofu_methods.frontier_families(bench_tofu.parse_args(["--frontier", "--densities", "0.25"]))
    assert [f["family"] for f in default] == ["auto (unlearn defaults)", "full NPO", "LoRA r=8 NPO", "GRIN 25% NPO",
                                              "mask 25% random NPO"]  # fmt: skip
    args = bench_tofu.parse_args(
        ["--frontier", "--objectives", "npo,ihl", "--fila", "--densities", "0.25", "--mask-scores", "none"]
    )
    families = tofu_methods.frontier_families(args)
    assert [(f["family"], f["kind"], f["objective"]) for f in families[1:]] == [
        ("full NPO", "full", "npo"), ("LoRA r=8 NPO", "lora", "npo"), ("FILA LoRA r=8 NPO", "fila", "npo"),
        ("full IHL", "full", "ihl"), ("LoRA r=8 IHL", "lora", "ihl"), ("LoKU (FILA LoRA r=8 IHL)", "fila", "ihl"),
        ("GRIN 25% NPO", "grin", "npo"), ("GRIN 25% IHL", "grin", "ihl"),
    ]  # fmt: skip
    runs = tofu_methods.frontier_methods(args)
    loku = [r for r in runs if r.group == "LoKU (FILA LoRA r=8 IHL)"]
    assert [r.lr for r in loku] == list(tofu_methods.DEFAULT_GRID_LORA)
    assert {(r.kind, r.objective) for r in loku} == {("fila", "ihl")}
    # --grid-fila moves both FILA families (not plain LoRA) to their own rates
    args = bench_tofu.parse_args(
        ["--frontier", "--objectives", "npo,ihl", "--fila", "--densities", "0.25", "--grid-fila", "3e-4,1e-3"]
    )
    grids = {f["family"]: f["grid"] for f in tofu_methods.frontier_families(args)}
    assert grids["LoKU (FILA LoRA r=8 IHL)"] == grids["FILA LoRA r=8 NPO"] == [3e-4, 1e-3]
    assert grids["LoRA r=8 IHL"] == list(tofu_methods.DEFAULT_GRID_LORA)


def test_frontier_variants_run_grin_as_published_and_re_localised_and_are_reported_by_their_own_name():
    import tofu_methods

    from grin_peft import GrinConfig

    args = bench_tofu.parse_args(
        ["--frontier", "--densities", "0.25", "--mask-scores", "paper,relocalize", "--seeds", "1"]
    )
    families = tofu_methods.frontier_families(args)
    assert [(f["family"], f["score"]) for f in families[3:]] == [
        ("GRIN 25% NPO", "gradient_ratio"), ("GRIN 25% paper preset NPO", "paper"),
        ("GRIN 25% re-localised every epoch NPO", "relocalize"),
    ]  # fmt: skip
    runs = {r.group: r for r in tofu_methods.frontier_methods(args)}
    paper = runs["GRIN 25% paper preset NPO"].grin
    assert GrinConfig(**paper) == GrinConfig.paper(density=0.25, seed=1)
    assert runs["GRIN 25% re-localised every epoch NPO"].grin["relocalize_every"] == 13  # one epoch of forget10
    assert [tofu_methods.selector_of(r.grin) for r in runs.values() if r.grin] == ["gradient_ratio", "paper",
                                                                                    "relocalize"]  # fmt: skip
    with pytest.raises(SystemExit):
        bench_tofu.parse_args(["--frontier", "--mask-scores", "papers"])


def test_a_lora_run_starts_from_the_same_adapter_whatever_ran_before_it(tiny, tmp_path):
    """LoRA's A matrices come from torch's global RNG: the run's seed fixes them, not the process's history."""
    base, fmt, forget, retain = tiny
    make = lambda: copy.deepcopy(base)  # noqa: E731
    method = unlearning_runs.Method("LoRA", "lora", "npo", 1e-3, lora={"r": 2, "lora_alpha": 4})
    train = {"max_steps": 1, "per_device_train_batch_size": 4, "use_cpu": True, "num_threads": 1, "seed": 3}
    runs = []
    for history in (0, 1):
        torch.manual_seed(100 + history)
        torch.rand(history + 1)  # a different RNG state before each run
        model, _ = unlearning_runs.run_method(
            method, make, fmt, forget, retain, train=train, workdir=str(tmp_path / "w")
        )
        runs.append({n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n})
    assert runs[0] and runs[0].keys() == runs[1].keys()
    assert all(torch.equal(runs[0][n], runs[1][n]) for n in runs[0])


def test_fila_run_saves_a_plain_lora_that_reproduces_it_on_the_original_base(tiny, tmp_path):
    """FILA moves base weights; the saved checkpoint must still be an adapter for the untouched target."""
    import tofu_runs

    base, fmt, forget, retain = tiny
    make = lambda: copy.deepcopy(base)  # noqa: E731
    method = unlearning_runs.Method("LoKU", "fila", "ihl", 1e-2, lora={"r": 2, "lora_alpha": 4})
    train = {"num_train_epochs": 1, "per_device_train_batch_size": 4, "use_cpu": True, "num_threads": 1, "seed": 0}
    model, info = unlearning_runs.run_method(
        method, make, fmt, forget, retain, train=train, workdir=str(tmp_path / "work")
    )
    assert info["steps"] == 2 and info["fila"]["data"]["forget"]["units"] == len(forget)
    ids = torch.tensor([fmt.encode(forget[0]["question"], forget[0]["answer"])["input_ids"]])
    with torch.no_grad():
        trained = model(input_ids=ids).logits
        assert not torch.allclose(trained, base(input_ids=ids).logits, atol=1e-3)  # it did unlearn something
    nbytes, files = tofu_runs.save_checkpoint(model, "fila", tmp_path / "ckpt", info["fila_initial"])
    assert files == "adapter_model.safetensors" and nbytes > 0
    loaded = tofu_runs.load_checkpoint("fila", tmp_path / "ckpt", make)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=ids).logits, trained, atol=1e-4, rtol=1e-4)


def test_a_stopped_frontier_log_rebuilds_the_finished_runs_as_a_mergeable_report(tmp_path):
    import tofu_log

    log = tmp_path / "run.log"
    log.write_text(
        "26 runs over 2 seed(s); target {'forget': 0.98}\n"
        "[0 s] run 3/26: LoRA r=8 IHL lr=0.001 seed=1\n"
        "    step 0 (epoch 0.00): forget 0.989 retain 0.991\n"
        "    step 13 (epoch 1.00): forget 0.100 retain 0.700\n"
        "    step 26 (epoch 2.00): forget 0.300 retain 0.800\n"
        "    3 points, lowest forget 0.100; kept forget 0.100 retain 0.700; 125 s training + 41 s trajectory; "
        "delta 191,968 bytes\n"
        "[166 s] run 4/26: LoRA r=8 IHL lr=0.003 seed=1\n"
        "    step 13 (epoch 1.00): forget 0.500 retain 0.900\n"  # stopped here: no summary line, left out
    )
    runs = tofu_log.runs_from_log(log.read_text())
    assert [(r["run"], r["family"], r["lr"], r["seed"]) for r in runs] == [
        ("LoRA r=8 IHL lr=0.001 seed=1", "LoRA r=8 IHL", 1e-3, 1)
    ]
    assert [(p["step"], p["forget"], p["retain"]) for p in runs[0]["points"]][1] == (13, 0.1, 0.7)
    assert runs[0]["kept"]["step"] == 13 and runs[0]["delta_bytes"] == 191968 and runs[0]["wall_seconds"] == 125

    lora = {"family": "LoRA r=8 NPO", "kind": "lora", "density": None, "trainable_entries": 47104}
    like = {"mode": "frontier", "command": "c", "results": [], "settings": {"seeds": [0]}, "runs": [lora]}
    (tmp_path / "like.json").write_text(json.dumps(like))
    out, argv = tmp_path / "rebuilt.json", "--frontier --objectives npo,ihl --densities 0.25 --mask-scores none"
    report = tofu_log.main([str(log), "--argv", argv, "--like", str(tmp_path / "like.json"), "--out", str(out)])
    assert report["runs"][0]["trainable_entries"] == 47104 and report["runs"][0]["kind"] == "lora"
    assert report["settings"]["seeds"] == [1] and report["settings"]["grids"] == {
        "LoRA r=8 IHL": [1e-3, 3e-3, 1e-2, 3e-2]
    }
    assert "rebuilt" in json.loads(out.read_text())["command"]
    with pytest.raises(SystemExit, match="define no family"):  # the log's IHL family needs --objectives ihl
        tofu_log.main([str(log), "--argv=--frontier", "--like", str(tmp_path / "like.json"), "--out", str(out)])
