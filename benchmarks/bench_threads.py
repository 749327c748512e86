"""The thread rule of `unlearn` (grin_peft.threads), measured: one thread against all cores, per model size.

Part 1, step time: one GRIN training step (density 0.1%, forward + backward + AdamW) of Llama-shaped models of
growing hidden size, with 1 thread and with ``--threads`` threads, interleaved (each round runs both, in a seeded
random order), median over rounds; the ratio says which thread count the rule should pick at that size.
Part 2, end to end: `unlearn()` on the demo's memorised tiny model (fixed schedule) under the rule (1 thread) and
forced to ``--threads``, alternating; wall and process CPU time per run, and a check that both deltas (indices,
values and base values of every layer, as saved) are byte-identical. Run it without ``OMP_NUM_THREADS`` in the
environment, or the rule leaves torch's setting alone.

    python benchmarks/bench_threads.py                 # ~5-10 min on 2 busy cores
    python benchmarks/bench_threads.py --sizes 64x2 --rounds 2 --unlearn-runs 1   # quick check
"""

from __future__ import annotations

import argparse
import copy
import os
import random
import statistics
import sys
import time
import warnings

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# torch first: libgomp reads OMP_WAIT_POLICY when torch loads, and bench_training would set PASSIVE; this measures
# what a user gets by default
WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
import torch  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_training as bt  # noqa: E402

warnings.filterwarnings("ignore")


def step_times(hidden: int, layers: int, threads: int, rounds: int, vocab: int) -> dict[str, float]:
    spec = dict(hidden=hidden, layers=layers, intermediate=bt.intermediate_for(hidden), vocab=vocab, batch=4, seq=128)
    trainer = bt.Trainer("grin", bt.apply_method(bt.build_base(spec), "grin", 1e-3), bt.make_batch(spec))
    times: dict[int, list[float]] = {1: [], threads: []}
    rng = random.Random(0)
    for n in (1, threads):  # warm-up
        torch.set_num_threads(n)
        trainer.step()
    for _ in range(rounds):
        order = [1, threads]
        rng.shuffle(order)
        for n in order:
            torch.set_num_threads(n)
            start = time.perf_counter()
            trainer.step()
            times[n].append(time.perf_counter() - start)
    ratios = [a / b for a, b in zip(times[1], times[threads])]
    return {
        "params": bt.count_params(spec),
        "one": statistics.median(times[1]),
        "many": statistics.median(times[threads]),
        "ratio": statistics.median(ratios),
        "ratio_range": (min(ratios), max(ratios)),
    }


def unlearn_times(threads: int, runs: int) -> dict[str, object]:
    from grin_peft import GrinConfig, unlearn
    from grin_peft.tiny import load_or_train_memorised_model

    memorised = load_or_train_memorised_model(progress=False)
    data = memorised.dataset
    out: dict[str, list] = {"rule": [], "forced": [], "rule_cpu": [], "forced_cpu": []}
    deltas = {}
    for _ in range(runs):
        for mode in ("rule", "forced"):
            model = copy.deepcopy(memorised.model)
            kw = {"num_threads": threads} if mode == "forced" else {}
            start, cpu = time.perf_counter(), time.process_time()
            result = unlearn(
                model,
                data.forget,
                data.retain,
                config=GrinConfig(target_modules="all-linear", density=1e-2, seed=0),
                tokenizer=memorised.tokenizer,
                learning_rate=5e-2,
                num_train_epochs=5,
                verbose=False,
                disable_tqdm=True,
                **kw,
            )
            out[mode].append(time.perf_counter() - start)
            out[f"{mode}_cpu"].append(time.process_time() - cpu)
            state = result.peft_model.state_dict()
            deltas[mode] = {n: t.contiguous().view(torch.uint8).clone() for n, t in state.items() if "grin_" in n}
    identical = deltas["rule"].keys() == deltas["forced"].keys() and all(
        torch.equal(deltas["rule"][n], deltas["forced"][n]) for n in deltas["rule"]
    )
    params = sum(p.numel() for p in memorised.model.parameters())
    return {
        "params": params,
        "rule_s": out["rule"],
        "forced_s": out["forced"],
        "rule_cpu_s": out["rule_cpu"],
        "forced_cpu_s": out["forced_cpu"],
        "identical": identical,
        "delta_bytes": sum(t.numel() for t in deltas["rule"].values()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="64x4,128x4,256x4,512x4,768x4", help="HIDDENxLAYERS,...")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--unlearn-runs", type=int, default=2)
    args = parser.parse_args()
    command = "python benchmarks/bench_threads.py " + " ".join(sys.argv[1:])
    print(f"`{command}` (OMP_WAIT_POLICY={WAIT_POLICY}, load {os.getloadavg()[0]:.1f})\n")
    print(f"| model | parameters | 1 thread s | {args.threads} threads s | 1 / {args.threads} threads (range) |")
    print("|---|---|---|---|---|")
    for text in filter(None, args.sizes.split(",")):
        hidden, layers = (int(p) for p in text.split("x"))
        r = step_times(hidden, layers, args.threads, args.rounds, args.vocab)
        low, high = r["ratio_range"]
        print(
            f"| h={hidden} L={layers} | {r['params'] / 1e6:.1f}M | {r['one']:.3f} | {r['many']:.3f} | "
            f"{r['ratio']:.2f} ({low:.2f}-{high:.2f}) |",
            flush=True,
        )
    if args.unlearn_runs:
        r = unlearn_times(args.threads, args.unlearn_runs)

        def runs(key: str) -> str:
            return ", ".join(f"{t:.1f}" for t in r[key])

        print(
            f"\nunlearn() on the demo's memorised model ({r['params'] / 1e6:.2f}M parameters, fixed schedule): "
            f"rule (1 thread) {runs('rule_s')} s wall, {runs('rule_cpu_s')} s CPU; forced to {args.threads} threads "
            f"{runs('forced_s')} s wall, {runs('forced_cpu_s')} s CPU; deltas ({r['delta_bytes']:,} bytes) "
            f"byte-identical: {r['identical']}; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS')}, load "
            f"{os.getloadavg()[0]:.1f}"
        )


if __name__ == "__main__":
    main()
