"""What GRIN's sparse delta costs on top of the frozen layer, next to the alternatives, in one run.

For each layer shape (OUTxIN, the weight's [out_features, in_features]) and density it times one forward+backward
of a [tokens, in] batch through:

* base:    the frozen layer alone, gradient wrt x only (what any adapter must pay anyway);
* GRIN:    base + ``sparse_delta_linear`` (CSR SpMM forward, SpMM + SDDMM backward), gradients wrt x and values;
* LoRA:    base + a rank-r LoRA (two thin dense matmuls), gradients wrt x, A and B;
* scatter: the dense-delta approach of PEFT's Super-Tuning: scatter the values into a copy of the weight and run one
           dense linear, gradients wrt x and values (its backward forms the dense out x in weight gradient);
* dense:   GRIN's dense regime (``grin_peft.dense.merged_linear``, what a layer above ``dense_threshold`` runs): the
           values merged into a float copy of the weight, one linear, gradients wrt x and values;
* delta:   the frozen layer plus a separate dense delta matmul, ``base(x) + x @ D^T`` with D scattered from the values;
* fused:   what a GRIN layer runs on the CPU (``grin_peft.fused``): the delta written into the frozen weight for the
           layer's own matmuls, the values' gradient by a kernel chosen by entry count; ``fused-gather`` /
           ``fused-csr`` / ``fused-dense`` force one kernel (the crossover measurements).

All methods are timed interleaved: every round runs each method once, in a fresh seeded random order, so that load
from other processes hits them alike. The table reports the median (or min, or both) over rounds and each method's
ratio to the frozen base; with --paired A/B it adds the median over rounds of A's time / B's time in the same round.

    python benchmarks/bench_sparse_op.py                       # the default table
    python benchmarks/bench_sparse_op.py --shapes 4096x4096 --densities 1e-3 --repeats 5
    python benchmarks/bench_sparse_op.py --threads 1 --clock cpu  # on a busy shared machine: CPU time, 1 thread
    python benchmarks/bench_sparse_op.py --methods GRIN,dense,delta --paired dense/GRIN \
        --shapes 2048x5504 --densities 1e-3,1e-2,5e-2,0.1,0.25,0.5   # the sparse/dense crossover
"""

from __future__ import annotations

import argparse
import platform
import random
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from grin_peft.dense import merged_linear
from grin_peft.fused import fused_sparse_linear
from grin_peft.sparse import sparse_delta_linear
from grin_peft.sparse_pattern import SparsePattern

METHODS = ("GRIN", "LoRA", "scatter", "dense", "delta", "fused", "fused-gather", "fused-csr", "fused-dense")


def parse_shape(text: str) -> tuple[int, int]:
    out_features, in_features = (int(part) for part in text.lower().split("x"))
    return out_features, in_features


def make_steps(
    out_features: int,
    in_features: int,
    tokens: int,
    density: float,
    rank: int,
    dtype: torch.dtype,
    seed: int,
    methods: tuple[str, ...] = ("GRIN", "LoRA", "scatter"),
) -> tuple[dict[str, Callable[[], None]], int]:
    """One closure per method, each running a full forward+backward on the same input and upstream gradient."""
    g = torch.Generator().manual_seed(seed)
    weight = (torch.randn(out_features, in_features, generator=g) / in_features**0.5).to(dtype)
    x0 = torch.randn(tokens, in_features, generator=g).to(dtype)
    grad_y = torch.randn(tokens, out_features, generator=g).to(dtype)

    nnz = max(1, round(out_features * in_features * density))
    indices = torch.randperm(out_features * in_features, generator=g)[:nnz].sort().values
    pattern = SparsePattern.from_flat_indices(indices, out_features, in_features)
    values = torch.nn.Parameter(torch.randn(nnz, generator=g) * 1e-2)  # float32 master values, like GRIN layers

    lora_a = torch.nn.Parameter((torch.randn(rank, in_features, generator=g) / in_features**0.5).to(dtype))
    lora_b = torch.nn.Parameter((torch.randn(out_features, rank, generator=g) * 1e-2).to(dtype))

    def base() -> None:
        x = x0.clone().requires_grad_()
        F.linear(x, weight).backward(grad_y)

    def grin() -> None:
        x = x0.clone().requires_grad_()
        (F.linear(x, weight) + sparse_delta_linear(x, values, pattern)).backward(grad_y)

    def lora() -> None:
        x = x0.clone().requires_grad_()
        (F.linear(x, weight) + F.linear(F.linear(x, lora_a), lora_b) * 2.0).backward(grad_y)

    def scatter() -> None:
        x = x0.clone().requires_grad_()
        effective = weight.reshape(-1).scatter_add(0, indices, values.to(dtype)).view_as(weight)
        F.linear(x, effective).backward(grad_y)

    def dense() -> None:
        x = x0.clone().requires_grad_()
        merged_linear(x, weight, None, [(values, indices)]).backward(grad_y)

    def delta() -> None:
        x = x0.clone().requires_grad_()
        d = torch.zeros(out_features * in_features).index_put((indices,), values).to(dtype).view_as(weight)
        (F.linear(x, weight) + F.linear(x, d)).backward(grad_y)

    def fused(kernel: str | None) -> Callable[[], None]:
        def step() -> None:
            x = x0.clone().requires_grad_()
            fused_sparse_linear(x, weight, None, values, pattern, kernel).backward(grad_y)

        return step

    steps = {"GRIN": grin, "LoRA": lora, "scatter": scatter, "dense": dense, "delta": delta}
    steps.update({"fused": fused(None), **{f"fused-{kernel}": fused(kernel) for kernel in ("gather", "csr", "dense")}})
    labels = {"LoRA": f"LoRA r={rank}"}
    return {"base": base, **{labels.get(name, name): steps[name] for name in methods}}, nnz


def time_interleaved(
    steps: dict[str, Callable[[], None]], warmup: int, repeats: int, clock: Callable[[], float], seed: int = 0
) -> dict[str, list[float]]:
    """Per round, every method once in a fresh seeded random order: no method always follows the same one."""
    rng = random.Random(seed)
    for _ in range(warmup):
        for step in steps.values():
            step()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        order = list(steps.items())
        rng.shuffle(order)
        for name, step in order:
            start = clock()
            step()
            times[name].append((clock() - start) * 1e3)
    return times


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="1024x1024,2048x5504", help="comma-separated OUTxIN weight shapes")
    parser.add_argument("--densities", default="1e-4,1e-3,1e-2,5e-2", help="comma-separated fractions of entries")
    parser.add_argument("--tokens", type=int, default=2048, help="rows of x (batch x sequence)")
    parser.add_argument("--rank", type=int, default=8, help="LoRA rank")
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--stat", default="median", choices=["median", "min", "both"], help="both: two tables")
    parser.add_argument(
        "--clock",
        default="wall",
        choices=["wall", "cpu"],
        help="cpu: this process's CPU time, robust to other load on a shared machine (use with --threads 1)",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--methods", default="GRIN,LoRA,scatter", help=f"comma-separated, from {', '.join(METHODS)} (base always runs)"
    )
    parser.add_argument("--paired", default=None, help="A/B: add the median per-round ratio of A's time to B's")
    args = parser.parse_args(argv)
    methods = tuple(args.methods.split(","))
    if any(m not in METHODS for m in methods):
        parser.error(f"--methods must be a subset of {', '.join(METHODS)}")
    paired = tuple(args.paired.split("/")) if args.paired else None
    if paired and (len(paired) != 2 or any(m not in methods for m in paired)):
        parser.error("--paired must be A/B with A and B among --methods")

    torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    clock = time.perf_counter if args.clock == "wall" else time.process_time
    stats = {"median": statistics.median, "min": min}
    if args.stat != "both":
        stats = {args.stat: stats[args.stat]}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}, "
        f"tokens={args.tokens}, dtype={args.dtype}, {args.repeats} repeats after {args.warmup} warmup; "
        f"forward+backward {args.clock}-clock ms (ratio to the frozen base)"
    )
    rows: dict[str, list[str]] = {name: [] for name in stats}
    header: list[str] = []
    for shape in args.shapes.split(","):
        out_features, in_features = parse_shape(shape)
        for density in (float(d) for d in args.densities.split(",")):
            steps, nnz = make_steps(
                out_features, in_features, args.tokens, density, args.rank, dtype, args.seed, methods
            )
            samples = time_interleaved(steps, args.warmup, args.repeats, clock, args.seed)
            header = list(steps)
            for stat, reduce in stats.items():
                times = {name: reduce(values) for name, values in samples.items()}
                cells = [f"{times['base']:.1f}"] + [
                    f"{times[name]:.1f} ({times[name] / times['base']:.2f}x)" for name in header[1:]
                ]
                if paired:
                    ratios = [a / b for a, b in zip(samples[paired[0]], samples[paired[1]])]
                    cells.append(f"{statistics.median(ratios):.2f} ({min(ratios):.2f}-{max(ratios):.2f})")
                rows[stat].append(
                    f"| {out_features}x{in_features} | {density:g} | {nnz} | " + " | ".join(cells) + " |"
                )
            if paired:
                header = header + [f"{paired[0]}/{paired[1]} paired"]
            if len(stats) == 1:  # stream rows as they come when there is only one table
                print(("" if len(rows[stat]) > 1 else table_head(stat, header)) + rows[stat][-1], flush=True)
    if len(stats) > 1:
        for stat in stats:
            print(table_head(stat, header) + "\n".join(rows[stat]))


def table_head(stat: str, header: list[str]) -> str:
    return (
        f"\n{stat} over repeats:\n\n| out x in | density | nnz | "
        + " | ".join(header)
        + " |\n|---|---|---|"
        + "---|" * len(header)
        + "\n"
    )


if __name__ == "__main__":
    main()
