"""compare on a tiny problem: every regime from the same weights, bad settings refused."""

import math

import pytest

import batchgrad as bg
from batchgrad._compare import compare
from batchgrad._problem import Problem

from .problems import mse, regression, tiny_problem


def test_compare_trains_every_regime_from_the_same_weights():
    grid = (0.01, 0.05, 1e200)  # 1e200 overflows at once
    result = compare(tiny_problem(), (1, 8, "full"), epochs=2, lr_grid=grid)

    runs = {run.regime: run for run in result.runs}
    assert list(runs) == ["stochastic", "mini-batch", "full-batch"]
    assert [run.batch_size for run in result.runs] == [1, 8, 40]
    assert runs["stochastic"].final.step == 80
    assert runs["mini-batch"].final.step == 10
    assert runs["full-batch"].final.step == 2  # one step per epoch
    assert [len(h.steps) for h in result.histories.values()] == [80, 10, 2]
    initial = {run.curve[0].train_loss for run in result.runs}
    assert len(initial) == 1  # the same initial weights
    for run in result.runs:
        assert run.lr in grid[:2]
        assert run.final.samples_seen == 80
        assert run.final.epoch == 2
        assert math.isfinite(run.final.train_loss)
        assert math.isfinite(run.final.eval_loss)
        assert run.final.train_loss < run.curve[0].train_loss
        assert run.final.wall_time > 0
        diverged = {p.lr for p in run.sweep if p.diverged}
        assert diverged == {1e200}
        assert all(math.isfinite(p.loss) for p in run.sweep if not p.diverged)
        best = min((p for p in run.sweep if not p.diverged), key=lambda p: p.loss)
        assert run.lr == best.lr
    data = result.to_dict()
    assert [r["label"] for r in data["runs"]] == ["1", "8", "full"]
    assert result.reach_table().rows[2][3] == "2"  # full-batch reaches its own final loss
    assert "Per step" in result.findings()


def test_compare_refuses_bad_settings():
    problem = tiny_problem()
    with pytest.raises(bg.ConfigError, match=r"Batch size 41 is larger than the training set"):
        compare(problem, (1, 41))
    with pytest.raises(
        bg.ConfigError,
        match=r"No learning rate of the sweep trained at batch size 8 \(diverged: 1e\+200\)",
    ):
        compare(problem, (8,), epochs=1, lr_grid=(1e200,))
    with pytest.raises(bg.ConfigError, match=r"select='eval' picks the lr on held-out data"):
        compare(Problem(problem.model, mse, regression(10)), (1,), select="eval")
    with pytest.raises(bg.ConfigError, match=r"metrics= are computed on eval_data="):
        Problem(problem.model, mse, regression(10), metrics={"accuracy": "accuracy"})
