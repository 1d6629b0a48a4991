import gc
import math
import weakref
from collections import namedtuple

import pytest
import torch
from hypothesis import event, given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import batchgrad as bg
import batchgrad._loop
from tests.cases import CASE_IDS, CASES, TOLERANCE, current_grads, reference_grads, rel_err


def naive_grads(case, model, batch, micro_batch_size):
    """The common recipe: each micro-batch's own mean, divided by the micro-batch count."""
    splits = list(bg._split.micro_batches(batch, micro_batch_size))
    for micro_batch in splits:
        (case.reference(model, micro_batch, "mean") / len(splits)).backward()
    return current_grads(model)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
@given(
    n=st.integers(1, 24),
    split=st.integers(1, 26),
    reduction=st.sampled_from(["mean", "sum"]),
    seed=st.integers(0, 2**16),
)
def test_accumulate_equals_whole_batch(case, dtype, n, split, reduction, seed):
    model, batch = case.build(n, dtype, seed)
    micro_batch_size = min(split, n + 1)  # sizes beyond n run the batch whole
    expected = reference_grads(case, model, batch, reduction)
    if not torch.isfinite(case.reference(model, batch, reduction)):
        # Every unit is masked: PyTorch's mean is 0/0, batchgrad refuses it.
        with pytest.raises(bg.ZeroCountError):
            bg.accumulate(model, case.loss_fn, batch, micro_batch_size=micro_batch_size)
        return

    report = bg.accumulate(
        model, case.loss_fn, batch, micro_batch_size=micro_batch_size, reduction=reduction
    )

    assert rel_err(current_grads(model), expected) <= TOLERANCE[dtype]
    assert report.micro_batches == math.ceil(n / micro_batch_size)
    reference_loss = float(case.reference(model, batch, reduction).detach())
    assert report.loss == pytest.approx(reference_loss, rel=TOLERANCE[dtype], abs=1e-12)
    counts = report.micro_batch_counts
    assert report.count == pytest.approx(sum(counts))
    if reduction == "mean" and dtype == torch.float64 and len(set(counts)) > 1 and min(counts) > 0:
        # Uneven micro-batches: the naive recipe must be measurably wrong here,
        # or this example proves nothing about the weighting.
        model.zero_grad(set_to_none=True)
        naive_error = rel_err(naive_grads(case, model, batch, micro_batch_size), expected)
        event(f"naive rel err ~1e{math.floor(math.log10(naive_error))}")
        assert naive_error > 1e-8


@pytest.mark.parametrize("case", CASES, ids=CASE_IDS)
def test_naive_recipe_is_far_off_on_uneven_splits(case):
    model, batch = case.build(12, torch.float64, seed=3)
    expected = reference_grads(case, model, batch, "mean")
    naive_error = rel_err(naive_grads(case, model, batch, 5), expected)
    model.zero_grad(set_to_none=True)
    bg.accumulate(model, case.loss_fn, batch, micro_batch_size=5)
    assert rel_err(current_grads(model), expected) <= 1e-10
    # The cases with an uneven spread of units are far off; even the CNN, where
    # every sample counts one unit, is off because the last micro-batch is short.
    assert naive_error > 0.01


@pytest.mark.parametrize("micro_batch_size", [1, 2, 5, 10, None])
def test_micro_batch_sizes_from_one_to_whole(micro_batch_size):
    case = CASES[0]
    model, batch = case.build(10, torch.float64, seed=0)
    expected = reference_grads(case, model, batch, "mean")
    bg.accumulate(model, case.loss_fn, batch, micro_batch_size=micro_batch_size)
    assert rel_err(current_grads(model), expected) <= 1e-10


def test_ready_made_micro_batches_of_any_sizes():
    case = CASES[0]
    model, (x, y) = case.build(11, torch.float64, seed=1)
    expected = reference_grads(case, model, (x, y), "mean")
    bounds = [(0, 1), (1, 7), (7, 8), (8, 11)]
    report = bg.accumulate(model, case.loss_fn, ((x[a:b], y[a:b]) for a, b in bounds))
    assert report.micro_batches == 4
    assert rel_err(current_grads(model), expected) <= 1e-10


def test_structures_namedtuples_nested_and_constants_are_passed_through():
    Pair = namedtuple("Pair", ["x", "y"])
    model = nn.Linear(3, 1).double()
    x, y = torch.randn(7, 3, dtype=torch.float64), torch.randn(7, 1, dtype=torch.float64)
    seen = []

    def loss_fn(model, batch):
        pair, (scale, tag) = batch["data"], batch["extra"]
        seen.append((type(pair), tag, scale.shape))
        return bg.Loss.from_values(scale * (model(pair.x) - pair.y).square())

    batch = {"data": Pair(x, y), "extra": (torch.tensor(2.0, dtype=torch.float64), "tag")}
    bg.accumulate(model, loss_fn, batch, micro_batch_size=3)
    assert seen == [(Pair, "tag", torch.Size([]))] * 3
    expected = torch.autograd.grad((2 * (model(x) - y).square()).mean(), list(model.parameters()))
    assert rel_err(current_grads(model), list(expected)) <= 1e-10


def test_report_describes_the_logical_batch():
    model = nn.Linear(2, 1).double()
    x = torch.randn(5, 2, dtype=torch.float64)
    mask = torch.tensor([1, 1, 0, 1, 0], dtype=torch.bool)

    def loss_fn(model, batch):
        x, mask = batch
        return bg.Loss.from_values(model(x).squeeze(1), mask)

    report = bg.accumulate(model, loss_fn, (x, mask), micro_batch_size=2)
    assert (report.micro_batches, report.count, report.micro_batch_counts) == (3, 3, (2, 1, 0))
    assert report.loss == pytest.approx(float(model(x).squeeze(1)[mask].mean().detach()))
    assert report.grad_norm == pytest.approx(
        float(torch.cat([p.grad.flatten() for p in model.parameters()]).norm())
    )
    assert report.reduction == "mean"


def test_weighted_units_give_a_float_count():
    model = nn.Linear(2, 1).double()
    x, w = torch.randn(4, 2, dtype=torch.float64), torch.tensor([0.5, 1.0, 0.25, 1.0])
    report = bg.accumulate(model, lambda m, b: bg.Loss.from_values(m(b[0])[:, 0], b[1]), (x, w))
    assert report.count == 2.75


def test_one_backward_per_micro_batch_and_no_graph_kept_across_micro_batches():
    model = nn.Linear(4, 2)
    x = torch.randn(12, 4)
    backward_calls = []
    model.weight.register_hook(lambda grad: backward_calls.append(1))
    outputs = []

    def loss_fn(model, x):
        # Each earlier micro-batch's activations must be gone by the time the next
        # one starts: nothing of its graph may be kept alive.
        gc.collect()
        assert all(ref() is None for ref in outputs)
        output = model(x)
        outputs.append(weakref.ref(output))
        return bg.Loss.from_values(output.square())

    bg.accumulate(model, loss_fn, x, micro_batch_size=3)
    assert len(backward_calls) == 4


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("micro_batch_size", [60, 24, 7], ids=["k1", "k3-uneven", "k9-uneven"])
def test_equal_units_per_row_give_the_hand_written_loops_gradient_bit_for_bit(
    dtype, micro_batch_size
):
    # One label per sample: N(B) is presumed right from the first micro-batch, so
    # each micro-batch backpropagates total / N(B) exactly as a loop that counted
    # the batch first, and nothing is divided afterwards.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3)).to(dtype)
    x, y = torch.randn(60, 5, dtype=dtype), torch.randint(0, 3, (60,))
    for xs, ys in zip(x.split(micro_batch_size), y.split(micro_batch_size), strict=True):
        (F.cross_entropy(model(xs), ys, reduction="sum") / len(y)).backward()
    expected = current_grads(model)
    model.zero_grad(set_to_none=True)

    def loss_fn(model, batch):
        return bg.Loss.from_criterion(nn.CrossEntropyLoss(), model(batch[0]), batch[1])

    bg.accumulate(model, loss_fn, (x, y), micro_batch_size=micro_batch_size)
    assert all(torch.equal(g, e) for g, e in zip(current_grads(model), expected, strict=True))


def test_a_float16_norm_that_overflows_before_the_division_is_taken_again_after():
    # Ready-made micro-batches presume nothing: their sum is divided at the end. The
    # norm of that sum (1e5) overflows float16; the mean's (1e3) does not.
    model = nn.Linear(10_000, 1, bias=False).half()
    x = torch.full((100, 10_000), 10.0, dtype=torch.float16)
    loss_fn = lambda m, x: bg.Loss.from_values(m(x)[:, 0].float())  # noqa: E731
    report = bg.accumulate(model, loss_fn, iter(x.split(50)))
    assert torch.equal(model.weight.grad, torch.full_like(model.weight, 10.0))
    assert report.grad_norm == pytest.approx(1000.0, rel=1e-3)


def test_without_the_engine_entry_point_the_public_backward_gives_the_same(monkeypatch):
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(10, 3, dtype=torch.float64)
    loss_fn = lambda m, x: bg.Loss.from_values(m(x).square())  # noqa: E731
    bg.accumulate(model, loss_fn, x, micro_batch_size=4)
    expected = current_grads(model)
    model.zero_grad(set_to_none=True)
    monkeypatch.setattr(batchgrad._loop, "_run_backward", None)
    bg.accumulate(model, loss_fn, x, micro_batch_size=4)
    assert all(torch.equal(g, e) for g, e in zip(current_grads(model), expected, strict=True))


def test_a_wrong_presumption_of_the_count_is_corrected():
    # The first micro-batch holds 1 unit in 4 rows, so N(B) is presumed 1 · 12/4 = 3;
    # it is 8.
    torch.manual_seed(0)
    model = nn.Linear(3, 1).double()
    x = torch.randn(12, 3, dtype=torch.float64)
    mask = torch.tensor([1, 0, 0, 0, 1, 1, 1, 1, 1, 1, 1, 0], dtype=torch.bool)
    loss_fn = lambda m, b: bg.Loss.from_values(m(b[0])[:, 0].square(), b[1])  # noqa: E731
    values = model(x)[:, 0].square()
    (values[mask].sum() / mask.sum()).backward()
    expected = current_grads(model)
    model.zero_grad(set_to_none=True)

    report = bg.accumulate(model, loss_fn, (x, mask), micro_batch_size=4)
    assert report.micro_batch_counts == (1, 4, 3)
    assert rel_err(current_grads(model), expected) <= 1e-14


# ---- gradients already present -------------------------------------------------


def _linear_problem():
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x = torch.randn(6, 3, dtype=torch.float64)
    return model, x, lambda m, x: bg.Loss.from_values(m(x).square())


def test_stale_gradients_are_refused_and_kept():
    model, x, loss_fn = _linear_problem()
    model(x).sum().backward()
    before = [p.grad for p in model.parameters()]
    values = [g.clone() for g in before]
    with pytest.raises(bg.ExistingGradError, match=r"weight.*zero_grad\(\).*existing_grad='add'"):
        bg.accumulate(model, loss_fn, x)
    for p, grad, value in zip(model.parameters(), before, values, strict=True):
        assert p.grad is grad
        assert torch.equal(p.grad, value)


def test_zeroed_gradients_count_as_cleared():
    model, x, loss_fn = _linear_problem()
    model(x).sum().backward()
    model.zero_grad(set_to_none=False)
    bg.accumulate(model, loss_fn, x)
    expected = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    assert rel_err(current_grads(model), list(expected)) <= 1e-10


@pytest.mark.parametrize("mode", ["replace", "add"])
def test_existing_gradients_replaced_or_added(mode):
    model, x, loss_fn = _linear_problem()
    model(x).sum().backward()
    old = [p.grad.clone() for p in model.parameters()]
    report = bg.accumulate(model, loss_fn, x, micro_batch_size=4, existing_grad=mode)
    fresh = torch.autograd.grad(model(x).square().mean(), list(model.parameters()))
    expected = [f + o for f, o in zip(fresh, old, strict=True)] if mode == "add" else list(fresh)
    assert rel_err(current_grads(model), expected) <= 1e-10
    assert report.grad_norm == pytest.approx(
        float(torch.cat([e.flatten() for e in expected]).norm())
    )


# ---- bad input: each raises a BatchError and leaves gradients and buffers as they were ----


def _model_with_state():
    """A model with a BatchNorm (its running stats change on every forward) and
    gradients in two states: present on the first layer, None on the last."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 1)).double()
    model(torch.randn(5, 3, dtype=torch.float64)).sum().backward()
    model[2].weight.grad = None
    model[2].bias.grad = None
    return model


def _state(model):
    grads = [(p.grad, None if p.grad is None else p.grad.clone()) for p in model.parameters()]
    buffers = [b.clone() for b in model.buffers()]
    return grads, buffers


def _assert_unchanged(model, state):
    grads, buffers = state
    for p, (grad, value) in zip(model.parameters(), grads, strict=True):
        assert p.grad is grad
        if grad is not None:
            assert torch.equal(p.grad, value)
    for buffer, value in zip(model.buffers(), buffers, strict=True):
        assert torch.equal(buffer, value)


def _square_loss(model, batch):
    return bg.Loss.from_values(model(batch).square())


_X = torch.randn(8, 3, dtype=torch.float64)


def _nan_in_third_micro_batch():
    x = _X.clone()
    x[5, 0] = float("nan")
    return x


def _sqrt_of_zero(model, batch):
    # Finite loss, infinite gradient: d/dz sqrt(z) at z = 0.
    out = model(batch)
    return bg.Loss(out.sum() + (out[:, 0] * 0).square().sum().sqrt(), batch.shape[0])


def _nan_count_in_the_short_micro_batch(model, batch):
    count = torch.tensor(float("nan")) if batch.shape[0] < 3 else batch.shape[0]
    return bg.Loss(model(batch).sum(), count)


def _zero_units(model, batch):
    return bg.Loss.from_values(model(batch), torch.zeros_like(model(batch), dtype=torch.bool))


BAD_INPUTS = [
    pytest.param(
        _square_loss,
        _nan_in_third_micro_batch(),
        {"micro_batch_size": 2, "existing_grad": "replace"},
        bg.NonFiniteError,
        r"loss of micro-batch 2 is nan",
        id="nan-loss",
    ),
    pytest.param(
        _sqrt_of_zero,
        _X,
        {"micro_batch_size": 3, "existing_grad": "replace"},
        bg.NonFiniteError,
        r"gradient of 0\.weight, 0\.bias.*first seen in micro-batch 0",
        id="inf-grad",
    ),
    pytest.param(
        _zero_units,
        _X,
        {"micro_batch_size": 3, "existing_grad": "replace"},
        bg.ZeroCountError,
        r"0 units over its 3 micro-batch\(es\).*reduction='sum'",
        id="zero-count",
    ),
    pytest.param(
        _square_loss,
        (_X, torch.randn(7, 1)),
        {"existing_grad": "replace"},
        bg.BatchShapeError,
        r"batch\[0\] has 8, batch\[1\] has 7",
        id="dim0-mismatch",
    ),
    pytest.param(
        _square_loss,
        iter([_X[:4], (_X[4:], torch.randn(2, 1))]),
        {"existing_grad": "replace"},
        bg.BatchShapeError,
        r"micro-batch 1 disagree",
        id="dim0-mismatch-in-micro-batch",
    ),
    pytest.param(
        _square_loss,
        _X[:0],
        {"existing_grad": "replace"},
        bg.EmptyBatchError,
        r"0 samples",
        id="empty-batch",
    ),
    pytest.param(
        _square_loss,
        iter([]),
        {"existing_grad": "replace"},
        bg.EmptyBatchError,
        r"yielded nothing",
        id="no-micro-batches",
    ),
    pytest.param(
        lambda model, batch: model(batch).square().mean(),
        _X,
        {"micro_batch_size": 4, "existing_grad": "replace"},
        bg.LossTypeError,
        r"returned Tensor for micro-batch 0.*bg\.Loss",
        id="not-a-loss",
    ),
    pytest.param(
        lambda model, batch: bg.Loss(model(batch).square(), batch.shape[0]),
        _X,
        {"micro_batch_size": 4, "existing_grad": "replace"},
        bg.LossTypeError,
        r"total of micro-batch 0 must be a 0-d tensor.*\.sum\(\)",
        id="total-not-0d",
    ),
    pytest.param(
        lambda model, batch: bg.Loss(batch.sum(), batch.shape[0]),
        _X,
        {"micro_batch_size": 4, "existing_grad": "replace"},
        bg.LossTypeError,
        r"micro-batch 0 does not depend on any parameter",
        id="total-without-graph",
    ),
    pytest.param(
        lambda model, batch: bg.Loss(model(batch).sum(), -1),
        _X,
        {"micro_batch_size": 4, "existing_grad": "replace"},
        bg.LossTypeError,
        r"count of micro-batch 0 is -1",
        id="negative-count",
    ),
    pytest.param(
        _nan_count_in_the_short_micro_batch,
        _X,
        {"micro_batch_size": 3, "existing_grad": "replace"},
        bg.LossTypeError,
        r"count of micro-batch 2 is nan; a count must be a finite number.*how loss_fn counts",
        id="nan-count",
    ),
    pytest.param(
        lambda model, batch: bg.Loss(model(batch).sum(), "8"),
        _X,
        {"micro_batch_size": 4, "existing_grad": "replace"},
        bg.LossTypeError,
        r"count of micro-batch 0 must be an int, float or 0-d tensor, got str",
        id="count-wrong-type",
    ),
    pytest.param(
        _square_loss,
        _X,
        {"micro_batch_size": 0, "existing_grad": "replace"},
        bg.ConfigError,
        r"at least 1, got 0",
        id="micro-batch-size-0",
    ),
    pytest.param(
        _square_loss,
        _X,
        {"micro_batch_size": "auto", "existing_grad": "replace"},
        bg.ConfigError,
        r"positive int or None",
        id="micro-batch-size-not-int",
    ),
    pytest.param(
        _square_loss,
        iter([_X]),
        {"micro_batch_size": 2, "existing_grad": "replace"},
        bg.ConfigError,
        r"give one or the other",
        id="size-with-ready-micro-batches",
    ),
    pytest.param(
        _square_loss,
        _X,
        {"reduction": "avg", "existing_grad": "replace"},
        bg.ConfigError,
        r"reduction must be one of",
        id="bad-reduction",
    ),
]


@pytest.mark.parametrize(("loss_fn", "batch", "kwargs", "error", "message"), BAD_INPUTS)
def test_bad_input_raises_and_leaves_gradients_and_buffers_untouched(
    loss_fn, batch, kwargs, error, message
):
    model = _model_with_state()
    state = _state(model)
    with pytest.raises(error, match=message) as raised:
        bg.accumulate(model, loss_fn, batch, **kwargs)
    assert isinstance(raised.value, bg.BatchError)
    _assert_unchanged(model, state)


def test_error_raised_by_the_users_loss_fn_also_restores_state():
    model = _model_with_state()
    state = _state(model)

    def loss_fn(model, batch):
        if batch.shape[0] < 3:
            raise RuntimeError("user bug in the last micro-batch")
        return _square_loss(model, batch)

    with pytest.raises(RuntimeError, match="user bug"):
        bg.accumulate(model, loss_fn, _X, micro_batch_size=3, existing_grad="replace")
    _assert_unchanged(model, state)


def test_inf_grad_in_ready_made_micro_batches_names_the_parameter():
    model = _model_with_state()
    state = _state(model)
    with pytest.raises(bg.NonFiniteError, match=r"0\.weight.*unknown micro-batch"):
        bg.accumulate(model, _sqrt_of_zero, iter([_X[:4], _X[4:]]), existing_grad="replace")
    _assert_unchanged(model, state)


def test_inf_grad_that_needs_the_randomness_of_the_call_is_not_found_by_the_replay():
    # The gradient is infinite only where a random draw of the call falls below 0.5;
    # the replay draws afresh, then puts the random state back as the call left it.
    model = _model_with_state()
    state = _state(model)
    calls, after_call = [], []

    def loss_fn(model, batch):
        draw = float(torch.rand(()))
        calls.append(draw)
        if len(calls) == 2:  # the end of the call: two micro-batches
            after_call.append(torch.get_rng_state())
        singular = draw < 0.5 and len(calls) <= 2
        return _sqrt_of_zero(model, batch) if singular else _square_loss(model, batch)

    torch.manual_seed(3)
    assert float(torch.rand(())) < 0.5  # so the call's first draw is the singular one
    torch.manual_seed(3)
    with pytest.raises(bg.NonFiniteError, match=r"did not fail again when replayed alone"):
        bg.accumulate(model, loss_fn, _X, micro_batch_size=4, existing_grad="replace")
    assert len(calls) == 4
    assert torch.equal(torch.get_rng_state(), after_call[0])
    _assert_unchanged(model, state)


def test_float32_masked_language_model_matches_f_cross_entropy():
    # The same check as the property test, written out once for a reader.
    case = CASES[-1]
    model, batch = case.build(9, torch.float32, seed=5)
    bg.accumulate(model, case.loss_fn, batch, micro_batch_size=2)
    logits = model(batch.input_ids)
    loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten())
    expected = torch.autograd.grad(loss, list(model.parameters()))
    assert rel_err(current_grads(model), list(expected)) <= 1e-5


@pytest.mark.parametrize("existing_grad", ["error", "replace", "add"])
def test_gradients_land_in_the_tensors_held_before_the_call(existing_grad):
    # Autograd accumulates into an existing p.grad in place; code that keeps the
    # gradients as views of one flat buffer must find the result there.
    torch.manual_seed(0)
    model = nn.Linear(3, 2).double()
    x, y = torch.randn(5, 3, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64)
    expected = torch.autograd.grad(F.mse_loss(model(x), y), list(model.parameters()))
    flat = torch.zeros(sum(p.numel() for p in model.parameters()), dtype=torch.float64)
    views = list(torch.split(flat, [p.numel() for p in model.parameters()]))
    for p, view in zip(model.parameters(), views, strict=True):
        p.grad = view.view_as(p)
    held = [p.grad for p in model.parameters()]

    bg.accumulate(
        model,
        lambda m, b: bg.Loss.from_criterion(nn.MSELoss(), m(b[0]), b[1]),
        (x, y),
        micro_batch_size=2,
        existing_grad=existing_grad,
    )

    assert all(p.grad is g for p, g in zip(model.parameters(), held, strict=True))
    for view, grad in zip(views, expected, strict=True):
        torch.testing.assert_close(view, grad.flatten(), rtol=1e-12, atol=0)
