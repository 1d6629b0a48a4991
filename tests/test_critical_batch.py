"""steps_to_target and the fit S(B) = S_min (1 + B_noise / B)."""

import math

import pytest

import batchgrad as bg
from batchgrad._critical_batch import fit_tradeoff, steps_to_target
from batchgrad._problem import Problem

from .problems import mse, regression, tiny_problem


def test_fit_tradeoff_recovers_the_curve():
    sizes = [4, 16, 64, 256]
    s_min, b_noise = fit_tradeoff(sizes, [50 * (1 + 30 / b) for b in sizes])
    assert (s_min, b_noise) == (pytest.approx(50), pytest.approx(30))
    assert all(math.isnan(v) for v in fit_tradeoff([4], [10.0]))
    assert all(math.isnan(v) for v in fit_tradeoff([4, 16], [10.0, 20.0]))  # rising


def test_steps_to_target_falls_with_the_batch():
    problem = Problem(tiny_problem().model, mse, regression(256))
    result = steps_to_target(problem, (2, 16, 128), 0.2, lr_grid=(0.01, 0.03, 0.1, 0.3))
    steps = [run.steps for run in result.runs]
    assert all(s is not None for s in steps)
    assert steps[0] > steps[1] > steps[2]
    for run in result.runs:
        assert run.lr in (0.01, 0.03, 0.1, 0.3)
        assert run.lr in [lr for lr, _ in run.tried]
        wall = run.seconds  # recorded for the report; its value is never judged
        assert wall > 0
    assert result.s_min > 0
    assert result.b_noise > 0
    with pytest.raises(bg.ConfigError, match=r"already at most the target"):
        steps_to_target(problem, (2,), 1e6)
