"""Specification of UnlearningArguments and unlearn_score: the checkpoint criterion, arguments refused when built."""

from __future__ import annotations

import pytest

from grin_peft.errors import GrinError
from grin_peft.unlearning_args import UnlearningArguments, unlearn_score


def make_args(tmp_path, **kw) -> UnlearningArguments:
    return UnlearningArguments(output_dir=str(tmp_path / "out"), use_cpu=True, report_to="none", **kw)


def test_unlearn_score_definitions():
    assert unlearn_score(0.2, 0.9) == pytest.approx(0.7)
    assert unlearn_score(0.2, 0.9, "harmonic") == pytest.approx(2 * 0.8 * 0.9 / 1.7)
    assert unlearn_score(1.0, 0.9, "harmonic") == 0.0  # nothing forgotten
    assert unlearn_score(0.0, 0.0, "harmonic") == 0.0  # everything forgotten, retain included
    with pytest.raises(GrinError, match="criterion"):
        unlearn_score(0.1, 0.9, "ratio")


def test_bad_arguments_raise_grin_error(tmp_path):
    with pytest.raises(GrinError, match="unknown objective"):
        make_args(tmp_path, objective="forget_everything")
    with pytest.raises(GrinError, match="no hyper-parameter beta"):
        make_args(tmp_path, objective="grad_diff", beta=0.5)
    with pytest.raises(GrinError, match="unlearn_criterion"):
        make_args(tmp_path, unlearn_criterion="ratio")
    with pytest.raises(GrinError, match="num_threads"):
        make_args(tmp_path, num_threads=0)
