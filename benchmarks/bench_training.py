"""Training cost of a GRIN adapter against LoRA, SHiRA, Super-Tuning, full fine-tuning and the frozen base (issue 3).

What is measured, all on one Llama-shaped model built from a ``LlamaConfig`` (random weights, random tokens; the
loss is the causal-LM loss on every token):

* **step time**: one training step = forward + ``loss.backward()`` + ``AdamW.step()`` (+ ``zero_grad``), median
  over ``--steps`` steps after ``--warmup`` steps. All methods are timed in ONE process, interleaved: every round
  runs one step of every method, in an order rotated each round, so a burst of load from other jobs on a shared
  machine hits every method alike. Models share the (frozen) base weight tensors, so memory stays at one base copy
  (full fine-tuning gets its own copy, since it updates the weights).
* **frozen base fwd+bwd** (the reference): the same model, every weight frozen, the input embedding's output marked
  ``requires_grad`` (``enable_input_require_grads``), so backward propagates through all activations but computes no
  weight gradient; there is no optimizer step. Any adapter on every layer must do at least this much work.
* **peak memory**: every method again in a FRESH process (forked from a forkserver that has only imported the
  libraries): build the model and the adapter, reset the kernel's
  peak-RSS counter (``echo 5 > /proc/self/clear_refs``), run ``--mem-steps`` training steps (the first one allocates
  the AdamW state), and read ``VmHWM`` (peak resident set size) from ``/proc/self/status``. Reported as total peak
  RSS (Python + torch + weights + activations + optimizer) and as the increase over the RSS just before the steps.
  Falls back to ``ru_maxrss`` (whole-process peak) where clear_refs is not writable.
* **adapter file size**: ``save_pretrained`` then the size of ``adapter_model.safetensors`` (full FT: the fp32
  weights, ``sum(numel * 4)``).
* **merge time**: ``merge_and_unload()`` after the training steps, in the same subprocess.

Sweeps: GRIN density (step time vs density, with LoRA r=8 / full FT / frozen base as reference lines) comes from the
same interleaved run; a model-size sweep (GRIN 0.1%, LoRA r=8, full FT, frozen base) runs per size; a
bitsandbytes 4-bit base compares GRIN with QLoRA (LoRA r=8 on the 4-bit base).

GRIN layers take the fused CPU path (grin_peft.fused); ``--reference`` densities also run a GRIN model forced onto the
reference path (base layer + ``sparse_delta_linear``), side by side, to measure what the fused path gains.
``--bound`` densities run a diagnostic GRIN whose values gradient is replaced by zeros: what the fused path would
cost with a free sparse kernel, i.e. how much of GRIN's cost over the floor is the values' gradient.

Targets (issues 3 and 15), printed with PASS/FAIL and the measured ratio:
  T1  GRIN step time <= 0.9 x LoRA r=8's, at every density up to 1% (issue 15; issue 3 asked for <= 1.0 x)
  T2  GRIN step time <= 0.5 x full fine-tuning's, at every density up to 1%
  T4  GRIN step time <= 1.05 x the frozen base fwd+bwd, at every density up to 0.1% (issue 15)
  T3  GRIN peak memory <= 1.10 x (frozen base fwd+bwd peak + K x 20 bytes), K = trained entries, 20 bytes/entry =
      int32 index (4) + float32 value (4) + its gradient (4) + AdamW exp_avg and exp_avg_sq (8)

The models and methods live in ``training_methods.py``, the markdown/JSON/plot report in ``training_report.py``.

    python benchmarks/bench_training.py            # hidden 768, 4 layers, 4x128 tokens: ~8-15 min on 2 busy cores
    python benchmarks/bench_training.py --quick    # tiny model, ~1-2 min: checks the script end to end
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import multiprocessing
import os
import platform
import random
import resource
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import traceback
import warnings

# libgomp's default spin-waiting turns every parallel region into a scheduling lottery when other jobs share the
# cores (a 128x256x704 matmul took 32 ms with 2 threads vs 0.5 ms with 1 on a loaded 2-core machine); passive waiting
# fixes it. Must be set before torch loads OpenMP; an explicit OMP_WAIT_POLICY in the environment wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
# Memory probes run in child processes that inherit this: a fixed mmap threshold stops glibc from raising it after
# the first big free (its default), so every tensor >= 64 KiB is mmap'd and returned on free and RSS tracks live
# memory instead of heap left over from model construction. (The timing process already started with the default.)
os.environ.setdefault("MALLOC_MMAP_THRESHOLD_", "65536")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402
from training_methods import (  # noqa: E402
    BASE_METHODS,
    BYTES_PER_ENTRY,
    SIZE_METHODS,
    Trainer,
    apply_method,
    build_base,
    count_params,
    grin_entries,
    grin_held_bytes,
    grin_name,
    intermediate_for,
    load_4bit,
    make_batch,
    method_table,
    reference_name,
    shared_copy,
    spec_str,
)
from training_report import fmt_mb, report  # noqa: E402

warnings.filterwarnings("ignore")

HERE = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------------ interleaved timing
def time_interleaved(trainers: list[Trainer], steps: int, warmup: int, label: str) -> dict[str, dict]:
    """Wall-clock and process CPU time (all threads) of every step; every round runs each method once, in a fresh
    (seeded) random order, so neither a load burst nor a fixed predecessor favours one method."""
    walls = {t.name: [] for t in trainers}
    cpus = {t.name: [] for t in trainers}
    rng = random.Random(0)
    for r in range(warmup + steps):
        order = list(trainers)
        rng.shuffle(order)
        for t in order:
            gc.collect()
            start, cpu_start = time.perf_counter(), time.process_time()
            t.step()
            wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
            if r >= warmup:
                walls[t.name].append(wall)
                cpus[t.name].append(cpu)
        done = (
            [f"{t.name}={walls[t.name][-1]:.2f}s/{cpus[t.name][-1]:.2f}cpu" for t in trainers]
            if r >= warmup
            else ["warmup"]
        )
        print(f"  [{label}] round {r + 1}/{warmup + steps}: " + ", ".join(done), flush=True)
    return {
        name: {
            "median_s": statistics.median(walls[name]),
            "min_s": min(walls[name]),
            "max_s": max(walls[name]),
            "cpu_median_s": statistics.median(cpus[name]),
            "times_s": walls[name],
            "cpu_times_s": cpus[name],
        }
        for name in walls
    }


# ------------------------------------------------------------------------------------------------ memory subprocess
def saved_activation_bytes(trainer: Trainer) -> int:
    """Bytes autograd keeps from forward to backward (unique storages, parameters and buffers excluded): the
    allocator-independent part of the activation memory, read with saved_tensors_hooks during one forward."""
    model = trainer.model
    own = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    seen: dict[int, int] = {}

    def pack(tensor):
        if tensor.layout == torch.sparse_coo:  # SHiRA's delta
            parts = (tensor._indices(), tensor._values())
        elif tensor.layout != torch.strided:
            parts = (tensor.crow_indices(), tensor.col_indices(), tensor.values())
        else:
            parts = (tensor,)
        for part in parts:
            storage = part.untyped_storage()
            if storage.data_ptr() not in own:
                seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        out = model(**trainer.batch)
    out.loss.backward()
    if trainer.opt is not None:
        trainer.opt.zero_grad(set_to_none=True)
    return sum(seen.values())


def rss_now() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def reset_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def read_peak() -> int:
    with open("/proc/self/status") as handle:
        for line in handle:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def probe(job: dict) -> dict:
    """Runs in a fresh process (see run_probe): peak memory of `mem_steps` training steps, adapter size, merge time."""
    torch.set_num_threads(job["threads"])
    spec, kind, param = job["spec"], job["kind"], job["param"]
    base = load_4bit(job["q4_dir"]) if job.get("q4_dir") else build_base(spec)
    model = apply_method(base, kind, param)
    batch = make_batch(spec)
    trainer = Trainer(job["name"], model, batch)
    gc.collect()
    start_rss = rss_now()
    exact = reset_peak()
    for _ in range(job["mem_steps"]):
        trainer.step()
    peak = read_peak() if exact else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    saved = saved_activation_bytes(trainer)
    result = {
        "name": job["name"],
        "peak_rss_bytes": peak,
        "rss_before_steps_bytes": start_rss,
        "peak_above_start_bytes": peak - start_rss,
        "peak_method": "VmHWM after clear_refs" if exact else "ru_maxrss (whole process)",
        "trainable": trainer.trainable(),
        "saved_for_backward_bytes": saved,
    }
    if kind in ("grin", "grin_reference"):
        result["entries"] = grin_entries(model)
        result["grin_held_bytes"] = grin_held_bytes(model)
    if kind == "full":
        result["adapter_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    elif kind != "frozen":
        with tempfile.TemporaryDirectory() as tmp:
            model.save_pretrained(tmp)
            result["adapter_bytes"] = os.path.getsize(os.path.join(tmp, "adapter_model.safetensors"))
        if not job.get("q4_dir"):
            start = time.perf_counter()
            model.merge_and_unload()
            result["merge_s"] = time.perf_counter() - start
    return result


_PRELOAD = ["torch", "transformers", "transformers.models.llama.modeling_llama", "peft", "grin_peft", "bitsandbytes"]


def _probe_child(job: dict, conn) -> None:
    try:
        conn.send(("ok", probe(job)))
    except BaseException:  # noqa: BLE001  (report any failure to the parent)
        conn.send(("error", traceback.format_exc()))
    finally:
        conn.close()


def run_probe(job: dict) -> dict:
    """`probe(job)` in a fresh process forked from a forkserver that only imported the libraries (never built a
    model or ran a parallel region): a clean process per method without paying ~10 s of imports each time."""
    ctx = multiprocessing.get_context("forkserver")
    ctx.set_forkserver_preload(_PRELOAD)
    receiver, sender = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_probe_child, args=(job, sender))
    proc.start()
    sender.close()
    try:
        status, payload = receiver.recv()
    except EOFError:
        status, payload = "error", "the probe process died without a result (out of memory?)"
    proc.join()
    if status != "ok":
        raise RuntimeError(f"memory probe '{job['name']}' failed:\n{payload}")
    return payload


# ------------------------------------------------------------------------------------------------ profiling
def profile_steps(trainers: list[Trainer], steps: int = 2, top: int = 12) -> dict[str, dict]:
    """`steps` profiled steps per trainer. On the reference path GRIN's sparse kernels are labelled with
    record_function (a wrap done here, in the benchmark); on the fused path each GRIN layer is one autograd node
    (`_FusedSparseLinear` and its backward), whose time less its base matmul child (`aten::linear` forward, the first
    `aten::mm` backward) is the delta's share. The ops inside are summed separately, so the overhead GRIN adds on top
    of the base model's own work is read off within the same steps, independent of machine noise between steps."""
    from torch.profiler import ProfilerActivity, profile, record_function

    import grin_peft.sparse as sparse

    orig_fwd, orig_bwd = sparse._csr_forward, sparse._csr_backward

    def fwd(*a, **k):
        with record_function("grin::sparse_forward"):
            return orig_fwd(*a, **k)

    def bwd(*a, **k):
        with record_function("grin::sparse_backward"):
            return orig_bwd(*a, **k)

    def walk(event, acc):
        for child in event.cpu_children:
            acc[child.name] = acc.get(child.name, 0.0) + child.self_cpu_time_total / 1e6
            walk(child, acc)

    sparse._csr_forward, sparse._csr_backward = fwd, bwd
    out = {}
    try:
        for t in trainers:
            t.step()
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                start = time.perf_counter()
                for _ in range(steps):
                    t.step()
                wall = (time.perf_counter() - start) / steps
            events = prof.key_averages()
            by_key = {e.key: e for e in events}
            inside: dict[str, float] = {}
            fused = {"_FusedSparseLinear": 0.0, "_FusedSparseLinearBackward": 0.0}
            for event in prof.events():
                if event.name.startswith("grin::"):
                    own = "python/glue (label self time)"
                    inside[own] = inside.get(own, 0.0) + event.self_cpu_time_total / 1e6
                    walk(event, inside)
                elif event.name in fused:
                    base_op = "aten::linear" if event.name == "_FusedSparseLinear" else "aten::mm"
                    children = list(event.cpu_children)
                    base = next((c for c in children if c.name == base_op), None)
                    fused[event.name] += (event.cpu_time_total - (base.cpu_time_total if base else 0)) / 1e6
                    own = "python/glue (node self time)"
                    inside[own] = inside.get(own, 0.0) + event.self_cpu_time_total / 1e6
                    for child in children:
                        if child is not base:
                            inside[child.name] = inside.get(child.name, 0.0) + child.self_cpu_time_total / 1e6
                            walk(child, inside)

            def per_step(key, field="self_cpu_time_total", table=by_key):
                e = table.get(key)
                return 0.0 if e is None else getattr(e, field) / 1e6 / steps

            out[t.name] = {
                "wall_s_per_step": wall,
                "self_cpu_s_per_step": sum(e.self_cpu_time_total for e in events) / 1e6 / steps,
                "dense_mm_s": per_step("aten::mm"),
                "dense_mm_calls": by_key["aten::mm"].count // steps if "aten::mm" in by_key else 0,
                "sparse_forward_s": per_step("grin::sparse_forward", "cpu_time_total")
                + fused["_FusedSparseLinear"] / steps,
                "sparse_backward_s": per_step("grin::sparse_backward", "cpu_time_total")
                + fused["_FusedSparseLinearBackward"] / steps,
                "inside_sparse_op_s": {k: v / steps for k, v in sorted(inside.items(), key=lambda kv: -kv[1])},
                "adamw_s": per_step("Optimizer.step#AdamW.step", "cpu_time_total"),
                "top_self": [
                    (e.key, e.self_cpu_time_total / 1e6 / steps, e.count // steps)
                    for e in sorted(events, key=lambda e: e.self_cpu_time_total, reverse=True)[:top]
                ],
            }
    finally:
        sparse._csr_forward, sparse._csr_backward = orig_fwd, orig_bwd
    return out


# ------------------------------------------------------------------------------------------------ main
def thread_check(threads: int) -> dict:
    """Median time of a small and a larger matmul with 1 thread and with `threads`: flags oversubscription."""
    out = {}
    small = (torch.randn(128, 256), torch.randn(256, 704))
    large = (torch.randn(512, 768), torch.randn(768, 2112))
    for n in sorted({1, threads}):
        torch.set_num_threads(n)
        for label, (a, b), reps in (("small_us", small, 100), ("large_us", large, 10)):
            ts = []
            for _ in range(reps):
                start = time.perf_counter()
                a @ b
                ts.append(time.perf_counter() - start)
            out[f"{n}t_{label}"] = statistics.median(ts) * 1e6
    torch.set_num_threads(threads)
    return out


def parse_size(text: str) -> tuple[int, int]:
    hidden, layers = text.lower().split("x")
    return int(hidden), int(layers)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=768)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--intermediate", type=int, default=None, help="default: 2.75 x hidden, multiple of 64")
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=128)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=["float32", "bfloat16"],
        help="the base model's weights (main comparison)",
    )
    parser.add_argument("--steps", type=int, default=10, help="timed steps per method (after warmup)")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--mem-steps", type=int, default=2, help="training steps per memory subprocess")
    parser.add_argument("--densities", default="1e-4,1e-3,1e-2,5e-2", help="GRIN densities (fractions)")
    parser.add_argument(
        "--reference", default="1e-3,1e-2", help="densities also run on the reference path ('' for none)"
    )
    parser.add_argument(
        "--bound", default="", help="densities also run without the values' gradient (diagnostic; '' for none)"
    )
    parser.add_argument(
        "--baselines",
        default=",".join(BASE_METHODS),
        help="comma list of the non-GRIN methods to run (the frozen base and LoRA r=8 always run)",
    )
    parser.add_argument("--sizes", default="512x4,768x4,1024x4", help="size sweep, HIDDENxLAYERS,...")
    parser.add_argument("--size-steps", type=int, default=6)
    parser.add_argument("--q4-hidden", type=int, default=512)
    parser.add_argument("--q4-layers", type=int, default=4)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--skip", default="", help="comma list of parts to skip: memory,sizes,q4,profile")
    parser.add_argument("--quick", action="store_true", help="tiny configuration to check the script end to end")
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    parser.add_argument("--replot", metavar="JSON", help="only rebuild the tables and plots from a training.json")
    args = parser.parse_args()

    if args.replot:
        with open(args.replot) as handle:
            saved = json.load(handle)
        report(saved, [float(d) for d in saved["settings"]["densities"].split(",")], args.out)
        return

    if args.quick:
        args.hidden, args.layers, args.seq, args.batch = 256, 2, 64, 2
        args.steps, args.size_steps, args.mem_steps = 3, 2, 1
        args.sizes, args.q4_hidden, args.q4_layers = "128x2,256x2", 128, 2
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    torch.set_num_threads(args.threads)
    densities = [float(d) for d in args.densities.split(",")]
    spec = {
        "hidden": args.hidden,
        "layers": args.layers,
        "intermediate": args.intermediate or intermediate_for(args.hidden),
        "vocab": args.vocab,
        "batch": args.batch,
        "seq": args.seq,
        "dtype": args.dtype,
    }
    command = "python " + " ".join(shlex.quote(a) for a in ["benchmarks/bench_training.py"] + sys.argv[1:])
    results: dict = {
        "command": command,
        "model": spec,
        "model_params": count_params(spec),
        "settings": {k: v for k, v in vars(args).items()},
        "environment": {
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "cpu_count": os.cpu_count(),
            "platform": platform.platform(),
            "loadavg_start": os.getloadavg(),
            "OMP_WAIT_POLICY": os.environ.get("OMP_WAIT_POLICY"),
            "thread_check": thread_check(args.threads),
        },
        "bytes_per_entry_formula": BYTES_PER_ENTRY,
    }
    t_start = time.time()
    print(f"# bench_training: {spec_str(spec)} ({count_params(spec) / 1e6:.1f}M params)\n$ {command}", flush=True)

    # ---- 1. main comparison + density sweep: one interleaved run
    reference = [float(d) for d in args.reference.split(",") if d.strip()]
    bound = [float(d) for d in args.bound.split(",") if d.strip()]
    methods = method_table(densities, reference, bound)
    wanted = set(args.baselines.split(",")) | {"frozen base fwd+bwd", "LoRA r=8"}
    methods = {n: m for n, m in methods.items() if m[0].startswith("grin") or n in wanted}
    base = build_base(spec)
    batch = make_batch(spec)
    trainers = []
    for name, (kind, param) in methods.items():
        model = copy.deepcopy(base) if kind == "full" else shared_copy(base)
        trainers.append(Trainer(name, apply_method(model, kind, param), batch, kind=kind))
    trainable = {t.name: t.trainable() for t in trainers}
    times = time_interleaved(trainers, args.steps, args.warmup, "main")
    for name in times:
        times[name]["trainable"] = trainable[name]
    results["main"] = times

    if "profile" not in skip:
        profiled = ("frozen base fwd+bwd", "LoRA r=8", grin_name(1e-2), grin_name(1e-3), reference_name(1e-3))
        picks = [t for t in trainers if t.name in profiled]
        print("  profiling two steps each of: " + ", ".join(t.name for t in picks), flush=True)
        results["profile"] = profile_steps(picks)
    del trainers, base
    gc.collect()

    # ---- 2. memory, adapter size, merge time: fresh subprocess per method
    if "memory" not in skip:
        results["memory"] = {}
        for name, (kind, param) in methods.items():
            if kind == "grin_bound":
                continue  # a step-time diagnostic; its memory is GRIN's
            job = {"name": name, "kind": kind, "param": param, "spec": spec, "threads": args.threads}
            job["mem_steps"] = args.mem_steps
            results["memory"][name] = run_probe(job)
            r = results["memory"][name]
            print(f"  [memory] {name}: peak {fmt_mb(r['peak_rss_bytes'])} MiB", flush=True)

    # ---- 3. model-size sweep
    if "sizes" not in skip:
        results["sizes"] = []
        for text in args.sizes.split(","):
            hidden, layers = parse_size(text)
            sspec = dict(spec, hidden=hidden, layers=layers, intermediate=intermediate_for(hidden))
            if sspec == spec and all(name in results["main"] for name in SIZE_METHODS):
                # the main run already measured this size (with more steps)
                stimes = {name: results["main"][name] for name in SIZE_METHODS}
                results["sizes"].append(
                    {"spec": sspec, "params": count_params(sspec), "times": stimes, "from": "main"}
                )
                continue
            sbase = build_base(sspec)
            sbatch = make_batch(sspec)
            all_methods = method_table([1e-3])
            strainers = []
            for name in SIZE_METHODS:
                kind, param = all_methods[name]
                model = copy.deepcopy(sbase) if kind == "full" else shared_copy(sbase)
                strainers.append(Trainer(name, apply_method(model, kind, param), sbatch))
            stimes = time_interleaved(strainers, args.size_steps, args.warmup, f"size {text}")
            results["sizes"].append({"spec": sspec, "params": count_params(sspec), "times": stimes})
            del strainers, sbase
            gc.collect()

    # ---- 4. bitsandbytes 4-bit base: GRIN vs QLoRA
    if "q4" not in skip:
        qspec = dict(
            spec,
            hidden=args.q4_hidden,
            layers=args.q4_layers,
            intermediate=intermediate_for(args.q4_hidden),
            dtype="float32",
        )  # 4-bit weights with float32 compute, whatever --dtype says
        qdir = tempfile.mkdtemp(prefix="bench_training_q4_")
        try:
            build_base(qspec).save_pretrained(qdir)
            qmethods = {
                "frozen base fwd+bwd": ("frozen", None),
                "QLoRA r=8": ("lora", 8),
                "GRIN 0.1%": ("grin", 1e-3),
                "GRIN 1%": ("grin", 1e-2),
            }
            qbatch = make_batch(qspec)
            qtrainers = [Trainer(n, apply_method(load_4bit(qdir), k, p), qbatch) for n, (k, p) in qmethods.items()]
            qtimes = time_interleaved(qtrainers, args.size_steps, args.warmup, "4-bit")
            for t in qtrainers:
                qtimes[t.name]["trainable"] = t.trainable()
            del qtrainers
            gc.collect()
            qmem = {}
            if "memory" not in skip:
                for name, (kind, param) in qmethods.items():
                    job = {"name": name, "kind": kind, "param": param, "spec": qspec, "threads": args.threads}
                    job.update(mem_steps=args.mem_steps, q4_dir=qdir)
                    qmem[name] = run_probe(job)
                    print(f"  [memory 4-bit] {name}: peak {fmt_mb(qmem[name]['peak_rss_bytes'])} MiB", flush=True)
            results["q4"] = {"spec": qspec, "params": count_params(qspec), "times": qtimes, "memory": qmem}
        finally:
            shutil.rmtree(qdir, ignore_errors=True)

    results["environment"]["loadavg_end"] = os.getloadavg()
    results["total_wall_s"] = time.time() - t_start
    report(results, densities, args.out)


if __name__ == "__main__":
    main()
