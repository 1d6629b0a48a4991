"""compare, advise and steps_to_target on tiny problems; the formulas behind the advice."""

import math

import pytest
import torch
from torch import nn

import batchgrad as bg
from batchgrad._regimes import (
    Problem,
    advise,
    compare,
    fit_tradeoff,
    lr_scale,
    recommend_batch_size,
    steps_to_target,
)


def mse(model, batch):
    x, y = batch
    return bg.Loss.from_values((model(x) - y).pow(2).sum(1))


def regression(n, dim=3, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    return x, x @ w + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)


def tiny_problem(n=40, **kwargs):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    return Problem(model, mse, regression(n), regression(20, seed=1), **kwargs)


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
    with pytest.raises(bg.ConfigError, match=r"Every learning rate of the sweep diverged"):
        compare(problem, (8,), epochs=1, lr_grid=(1e200,))
    with pytest.raises(bg.ConfigError, match=r"select='eval' picks the lr on held-out data"):
        compare(Problem(problem.model, mse, regression(10)), (1,), select="eval")
    with pytest.raises(bg.ConfigError, match=r"metrics= are computed on eval_data="):
        Problem(problem.model, mse, regression(10), metrics={"accuracy": "accuracy"})


def test_advise_finds_a_known_noise_scale():
    """Linear regression at a fixed point: B_simple = tr Σ / ‖G‖² over the data set."""
    x, y = regression(4096, dim=6, noise=1.0)
    torch.manual_seed(0)
    model = nn.Linear(6, 1).double()
    with torch.no_grad():  # near the optimum: the noise dominates the gradient
        exact = torch.linalg.lstsq(torch.cat([x, torch.ones(len(x), 1)], 1), y).solution
        model.weight.copy_(exact[:6].T + 0.25 * torch.randn(1, 6, dtype=torch.float64))
        model.bias.copy_(exact[6])
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
    assert advice.recommended_lr == pytest.approx(
        1e-5 * lr_scale(advice.b_simple, 64, advice.batch_size)
    )
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
