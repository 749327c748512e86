"""The values' gradient on one layer: grin_peft's fused-path kernels against a compiled scratch kernel (issue 15).

The fused CPU path's only sparse work is the values' gradient, ``grad[k] = sum_n grad_y[n, r_k] x[n, c_k]`` at the
K delta entries (BENCHMARKS.md §2.1: with it skipped a GRIN step costs the frozen floor). This script times the
kernels ``grin_peft.fused`` picks from (``gather``: the K columns of both operands gathered, one dot product per
entry; ``csr``: torch's SDDMM after transposing both operands) against a plain-C kernel compiled at run time with the
system C compiler (OpenMP) and called through ctypes: per tile of 64 tokens it copies the distinct rows of
``grad_y`` and columns of ``x`` the entries need into token-contiguous buffers, then accumulates each entry's
64-token dot product in eight-lane partial sums. The C kernel is an experiment, not part of the package (why: §2.1).

    python benchmarks/bench_values_kernel.py            # one thread, three layer shapes, five densities: ~1 min
"""

from __future__ import annotations

import argparse
import ctypes
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from types import SimpleNamespace

import torch

from grin_peft.fused import _values_grad
from grin_peft.sparse_pattern import SparsePattern, _rows_cols

TILE = 64
C_SOURCE = r"""
#include <stdint.h>
#define TILE 64

/* dst[j * TILE + t] = src[(t0 + t) * stride + idx[j]] for t < tt, zero-padded to TILE */
static void gather(const float* src, int64_t stride, const int64_t* idx, int64_t j0, int64_t j1, int64_t t0,
                   int64_t tt, float* dst) {
  for (int64_t j = j0; j < j1; ++j) {
    const float* col = src + t0 * stride + idx[j];
    float* d = dst + j * TILE;
    int64_t t = 0;
    for (; t < tt; ++t) d[t] = col[t * stride];
    for (; t < TILE; ++t) d[t] = 0.0f;
  }
}

/* partial[k * 8 + l] += the tile's 64-token dot product of entry k, in eight lanes l = t mod 8 */
static void dots(const float* gb, const float* xb, const int64_t* ri, const int64_t* ci, int64_t k0, int64_t k1,
                 float* partial) {
  for (int64_t k = k0; k < k1; ++k) {
    const float* a = gb + ri[k] * TILE;
    const float* b = xb + ci[k] * TILE;
    float acc0[8], acc1[8];
    for (int l = 0; l < 8; ++l) { acc0[l] = a[l] * b[l]; acc1[l] = a[8 + l] * b[8 + l]; }
    for (int s = 16; s < TILE; s += 16)
      for (int l = 0; l < 8; ++l) { acc0[l] += a[s + l] * b[s + l]; acc1[l] += a[s + 8 + l] * b[s + 8 + l]; }
    float* p = partial + k * 8;
    for (int l = 0; l < 8; ++l) p[l] += acc0[l] + acc1[l];
  }
}

/* out[k] = sum_n gy[n, urows[ri[k]]] * x[n, ucols[ci[k]]]; partial: K * 8 zeroed floats */
void values_grad(const float* gy, const float* x, int64_t n_tokens, int64_t out_f, int64_t in_f,
                 const int64_t* urows, int64_t nr, const int64_t* ucols, int64_t nc, const int64_t* ri,
                 const int64_t* ci, int64_t k_entries, float* gbuf, float* xbuf, float* partial, float* out,
                 int threads) {
  for (int64_t t0 = 0; t0 < n_tokens; t0 += TILE) {
    int64_t tt = n_tokens - t0 < TILE ? n_tokens - t0 : TILE;
    #pragma omp parallel num_threads(threads)
    {
      #pragma omp for schedule(static) nowait
      for (int64_t j = 0; j < nr; j += 64) gather(gy, out_f, urows, j, j + 64 < nr ? j + 64 : nr, t0, tt, gbuf);
      #pragma omp for schedule(static)
      for (int64_t j = 0; j < nc; j += 64) gather(x, in_f, ucols, j, j + 64 < nc ? j + 64 : nc, t0, tt, xbuf);
      #pragma omp for schedule(static)
      for (int64_t k = 0; k < k_entries; k += 1024)
        dots(gbuf, xbuf, ri, ci, k, k + 1024 < k_entries ? k + 1024 : k_entries, partial);
    }
  }
  for (int64_t k = 0; k < k_entries; ++k) {
    const float* p = partial + k * 8;
    out[k] = ((p[0] + p[1]) + (p[2] + p[3])) + ((p[4] + p[5]) + (p[6] + p[7]));
  }
}
"""


def compile_kernel(workdir: str) -> ctypes.CDLL:
    """Build the scratch kernel with the system C compiler (-O3 -march=native) and load it."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        raise SystemExit("bench_values_kernel: no C compiler (cc/gcc) on PATH")
    source, library = os.path.join(workdir, "values_grad.c"), os.path.join(workdir, "values_grad.so")
    with open(source, "w") as handle:
        handle.write(C_SOURCE)
    flags = ["-O3", "-march=native", "-fopenmp", "-shared", "-fPIC"]
    subprocess.run([compiler, *flags, "-o", library, source], check=True)
    lib = ctypes.CDLL(library)
    p, i = ctypes.c_void_p, ctypes.c_int64
    lib.values_grad.argtypes = [p, p, i, i, i, p, i, p, i, p, p, i, p, p, p, p, ctypes.c_int]
    lib.values_grad.restype = None
    return lib


def compact(rows: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The distinct rows and columns the entries touch and each entry's position among them (once per pattern, as a
    layer would cache it)."""
    urows, ri = torch.unique(rows, return_inverse=True)
    ucols, ci = torch.unique(cols, return_inverse=True)
    return urows, ri, ucols, ci


def compiled_values_grad(lib: ctypes.CDLL, gy: torch.Tensor, x: torch.Tensor, layout: tuple[torch.Tensor, ...]):
    """The scratch kernel on float32 [tokens, out] / [tokens, in] inputs."""
    urows, ri, ucols, ci = layout
    k = ri.numel()
    gbuf, xbuf = torch.empty(urows.numel() * TILE), torch.empty(ucols.numel() * TILE)
    partial, out = torch.zeros(k * 8), torch.empty(k)
    lib.values_grad(
        gy.data_ptr(), x.data_ptr(), gy.shape[0], gy.shape[1], x.shape[1], urows.data_ptr(), urows.numel(),
        ucols.data_ptr(), ucols.numel(), ri.data_ptr(), ci.data_ptr(), k, gbuf.data_ptr(), xbuf.data_ptr(),
        partial.data_ptr(), out.data_ptr(), torch.get_num_threads(),
    )  # fmt: skip
    return out


def time_layer(lib: ctypes.CDLL, gy: torch.Tensor, x: torch.Tensor, pattern: SparsePattern, reps: int) -> dict:
    """Median milliseconds of each kernel on one layer's values' gradient, after checking each against float64."""
    rows, cols = _rows_cols(pattern)
    exact = (gy.double().t() @ x.double()).view(-1)[pattern.indices].float()
    gather_ctx = SimpleNamespace(kernel="gather", rows=rows, cols=cols, kept_taken=False)
    layout = compact(rows, cols)
    kernels = {
        "gather": lambda: _values_grad(gather_ctx, gy, x, pattern),
        "csr": lambda: _values_grad(SimpleNamespace(kernel="csr"), gy, x, pattern),
        "compiled": lambda: compiled_values_grad(lib, gy, x, layout),
    }
    if pattern.nnz > 3 * (pattern.in_features + pattern.out_features):
        del kernels["gather"]  # 4x past the range fused picks it for (0.75 x (in + out)): tens of ms
    times = {name: [] for name in kernels}
    for run in kernels.values():
        torch.testing.assert_close(run(), exact, rtol=1e-4, atol=1e-3)
    for _ in range(reps):
        for name, run in kernels.items():
            start = time.perf_counter()
            run()
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(v) * 1e3 for name, v in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=512)
    parser.add_argument("--shapes", default="768x2112,2112x768,768x768", help="INxOUT,...")
    parser.add_argument("--densities", default="1e-4,1e-3,3e-3,1e-2,3e-2")
    parser.add_argument("--reps", type=int, default=9)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as workdir:
        lib = compile_kernel(workdir)
        print(f"{args.tokens} tokens, {args.threads} thread(s), median of {args.reps} interleaved repetitions (ms)\n")
        print("| layer (in x out) | density | K | gather | csr (SDDMM) | compiled | best torch / compiled |")
        print("|---|---|---|---|---|---|---|")
        for shape in args.shapes.split(","):
            n_in, n_out = (int(v) for v in shape.split("x"))
            x, gy = torch.randn(args.tokens, n_in), torch.randn(args.tokens, n_out)
            for density in (float(d) for d in args.densities.split(",")):
                k = max(1, int(density * n_in * n_out))
                flat = torch.randperm(n_in * n_out)[:k].sort().values
                pattern = SparsePattern.from_flat_indices(flat, n_out, n_in)
                med = time_layer(lib, gy, x, pattern, args.reps)
                best = min(v for name, v in med.items() if name != "compiled")
                cells = [f"{med[name]:.3f}" if name in med else "-" for name in ("gather", "csr", "compiled")]
                print(f"| {shape} | {density:g} | {k:,} | " + " | ".join(cells) + f" | {best / med['compiled']:.2f} |")


if __name__ == "__main__":
    main()
