"""bg.bptt, bg.tbptt and bg.time_contributions against full backpropagation through time."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import batchgrad as bg


class TanhRNNCell(nn.Module):
    """A user-written cell: h' = tanh(W x + U h)."""

    def __init__(self, n_in: int, hidden: int) -> None:
        super().__init__()
        self.input = nn.Linear(n_in, hidden)
        self.recurrent = nn.Linear(hidden, hidden, bias=False)

    def forward(self, x, h):
        return torch.tanh(self.input(x) + self.recurrent(h))


CELLS = ["rnn", "gru", "lstm", "custom"]


class Net(nn.Module):
    def __init__(self, kind: str, n_in=3, hidden=4, n_out=3, dropout=0.0):
        super().__init__()
        self.kind, self.hidden = kind, hidden
        make = {"rnn": nn.RNNCell, "gru": nn.GRUCell, "lstm": nn.LSTMCell, "custom": TanhRNNCell}
        self.cell = make[kind](n_in, hidden)
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(hidden, n_out)


def step_fn(model, chunk, state):
    """Per-step cross-entropy over the unmasked steps; the state is h, or (h, c)."""
    x, y, mask = chunk["x"], chunk["y"], chunk["mask"]
    assert chunk["name"] == "toy"  # non-tensor leaves reach every chunk
    assert chunk["lengths"].shape == (x.shape[0],)  # 1-D leaves are not cut in time
    if state is None:
        h = x.new_zeros(x.shape[0], model.hidden)
        state = (h, h) if model.kind == "lstm" else h
    losses = []
    for t in range(x.shape[1]):
        state = model.cell(model.drop(x[:, t]), state)
        h = state[0] if model.kind == "lstm" else state
        losses.append(F.cross_entropy(model.head(h), y[:, t], reduction="none"))
    return bg.Loss.from_values(torch.stack(losses, 1), mask), state


def make_sequence(batch, steps, seed, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(1, steps + 1, (batch,), generator=g)
    lengths[0] = steps
    return {
        "x": torch.randn(batch, steps, 3, dtype=dtype, generator=g),
        "y": torch.randint(0, 3, (batch, steps), generator=g),
        "mask": torch.arange(steps) < lengths[:, None],  # variable-length sequences
        "lengths": lengths,
        "name": "toy",
    }


def full_bptt(model, sequence, reduction="mean", initial_state=None, seed=0):
    """The reference: the whole sequence in one graph, one backward."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss, _ = step_fn(model, sequence, initial_state)
    (loss.total / (loss.count if reduction == "mean" else 1)).backward()
    grads = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


def rel_err(model, reference):
    worst = 0.0
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        worst = max(worst, float((p.grad - reference[name]).norm() / reference[name].norm()))
    return worst


@given(
    kind=st.sampled_from(CELLS),
    batch=st.integers(1, 4),
    steps=st.integers(1, 9),
    chunk=st.integers(1, 10),
    reduction=st.sampled_from(["mean", "sum"]),
    dropout=st.sampled_from([0.0, 0.5]),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=60, deadline=None)
def test_bptt_equals_full_bptt(kind, batch, steps, chunk, reduction, dropout, dtype, seed):
    torch.manual_seed(seed)
    model = Net(kind, dropout=dropout).to(dtype)
    sequence = make_sequence(batch, steps, seed, dtype)
    reference = full_bptt(model, sequence, reduction, seed=seed)

    torch.manual_seed(seed)  # the same dropout masks as the reference
    report = bg.bptt(model, step_fn, sequence, chunk=chunk, reduction=reduction)

    assert rel_err(model, reference) <= (1e-10 if dtype == torch.float64 else 1e-5)
    assert report.chunks == -(-steps // chunk)
    assert report.count == int(sequence["mask"].sum())
    assert sum(report.chunk_counts) == report.count
    assert report.time_steps == steps
    assert report.micro_batches == 1


@pytest.mark.parametrize("chunk", [1, 3, 7, 100])
@pytest.mark.parametrize("micro_batch_size", [1, 2, 5])
def test_bptt_composes_with_micro_batches(chunk, micro_batch_size):
    torch.manual_seed(0)
    model = Net("lstm").double()
    sequence = make_sequence(5, 7, seed=1)
    h0 = torch.randn(5, 4, dtype=torch.float64)
    initial_state = (h0, torch.randn(5, 4, dtype=torch.float64))  # batch first: split too
    reference = full_bptt(model, sequence, initial_state=initial_state)

    report = bg.bptt(
        model,
        step_fn,
        sequence,
        chunk=chunk,
        initial_state=initial_state,
        micro_batch_size=micro_batch_size,
    )

    assert rel_err(model, reference) <= 1e-10
    assert report.micro_batches == -(-5 // micro_batch_size)
    assert report.count == int(sequence["mask"].sum())


def test_bptt_with_a_fused_lstm_and_a_dict_state():
    """nn.LSTM over a whole chunk, its (h, c) carried in a dict, not batch first."""
    torch.manual_seed(0)
    lstm, head = nn.LSTM(2, 5, batch_first=True).double(), nn.Linear(5, 1).double()
    model = nn.ModuleDict({"lstm": lstm, "head": head})
    x, target = torch.randn(3, 12, 2, dtype=torch.float64), torch.randn(3, 12, 1).double()

    def lstm_step(model, chunk, state):
        x, target = chunk
        hc = None if state is None else (state["h"], state["c"])
        out, (h, c) = model["lstm"](x, hc)
        return bg.Loss.from_values((model["head"](out) - target) ** 2), {"h": h, "c": c}

    loss, _ = lstm_step(model, (x, target), None)
    (loss.total / loss.count).backward()
    reference = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    bg.bptt(model, lstm_step, (x, target), chunk=5)

    assert rel_err(model, reference) <= 1e-10


def test_a_learned_initial_state_receives_its_gradient():
    torch.manual_seed(0)
    model = Net("rnn").double()
    model.h0 = nn.Parameter(torch.randn(1, 4, dtype=torch.float64))
    sequence = make_sequence(3, 6, seed=2)
    reference = full_bptt(model, sequence, initial_state=model.h0.expand(3, 4))

    bg.bptt(model, step_fn, sequence, chunk=2, initial_state=model.h0.expand(3, 4))

    assert rel_err(model, reference) <= 1e-10


def test_bptt_leaves_rng_and_buffers_as_one_forward_pass_does():
    torch.manual_seed(0)
    model = Net("gru", dropout=0.3).double()
    model.register_buffer("calls", torch.zeros((), dtype=torch.float64))

    def counting_step(model, chunk, state):
        model.calls += chunk["x"].shape[1]  # a buffer updated by the forward
        return step_fn(model, chunk, state)

    sequence = make_sequence(2, 9, seed=3)
    torch.manual_seed(5)
    counting_step(model, sequence, None)
    after_one_forward = torch.get_rng_state()
    model.calls.zero_()

    torch.manual_seed(5)
    bg.bptt(model, counting_step, sequence, chunk=4)

    assert torch.equal(torch.get_rng_state(), after_one_forward)
    assert model.calls.item() == 9


@pytest.mark.parametrize("existing", ["replace", "add"])
def test_existing_gradients(existing):
    torch.manual_seed(0)
    model = Net("rnn").double()
    sequence = make_sequence(2, 5, seed=4)
    reference = full_bptt(model, sequence)
    old = {name: torch.randn_like(p) for name, p in model.named_parameters()}
    for name, p in model.named_parameters():
        p.grad = old[name].clone()

    bg.bptt(model, step_fn, sequence, chunk=2, existing_grad=existing)

    expected = reference if existing == "replace" else {n: reference[n] + old[n] for n in old}
    assert rel_err(model, expected) <= 1e-10


# -- time_contributions -----------------------------------------------------------


@pytest.mark.parametrize("kind", CELLS)
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_time_contributions_sum_to_the_full_gradient(kind, reduction):
    torch.manual_seed(0)
    model = Net(kind).double()
    sequence = make_sequence(3, 6, seed=5)
    reference = full_bptt(model, sequence, reduction)

    result = bg.time_contributions(model, step_fn, sequence, reduction=reduction)

    for name, p in model.named_parameters():
        assert p.grad is None  # a diagnostic: gradients untouched
        assert result.grads[name].shape == (6, *p.shape)
        summed = result.grads[name].sum(0)
        assert float((summed - reference[name]).norm() / reference[name].norm()) <= 1e-10
    norms = torch.stack(
        [torch.cat([g[t].flatten() for g in result.grads.values()]).norm() for t in range(6)]
    )
    torch.testing.assert_close(result.step_norms, norms, rtol=1e-12, atol=1e-15)
    assert result.count == int(sequence["mask"].sum())


def test_state_gradient_norms_match_autograd():
    """‖∂(losses after step t)/∂h_t‖, from one full forward with autograd."""
    torch.manual_seed(0)
    model = Net("rnn").double()
    sequence = make_sequence(2, 7, seed=6)
    x, y, mask = sequence["x"], sequence["y"], sequence["mask"]
    states, losses = [], []
    h = x.new_zeros(2, 4)
    for t in range(7):
        h = model.cell(x[:, t], h)
        states.append(h)
        step = F.cross_entropy(model.head(h), y[:, t], reduction="none")
        losses.append(torch.where(mask[:, t], step, 0).sum() / mask.sum())
    expected = [
        torch.autograd.grad(sum(losses[t + 1 :]), states[t], retain_graph=True)[0].norm()
        for t in range(6)
    ]
    expected.append(torch.zeros((), dtype=torch.float64))

    result = bg.time_contributions(model, step_fn, sequence, keep_grads=False)

    assert result.grads == {}
    torch.testing.assert_close(
        result.state_grad_norms, torch.stack(expected), rtol=1e-12, atol=1e-15
    )


# -- tbptt ------------------------------------------------------------------------


def brute_force_tbptt(model, sequence, k1, k2, reduction="mean"):
    """Williams and Peng, a step at a time: window j holds steps [j*k1, (j+1)*k1); their
    losses are backpropagated through them and the k2 - k1 steps before, to the
    state there, cut from the graph."""
    x, y, mask = sequence["x"], sequence["y"], sequence["mask"]
    steps = x.shape[1]
    with torch.no_grad():  # the states of one plain forward
        states = [x.new_zeros(x.shape[0], model.hidden)]
        for t in range(steps):
            states.append(model.cell(x[:, t], states[-1]))
    model.zero_grad(set_to_none=True)
    for first in range(0, steps, k1):
        stop = min(first + k1, steps)
        start = max(0, first - (k2 - k1))
        h = states[start].detach()
        total = x.new_zeros(())
        for t in range(start, stop):
            h = model.cell(x[:, t], h)
            if t >= first:
                losses = F.cross_entropy(model.head(h), y[:, t], reduction="none")
                total = total + torch.where(mask[:, t], losses, 0).sum()
        total.backward()
    divisor = float(mask.sum()) if reduction == "mean" else 1.0
    grads = {name: p.grad / divisor for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize(("k1", "k2"), [(1, 1), (2, 2), (3, None), (2, 5), (3, 4), (4, 9), (9, 9)])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_tbptt_equals_the_brute_force_reference(k1, k2, reduction):
    torch.manual_seed(0)
    model = Net("rnn").double()
    sequence = make_sequence(3, 9, seed=7)
    reference = brute_force_tbptt(model, sequence, k1, k2 or k1, reduction)

    report = bg.tbptt(model, step_fn, sequence, k1=k1, k2=k2, reduction=reduction)

    assert rel_err(model, reference) <= 1e-10
    assert report.chunks == -(-9 // k1)
    assert report.count == int(sequence["mask"].sum())


def test_tbptt_with_k1_at_least_t_is_full_bptt():
    torch.manual_seed(0)
    model = Net("lstm").double()
    sequence = make_sequence(3, 6, seed=8)
    reference = full_bptt(model, sequence)

    bg.tbptt(model, step_fn, sequence, k1=6)

    assert rel_err(model, reference) <= 1e-10


def test_tbptt_with_an_optimizer_steps_after_every_window():
    torch.manual_seed(0)
    model = Net("rnn").double()
    twin = Net("rnn").double()
    twin.load_state_dict(model.state_dict())
    sequence = make_sequence(2, 7, seed=9)
    x, y, mask = sequence["x"], sequence["y"], sequence["mask"]
    # reference: the common loop, detaching every 3 steps and stepping per window
    optimizer = torch.optim.SGD(twin.parameters(), lr=0.5)
    h = x.new_zeros(2, 4)
    for first in range(0, 7, 3):
        h = h.detach()
        losses = []
        for t in range(first, min(first + 3, 7)):
            h = twin.cell(x[:, t], h)
            losses.append(F.cross_entropy(twin.head(h), y[:, t], reduction="none"))
        window_mask = mask[:, first : first + 3]
        (torch.where(window_mask, torch.stack(losses, 1), 0).sum() / window_mask.sum()).backward()
        optimizer.step()
        optimizer.zero_grad()

    report = bg.tbptt(
        model, step_fn, sequence, k1=3, optimizer=torch.optim.SGD(model.parameters(), lr=0.5)
    )

    assert report.chunks == 3
    for p, q in zip(model.parameters(), twin.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)
        assert p.grad is None


def test_tbptt_replays_dropout_when_recomputing():
    """With k2 > k1 earlier steps are recomputed; their dropout masks must not change,
    so with windows reaching back to step 0 the result is full BPTT's."""
    torch.manual_seed(0)
    model = Net("gru", dropout=0.5).double()
    sequence = make_sequence(2, 8, seed=10)
    torch.manual_seed(3)
    bg.tbptt(model, step_fn, sequence, k1=8)
    single_window = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad(set_to_none=True)

    for k1 in (2, 3):  # k2 - k1 >= T: every window backpropagates to step 0
        torch.manual_seed(3)
        bg.tbptt(model, step_fn, sequence, k1=k1, k2=k1 + 8)
        assert rel_err(model, single_window) <= 1e-10
        model.zero_grad(set_to_none=True)


# -- bad input: a clear BatchError, and the model as it was ---------------------------


def _snapshot(model):
    return {n: None if p.grad is None else p.grad.clone() for n, p in model.named_parameters()}


def _assert_untouched(model, before):
    for name, p in model.named_parameters():
        if before[name] is None:
            assert p.grad is None, name
        else:
            assert torch.equal(p.grad, before[name]), name


def _nan_step(model, chunk, state):
    loss, state = step_fn(model, chunk, state)
    if chunk["x"].shape[1] and chunk["x"][0, 0, 0] == 42.0:
        return bg.Loss(loss.total * float("nan"), loss.count), state
    return loss, state


def _sqrt_step(model, chunk, state):
    loss, state = step_fn(model, chunk, state)
    return bg.Loss(loss.total + (model.head.bias * 0).sqrt().sum(), loss.count), state


BAD_CALLS = {
    "chunk 0": (dict(chunk=0), bg.ConfigError, r"chunk must be a positive int .*got 0"),
    "chunk True": (dict(chunk=True), bg.ConfigError, r"chunk must be a positive int"),
    "reduction": (dict(chunk=2, reduction="avg"), bg.ConfigError, r"reduction must be one of"),
    "no time dimension": (
        dict(chunk=2, sequence=torch.randn(3)),
        bg.BatchShapeError,
        r"no tensor shaped \[batch, time, \.\.\.\]",
    ),
    "times disagree": (
        dict(chunk=2, sequence={"x": torch.randn(2, 5, 3), "y": torch.zeros(2, 4)}),
        bg.BatchShapeError,
        r"disagree on the time dimension.*sequence\['y'\] has 4",
    ),
    "not a pair": (
        dict(chunk=2, step_fn=lambda m, c, s: step_fn(m, c, s)[0]),
        bg.LossTypeError,
        r"step_fn returned Loss for time chunk 0 \(steps 0-1\); it must return a pair",
    ),
    "not a Loss": (
        dict(chunk=2, step_fn=lambda m, c, s: (1.0, None)),
        bg.LossTypeError,
        r"\(float, state\) for time chunk 0.*must be a bg.Loss",
    ),
    "state not detachable": (
        dict(chunk=2, step_fn=lambda m, c, s: (step_fn(m, c, None)[0], object())),
        bg.StateError,
        r"state is a object, which batchgrad cannot cut from the autograd graph",
    ),
    "NaN loss": (
        dict(chunk=2, step_fn=_nan_step, nan_at=4),
        bg.NonFiniteError,
        r"time chunk 2 \(steps 4-5\) is nan",
    ),
    "zero count": (
        dict(
            chunk=2,
            step_fn=lambda m, c, s: (bg.Loss(step_fn(m, c, s)[0].total, 0), step_fn(m, c, s)[1]),
        ),
        bg.ZeroCountError,
        r"0 units over 3 time chunk\(s\)",
    ),
    "NaN gradient": (
        dict(chunk=2, step_fn=_sqrt_step),
        bg.NonFiniteError,
        r"gradient of head.bias is NaN",
    ),
    "nothing attached": (
        dict(chunk=2, step_fn=lambda m, c, s: (bg.Loss(torch.zeros(()), 1), s)),
        bg.LossTypeError,
        r"No chunk's Loss.total depends on a parameter",
    ),
    "state kept on the module": (
        dict(chunk=2, step_fn=lambda m, c, s: _state_on_module_step(m, c)),
        bg.StateError,
        r"time chunk \d \(steps .*\) was .* in the forward pass but .* when recomputed "
        r"from the state entering it.*self.hidden = h",
    ),
    "initial state not batch first": (
        dict(chunk=2, micro_batch_size=1, initial_state=torch.zeros(4, 2)),
        bg.BatchShapeError,
        r"initial_state must be batch first",
    ),
}


def _state_on_module_step(model, chunk):
    """A step_fn that carries its hidden state on the module, not through ``state``."""
    loss, h = step_fn(model, chunk, getattr(model, "kept_h", None))
    model.kept_h = h.detach()
    return loss, None


def test_time_contributions_refuses_a_state_kept_on_the_module():
    model = Net("gru").double()
    with pytest.raises(bg.StateError, match="recomputed from the state entering it"):
        bg.time_contributions(
            model, lambda m, c, s: _state_on_module_step(m, c), make_sequence(2, 4, seed=3)
        )


@pytest.mark.parametrize("case", list(BAD_CALLS))
@pytest.mark.parametrize("had_grads", [False, True])
def test_bad_input_raises_and_leaves_the_model_as_it_was(case, had_grads):
    torch.manual_seed(0)
    model = Net("rnn").double()
    model.register_buffer("calls", torch.zeros(()))
    if had_grads:
        for p in model.parameters():
            p.grad = torch.zeros_like(p)  # cleared, not None: accepted and kept
    kwargs, error, message = BAD_CALLS[case]
    kwargs = dict(kwargs)
    sequence = kwargs.pop("sequence", make_sequence(2, 6, seed=11))
    if "nan_at" in kwargs:
        sequence["x"][0, kwargs.pop("nan_at"), 0] = 42.0
    user_step = kwargs.pop("step_fn", step_fn)

    def counting_step(model, chunk, state):
        model.calls += 1
        return user_step(model, chunk, state)

    before, rng = _snapshot(model), torch.get_rng_state()

    with pytest.raises(error, match=message):
        bg.bptt(model, counting_step, sequence, **kwargs)

    _assert_untouched(model, before)
    assert model.calls.item() == 0
    assert torch.equal(torch.get_rng_state(), rng)


def test_stale_gradients_are_refused():
    model = Net("rnn").double()
    model.head.bias.grad = torch.ones(3, dtype=torch.float64)
    before = _snapshot(model)
    sequence = make_sequence(2, 4, seed=12)

    with pytest.raises(bg.ExistingGradError, match=r"head\.bias"):
        bg.bptt(model, step_fn, sequence, chunk=2)
    with pytest.raises(bg.ExistingGradError, match=r"head\.bias"):
        bg.tbptt(model, step_fn, sequence, k1=2)

    _assert_untouched(model, before)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(k1=0), r"k1 must be a positive int"),
        (dict(k1=3, k2=2), r"k2=2 is smaller than k1=3"),
        (dict(k1=2, k2=1.5), r"k2 must be a positive int"),
        (
            dict(k1=2, optimizer=True, existing_grad="add"),
            r"'add' cannot be combined with an optimizer",
        ),
    ],
)
def test_tbptt_refuses_invalid_windows(kwargs, message):
    model = Net("rnn").double()
    with pytest.raises(bg.ConfigError, match=message):
        bg.tbptt(model, step_fn, make_sequence(2, 4, seed=13), **kwargs)
    assert all(p.grad is None for p in model.parameters())


def test_tbptt_names_the_window_of_a_nan_loss():
    model = Net("rnn").double()
    sequence = make_sequence(2, 6, seed=14)
    sequence["x"][0, 4, 0] = 42.0
    with pytest.raises(bg.NonFiniteError, match=r"window 2 \(steps 4-5\) is nan"):
        bg.tbptt(model, _nan_step, sequence, k1=2)
    assert all(p.grad is None for p in model.parameters())


def test_a_state_that_changes_structure_is_refused():
    model = Net("rnn").double()
    calls = []

    def shifting_step(model, chunk, state):
        loss, h = step_fn(model, chunk, None if state is None else state[0])
        calls.append(1)
        return loss, (h,) * (1 if len(calls) <= 3 else 2)  # pass 1 returns 1 tensor, then 2

    with pytest.raises(
        bg.StateError, match=r"state of 2 tensor\(s\) for time chunk 1 .* but 1 before"
    ):
        bg.bptt(model, shifting_step, make_sequence(2, 6, seed=15), chunk=2)
    assert all(p.grad is None for p in model.parameters())


def test_bptt_writes_into_the_gradient_tensors_held_before_the_call():
    torch.manual_seed(0)
    model = Net("gru").double()
    sequence = make_sequence(3, 6, seed=5)
    bg.bptt(model, step_fn, sequence, chunk=6)
    expected = [p.grad.clone() for p in model.parameters()]
    held = [torch.zeros_like(p) for p in model.parameters()]
    for p, grad in zip(model.parameters(), held, strict=True):
        p.grad = grad
    bg.bptt(model, step_fn, sequence, chunk=2)
    for p, grad, want in zip(model.parameters(), held, expected, strict=True):
        assert p.grad is grad
        torch.testing.assert_close(grad, want, rtol=1e-10, atol=1e-14)
