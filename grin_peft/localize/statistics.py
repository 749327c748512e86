"""Per-entry gradient statistics of the targeted weights, accumulated over data at the original weights.

Why a tap and not ``weight.grad``: quantized bases (bitsandbytes 8-bit/4-bit) have no usable weight gradient, and
asking autograd for ``.grad`` on every targeted weight would allocate a full gradient copy in the model dtype. In
scoring mode every GRIN layer's output passes through :class:`_GradTap`, an identity autograd function that saves
the layer input ``x`` and, in backward, computes the weight gradient ``grad_y^T @ x`` (tokens flattened, result in
float32) and adds its statistic into a float32 accumulator. A scalar ``dummy`` that requires grad is fed into every
tap, so autograd reaches the taps although every parameter is frozen; nothing allocates ``.grad``. This works
unchanged under gradient checkpointing (the tap is recomputed with its layer) and for any base layer whose forward
is differentiable in its input.

What is accumulated, per entry and per pass (one data set). A *unit* is one example (``unit='example'``, default)
or one batch; ``g_u`` is the gradient of the unit's *summed* answer-token loss and ``T_u`` its answer tokens:

* ``sum``: ``sum_u g_u`` (signed; the same for both units, one GEMM per batch);
* ``abs``: ``sum_u |g_u|``;
* ``sq``: ``sum_u g_u^2``;
* ``sq_mean``: ``sum_u (g_u / T_u)^2`` (squared gradient of the unit's *mean* loss: the Fisher estimate of SSD and
  LoKU).

Per-example units matter: gradients of a converged model cancel when summed, within a batch as across batches, so
``|g|`` or ``g^2`` of whole batches lose most of what distinguishes weights (measured on planted sequences: the
top-1% ``sum_sq`` ratio mask raised the forget loss 2.5x as much as the retain loss with per-example units, 1.2x with
batches of 8). Per-example terms come out of the batch's own backward: each module's weight gradient is split per
example (``B`` GEMMs of ``T`` tokens instead of one of ``B*T``, the same flops), so batching stays efficient.

Exactness across processes: floating-point addition is not associative, so summing per rank and all-reducing would
give different bits than one process, and selection ties at the budget's threshold would move. Instead, batches are
dealt round-robin (global batch ``s * world + rank`` at step ``s``); after each step every rank exchanges its batch's
terms module by module (in name order) with ``all_gather`` and adds all of them in global batch order. Every
rank thus performs exactly the single-process sequence of float32 operations, bit for bit, provided a batch's
gradient itself does not depend on the process (true for the same kernels and data; measured thread-invariant with
MKL on CPU). The price: per rank, one more float32 copy of the targeted weights (the step's gradients wait for the
end of backward, so no collective runs inside autograd and a module that did not run cannot hang the others), a
transient ``world x`` the largest module during the exchange, and ``world / 2`` times the traffic of a DDP
all-reduce.
"""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..data import IGNORE_INDEX
from ..errors import GrinError
from ..layer import GrinLayer
from .select import all_finite

KINDS = ("sum", "abs", "sq", "sq_mean")
# per-example statistics: weight rows per block (float32 entries). One example's [rows, T] x [T, in] GEMM per block:
# thin blocks (64k entries = 46 rows of a 1408-wide weight) ran those GEMMs up to 1.5x slower than one batch GEMM;
# 256k entries (1 MiB, a core's L2 here) was fastest or tied on 256-1408 wide weights (issue 15, BENCHMARKS §4)
_BLOCK_ELEMENTS = 1 << 18
_MIN_BLOCK_ROWS = 8
UNITS = ("example", "batch")


@dataclass(frozen=True)
class World:
    """Where this process stands in a torch.distributed job (size 1 without one)."""

    rank: int = 0
    size: int = 1
    group: object | None = None

    @classmethod
    def current(cls, group: object | None = None) -> World:
        """The default (or given) process group when torch.distributed is initialised, else a single process."""
        if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return cls()
        return cls(torch.distributed.get_rank(group), torch.distributed.get_world_size(group), group)

    def all_gather(self, tensor: torch.Tensor) -> list[torch.Tensor]:
        """Every rank's tensor, in rank order."""
        parts = [torch.empty_like(tensor) for _ in range(self.size)]
        torch.distributed.all_gather(parts, tensor, group=self.group)
        return parts


@dataclass
class Statistic:
    """One pass's accumulators (float32, in each base weight's stored layout) and what they were summed over.

    ``units`` counts the gradients that entered the statistic: examples (``unit='example'``) or batches, in both
    cases only those with at least one answer token.
    """

    kind: str
    unit: str
    values: dict[str, torch.Tensor]
    batches: int = 0
    examples: int = 0
    units: int = 0
    tokens: int = 0
    seconds: float = 0.0


def weight_gradient(
    grad_y: torch.Tensor, x: torch.Tensor, transposed: bool, out: torch.Tensor | None = None
) -> torch.Tensor:
    """The gradient of a linear weight from its output gradient and input, in float32, as the weight is stored.

    ``y = x W^T`` gives ``dW = grad_y^T x`` (out x in); Conv1D stores W as (in, out), so there it is ``x^T grad_y``.
    bf16 activations keep a bf16 GEMM (float32 accumulation inside the kernel, one bf16 rounding of the result, as
    the model's own weight gradient would have): a float32 GEMM costs about 3x on CPUs with bf16 units and far more
    on GPUs. float16 is upcast, since its range could overflow. ``out`` reuses a buffer: fresh large CPU
    allocations are page-faulted in, which costs as much as the GEMM.
    """
    dtype = torch.bfloat16 if grad_y.dtype == x.dtype == torch.bfloat16 else torch.float32
    gy = grad_y.reshape(-1, grad_y.shape[-1]).to(dtype)
    xx = x.reshape(-1, x.shape[-1]).to(dtype)
    a, b = (xx.t(), gy) if transposed else (gy.t(), xx)
    if dtype == torch.float32:
        return torch.mm(a, b) if out is None else torch.mm(a, b, out=out)
    grad = torch.mm(a, b)
    return grad.float() if out is None else out.copy_(grad)


def _transform(grad: torch.Tensor, kind: str, tokens: int) -> torch.Tensor:
    """One unit's gradient -> its term of the statistic, in place.

    Separate, exactly rounded ops (no fused multiply-add) so results cannot depend on how a kernel splits the
    tensor over threads or vector lanes.
    """
    if kind == "abs":
        return grad.abs_()
    if kind == "sq_mean":
        grad.div_(tokens)
    if kind in ("sq", "sq_mean"):
        return grad.mul_(grad)
    return grad


class _GradTap(torch.autograd.Function):
    """Identity on a layer's output whose backward hands (grad_y, x) to a sink.

    Returns ``y.detach()`` rather than ``y``: autograd treats an input returned as-is as a view, and downstream
    in-place ops on views made by custom functions are forbidden.
    """

    @staticmethod
    def forward(ctx, y: torch.Tensor, x: torch.Tensor, dummy: torch.Tensor, sink: _Sink) -> torch.Tensor:
        ctx.sink = sink
        ctx.save_for_backward(x)
        return y.detach()

    @staticmethod
    def backward(ctx, grad_y: torch.Tensor):
        (x,) = ctx.saved_tensors
        ctx.sink.collector.add(ctx.sink, grad_y, x)
        return grad_y, None, None, None


class _Join(torch.autograd.Function):
    """Identity that makes a tensor require grad through ``dummy`` (reentrant checkpointing needs such inputs)."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, dummy: torch.Tensor) -> torch.Tensor:
        return y.detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        return None, None


@dataclass
class _Sink:
    """One module's end of the tap."""

    name: str
    transposed: bool
    collector: _Collector


class _Collector:
    """Accumulators of one pass; adds each batch's contribution in global batch order."""

    def __init__(self, layers: dict[str, GrinLayer], kind: str, unit: str, world: World) -> None:
        if kind not in KINDS:
            raise GrinError(f"unknown statistic kind {kind!r}; expected one of {', '.join(KINDS)}.")
        if unit not in UNITS:
            raise GrinError(f"unknown gradient unit {unit!r}; expected one of {', '.join(UNITS)}.")
        self.kind = kind
        self.unit = unit
        self.world = world
        self.names = sorted(layers)
        self.acc = {}
        for name, layer in layers.items():
            weight = layer.get_base_layer().weight
            shape = (layer.out_features, layer.in_features)
            self.acc[name] = torch.zeros(
                shape[::-1] if _transposed(layer) else shape, dtype=torch.float32, device=weight.device
            )
        self.pending: dict[str, torch.Tensor] = {}
        self.seen: set[str] = set()
        self.example_tokens: list[int] = []

    def begin_batch(self, example_tokens: list[int], seq_len: int) -> None:
        self.example_tokens = example_tokens
        self.seq_len = seq_len
        self.seen.clear()

    def add(self, sink: _Sink, grad_y: torch.Tensor, x: torch.Tensor) -> None:
        """The batch's term of the statistic for one module: one gradient, or the sum of per-example terms."""
        if sink.name in self.seen:
            raise GrinError(
                f"{sink.name} ran more than once in one forward pass (shared weights?); gradient statistics need "
                "each targeted module to run once per batch."
            )
        self.seen.add(sink.name)
        if self.kind == "sum" or self.unit == "batch":
            # a sum of per-example gradients is the batch gradient: one GEMM
            term = _transform(weight_gradient(grad_y, x, sink.transposed), self.kind, sum(self.example_tokens))
            if self.world.size > 1:
                self.pending[sink.name] = term  # exchanged after backward, see end_step
            else:
                self.acc[sink.name].add_(term)
            return
        grad_y, x = self._per_example(sink.name, grad_y), self._per_example(sink.name, x)
        acc = self.acc[sink.name]
        examples = [(i, tokens) for i, tokens in enumerate(self.example_tokens) if tokens]
        if not examples:
            return
        # one block of weight rows at a time through every example, so the per-example gradients stay in cache
        # instead of streaming a weight-sized tensor through memory per example (elementwise results unchanged)
        term = torch.empty_like(acc) if self.world.size > 1 else None
        step = max(_MIN_BLOCK_ROWS, _BLOCK_ELEMENTS // acc.shape[1])
        first, part = torch.empty((2, min(step, acc.shape[0]), acc.shape[1]), dtype=torch.float32, device=acc.device)
        for start in range(0, acc.shape[0], step):
            rows = slice(start, min(start + step, acc.shape[0]))
            size = rows.stop - start
            block = term[rows] if term is not None else first[:size]
            for n, (i, tokens) in enumerate(examples):
                # the stored weight's rows are grad_y's features (out x in), or x's for Conv1D (in x out)
                gy, xx = (grad_y[i], x[i][..., rows]) if sink.transposed else (grad_y[i][..., rows], x[i])
                out = block if n == 0 else part[:size]
                _transform(weight_gradient(gy, xx, sink.transposed, out=out), self.kind, tokens)
                if n:
                    block.add_(out)
            if term is None:
                acc[rows].add_(block)
        if term is not None:
            self.pending[sink.name] = term  # exchanged after backward, see end_step

    def _per_example(self, name: str, t: torch.Tensor) -> torch.Tensor:
        batch = len(self.example_tokens)
        if t.dim() >= 3 and t.shape[0] == batch:
            return t
        if t.dim() == 2 and t.shape[0] == batch * self.seq_len:
            return t.view(batch, self.seq_len, t.shape[-1])
        raise GrinError(
            f"{name}: cannot split its input of shape {tuple(t.shape)} into the batch's {batch} examples; use "
            "grad_unit='batch'."
        )

    def end_step(self, meta: list[int]) -> list[list[int]]:
        """Exchange the step's batch terms across ranks and add them in rank (= global batch) order.

        ``meta`` is this rank's [valid, finite, tokens, units, examples, fingerprint]; returns every rank's, in
        rank order.
        """
        if self.world.size == 1:
            return [meta]
        device = next(iter(self.acc.values())).device
        metas = [m.tolist() for m in self.world.all_gather(torch.tensor(meta, dtype=torch.int64, device=device))]
        if len({m[5] for m in metas}) != 1:
            raise GrinError(
                "the ranks were given different data: pass the same, unsharded forget/retain data on every rank "
                "(localize deals batches to ranks itself)."
            )
        if all(m[1] for m in metas):
            for name in self.names:
                term = self.pending.pop(name, None)
                term = torch.zeros_like(self.acc[name]) if term is None else term
                for m, part in zip(metas, self.world.all_gather(term)):
                    if m[0]:
                        self.acc[name].add_(part)
        self.pending.clear()
        return metas


def _transposed(layer: GrinLayer) -> bool:
    # PEFT LoRA layers (FILA's statistics, grin_peft.fila) state a Conv1D base's (in, out) layout as fan_in_fan_out
    return bool(getattr(layer, "_grin_transposed", getattr(layer, "fan_in_fan_out", False)))


def answer_tokens(labels: torch.Tensor) -> list[int]:
    """Per example, the tokens that carry loss after the causal shift (labels align with input_ids, as in
    transformers)."""
    labels = labels.reshape(-1, labels.shape[-1]) if labels.dim() > 1 else labels.reshape(1, -1)
    return [int(n) for n in (labels[:, 1:] != IGNORE_INDEX).sum(dim=1)]


def answer_loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Summed next-token cross-entropy over the answer tokens, in float32.

    Summed, not averaged, so a batch's gradient is the sum of its tokens' gradients and statistics can be
    normalised by token or batch counts afterwards.
    """
    inputs = {k: v for k, v in batch.items() if k != "labels" and isinstance(v, torch.Tensor)}
    if getattr(getattr(model, "config", None), "use_cache", None) is not None:
        inputs["use_cache"] = False
    out = model(**inputs)
    logits = out.logits if hasattr(out, "logits") else out[0] if isinstance(out, (tuple, list)) else out
    labels = batch["labels"].to(logits.device)
    return F.cross_entropy(
        logits[..., :-1, :].reshape(-1, logits.shape[-1]).float(),
        labels[..., 1:].reshape(-1),
        ignore_index=IGNORE_INDEX,
        reduction="sum",
    )


@contextmanager
def scoring_mode(
    model: nn.Module, layers: dict[str, GrinLayer], collector: _Collector, adapters: bool = False
) -> Iterator[None]:
    """Run the model at its original weights with taps on the targeted layers, then put everything back.

    Adapters off (deltas ignored; ``adapters=True`` leaves them as they are, so the taps see each layer's output
    with its delta and the statistics are taken at the current weights), every parameter frozen (no ``.grad``
    anywhere), dropout off (eval mode) except that layers with gradient checkpointing keep ``training=True`` on
    themselves only, since transformers checkpoints only in training mode, and so do bitsandbytes 4-bit layers, which
    in eval mode on CPU switch to a kernel that gradients cannot pass.
    """
    all_layers = [m for m in model.modules() if isinstance(m, GrinLayer)]
    modules = list(model.modules())
    four_bit = [m for m in modules if getattr(getattr(m, "weight", None), "quant_state", None) is not None]
    if any(getattr(m.weight.quant_state, "packing_format_for_cpu", False) for m in four_bit):
        raise GrinError(
            "bitsandbytes repacked 4-bit weights for its CPU inference kernel (after a forward in eval mode without "
            "gradients), and gradients do not flow through that layout. Localize right after loading the model, or "
            "keep it in train mode for earlier forwards."
        )
    training = [m.training for m in modules]
    params = list(model.parameters())
    requires_grad = [p.requires_grad for p in params]
    disabled = [layer.disable_adapters for layer in all_layers]
    device = next(iter(collector.acc.values())).device
    dummy = torch.zeros((), device=device, requires_grad=True)
    handles = []
    try:
        model.eval()
        checkpointing = [m for m in modules if getattr(m, "gradient_checkpointing", False) is True]
        # bnb 4-bit layers repack for a CPU inference kernel without autograd when run in eval mode
        for m in checkpointing + four_bit:
            m.training = True
        if not adapters:
            for layer in all_layers:
                layer.enable_adapters(False)
        for p in params:
            p.requires_grad_(False)
        for name, layer in layers.items():
            handles.append(layer.register_forward_hook(_tap_hook(_Sink(name, _transposed(layer), collector), dummy)))
        embeddings = getattr(model, "get_input_embeddings", lambda: None)()
        if checkpointing and isinstance(embeddings, nn.Module):
            handles.append(embeddings.register_forward_hook(lambda m, a, out: _Join.apply(out, dummy)))
        yield
    finally:
        for handle in handles:
            handle.remove()
        if not adapters:
            for layer, was_disabled in zip(all_layers, disabled):
                layer.enable_adapters(not was_disabled)
        for p, flag in zip(params, requires_grad):
            p.requires_grad_(flag)
        for m, flag in zip(modules, training):
            m.training = flag


def _tap_hook(sink: _Sink, dummy: torch.Tensor):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return _GradTap.apply(output, args[0], dummy, sink)

    return hook


def _fingerprint(batches: list[dict[str, torch.Tensor]]) -> int:
    """A cheap checksum of a step's batches, to catch ranks that were given different data."""
    crc = 0
    for batch in batches:
        crc = zlib.crc32(batch["input_ids"].detach().cpu().numpy().tobytes(), crc)
    return crc & 0x7FFFFFFF


def _steps(batches: Iterable[dict[str, torch.Tensor]], size: int) -> Iterator[list[dict[str, torch.Tensor]]]:
    group = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def collect_statistic(
    model: nn.Module,
    layers: dict[str, GrinLayer],
    batches: Iterable[dict[str, torch.Tensor]],
    kind: str,
    *,
    unit: str = "example",
    world: World | None = None,
    progress: bool = True,
    desc: str = "scoring",
    total: int | None = None,
    adapters: bool = False,
) -> Statistic:
    """One pass over ``batches`` (the same global sequence on every rank): accumulate ``kind`` for every layer.

    ``layers`` are GRIN layers, or any PEFT tuner layer over a linear base (:mod:`grin_peft.fila` passes LoRA
    layers; their adapters are not switched off here, so a fresh LoRA adapter, whose output is 0, is what they need).

    ``unit='example'`` applies the statistic to each example's gradient (split out of the batch's weight-gradient
    GEMM, so batching stays efficient); ``'batch'`` to each batch's. Gradients are taken at the original weights
    (adapters off), or with ``adapters=True`` at the current ones (base + active deltas). Raises GrinError on a
    non-finite loss (naming the batch) and when no batch holds an answer token.
    """
    from tqdm.auto import tqdm

    world = world or World()
    start = time.perf_counter()
    collector = _Collector(layers, kind, unit, world)
    device = input_device(model)
    stat = Statistic(kind, unit, collector.acc)
    steps = None if total is None else -(-total // world.size)
    progress_bar = tqdm(total=steps, desc=desc, unit="step", disable=not progress or world.rank != 0)
    with scoring_mode(model, layers, collector, adapters), progress_bar:
        for step, group in enumerate(_steps(batches, world.size)):
            mine = group[world.rank] if world.rank < len(group) else None
            example_tokens = answer_tokens(mine["labels"]) if mine is not None else []
            tokens = sum(example_tokens)
            units = sum(1 for t in example_tokens if t) if unit == "example" else int(tokens > 0)
            finite = True
            if tokens:
                collector.begin_batch(example_tokens, int(mine["input_ids"].shape[-1]))
                loss = answer_loss(model, {k: _to(v, device) for k, v in mine.items()})
                finite = bool(torch.isfinite(loss))
                if finite:
                    loss.backward()
            fingerprint = _fingerprint(group) if world.size > 1 else 0
            meta = [int(tokens > 0), int(finite), tokens, units, len(example_tokens), fingerprint]
            for index, (valid, batch_finite, batch_tokens, batch_units, batch_examples, _) in enumerate(
                collector.end_step(meta)
            ):
                if not batch_finite:
                    raise GrinError(
                        f"{desc}: the loss of batch {step * world.size + index} is NaN/Inf; fix the data or the model "
                        "(e.g. a dtype overflow) before localizing."
                    )
                stat.examples += batch_examples
                if valid:
                    stat.batches += 1
                    stat.tokens += batch_tokens
                    stat.units += batch_units
            progress_bar.update(1)
    if stat.batches == 0:
        raise GrinError(f"{desc}: no batch holds an answer token (all labels are {IGNORE_INDEX}); nothing to score.")
    for name, acc in stat.values.items():
        if not all_finite(acc):
            raise GrinError(f"{desc}: gradients of {name} are NaN/Inf (overflow in the model dtype?).")
    stat.seconds = time.perf_counter() - start
    return stat


def input_device(model: nn.Module) -> torch.device:
    """Where a batch goes: the input embeddings' device (multi-device models dispatch from there), else the first
    parameter's."""
    embeddings = getattr(model, "get_input_embeddings", lambda: None)()
    for module in (embeddings, model):
        if isinstance(module, nn.Module):
            for param in module.parameters():
                return param.device
    return torch.device("cpu")


def _to(value: object, device: torch.device) -> object:
    return value.to(device) if isinstance(value, torch.Tensor) else value
