"""Cost of the base fingerprint modes on a 1B-parameter-sized set of tensors (issue 11, item 19).

A module holding bf16 weights of 1e9 entries in all (2 GB, the shapes of a 1B Llama's linear layers, rounded),
fingerprinted in the full and the sampled mode; prints wall seconds and GB/s.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_fingerprint.py --entries 1e9
"""

from __future__ import annotations

import argparse
import time

import torch
from torch import nn

from grin_peft.fingerprint import fingerprint


def weights(entries: int) -> nn.Module:
    """2048 x 8192 bf16 layers (16.8M entries each) until `entries` are reached."""
    model = nn.Module()
    per_layer = 2048 * 8192
    for i in range(max(1, round(entries / per_layer))):
        model.register_parameter(f"w{i}", nn.Parameter(torch.empty(2048, 8192, dtype=torch.bfloat16).normal_()))
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=float, default=1e9)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    model = weights(int(args.entries))
    numel = sum(p.numel() for p in model.parameters())
    size = numel * 2
    print(f"{numel:,} bf16 entries ({size / 1e9:.2f} GB) in {len(list(model.parameters()))} tensors")
    for mode in ("full", "sampled"):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            fingerprint(model, mode=mode)
            times.append(time.perf_counter() - start)
        best = min(times)
        print(
            f"{mode:8s} best of {args.repeats}: {best:.2f} s ({size / best / 1e9:.2f} GB/s); all: "
            + ", ".join(f"{t:.2f}" for t in times)
        )


if __name__ == "__main__":
    main()
