"""The thread rule of `unlearn` and `grin-peft unlearn`: explicit count, else the environment's, else one thread for
a small CPU model, else torch's own setting; always restored afterwards."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import grin_peft.pipeline as pipeline
import grin_peft.threads as threads_module
from grin_peft.errors import GrinError
from grin_peft.pipeline import unlearn
from grin_peft.threads import choose_threads, torch_threads, with_thread_rule
from grin_peft.unlearning_args import UnlearningArguments


@pytest.fixture(autouse=True)
def two_threads_no_env(monkeypatch):
    """Start every test from 2 torch threads and no OMP_NUM_THREADS, whatever the session set."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    previous = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(previous)


def small() -> nn.Module:
    return nn.Linear(10, 10)  # 110 parameters


def test_a_small_cpu_model_runs_on_one_thread():
    assert choose_threads(small()) == 1


def test_a_large_model_keeps_torchs_setting(monkeypatch):
    monkeypatch.setattr(threads_module, "SMALL_MODEL_PARAMETERS", 110)
    assert choose_threads(small()) is None
    monkeypatch.setattr(threads_module, "SMALL_MODEL_PARAMETERS", 111)
    assert choose_threads(small()) == 1


def test_an_explicit_count_wins_over_everything(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "4")
    assert choose_threads(small(), 3) == 3


def test_omp_num_threads_in_the_environment_is_left_alone(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "2")
    assert choose_threads(small()) is None


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "2"])
def test_a_bad_count_is_refused(bad):
    with pytest.raises(GrinError, match="num_threads must be a positive integer"):
        choose_threads(small(), bad)


def test_torch_threads_restores_the_previous_count_even_on_error():
    with torch_threads(1):
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), torch_threads(1):
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with torch_threads(None):
        assert torch.get_num_threads() == 2


def test_the_decorator_applies_the_rule_to_the_model_and_num_threads_it_is_given():
    seen = []

    @with_thread_rule
    def run(model, training_args=None, **kw):
        seen.append(torch.get_num_threads())

    run(small())
    run(small(), num_threads=2)
    run(model=small(), training_args=UnlearningArguments(output_dir="unused", num_threads=2))
    assert seen == [1, 2, 2]
    assert torch.get_num_threads() == 2


def test_unlearn_runs_under_the_rule_and_restores_the_setting(monkeypatch):
    seen = []

    def stop(*args, **kwargs):  # unlearn's first step after its argument checks
        seen.append(torch.get_num_threads())
        raise GrinError("stopped here")

    monkeypatch.setattr(pipeline, "_training_args", stop)
    for kw in ({}, {"num_threads": 2}):
        with pytest.raises(GrinError, match="stopped here"):
            unlearn(small(), forget=[], retain=[], learning_rate=1e-2, **kw)
    assert seen == [1, 2]
    assert torch.get_num_threads() == 2
