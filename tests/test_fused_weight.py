"""The fused path writes the delta into the frozen weight for each matmul: the base must come back bit for bit.

What could go wrong, each checked here on a GRIN model: an exception inside the matmul, training steps, merge and
unmerge around training, tied weights, a weight shared by two layers, gradient checkpointing (forward recomputed in
backward), two threads running the model at once, several adapters, 16-bit weights (the merge's rounding), and
``grin_fused = False`` (the reference path, untouched). Each compares against the reference path and hashes the base.
"""

from __future__ import annotations

import hashlib

import pytest
import torch
import torch.nn.functional as F
from concurrency import run_on_threads
from peft import get_peft_model
from tiny_models import build, example_input, output
from torch import nn

from grin_peft import GrinConfig, GrinLayer
from grin_peft.fused import fused_sparse_linear
from grin_peft.sparse_pattern import SparsePattern


def base_hash(model: nn.Module) -> str:
    """A digest of every frozen tensor's bytes: the base as stored."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if "grin_" not in name:
            digest.update(name.encode())
            digest.update(tensor.detach().contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def grin_model(density=0.05, fused=True, dtype=torch.float32, kind="llama", **kwargs):
    """A tiny model with a noise-initialised GRIN delta on every linear layer."""
    config = GrinConfig(target_modules="all-linear", density=density, score="random", seed=0, **kwargs)
    model = get_peft_model(build(kind, dtype), config)
    for module in model.modules():
        if isinstance(module, GrinLayer):
            module.grin_fused = fused
    return model


@pytest.fixture
def fused_calls(monkeypatch):
    calls = []
    monkeypatch.setattr(
        "grin_peft.layer.fused_sparse_linear", lambda *a, **k: calls.append(1) or fused_sparse_linear(*a, **k)
    )
    return calls


def train(model, steps=3, inputs=None):
    inputs = inputs or example_input("llama")
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    for _ in range(steps):
        optimizer.zero_grad()
        output(model, inputs).square().mean().backward()
        optimizer.step()


# ----------------------------------------------------------------------------------------------- the op itself


def test_an_exception_inside_the_matmul_leaves_the_weight_bit_identical(monkeypatch):
    weight = torch.randn(12, 8)
    before = weight.clone()
    pattern = SparsePattern.from_flat_indices(torch.tensor([3, 40, 95]), 12, 8)
    values = torch.nn.Parameter(torch.tensor([1.0, -2.0, 3.0]))
    x = torch.randn(4, 8, requires_grad=True)

    def failing(*args, **kwargs):
        assert not torch.equal(args[1], before)  # the delta is in the weight during the matmul
        raise RuntimeError("out of memory")

    monkeypatch.setattr(F, "linear", failing)
    with pytest.raises(RuntimeError, match="out of memory"):
        fused_sparse_linear(x, weight, None, values, pattern)
    assert torch.equal(weight, before)
    monkeypatch.undo()
    y = fused_sparse_linear(x, weight, None, values, pattern)  # the lock was released
    monkeypatch.setattr(torch, "mm", lambda *a: (_ for _ in ()).throw(RuntimeError("in backward")))
    with pytest.raises(RuntimeError, match="in backward"):
        y.sum().backward()
    assert torch.equal(weight, before)


# ----------------------------------------------------------------------------------------------- in a GRIN model


@pytest.mark.parametrize("density", [0.01, 0.1, 0.5], ids=["gather", "csr", "dense"])
def test_a_grin_model_trains_the_same_on_the_fast_path_and_its_base_is_untouched(density, fused_calls):
    results = []
    for fused in (False, True):
        model = grin_model(density, fused, dense_threshold=1.0)
        before = base_hash(model)
        out = output(model, example_input("llama"))
        out.square().sum().backward()
        grads = {n: p.grad for n, p in model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
        train(model)
        assert base_hash(model) == before
    assert len(fused_calls) == 4 * len(model.base_model.grin_layers())  # every layer, in the fused model only
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-5, atol=1e-6 * float(grad.abs().max()), msg=name)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_the_output_is_the_merged_models_bit_for_bit_and_unmerge_restores_the_base(dtype):
    # float64 too: a merge adds in float64 there, as the fast path does (it used to round through float32)
    model = grin_model(0.05, dtype=dtype)
    before = base_hash(model)
    train(model)
    inputs = example_input("llama")
    with torch.no_grad():
        unmerged = output(model, inputs)
        model.merge_adapter()
        assert base_hash(model) != before
        assert torch.equal(output(model, inputs), unmerged)
        model.unmerge_adapter()
    assert base_hash(model) == before
    train(model, steps=1)
    assert base_hash(model) == before


def test_tied_weights_the_embedding_keeps_its_values():
    # lm_head shares the input embedding's weight: the embedding must never see lm_head's delta
    config = GrinConfig(target_modules=["lm_head", "q_proj"], density=0.05, score="random", seed=0)
    results = []
    for fused in (False, True):
        tied = build("llama")
        tied.config.tie_word_embeddings = True
        tied.tie_weights()
        assert tied.lm_head.weight is tied.model.embed_tokens.weight
        peft_model = get_peft_model(tied, config)
        for module in peft_model.modules():
            if isinstance(module, GrinLayer):
                module.grin_fused = fused
        before = base_hash(peft_model)
        out = output(peft_model, example_input("llama"))
        out.square().sum().backward()
        grads = {n: p.grad.clone() for n, p in peft_model.named_parameters() if p.requires_grad}
        results.append((out.detach(), grads))
        train(peft_model)
        assert base_hash(peft_model) == before
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-4, atol=1e-5 * float(grad.abs().max()), msg=name)


class SharedWeight(nn.Module):
    """Two linear layers holding one weight Parameter (a tied pair), each with its own GRIN entries."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.first = nn.Linear(16, 16)
        self.second = nn.Linear(16, 16)
        self.second.weight = self.first.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.second(torch.tanh(self.first(x)))


def test_a_weight_shared_by_two_layers():
    x = torch.randn(5, 16, generator=torch.Generator().manual_seed(1))
    results = []
    for fused in (False, True):
        model = get_peft_model(
            SharedWeight(), GrinConfig(target_modules=["first", "second"], density=0.2, score="random", seed=0)
        )
        for module in model.modules():
            if isinstance(module, GrinLayer):
                module.grin_fused = fused
        before = base_hash(model)
        out = model(x)
        out.square().sum().backward()
        results.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}))
        assert base_hash(model) == before
    (ref_out, ref_grads), (out, grads) = results
    torch.testing.assert_close(out, ref_out)
    for name, grad in ref_grads.items():
        torch.testing.assert_close(grads[name], grad, msg=name)


@pytest.mark.parametrize("reentrant", [False, True])
def test_gradient_checkpointing_recomputes_the_same_forward(reentrant, fused_calls):
    plain = grin_model(0.05)
    out = output(plain, example_input("llama"))
    out.square().sum().backward()
    expected = {n: p.grad.clone() for n, p in plain.named_parameters() if p.requires_grad}
    model = grin_model(0.05)
    model.train()
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": reentrant})
    model.enable_input_require_grads()
    before = base_hash(model)
    calls = len(fused_calls)
    got = output(model, example_input("llama"))
    got.square().sum().backward()
    assert len(fused_calls) > calls + len(model.base_model.grin_layers())  # the forward ran again in backward
    torch.testing.assert_close(got, out)
    for name, grad in expected.items():
        torch.testing.assert_close(model.get_parameter(name).grad, grad, msg=name)
    assert base_hash(model) == before


def test_two_threads_running_one_model_leave_the_base_as_it_was():
    model = grin_model(0.05)
    before = base_hash(model)
    inputs = example_input("llama")
    with torch.no_grad():
        expected = output(model, inputs)

    def run():
        with torch.no_grad():
            return [output(model, inputs) for _ in range(20)]

    outputs, errors = run_on_threads(run, 2)
    assert not errors and len(outputs) == 40
    assert all(torch.equal(out, expected) for out in outputs)
    assert base_hash(model) == before


def test_several_adapters_switching_and_the_reference_path(fused_calls):
    model = grin_model(0.05)
    model.add_adapter("other", GrinConfig(target_modules="all-linear", density=0.02, score="random", seed=1))
    before = base_hash(model)
    layers = len(model.base_model.grin_layers())
    inputs = example_input("llama")
    for adapter in ("default", "other"):
        model.set_adapter(adapter)
        output(model, inputs).sum().backward()
    assert len(fused_calls) == 2 * layers and base_hash(model) == before
    model.base_model.set_adapter(["default", "other"])  # two active adapters: the reference path
    output(model, inputs).sum().backward()
    assert len(fused_calls) == 2 * layers and base_hash(model) == before


def test_the_reference_path_serves_what_the_fast_path_does_not(fused_calls):
    model = grin_model(0.05)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        output(model, example_input("llama"))
    assert not fused_calls  # autocast would recast the base matmul: reference path
    layers = list(model.base_model.grin_layers().values())
    layers[0].get_base_layer().weight.requires_grad_(True)  # a trainable base weight
    layers[1].get_base_layer().weight.share_memory_()  # another process could see the written-in delta
    output(model, example_input("llama"))
    assert len(fused_calls) == len(layers) - 2
    for layer in layers:
        layer.grin_fused = False
    output(model, example_input("llama"))
    assert len(fused_calls) == len(layers) - 2


def test_the_fast_path_serves_every_density_whatever_the_dense_threshold(fused_calls):
    # on the fast path the output is the merged layer's at any density; dense_threshold is the reference path's
    model = grin_model(0.5, dense_threshold=0.0)
    output(model, example_input("llama"))
    assert len(fused_calls) == len(model.base_model.grin_layers())
