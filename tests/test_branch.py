"""The critical batch size measured by branching runs of equal samples from checkpoints."""

import math

import pytest

import batchgrad as bg
from batchgrad._branch import TOLERANCE, Branch, branch_critical_batch, critical_from

from .problems import tiny_problem


def test_critical_is_the_largest_batch_within_the_tolerance():
    def runs(losses):
        return [Branch(b, 64 // b, loss, 0.1, ()) for b, loss in losses]

    assert critical_from(2.0, runs([(4, 1.0), (8, 1.0 + TOLERANCE), (16, 1.2)])) == 8
    assert critical_from(2.0, runs([(4, 1.3), (8, 1.0), (16, 1.05), (32, math.nan)])) == 16
    assert critical_from(1.0, runs([(4, 1.0), (8, 1.5)])) is None  # nothing lowered the loss
    assert critical_from(1.0, runs([(4, math.nan)])) is None


def test_branches_share_the_sample_budget_and_start_from_each_checkpoint():
    problem = tiny_problem(n=64)
    result = branch_critical_batch(
        problem, (2, 8, 32), samples=256, checkpoints=(0, 20), lr_grid=(0.01, 0.05)
    )
    first, later = result.checkpoints
    assert (first.step, later.step) == (0, 20)
    assert later.start_loss < first.start_loss  # the warm-up trained in between
    for checkpoint in result.checkpoints:
        assert [b.steps for b in checkpoint.branches] == [128, 32, 8]
        assert all(b.lr in (0.01, 0.05) for b in checkpoint.branches)
        assert checkpoint.critical == critical_from(checkpoint.start_loss, checkpoint.branches)
        assert math.isfinite(checkpoint.b_simple)
    assert result.schedule() == [(c.step, c.critical) for c in result.checkpoints]
    assert len(result.table().rows) == 3 + 2
    assert result.to_dict()["checkpoints"][1]["step"] == 20


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(batch_sizes=(2, 100)), "up to the data set"),
        (dict(samples=8, batch_sizes=(2, 16)), "at least the largest batch size"),
        (dict(checkpoints=(-1,), batch_sizes=(2, 8)), "checkpoints must be step counts"),
    ],
)
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(bg.ConfigError, match=message):
        branch_critical_batch(tiny_problem(n=64), **kwargs)
