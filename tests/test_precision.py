"""Mixed precision: the float32 running sum, float32 norms, GradScaler, autocast.

The reference for low-precision parameters is the float64 gradient of the same
(rounded) parameters and data; "one rounding" is that gradient rounded once to the
parameters' dtype, the best a gradient held in that dtype can be.
"""

import math

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn.parallel import DistributedDataParallel

import batchgrad as bg
from batchgrad._distributed import launch
from batchgrad._precision import RunningSum

ROWS, FEATURES = 768, 96  # 1/768 is not a power of two: its rounding must be undone


def _linear_problem(dtype, seed=0):
    """A loss linear in the weight: each micro-batch's gradient is its rows' sum of
    ``x / N``, computed in one matrix product and rounded once, so what differs
    between accumulations is only how the micro-batches' gradients are added."""
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(FEATURES, 4, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.randn(4, FEATURES, generator=g))
    # Positive means: the micro-batches' gradients add up rather than cancel.
    x = (torch.randn(ROWS, FEATURES, generator=g) + 1.0).to(dtype)
    return model.to(dtype), x


def _linear_loss(model, x):
    return bg.Loss(model(x).sum(), x.shape[0])


def _exact(x):
    return x.double().sum(0).div(x.shape[0]).expand(4, FEATURES)


def _rel(a, b):
    return ((a.double() - b).norm() / b.norm()).item()


def _autograd_sum(model, x, k):
    """The hand-written loop: autograd adds each micro-batch's gradient into p.grad."""
    model.zero_grad(set_to_none=True)
    for part in x.split(ROWS // k):
        (model(part).sum() / ROWS).backward()
    return model.weight.grad.clone()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_half_parameters_are_within_one_rounding_whatever_the_micro_batch_count(dtype):
    model, x = _linear_problem(dtype)
    exact = _exact(x)
    once = _rel(exact.to(dtype), exact)
    errors, autograd = {}, {}
    for k in (4, 16, 64):
        model.zero_grad(set_to_none=True)
        report = bg.accumulate(model, _linear_loss, x, micro_batch_size=ROWS // k)
        assert model.weight.grad.dtype == dtype
        assert report.micro_batches == k
        errors[k] = _rel(model.weight.grad, exact)
        autograd[k] = _rel(_autograd_sum(model, x, k), exact)
    assert all(e <= 1.5 * once for e in errors.values()), (errors, once)
    assert errors[64] <= 1.1 * errors[4] + 0.1 * once, errors  # not growing with the count
    # The test can fail: autograd's own sum grows past that bound.
    assert autograd[64] > 1.5 * once, autograd
    assert autograd[64] > 1.5 * autograd[4], autograd


@settings(max_examples=15, deadline=None)
@given(
    dtype=st.sampled_from([torch.bfloat16, torch.float16]),
    size=st.integers(1, ROWS),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_any_split_is_within_one_rounding(dtype, size, reduction, seed):
    model, x = _linear_problem(dtype, seed)
    scale = 1 if reduction == "sum" else 1 / ROWS
    exact = _exact(x) * (ROWS * scale)
    bg.accumulate(model, _linear_loss, x, micro_batch_size=size, reduction=reduction)
    assert model.weight.grad.dtype == dtype
    # Each micro-batch's gradient comes out of its matrix product rounded to the
    # parameters' dtype, which no running sum can undo: at few micro-batches that
    # alone exceeds one rounding (2 of 547 and 221 rows: 1.55x). The best any sum can
    # do is those gradients summed exactly and rounded once.
    best = sum((part.double().sum(0) * scale).to(dtype).double() for part in x.split(size))
    floor = max(_rel(exact.to(dtype), exact), _rel(best.to(dtype).expand(4, FEATURES), exact))
    assert _rel(model.weight.grad, exact) <= 1.5 * floor


def test_accumulate_dtype_of_the_parameters_own_is_autogradss_sum():
    model, x = _linear_problem(torch.bfloat16)
    bg.accumulate(
        model, _linear_loss, x, micro_batch_size=ROWS // 16, accumulate_dtype=torch.bfloat16
    )
    assert torch.equal(model.weight.grad, _autograd_sum(model, x, 16))


def test_float32_parameters_get_no_running_sum_and_float64_one_on_request():
    model = nn.Linear(3, 2)
    params = list(model.parameters())
    assert RunningSum.of(params, None) is None
    assert RunningSum.of(params, torch.float16) is None  # never narrower
    wide = RunningSum.of(params, torch.float64)
    assert wide is not None
    assert wide.dtypes == [torch.float64, torch.float64]
    x = torch.randn(40, 3)
    loss_fn = lambda m, x: bg.Loss.from_values(m(x).square())  # noqa: E731
    bg.accumulate(model, loss_fn, x, micro_batch_size=7, accumulate_dtype=torch.float64)
    got = [p.grad.clone() for p in params]
    assert all(g.dtype == torch.float32 for g in got)
    model.zero_grad(set_to_none=True)
    bg.accumulate(model.double(), loss_fn, x.double())
    assert all(_rel(g, p.grad) < 1e-6 for g, p in zip(got, model.parameters(), strict=True))


@pytest.mark.parametrize("value", [torch.int32, torch.complex64, "float32", 32])
def test_a_bad_accumulate_dtype_is_a_config_error_that_changes_nothing(value):
    model, x = _linear_problem(torch.bfloat16)
    old = torch.ones_like(model.weight)
    model.weight.grad = old
    with pytest.raises(bg.ConfigError, match="accumulate_dtype must be None"):
        bg.accumulate(model, _linear_loss, x, micro_batch_size=100, accumulate_dtype=value)
    assert model.weight.grad is old
    assert torch.equal(old, torch.ones_like(old))


def test_a_mixed_model_sums_only_its_half_parameters_aside():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 1))
    model[0].to(torch.bfloat16)

    def loss_fn(m, x):
        return bg.Loss.from_values(m[1](m[0](x).float()).square())

    x = torch.randn(60, 6).to(torch.bfloat16)
    bg.accumulate(model, loss_fn, x, micro_batch_size=9)
    assert [p.grad.dtype for p in model.parameters()] == [torch.bfloat16] * 2 + [torch.float32] * 2
    reference = nn.Sequential(nn.Linear(6, 5), nn.Linear(5, 1)).double()
    reference.load_state_dict(model.state_dict())
    bg.accumulate(reference, lambda m, x: bg.Loss.from_values(m(x).square()), x.double())
    for p, r in zip(model.parameters(), reference.parameters(), strict=True):
        assert _rel(p.grad, r.grad) < 3e-2


def test_existing_gradients_are_added_before_the_one_rounding():
    model, x = _linear_problem(torch.bfloat16)
    old_values = torch.randn(4, FEATURES, generator=torch.Generator().manual_seed(3)).to(
        torch.bfloat16
    )
    old = old_values.clone()
    model.weight.grad = old
    bg.accumulate(model, _linear_loss, x, micro_batch_size=12, existing_grad="add")
    assert model.weight.grad is old
    exact = old_values.double() + _exact(x)
    assert _rel(old, exact) <= 1.5 * _rel(exact.to(torch.bfloat16), exact)


def test_a_float16_gradient_with_finite_entries_and_a_norm_above_65504():
    # Every entry is 1000; the norm, 1e5, does not fit float16: it is taken in float32.
    model = nn.Linear(10_000, 1, bias=False).half()
    x = torch.full((8, 10_000), 1000.0, dtype=torch.float16)
    loss_fn = lambda m, x: bg.Loss.from_values(m(x)[:, 0].float())  # noqa: E731
    report = bg.accumulate(model, loss_fn, x, micro_batch_size=2)
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 1000.0))
    assert report.grad_norm == pytest.approx(1e5, rel=1e-3)


def test_a_non_finite_float16_gradient_names_its_parameter():
    model = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 1)).half()
    x = torch.ones(4, 4, dtype=torch.float16)
    x[2, 0] = 60000.0  # finite, but its gradient in the first layer overflows float16

    def loss_fn(m, x):
        return bg.Loss.from_values(
            (m(x)[:, 0].float() * 1e-8) + (m[0].weight.float() * x[:, :1].float().sum() * 100).sum()
        )

    with pytest.raises(bg.NonFiniteError, match=r"gradient of 0\.weight"):
        bg.accumulate(model, loss_fn, x, micro_batch_size=2)
    assert all(p.grad is None for p in model.parameters())


def test_sparse_embeddings_are_refused_before_any_forward():
    model = nn.Sequential(nn.Embedding(10, 3, sparse=True), nn.Linear(3, 1))
    calls = []

    def loss_fn(m, ids):
        calls.append(1)
        return bg.Loss.from_values(m(ids))

    with pytest.raises(bg.ConfigError, match=r"0 \(Embedding\) has sparse=True"):
        bg.accumulate(model, loss_fn, torch.arange(10), micro_batch_size=4)
    assert not calls
    assert all(p.grad is None for p in model.parameters())
    model[0].sparse = False
    bg.accumulate(model, loss_fn, torch.arange(10), micro_batch_size=4)
    assert model[0].weight.grad.layout == torch.strided


def test_noise_scale_and_clipping_work_with_bfloat16_parameters():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 1)).to(torch.bfloat16)
    x = torch.randn(64, 5).to(torch.bfloat16)
    loss_fn = lambda m, x: bg.Loss.from_values(m(x).float().square())  # noqa: E731
    report = bg.accumulate(model, loss_fn, x, micro_batch_size=8, noise=True)
    assert report.noise is not None
    assert math.isfinite(report.noise.trace_cov)
    model.zero_grad(set_to_none=True)
    report = bg.accumulate(model, loss_fn, x, micro_batch_size=16, clip_per_sample=0.01)
    assert report.clipped is not None
    assert all(p.grad.dtype == torch.bfloat16 for p in model.parameters())


# ---- GradScaler ------------------------------------------------------------------------


def _scaled_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 1))
    x, y = torch.randn(30, 6), torch.randn(30, 1)
    return model, x, y


def _mse(model, batch):
    x, y = batch
    return bg.Loss.from_criterion(nn.MSELoss(), model(x), y)


def test_a_scaler_scales_every_backward_and_reports_unscaled_values():
    model, x, y = _scaled_problem()
    plain = bg.accumulate(model, _mse, (x, y), micro_batch_size=7)
    expected = [p.grad.clone() for p in model.parameters()]
    model.zero_grad(set_to_none=True)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    report = bg.accumulate(model, _mse, (x, y), micro_batch_size=7, scaler=scaler)
    assert not report.overflow
    # A power-of-two scale is exact: p.grad is the scale times the unscaled gradient.
    assert all(
        torch.equal(p.grad, e * 2.0**10) for p, e in zip(model.parameters(), expected, strict=True)
    )
    assert report.loss == plain.loss
    assert report.grad_norm == pytest.approx(plain.grad_norm, rel=1e-6)


def _blow_up_micro_batch(x, index, rows=7):
    """Rows of micro-batch ``index`` so large that their gradient overflows once scaled."""
    x = x.clone()
    x[index * rows : (index + 1) * rows] = 1e36
    return x


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_an_overflowing_micro_batch_skips_the_step_and_the_next_batch_steps_exactly(dtype):
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False).to(dtype)
    x = torch.rand(28, 6).to(dtype)
    reference = nn.Linear(6, 1, bias=False).to(dtype)
    reference.load_state_dict(model.state_dict())

    def loss_fn(m, x):  # linear in the weight: finite loss, huge gradient for huge x
        return bg.Loss(m(x).float().sum(), x.shape[0])

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    before = model.weight.detach().clone()
    report = bg.accumulate(
        model, loss_fn, _blow_up_micro_batch(x, 2), micro_batch_size=7, scaler=scaler
    )
    assert report.overflow
    assert not math.isfinite(report.grad_norm)
    assert math.isfinite(report.loss)
    assert report.noise is None
    scaler.step(optimizer)
    scaler.update()
    assert torch.equal(model.weight, before)  # the step was skipped
    assert scaler.get_scale() == 2.0**15  # and the scale lowered
    optimizer.zero_grad(set_to_none=True)

    report = bg.accumulate(model, loss_fn, x, micro_batch_size=7, scaler=scaler)
    assert not report.overflow
    scaler.step(optimizer)
    scaler.update()
    bg.accumulate(reference, loss_fn, x, micro_batch_size=7)
    torch.optim.SGD(reference.parameters(), lr=0.5).step()
    assert torch.equal(model.weight, reference.weight)  # power-of-two scale: exact


def test_a_non_finite_loss_still_raises_under_a_scaler():
    model, x, y = _scaled_problem()
    x[9, 0] = math.nan
    old = [torch.zeros_like(p) for p in model.parameters()]
    for p, g in zip(model.parameters(), old, strict=True):
        p.grad = g
    scaler = torch.amp.GradScaler("cpu")
    with pytest.raises(bg.NonFiniteError, match="loss of micro-batch 1"):
        bg.accumulate(model, _mse, (x, y), micro_batch_size=7, scaler=scaler)
    assert all(p.grad is g and not g.any() for p, g in zip(model.parameters(), old, strict=True))


def test_a_disabled_scaler_is_no_scaler_and_bad_scalers_are_refused():
    model, x, y = _scaled_problem()

    def loss_fn(m, b):  # sqrt at 0: a finite loss, a NaN gradient
        return bg.Loss(torch.sqrt(m[0].weight[0, 0] * 0) + m(b[0]).sum() * 0, len(b[0]))

    with pytest.raises(bg.NonFiniteError, match=r"gradient of 0\.weight"):
        bg.accumulate(
            model,
            loss_fn,
            (x, y),
            micro_batch_size=7,
            scaler=torch.amp.GradScaler("cpu", enabled=False),
        )
    report = bg.accumulate(
        model, loss_fn, (x, y), micro_batch_size=7, scaler=torch.amp.GradScaler("cpu")
    )
    assert report.overflow
    model.zero_grad(set_to_none=True)
    with pytest.raises(bg.ConfigError, match=r"must be a torch\.amp\.GradScaler"):
        bg.accumulate(model, _mse, (x, y), micro_batch_size=7, scaler=object())
    with pytest.raises(bg.ConfigError, match="clip_per_sample"):
        bg.accumulate(
            model,
            _mse,
            (x, y),
            micro_batch_size=7,
            scaler=torch.amp.GradScaler("cpu"),
            clip_per_sample=1.0,
        )


def test_finite_float32_entries_whose_norm_overflows_float32_are_not_an_error():
    # Entries of 1e20: their squares overflow a float32 sum; the norm is taken again
    # in float64 instead of reporting a non-finite gradient.
    model = nn.Linear(4, 1, bias=False)
    x = torch.full((6, 4), 1e20)
    report = bg.accumulate(
        model, lambda m, x: bg.Loss(m(x).sum(), 1), x, micro_batch_size=2, reduction="sum"
    )
    assert report.grad_norm == pytest.approx(6e20 * 2, rel=1e-6)


# ---- autocast --------------------------------------------------------------------------


def _autocast_problem():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5))
    x, y = torch.randn(96, 16), torch.randint(0, 5, (96,))
    return model, x, y


def _autocast_loss(model, batch):
    x, y = batch
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = model(x)
    return bg.Loss.from_criterion(nn.CrossEntropyLoss(), logits.float(), y)


@pytest.mark.parametrize("micro_batch_size", [48, 12, 5])
def test_autocast_inside_the_loss_is_as_close_to_float64_as_the_whole_batch_under_it(
    micro_batch_size,
):
    model, x, y = _autocast_problem()
    exact = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5)).double()
    exact.load_state_dict(model.state_dict())
    (F.cross_entropy(exact(x.double()), y)).backward()
    reference = torch.cat([p.grad.flatten() for p in exact.parameters()])

    _autocast_loss(model, (x, y)).total.div(len(y)).backward()  # the whole batch at once
    whole = _rel(torch.cat([p.grad.flatten() for p in model.parameters()]), reference)
    model.zero_grad(set_to_none=True)
    bg.accumulate(model, _autocast_loss, (x, y), micro_batch_size=micro_batch_size)
    accumulated = _rel(torch.cat([p.grad.flatten() for p in model.parameters()]), reference)
    assert whole > 1e-4  # autocast did compute in bfloat16
    assert accumulated <= 1.5 * whole, (accumulated, whole)


# ---- data-parallel ---------------------------------------------------------------------


def _ddp_cases():
    rank = dist.get_rank()
    out = {}
    # bf16 parameters, micro-batch counts differ per rank: the float32 running sum, the
    # float32 flat buffer, one rounding at the end.
    for wrap in ("ddp", "plain"):
        model, x = _linear_problem(torch.bfloat16)
        local = x[: ROWS // 3] if rank == 0 else x[ROWS // 3 :]
        wrapped = DistributedDataParallel(model) if wrap == "ddp" else model
        bg.accumulate(wrapped, _linear_loss, local, micro_batch_size=12)
        out[f"bf16-{wrap}"] = (model.weight.grad.clone(), _rel(model.weight.grad, _exact(x)))
        # gradients held before the call, added before the one rounding (each rank its own)
        old_values = torch.randn(4, FEATURES, generator=torch.Generator().manual_seed(rank))
        old = old_values.to(torch.bfloat16)
        model.weight.grad = old.clone()
        bg.accumulate(wrapped, _linear_loss, local, micro_batch_size=12, existing_grad="add")
        exact = old.double() + _exact(x)
        out[f"bf16-add-{wrap}"] = (
            _rel(model.weight.grad, exact),
            _rel(exact.to(torch.bfloat16), exact),
        )
        # an overflow in one micro-batch of rank 1 only: every rank skips
        torch.manual_seed(0)
        model = nn.Linear(6, 1, bias=False)
        reference = nn.Linear(6, 1, bias=False)
        reference.load_state_dict(model.state_dict())
        wrapped = DistributedDataParallel(model) if wrap == "ddp" else model
        data = torch.rand(28, 6, generator=torch.Generator().manual_seed(rank))
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss_fn = lambda m, x: bg.Loss(m(x).sum(), x.shape[0])  # noqa: E731
        bad = _blow_up_micro_batch(data, 1) if rank == 1 else data
        first = bg.accumulate(wrapped, loss_fn, bad, micro_batch_size=7, scaler=scaler)
        before = model.weight.detach().clone()
        scaler.step(optimizer)
        scaler.update()
        skipped = torch.equal(model.weight, before)
        optimizer.zero_grad(set_to_none=True)
        second = bg.accumulate(wrapped, loss_fn, data, micro_batch_size=7, scaler=scaler)
        scaler.step(optimizer)
        scaler.update()
        bg.accumulate(reference, loss_fn, data, micro_batch_size=7)
        torch.optim.SGD(reference.parameters(), lr=0.5).step()
        out[f"scaler-{wrap}"] = (
            first.overflow,
            skipped,
            second.overflow,
            scaler.get_scale(),
            model.weight.detach().clone(),
            reference.weight.detach().clone(),
        )
        # a NaN loss on rank 0 still raises, on every rank
        optimizer.zero_grad(set_to_none=True)
        nan = data.clone()
        if rank == 0:
            nan[3] = math.nan
        try:
            bg.accumulate(wrapped, loss_fn, nan, micro_batch_size=7, scaler=scaler)
            out[f"nan-{wrap}"] = None
        except bg.BatchError as error:
            out[f"nan-{wrap}"] = (type(error).__name__, str(error))
    # float32 parameters summed in float64: never through the agreement that rides in
    # the parameters' own buffer (it would read p.grad, not the float64 sums), also on
    # the calls after the group's first
    model, x = _linear_problem(torch.float32)
    local = x[: ROWS // 3] if rank == 0 else x[ROWS // 3 :]
    wrapped = DistributedDataParallel(model)
    errors = []
    for _ in range(3):
        model.zero_grad(set_to_none=True)
        bg.accumulate(
            wrapped, _linear_loss, local, micro_batch_size=12, accumulate_dtype=torch.float64
        )
        errors.append(_rel(model.weight.grad, _exact(x)))
    out["float64-sum"] = errors
    # autocast inside the loss, the ranks' shares against the whole batch under it
    model, x, y = _autocast_problem()
    share = slice(0, 40) if rank == 0 else slice(40, 96)
    bg.accumulate(
        DistributedDataParallel(model), _autocast_loss, (x[share], y[share]), micro_batch_size=9
    )
    out["autocast"] = torch.cat([p.grad.flatten() for p in model.parameters()])
    # ranks whose scalers disagree on the scale would sum different things
    model = nn.Linear(6, 1, bias=False)
    try:
        bg.accumulate(
            model,
            lambda m, x: bg.Loss(m(x).sum(), x.shape[0]),
            torch.rand(8, 6),
            micro_batch_size=4,
            scaler=torch.amp.GradScaler("cpu", init_scale=2.0 ** (10 + rank)),
        )
        out["scales"] = None
    except bg.BatchError as error:
        out["scales"] = (type(error).__name__, str(error), model.weight.grad)
    # sparse gradients refused on every rank
    sparse = nn.Sequential(nn.Embedding(10, 3, sparse=rank == 0), nn.Linear(3, 1))
    try:
        bg.accumulate(
            sparse, lambda m, i: bg.Loss.from_values(m(i)), torch.arange(10), micro_batch_size=4
        )
        out["sparse"] = None
    except bg.BatchError as error:
        out["sparse"] = (type(error).__name__, str(error))
    return out


@pytest.fixture(scope="module")
def ddp():
    return launch(_ddp_cases, 2, timeout=180)


def test_ddp_a_wider_running_sum_is_exact_on_every_call(ddp):
    for rank in range(2):
        assert max(ddp[rank]["float64-sum"]) <= 1e-6, rank  # float32 parameters


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_ddp_existing_gradients_are_added_before_the_one_rounding(ddp, wrap):
    for rank in range(2):
        err, once = ddp[rank][f"bf16-add-{wrap}"]
        assert err <= 1.1 * once, (rank, err, once)  # rounded twice: about 1.4x


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_ddp_half_parameters_are_within_one_rounding_on_every_rank(ddp, wrap):
    _, x = _linear_problem(torch.bfloat16)
    exact = _exact(x)
    once = _rel(exact.to(torch.bfloat16), exact)
    (grad0, err0), (grad1, _) = ddp[0][f"bf16-{wrap}"], ddp[1][f"bf16-{wrap}"]
    assert torch.equal(grad0, grad1)
    assert grad0.dtype == torch.bfloat16
    assert err0 <= 1.5 * once, (err0, once)


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_ddp_ranks_skip_an_overflow_together_and_then_step_exactly(ddp, wrap):
    for rank in ddp:
        overflow, skipped, again, scale, _, _ = rank[f"scaler-{wrap}"]
        assert overflow
        assert skipped
        assert not again
        assert scale == 2.0**15
    # the step after: the gradient of both ranks' data, equal on both ranks
    assert torch.equal(ddp[0][f"scaler-{wrap}"][4], ddp[1][f"scaler-{wrap}"][4])
    torch.manual_seed(0)
    model = nn.Linear(6, 1, bias=False)
    data = torch.cat(
        [torch.rand(28, 6, generator=torch.Generator().manual_seed(r)) for r in (0, 1)]
    )
    bg.accumulate(model, lambda m, x: bg.Loss(m(x).sum(), x.shape[0]), data)
    torch.optim.SGD(model.parameters(), lr=0.5).step()
    assert torch.allclose(ddp[0][f"scaler-{wrap}"][4], model.weight, rtol=1e-6, atol=0)


@pytest.mark.parametrize("wrap", ["ddp", "plain"])
def test_ddp_a_nan_loss_still_raises_on_every_rank(ddp, wrap):
    for rank in ddp:
        kind, message = rank[f"nan-{wrap}"]
        assert kind == "NonFiniteError"
        assert "On rank 0" in message
        assert "loss" in message


def test_ddp_autocast_is_as_close_to_float64_as_the_whole_batch_under_it(ddp):
    model, x, y = _autocast_problem()
    exact = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 5)).double()
    exact.load_state_dict(model.state_dict())
    F.cross_entropy(exact(x.double()), y).backward()
    reference = torch.cat([p.grad.flatten() for p in exact.parameters()])
    _autocast_loss(model, (x, y)).total.div(len(y)).backward()
    whole = _rel(torch.cat([p.grad.flatten() for p in model.parameters()]), reference)
    assert torch.equal(ddp[0]["autocast"], ddp[1]["autocast"])
    assert _rel(ddp[0]["autocast"], reference) <= 1.5 * whole


def test_ddp_sparse_gradients_are_refused_on_every_rank(ddp):
    for rank in ddp:
        kind, message = rank["sparse"]
        assert kind == "ConfigError"
        assert "On rank 0" in message
        assert "sparse=True" in message


# ---- bptt ------------------------------------------------------------------------------


def test_bptt_with_float16_parameters_takes_its_norm_in_float32():
    # bg.bptt has its own chunk loop (autograd sums the chunks into p.grad); its norm
    # check is the shared one: entries of 1000, a norm of 1e5 above float16's range.
    model = nn.Linear(10_000, 1, bias=False).half()
    sequence = torch.full((1, 4, 10_000), 250.0, dtype=torch.float16)

    def step_fn(m, chunk, state):
        return bg.Loss(m(chunk).float().sum(), 1), state

    report = bg.bptt(model, step_fn, sequence, chunk=2, reduction="sum")
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 1000.0))
    assert report.grad_norm == pytest.approx(1e5, rel=1e-3)


def test_ddp_ranks_whose_scalers_disagree_get_a_config_error(ddp):
    for rank in ddp:
        kind, message, grad = rank["scales"]
        assert kind == "ConfigError"
        assert "scaler: rank 0: 1024.0, rank 1: 2048.0" in message
        assert grad is None
