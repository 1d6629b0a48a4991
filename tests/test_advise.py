"""advise on tiny problems, and the formulas behind the advice."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

import batchgrad as bg
from batchgrad._advise import (
    MAX_REL_STD,
    advise,
    lr_scale,
    recommend_batch_size,
    tail_noise_scale,
)
from batchgrad._noise import NoiseEstimate
from batchgrad._problem import Problem, digits_problem

from .problems import mse, regression, tiny_problem


def near_optimum():
    """Linear regression near its optimum: the noise dominates the gradient."""
    x, y = regression(4096, dim=6, noise=1.0)
    torch.manual_seed(0)
    model = nn.Linear(6, 1).double()
    with torch.no_grad():
        exact = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
        model.weight.copy_(exact[:6].T + 0.25 * torch.randn(1, 6, dtype=torch.float64))
        model.bias.copy_(exact[6])
    return model, x, y


def test_advise_finds_a_known_noise_scale():
    """Linear regression at a fixed point: B_simple = tr Σ / ‖G‖² over the data set."""
    model, x, y = near_optimum()
    grads = bg.per_sample_grads(model, mse, (x, y))
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    mean = flat.mean(0)
    truth = float((flat - mean).pow(2).sum(1).mean() / mean.pow(2).sum())

    # lr so small that the model stays where the truth was computed
    advice = advise(Problem(model, mse, (x, y)), 64, 4, steps=200, lr=1e-5)

    assert 8 < truth < 200
    assert truth / 2 <= advice.batch_size <= 2 * truth
    assert advice.b_simple == pytest.approx(truth, rel=0.3)
    assert 0 < advice.b_simple_std < advice.b_simple
    lo, hi = advice.b_range
    assert lo < advice.b_simple < hi
    assert advice.scaled_lr == pytest.approx(
        1e-5 * lr_scale(advice.b_simple, 64, advice.batch_size)
    )
    assert advice.recommended_lr <= advice.scaled_lr
    assert (advice.micro_batches, advice.micro_batch_size, advice.lr_tuned) == (4, 16, False)
    assert len(advice.trajectory()) == 200
    assert f"batch size {advice.batch_size}" in advice.text
    assert advice.to_dict()["batch_size"] == advice.batch_size


def test_advise_sweeps_the_lr_without_one():
    advice = advise(tiny_problem(n=64), 16, 2, steps=20, lr_grid=(0.01, 0.05, 1e200))
    assert advice.lr_tuned
    assert advice.lr == min((p for p in advice.sweep if not p.diverged), key=lambda p: p.loss).lr
    assert [p.diverged for p in advice.sweep] == [False, False, True]
    assert math.isfinite(advice.b_simple)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(micro_batches=1), r"micro_batches must be at least 2"),
        (dict(batch_size=100), r"batch_size must be between micro_batches \(4\) and the training"),
        (dict(steps=0), r"steps must be a positive int"),
    ],
)
def test_advise_refuses_bad_settings(kwargs, message):
    with pytest.raises(bg.ConfigError, match=message):
        advise(tiny_problem(), **{"batch_size": 8, "micro_batches": 4, **kwargs})


def test_lr_scale_is_linear_below_the_noise_scale_and_flat_above():
    assert lr_scale(50, 64, 64) == 1
    assert lr_scale(50, 10, 20) == pytest.approx((1 + 5) / (1 + 2.5))
    assert lr_scale(1e9, 8, 64) == pytest.approx(8, rel=1e-6)  # B << B_noise: linear
    assert lr_scale(1, 1e6, 8e6) == pytest.approx(1, rel=1e-5)  # B >> B_noise: none
    assert lr_scale(100, 100, 1e12) == pytest.approx(2)  # at most 1 + B_noise / B0


def test_recommend_batch_size():
    assert recommend_batch_size(45.0, 1000) == 32
    assert recommend_batch_size(46.0, 1000) == 64  # log2(46) = 5.52
    assert recommend_batch_size(0.3, 1000) == 1
    assert recommend_batch_size(5000.0, 1000) == 1000  # capped at the data set
    assert recommend_batch_size(math.inf, 1000) is None
    assert recommend_batch_size(-3.0, 1000) is None


def test_advise_on_digits_recommends_an_lr_that_trains_at_its_batch_size():
    """The default advice, run as a user would: its lr at its batch size for 200 steps."""
    problem = digits_problem()
    advice = advise(problem)

    assert advice.conclusive
    assert advice.batch_size is not None
    assert advice.recommended_lr is not None
    assert advice.recommended_lr <= advice.scaled_lr
    trained_here = [p.lr for p in advice.verification if p.trained]
    assert advice.recommended_lr <= max(trained_here)
    # a finite loss stuck near the start is a failure, not a candidate
    stuck = [p for p in advice.sweep if not p.diverged and p.loss > 0.9 * p.initial]
    assert stuck
    assert all(p.stalled and not p.trained for p in stuck)
    assert advice.lr not in [p.lr for p in stuck]
    # the evidence is shown
    assert len(advice.sweep_table().rows) == len(advice.sweep)
    assert advice.verification_table().rows

    readme = " ".join((Path(__file__).parent.parent / "README.md").read_text().split())
    assert f"recommends B = {advice.batch_size} and lr {advice.recommended_lr:g}" in readme

    model = problem.initial_model()
    start = _train_loss(model, problem)
    optimizer = torch.optim.SGD(model.parameters(), lr=advice.recommended_lr)
    bg.fit(
        model,
        problem.loss_fn,
        problem.data,
        optimizer,
        batch_size=advice.batch_size,
        steps=200,
        seed=1,  # other shuffled orders than the check's
        progress=False,
    )
    assert _train_loss(model, problem) < start / 2


def _train_loss(model, problem):
    with torch.no_grad():
        loss = problem.loss_fn(model, problem.data)
    return float(loss.total / loss.count)


def test_advise_is_inconclusive_when_the_error_is_large_and_says_how_many_steps():
    model, x, y = near_optimum()
    problem = Problem(model, mse, (x, y))  # lr so small that the noise scale stays put
    advice = advise(problem, 64, 4, steps=8, lr=1e-5)
    assert advice.b_simple_std > MAX_REL_STD * advice.b_simple
    assert not advice.conclusive
    assert advice.batch_size is None
    assert advice.recommended_lr is None
    assert advice.verification == ()
    assert advice.nearest_batch_size is not None
    assert advice.steps_needed > advice.steps
    assert "Inconclusive: run more steps" in advice.text
    assert f"--steps {advice.steps_needed}" in advice.text
    assert advice.table().rows == []

    again = advise(problem, 64, 4, steps=advice.steps_needed, lr=1e-5)
    assert again.conclusive
    assert again.b_simple_std <= MAX_REL_STD * again.b_simple


def test_tail_noise_scale_error_shrinks_with_steps():
    g = torch.Generator().manual_seed(0)

    def steps(n):
        grad = 1 + 0.3 * torch.randn(n, generator=g, dtype=torch.float64)
        trace = 50 + 20 * torch.randn(n, generator=g, dtype=torch.float64)
        return [
            NoiseEstimate(float(a), float(b), 0.0, 0.0, 8, 32)
            for a, b in zip(grad, trace, strict=True)
        ]

    _, std_small, _, _ = tail_noise_scale(steps(100))
    b_big, std_big, _, _ = tail_noise_scale(steps(10000))
    assert b_big == pytest.approx(50, rel=0.02)
    assert std_big == pytest.approx(std_small / 10, rel=0.3)
    assert tail_noise_scale([])[1] == math.inf
    assert math.isnan(tail_noise_scale([NoiseEstimate(-1.0, 5.0, 0.0, 0.0, 8, 32)])[0])
