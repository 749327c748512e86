"""The models and methods `bench_training.py` times: a Llama built from a config, every method applied to it, and
one training step (forward + backward + AdamW) per method.

Imported after `bench_training.py` has set the OpenMP and allocator environment (torch must load after it).
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Iterator

import torch

BYTES_PER_ENTRY = 4 + 4 + 4 + 8  # int32 index + fp32 value + fp32 grad + AdamW (exp_avg, exp_avg_sq)


# method name -> (kind, parameter); the GRIN densities of the sweep are added from --densities
BASE_METHODS = {
    "frozen base fwd+bwd": ("frozen", None),
    "LoRA r=8": ("lora", 8),
    "LoRA r=64": ("lora", 64),
    "SHiRA (=GRIN 1%)": ("shira", 1e-2),
    "Super-Tuning (=GRIN 1%)": ("supertuning", 1e-2),
    "full fine-tuning": ("full", None),
}


SIZE_METHODS = ("frozen base fwd+bwd", "LoRA r=8", "GRIN 0.1%", "full fine-tuning")


def grin_name(density: float) -> str:
    return f"GRIN {density * 100:g}%"


def reference_name(density: float) -> str:
    return f"GRIN {density * 100:g}% (reference path)"


def bound_name(density: float) -> str:
    return f"GRIN {density * 100:g}% without the values' gradient (bound)"


@contextlib.contextmanager
def values_gradient_skipped() -> Iterator[None]:
    """A diagnostic, never a method: the fused path's values gradient replaced by zeros (forward, the written-in
    windows and grad_x unchanged), so the step costs what the fused path would cost with a free sparse kernel."""
    import grin_peft.fused as fused

    kernel = fused._values_grad
    fused._values_grad = lambda ctx, gy, saved, pattern: torch.zeros(
        pattern.nnz, dtype=torch.float32, device=gy.device
    )
    try:
        yield
    finally:
        fused._values_grad = kernel


def intermediate_for(hidden: int) -> int:
    """Llama's ~2.75 x hidden MLP width, rounded to a multiple of 64 (bitsandbytes 4-bit needs that)."""
    return max(64, int(round(hidden * 2.75 / 64)) * 64)


def build_base(spec: dict) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=spec["vocab"],
        hidden_size=spec["hidden"],
        intermediate_size=spec["intermediate"],
        num_hidden_layers=spec["layers"],
        num_attention_heads=max(1, spec["hidden"] // 64),
        num_key_value_heads=max(1, spec["hidden"] // 64),
        max_position_embeddings=max(spec["seq"], 128),
        tie_word_embeddings=False,
    )
    return AutoModelForCausalLM.from_config(config, dtype=getattr(torch, spec.get("dtype", "float32")))


def load_4bit(path: str) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch.float32)
    return AutoModelForCausalLM.from_pretrained(path, quantization_config=quant, dtype=torch.float32)


def make_batch(spec: dict) -> dict:
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(0, spec["vocab"], (spec["batch"], spec["seq"]), generator=generator)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def shared_copy(model: torch.nn.Module) -> torch.nn.Module:
    """A structural copy of `model` whose parameters and buffers ARE the original tensors (no weight memory)."""
    memo = {id(t): t for t in list(model.parameters()) + list(model.buffers())}
    return copy.deepcopy(model, memo)


def targeted_linears(model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """'all-linear' as PEFT resolves it: every Linear (incl. bnb Linear4bit) except the output head."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Linear) and not n.endswith("lm_head")]


def shira_rank(model: torch.nn.Module, density: float) -> int:
    """SHiRA gives every layer r * (in + out) entries: pick the r whose total is closest to density x all entries."""
    linears = targeted_linears(model)
    total = sum(m.in_features * m.out_features for _, m in linears)
    per_rank = sum(m.in_features + m.out_features for _, m in linears)
    return max(1, int(round(density * total / per_rank)))


def apply_method(base: torch.nn.Module, kind: str, param) -> torch.nn.Module:
    """Wrap `base` (modified in place) for a method; returns the model to train."""
    import peft

    import grin_peft

    if kind == "frozen":
        for p in base.parameters():
            p.requires_grad_(False)
        base.enable_input_require_grads()
        return base
    if kind == "full":
        for p in base.parameters():
            p.requires_grad_(True)
        return base
    if kind in ("grin", "grin_reference", "grin_bound"):
        config = grin_peft.GrinConfig(target_modules="all-linear", density=param, score="random", noise_std=0.0)
    elif kind == "lora":
        config = peft.LoraConfig(target_modules="all-linear", r=param, lora_alpha=2 * param, lora_dropout=0.0)
    elif kind == "shira":
        config = peft.ShiraConfig(target_modules="all-linear", r=shira_rank(base, param), random_seed=0)
    elif kind == "supertuning":
        config = peft.SupertuningConfig(target_modules="all-linear", sparsity=1.0 - param)
    else:
        raise ValueError(kind)
    model = peft.get_peft_model(base, config)
    if kind == "grin_reference":
        for module in model.modules():
            if isinstance(module, grin_peft.GrinLayer):
                module.grin_fused = False
    return model


def method_table(
    densities: list[float], reference: list[float] = (), bound: list[float] = ()
) -> dict[str, tuple[str, object]]:
    methods = dict(BASE_METHODS)
    for d in densities:
        methods[grin_name(d)] = ("grin", d)
    for d in reference:
        methods[reference_name(d)] = ("grin_reference", d)
    for d in bound:
        methods[bound_name(d)] = ("grin_bound", d)
    order = ["frozen base fwd+bwd", "LoRA r=8", "LoRA r=64"]
    order += [grin_name(d) for d in densities] + [reference_name(d) for d in reference]
    order += [bound_name(d) for d in bound]
    order += ["SHiRA (=GRIN 1%)", "Super-Tuning (=GRIN 1%)", "full fine-tuning"]
    return {name: methods[name] for name in order}


class Trainer:
    """One method's model + AdamW; `step()` runs one full training step."""

    def __init__(self, name: str, model: torch.nn.Module, batch: dict, lr: float = 1e-4, kind: str = ""):
        self.name, self.model, self.batch = name, model.train(), batch
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.opt = torch.optim.AdamW(self.params, lr=lr) if self.params else None
        self.skip_values_gradient = kind == "grin_bound"

    def step(self) -> float:
        with values_gradient_skipped() if self.skip_values_gradient else contextlib.nullcontext():
            out = self.model(**self.batch)
            out.loss.backward()
        if self.opt is not None:
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
        return float(out.loss.detach())

    def trainable(self) -> int:
        return sum(p.numel() for p in self.params)


def grin_entries(model: torch.nn.Module) -> int:
    return sum(v.numel() for n, v in model.named_parameters() if "grin_values" in n)


def grin_held_bytes(model: torch.nn.Module) -> int:
    """Bytes GRIN holds per entry set beyond the 20-byte formula's: indices, base values, CSR pattern (all layers)."""
    from grin_peft.layer import GrinLayer
    from grin_peft.sparse_pattern import _TENSOR_FIELDS

    total = 0
    for module in model.modules():
        if isinstance(module, GrinLayer):
            for adapter in module.grin_values:
                total += module.grin_indices[adapter].nbytes + module.grin_base_values[adapter].nbytes
                total += module.grin_values[adapter].nbytes * 4  # value + grad + exp_avg + exp_avg_sq
                pattern = module._grin_pattern(adapter)
                total += sum(getattr(pattern, f).nbytes for f in _TENSOR_FIELDS if getattr(pattern, f) is not None)
    return total


def count_params(spec: dict) -> int:
    h, i, v, n = spec["hidden"], spec["intermediate"], spec["vocab"], spec["layers"]
    return n * (4 * h * h + 3 * h * i + 2 * h) + 2 * v * h + h


def spec_str(spec: dict) -> str:
    return (
        f"Llama hidden={spec['hidden']}, layers={spec['layers']}, intermediate={spec['intermediate']}, "
        f"vocab={spec['vocab']}, batch={spec['batch']}x{spec['seq']} tokens"
    )
