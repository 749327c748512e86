"""Cost of GRIN's scoring pass against a plain forward+backward over the same batches.

The target (issue 4, tightened to 1.10x by issue 15): the scoring pass takes at most 1.10x the time of a plain
forward+backward of the same model with ``requires_grad`` on the targeted weights, and its peak memory is at most that
forward+backward's plus two float32 copies of the targeted weights. Both run the same loss (summed answer-token
cross-entropy) over the same batches. Times are interleaved repetitions in one process (medians); peak memory is
measured in a fresh process per mode (peak RSS above the RSS after building the model on CPU, ``max_memory_allocated``
on CUDA).

    python benchmarks/bench_localize.py               # Llama-shaped, hidden 512, 4 layers: ~2 minutes on 2 cores
    python benchmarks/bench_localize.py --hidden 256  # quicker
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import shlex
import statistics
import subprocess
import sys
import time

import torch
from peft import get_peft_model
from transformers import AutoModelForCausalLM, LlamaConfig

import grin_peft  # noqa: F401  (registers GRIN)
from grin_peft import GrinConfig
from grin_peft.localize.statistics import answer_loss, collect_statistic

MODES = ("plain", "scoring", "scoring_batch_unit")


def build(args: argparse.Namespace) -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A Llama built from a config (seeded) and random-token batches, loss on the last 3/4 of each sequence."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=int(args.hidden * 8 / 3) // 16 * 16,
        num_hidden_layers=args.layers,
        num_attention_heads=max(1, args.hidden // 64),
        num_key_value_heads=max(1, args.hidden // 64),
        max_position_embeddings=args.seq,
    )
    model = AutoModelForCausalLM.from_config(config).to(getattr(torch, args.dtype)).to(args.device).eval()
    generator = torch.Generator().manual_seed(1)
    batches = []
    for _ in range(args.batches):
        ids = torch.randint(0, args.vocab, (args.batch_size, args.seq), generator=generator)
        labels = ids.clone()
        labels[:, : args.seq // 4] = -100
        batches.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return model, batches


def targeted(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The weights GRIN's 'all-linear' targets: every Linear except the output head."""
    return [m.weight for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and n != "lm_head"]


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def run_plain(model: torch.nn.Module, batches: list[dict], device: str) -> None:
    """Forward+backward with requires_grad on the targeted weights, gradients accumulated in .grad."""
    for p in model.parameters():
        p.requires_grad_(False)
    weights = targeted(model)
    for w in weights:
        w.requires_grad_(True)
        w.grad = None
    for batch in batches:
        answer_loss(model, {k: v.to(device) for k, v in batch.items()}).backward()
    sync(device)


def grin_model(model: torch.nn.Module) -> torch.nn.Module:
    return get_peft_model(model, GrinConfig(target_modules="all-linear", density=1e-3))


def run_scoring(peft_model: torch.nn.Module, batches: list[dict], device: str, unit: str) -> None:
    """localize's scoring pass for the default score (sums of squared gradients) over the same batches: the first
    half as forget data, the second as retain data, both statistics alive at the end as in localize."""
    tuner = peft_model.base_model
    layers = tuner.grin_layers("default")
    half = len(batches) // 2
    stats = [
        collect_statistic(tuner.model, layers, part, "sq", unit=unit, progress=False)
        for part in (batches[:half], batches[half:])
    ]
    sync(device)
    del stats


def probe(args: argparse.Namespace) -> dict:
    """Peak memory of one mode, measured from a fresh process."""
    model, batches = build(args)
    subject = grin_model(model) if args.probe != "plain" else model
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
    else:
        with open("/proc/self/statm") as handle:
            start = int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    if args.probe == "plain":
        run_plain(subject, batches, args.device)
    else:
        run_scoring(subject, batches, args.device, "batch" if args.probe == "scoring_batch_unit" else "example")
    if args.device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated()
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"mode": args.probe, "peak_above_start": peak - start}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=8000)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--probe", choices=MODES, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.probe:
        print(json.dumps(probe(args)))
        return

    model, batches = build(args)
    peft_model = grin_model(copy.deepcopy(model))
    runs = {
        "plain": lambda: run_plain(model, batches, args.device),
        "scoring": lambda: run_scoring(peft_model, batches, args.device, "example"),
        "scoring_batch_unit": lambda: run_scoring(peft_model, batches, args.device, "batch"),
    }
    times: dict[str, list[float]] = {mode: [] for mode in MODES}
    cpu: dict[str, list[float]] = {mode: [] for mode in MODES}  # process CPU time: steadier on a shared machine
    for mode in MODES:  # warm-up
        runs[mode]()
    for _ in range(args.reps):
        for mode in MODES:
            start, cpu_start = time.perf_counter(), time.process_time()
            runs[mode]()
            times[mode].append(time.perf_counter() - start)
            cpu[mode].append(time.process_time() - cpu_start)

    memory = {}
    argv = sys.argv[1:]
    for mode in MODES:
        out = subprocess.run(
            [sys.executable, os.path.abspath(__file__), *argv, "--probe", mode],
            capture_output=True,
            text=True,
            check=True,
        )
        memory[mode] = json.loads(out.stdout.strip().splitlines()[-1])["peak_above_start"]

    n_targeted = sum(w.numel() for w in targeted(model))
    allowance = 2 * 4 * n_targeted
    plain_time = statistics.median(times["plain"])
    plain_cpu = statistics.median(cpu["plain"])
    tokens = args.batches * args.batch_size * args.seq
    command = "python benchmarks/bench_localize.py " + " ".join(shlex.quote(a) for a in argv)
    print(f"\n`{command}`\n")
    print(
        f"Llama-shaped model: hidden {args.hidden}, {args.layers} layers, vocab {args.vocab}, {args.dtype} on "
        f"{args.device} ({args.threads} threads); {n_targeted / 1e6:.2f}M targeted weights; {args.batches} batches "
        f"of {args.batch_size} x {args.seq} tokens; median of {args.reps} interleaved repetitions.\n"
    )
    print(
        "| mode | time (s) | time / plain | CPU s | CPU / plain (per-rep range) | tokens/s "
        "| peak memory above model (MB) | memory budget (MB) | within (CPU time) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for mode in MODES:
        t = statistics.median(times[mode])
        budget = memory["plain"] + (allowance if mode != "plain" else 0)
        c = statistics.median(cpu[mode])
        per_rep = [a / b for a, b in zip(cpu[mode], cpu["plain"])]
        ok = "" if mode == "plain" else ("yes" if c <= 1.10 * plain_cpu and memory[mode] <= budget else "no")
        print(
            f"| {mode} | {t:.2f} | {t / plain_time:.3f} | {c:.2f} | {c / plain_cpu:.3f} ({min(per_rep):.3f}-"
            f"{max(per_rep):.3f}) | {tokens / t:.0f} | {memory[mode] / 2**20:.0f} | {budget / 2**20:.0f} | {ok} |"
        )
    print(
        "\nplain: forward+backward with requires_grad on the targeted weights (.grad accumulated); scoring: "
        "localize's pass with per-example units (default); scoring_batch_unit: grad_unit='batch'. Budget: 1.10x "
        f"the plain time; plain's peak + two float32 copies of the targeted weights ({allowance / 2**20:.0f} MB)."
    )


if __name__ == "__main__":
    main()
