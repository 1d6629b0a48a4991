"""compare on a tiny problem: every regime from the same weights, bad settings refused."""

import copy
import dataclasses
import itertools
import math
import statistics

import pytest
import torch

import batchgrad as bg
from batchgrad._compare import compare
from batchgrad._problem import Problem, digits_problem
from batchgrad._runs import _mean, _train

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
    assert result.reach_table().rows[2][2] == "2"  # full-batch reaches its own final loss
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


def _last_epoch_low(run, epochs):
    return min(p.train_loss for p in run.curve if p.epoch >= epochs - 1 - 1e-9)


def test_compare_final_losses_are_free_of_the_short_last_batch():
    """1438 digits at B = 16 and 128 leave a short last batch of 14 and 30 samples: the
    whole-set loss read right after it is lifted, so it is skipped by default."""
    problem = digits_problem()
    settings = dict(epochs=4, lr_grid=(0.3, 1.0), sweep_epochs=0.5)
    kept = compare(problem, (16, 128), drop_last=False, **settings)
    lifted = [run.final.train_loss / _last_epoch_low(run, 4) for run in kept.runs]  # last step
    assert max(lifted) > 1.25  # the artefact, as it was
    assert "kept: losses read after it are lifted" in kept.table().title

    result = compare(problem, (16, 128), **settings)
    for run in result.runs:
        assert run.final.train_loss <= 1.25 * _last_epoch_low(run, 4)
        assert run.to_dict()["train_loss"] == run.final_loss
        assert {r.batch_size for r in run.history.steps} == {run.batch_size}
        assert run.final.step == 4 * (problem.size // run.batch_size)
    assert "short last batch of each epoch skipped" in result.table().title
    assert result.to_dict()["drop_last"] is True


def _timed(run, seconds):
    steps = [
        dataclasses.replace(r, wall_time=t)
        for r, t in zip(run.history.steps, seconds, strict=False)
    ]
    return dataclasses.replace(run, history=dataclasses.replace(run.history, steps=steps))


def test_compare_names_the_fastest_only_beyond_the_spread_of_the_timings():
    result = compare(tiny_problem(), (4, 8), epochs=2, lr_grid=(0.05,))
    small, big = result.runs  # 20 and 10 steps; both reach the common loss
    steps = {run.label: result.reach()[run.label].step for run in result.runs}

    def clock(run, per_step, jitter):
        return list(itertools.accumulate(per_step * (1 + jitter * (-1) ** k) for k in range(80)))

    # steady step times: the one with fewer seconds to the common loss is named
    steady = dataclasses.replace(
        result, runs=(_timed(small, clock(small, 1e-3, 0.01)), _timed(big, clock(big, 1e-1, 0.01)))
    )
    assert steady.fastest().label == ("4" if steps["4"] * 1e-3 < steps["8"] * 1e-1 else "8")
    assert "gets there first, beyond the timings' spread" in steady.findings()
    time = steady.runs[0].step_time
    assert time.low <= time.median <= time.high
    assert time.count == steady.runs[0].final.step

    # the same medians, each step's time ± 90%: the quartiles overlap, nothing is named
    ratio = steps["4"] / steps["8"]
    noisy = dataclasses.replace(
        result,
        runs=(_timed(small, clock(small, 1e-3, 0.9)), _timed(big, clock(big, ratio * 1e-3, 0.9))),
    )
    assert noisy.fastest() is None
    assert "no regime is clearly first" in noisy.findings()
    assert noisy.to_dict()["fastest"] is None


def test_compare_reports_the_tail_averaged_weights_not_the_last_steps_luck():
    result = compare(digits_problem(), (1,), epochs=2, lr_grid=(0.1,), sweep_epochs=0.1)
    (run,) = result.runs  # stochastic descent at a large lr: its loss jumps step to step
    last = [p.train_loss for p in run.curve if p.epoch > 1 - 1e-9]
    half = [p.train_loss for p in run.curve if p.epoch > 1.5 - 1e-9]
    assert len(last) >= 16  # evaluations spread over the last epoch
    assert max(last) > 2 * min(last)  # the iterates bounce
    assert run.averaged.step == run.final.step
    assert run.final_loss <= 1.25 * min(last)  # issue: within 1.25× of the epoch's lowest
    assert run.iterate_loss == statistics.median(half)
    assert run.last_epoch_range == (min(last), max(last))
    assert result.common_loss == run.iterate_loss  # every run's iterates got there
    assert result.table().rows[0][:1] + result.table().rows[0][3:5] == [
        "1",
        f"{run.final_loss:.4f}",
        f"{run.iterate_loss:.4f}",
    ]
    assert "with its weights averaged over the last half epoch" in result.findings()


def test_train_evaluates_the_average_of_the_weights_at_the_stops_from_average_from():
    problem = tiny_problem()
    initial = problem.initial_model()
    run = _train(problem, initial, 4, 0.05, [2, 4, 6, 8], momentum=0.0, seed=0, average_from=4)

    # by hand: the same trajectory, the weights at steps 4, 6 and 8 averaged
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    history, snapshots = None, []
    for stop in (2, 4, 6, 8):
        steps = stop - (history.step if history else 0)
        history = bg.fit(
            model,
            problem.loss_fn,
            problem.data,
            optimizer,
            batch_size=4,
            steps=steps,
            seed=0,
            history=history,
            progress=False,
        )
        if stop >= 4:
            snapshots.append([p.detach().clone() for p in model.parameters()])
    with torch.no_grad():
        for p, *values in zip(model.parameters(), *snapshots, strict=True):
            p.copy_(sum(values) / len(values))
    expected = _mean(model, [problem.loss_fn], problem.data)[0]
    assert run.averaged is not None
    assert math.isclose(run.averaged.train_loss, expected, rel_tol=1e-12)
    assert run.averaged.train_loss != run.curve[-1].train_loss  # not the last iterate
    assert _train(problem, initial, 4, 0.05, [2, 4], momentum=0.0, seed=0).averaged is None
