"""The noise-scale estimator against the truth computed from every per-sample gradient."""

import math
import statistics

import pytest
import torch
from torch import nn

import batchgrad as bg


def regression(samples=512, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(samples, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 1, generator=g, dtype=torch.float64) + 2.0
    y = y + 0.5 * torch.randn(samples, 1, generator=g, dtype=torch.float64)
    return x, y


def mse(model, batch):
    x, y = batch
    return bg.Loss.from_values((model(x) - y).pow(2).sum(1))


def truth(model, x, y):
    """‖G‖² and tr Σ over the whole data set, from every per-sample gradient."""
    grads = bg.per_sample_grads(model, mse, (x, y))
    flat = torch.cat([g.flatten(1) for g in grads.values()], 1)
    mean = flat.mean(0)
    return float(mean.pow(2).sum()), float((flat - mean).pow(2).sum(1).mean())


@pytest.mark.parametrize(
    ("micro_batch_size", "small_batches", "within"),
    [
        (8, None, 0.15),  # every micro-batch but the last measured: 7 small batches a step
        (13, None, 0.15),  # uneven splits
        (8, 1, 0.3),  # the default, one: unbiased too, its average noisier
        (13, 1, 0.3),
        (13, 2, 0.3),
    ],
)
def test_estimates_are_unbiased_and_the_moving_average_finds_b_simple(
    micro_batch_size, small_batches, within
):
    torch.manual_seed(0)
    model = nn.Linear(6, 1).double()
    x, y = regression()
    grad_sq, trace_cov = truth(model, x, y)
    scale = bg.NoiseScale(beta=0.99, small_batches=small_batches)
    draws = torch.Generator().manual_seed(1)
    estimates = []
    for _ in range(600):
        rows = torch.randint(0, len(x), (64,), generator=draws)  # independent samples
        model.zero_grad(set_to_none=True)
        report = bg.accumulate(
            model, mse, (x[rows], y[rows]), micro_batch_size=micro_batch_size, noise=scale
        )
        estimates.append(scale.last)
        assert report.noise is not None
    for truth_value, values in [
        (grad_sq, [e.grad_sq for e in estimates]),
        (trace_cov, [e.trace_cov for e in estimates]),
    ]:
        mean = statistics.fmean(values)
        assert abs(mean - truth_value) < 4 * statistics.stdev(values) / math.sqrt(len(values))
        if small_batches is None:
            assert mean == pytest.approx(truth_value, rel=0.05)
    assert scale.b_simple == pytest.approx(trace_cov / grad_sq, rel=within)
    assert estimates[0].big_batch == 64
    assert 0 < scale.b_simple_std < scale.b_simple


@pytest.mark.parametrize("bad", [0, -1, 1.5, True, "all"])
def test_small_batches_must_be_a_positive_int_or_none(bad):
    with pytest.raises(bg.ConfigError, match="small_batches"):
        bg.NoiseScale(small_batches=bad)


def test_one_step_estimate_from_known_gradients():
    """The formulas: two micro-batch means and the batch mean of fixed vectors."""
    estimate = bg._noise.estimate([5.0, 3.0], [2, 2], 2.5, 4)
    # E‖ĝ_b‖² = G² + T/2 = 4, E‖ĝ_B‖² = G² + T/4 = 2.5  ->  T = 6, G² = 1
    assert estimate.trace_cov == pytest.approx(6.0)
    assert estimate.grad_sq == pytest.approx(1.0)
    assert estimate.b_simple == pytest.approx(6.0)
    assert (estimate.small_batch, estimate.big_batch) == (2, 4)


def test_noise_leaves_the_gradient_unchanged():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = regression(40)
    bg.accumulate(model, mse, (x, y), micro_batch_size=7)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)

    report = bg.accumulate(model, mse, (x, y), micro_batch_size=7, noise=True)

    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=1e-12, atol=1e-14)
    assert report.noise.small_batch == 7  # the first micro-batch
    assert math.isfinite(report.noise.trace_cov)


@pytest.mark.parametrize(("small_batches", "measured"), [(1, 1), (2, 2), (None, 5), (9, 5)])
def test_one_step_estimate_equals_the_formula_on_each_micro_batchs_own_gradient(
    small_batches, measured
):
    """The estimate from the first ``small_batches`` micro-batches' own gradients (never
    the last), computed one by one here (uneven split; a weight used twice in the
    forward, whose gradient sums both uses)."""
    torch.manual_seed(0)
    linear = nn.Linear(6, 6).double()
    head = nn.Linear(6, 1).double()

    def tied(model, batch):
        x, y = batch
        out = head(torch.tanh(linear(torch.tanh(linear(x)))))
        return bg.Loss.from_values((out - y).pow(2).sum(1))

    model = nn.ModuleList([linear, head])
    x, y = regression(40)
    means, sizes = [], []
    for start in range(0, 40 - 7, 7):  # every micro-batch of 7 but the last (of 5)
        model.zero_grad(set_to_none=True)
        tied(model, (x[start : start + 7], y[start : start + 7])).total.backward()
        sq = sum(float(p.grad.pow(2).sum()) for p in model.parameters())
        means.append(sq / 7**2)
        sizes.append(7)
    model.zero_grad(set_to_none=True)
    tied(model, (x, y)).total.backward()
    big = sum(float(p.grad.pow(2).sum()) for p in model.parameters()) / 40**2
    expected = bg._noise.estimate(means[:measured], sizes[:measured], big, 40)
    model.zero_grad(set_to_none=True)
    scale = bg.NoiseScale(small_batches=small_batches)

    bg.accumulate(model, tied, (x, y), micro_batch_size=7, noise=scale)

    got = scale.last

    for name in ("grad_sq", "trace_cov", "b_simple", "b_simple_std"):
        assert getattr(got, name) == pytest.approx(getattr(expected, name), rel=1e-10), name
    assert (got.small_batch, got.big_batch) == (expected.small_batch, expected.big_batch)


def test_one_micro_batch_gives_no_estimate_and_the_scale_keeps_its_state():
    model = nn.Linear(6, 1).double()
    x, y = regression(16)
    scale = bg.NoiseScale()
    report = bg.accumulate(model, mse, (x, y), noise=scale)
    assert report.noise is None
    assert scale.steps == 0
    restored = bg.NoiseScale()
    bg.accumulate(model, mse, (x, y), micro_batch_size=4, noise=scale, existing_grad="replace")
    restored.load_state_dict(scale.state_dict())
    assert restored.b_simple == scale.b_simple


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(noise="yes"), r"noise must be True, False or a bg.NoiseScale"),
        (dict(noise=True, clip_per_sample=1.0), r"noise= is not supported together with"),
    ],
)
def test_invalid_noise_options(kwargs, message):
    model = nn.Linear(6, 1).double()
    with pytest.raises(bg.ConfigError, match=message):
        bg.accumulate(model, mse, regression(8), micro_batch_size=4, **kwargs)
    assert model.weight.grad is None


def test_invalid_beta():
    with pytest.raises(bg.ConfigError, match=r"beta must be a number in \[0, 1\)"):
        bg.NoiseScale(beta=1.0)


@pytest.mark.parametrize("small_batches", [1, None])
def test_existing_gradients_are_kept_and_do_not_enter_the_estimate(small_batches):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = regression(40)
    fresh = bg.NoiseScale(small_batches=small_batches)
    bg.accumulate(model, mse, (x, y), micro_batch_size=7, noise=fresh)
    expected = [p.grad.clone() for p in model.parameters()]
    old = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), old, strict=True):
        p.grad = g.clone()
    scale = bg.NoiseScale(small_batches=small_batches)

    bg.accumulate(model, mse, (x, y), micro_batch_size=7, noise=scale, existing_grad="add")

    for p, g, o in zip(model.parameters(), expected, old, strict=True):
        torch.testing.assert_close(p.grad, g + o, rtol=1e-12, atol=1e-14)
    assert scale.last.grad_sq == pytest.approx(fresh.last.grad_sq, rel=1e-10)
    assert scale.last.trace_cov == pytest.approx(fresh.last.trace_cov, rel=1e-10)


@pytest.mark.parametrize("small_batches", [1, None])
@pytest.mark.parametrize("failing", [0, 2, 5])  # the measured first, a measured later, the last
def test_a_failure_in_a_measured_micro_batch_keeps_the_gradients_and_the_scale(
    small_batches, failing
):
    """A micro-batch whose backward raises while the earlier sum is held apart: the
    gradients before the call come back, the scale is not updated, the next call works."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    x, y = regression(40)
    old = [torch.randn_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), old, strict=True):
        p.grad = g.clone()
    scale = bg.NoiseScale(small_batches=small_batches)
    calls = []

    def breaking(m, batch):
        loss = mse(m, batch)
        calls.append(None)
        if len(calls) == failing + 1:
            loss.total.register_hook(lambda g: (_ for _ in ()).throw(RuntimeError("in backward")))
        return loss

    with pytest.raises(RuntimeError, match="in backward"):  # the user's own error, as raised
        bg.accumulate(model, breaking, (x, y), micro_batch_size=7, noise=scale, existing_grad="add")

    for p, g in zip(model.parameters(), old, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert scale.steps == 0
    fresh = bg.NoiseScale(small_batches=small_batches)
    model.zero_grad(set_to_none=True)
    bg.accumulate(model, mse, (x, y), micro_batch_size=7, noise=fresh)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    bg.accumulate(model, mse, (x, y), micro_batch_size=7, noise=scale)
    for p, g in zip(model.parameters(), expected, strict=True):
        torch.testing.assert_close(p.grad, g, rtol=0, atol=0)
    assert scale.last.trace_cov == fresh.last.trace_cov
