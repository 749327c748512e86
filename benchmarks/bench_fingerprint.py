"""The base fingerprint modes (issue 11, item 19): what they detect, and what they cost at 1B parameters.

1. Detection: `--edits` single-entry edits (+1e-3 at a random position of one of two 256 x 256 weights), each
   fingerprinted in both modes.
2. Cost: bf16 weights of `--entries` entries in all (1e9: 2 GB, 2048 x 8192 layers), fingerprinted in both modes;
   prints wall seconds and GB/s.

    OMP_NUM_THREADS=1 nice -n 10 python benchmarks/bench_fingerprint.py --entries 1e9 --edits 200
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


def wide(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 256))


def detection(edits: int) -> None:
    """How many single-entry edits each mode detects."""
    base = wide()
    reference = {mode: fingerprint(base, mode=mode) for mode in ("full", "sampled")}
    detected = dict.fromkeys(reference, 0)
    generator = torch.Generator().manual_seed(0)
    for _ in range(edits):
        model = wide()
        weight = model[0].weight if int(torch.randint(2, (1,), generator=generator)) == 0 else model[2].weight
        with torch.no_grad():
            weight.view(-1)[int(torch.randint(weight.numel(), (1,), generator=generator))] += 1e-3
        for mode in reference:
            detected[mode] += fingerprint(model, mode=mode) != reference[mode]
    found = ", ".join(f"{mode} detected {n}" for mode, n in detected.items())
    print(f"{edits} single-entry edits of 256 x 256 weights: {found}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--entries", type=float, default=1e9)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--edits", type=int, default=200)
    args = parser.parse_args()
    detection(args.edits)
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
