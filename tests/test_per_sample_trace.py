"""Sample dimensions and parameter uses read from the forward, never from sizes."""

import pytest
import torch
from torch import nn
from torch.nn import functional as F

import batchgrad as bg
from batchgrad._per_sample_plan import trace
from batchgrad._per_sample_trace import MIXED


def traced(model, loss_fn, batch):
    return trace(model, loss_fn, batch, 0)[0].tracer


def values(model, x):
    return bg.Loss.from_values(model(x).flatten(1).sum(1))


def test_rnn_states_hold_the_samples_in_dimension_1_whatever_batch_first_says():
    lstm = nn.LSTM(3, 3, batch_first=True)

    def loss_fn(model, x):
        out, (h, c) = model(x)
        return bg.Loss.from_values(out.sum((1, 2)) + h.sum((0, 2)) + c.sum((0, 2)))

    (op,) = traced(lstm, loss_fn, torch.randn(3, 3, 3)).ops  # B = T = features = 3
    assert op.func is torch.lstm
    assert op.in_dims[0] == 0  # the input, batch first
    assert op.in_dims[1:3] == [1, 1]  # the zero states nn.LSTM made, [layers, B, H]
    assert op.out_dims == [0, 1, 1]  # out [B, T, H]; h_n and c_n [layers, B, H]


def test_shared_position_ids_are_not_taken_for_samples_when_t_equals_b():
    tokens, positions = nn.Embedding(5, 2), nn.Embedding(4, 2)
    model = nn.ModuleDict({"tokens": tokens, "positions": positions})

    def loss_fn(model, ids):
        pos = model["positions"](torch.arange(ids.shape[1]))  # [T] ids, T = B = 4
        return bg.Loss.from_values((model["tokens"](ids) + pos).pow(2).sum((1, 2)))

    tracer = traced(model, loss_fn, torch.randint(0, 5, (4, 4)))
    lookup = [op for op in tracer.ops if op.params[0] is positions.weight]
    assert len(lookup) == 1
    assert tuple(lookup[0].outputs[0].shape) == (4, 4, 2)  # expanded over the batch
    assert lookup[0].in_dims[0] == 0
    assert tracer.expanded
    assert not tracer.opaque


@pytest.mark.parametrize("as_tuple", [False, True], ids=["numbers", "tuple"])
def test_a_number_that_follows_the_batch_size_marks_the_call(as_tuple):
    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.h0 = nn.Parameter(torch.randn(1, 1, 2, dtype=torch.float64))

        def forward(self, x):
            if as_tuple:  # kept whole as one argument, compared whole with the probe's
                return self.h0.expand((1, x.shape[0], 2)).transpose(0, 1) * x
            return self.h0.expand(-1, x.shape[0], -1).transpose(0, 1) * x

    model, x = Model(), torch.randn(3, 1, 2, dtype=torch.float64)
    (op,) = traced(model, values, x).ops
    assert MIXED in op.in_dims  # the argument x.shape[0]
    grads = bg.per_sample_grads(model, values, x)  # so the module call is vmapped
    expected = torch.stack(
        [torch.autograd.grad(values(model, x[i : i + 1]).total, model.h0)[0] for i in range(3)]
    )
    torch.testing.assert_close(grads["h0"], expected, rtol=1e-10, atol=1e-12)


def test_every_use_of_a_parameter_is_recorded_where_it_happens():
    emb = nn.Embedding(5, 2)
    model = nn.ModuleDict({"emb": emb})

    def tied(model, ids):
        h = model["emb"](ids)
        return bg.Loss.from_values(F.linear(h, model["emb"].weight).sum((1, 2)))

    tracer = traced(model, tied, torch.randint(0, 5, (3, 2)))
    assert [(op.func, op.scope.name if op.scope else None) for op in tracer.ops] == [
        (F.embedding, "emb"),
        (F.linear, None),  # in the loss function, outside any module
    ]


def test_a_batch_of_the_same_shapes_reuses_the_probe():
    from batchgrad._per_sample_trace import _PROBES

    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()
    first = bg.per_sample_grads(model, values, torch.randn(5, 3).double())
    (probe,) = _PROBES[model].values()
    x = torch.randn(5, 3).double()
    again = bg.per_sample_grads(model, values, x)
    assert list(_PROBES[model].values()) == [probe]  # no second probe
    assert first.keys() == again.keys()
    for name, p in model.named_parameters():
        expected = torch.stack(
            [torch.autograd.grad(values(model, x[i : i + 1]).total, p)[0] for i in range(5)]
        )
        torch.testing.assert_close(again[name], expected, rtol=1e-10, atol=1e-12)
    bg.per_sample_grads(model, values, torch.randn(6, 3).double())
    assert len(_PROBES[model]) == 2  # another batch size: probed anew


class Branchy(nn.Module):
    """Takes another path depending on the values: a cached probe no longer fits."""

    def __init__(self):
        super().__init__()
        self.a, self.b = nn.Linear(3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.a(x) if bool(x.sum() > 0) else self.b(torch.tanh(x))


def test_a_forward_that_differs_from_the_cached_probe_is_probed_again():
    model = Branchy().double()
    x = torch.randn(4, 3).double().abs()
    bg.per_sample_grads(model, values, x)
    grads = bg.per_sample_grads(model, values, -x)  # the other branch, same shapes
    assert not grads["a.weight"].any()
    expected = torch.stack(
        [
            torch.autograd.grad(values(model, -x[i : i + 1]).total, model.b.weight)[0]
            for i in range(4)
        ]
    )
    torch.testing.assert_close(grads["b.weight"], expected, rtol=1e-10, atol=1e-12)


def test_a_parameter_resized_in_place_is_probed_again_not_read_with_the_old_shapes():
    """``p.data`` replaced by a tensor of another shape (here the output features
    become the batch size) between two calls: the cached probe is not reused."""
    torch.manual_seed(0)
    model = nn.Linear(4, 3).double()

    def loss_fn(m, batch):
        return bg.Loss.from_values(m(batch).pow(2).sum(1))

    x = torch.randn(6, 4, dtype=torch.float64)
    bg.per_sample_grads(model, loss_fn, x)
    with torch.no_grad():
        model.weight.data = torch.randn(6, 4, dtype=torch.float64)
        model.bias.data = torch.randn(6, dtype=torch.float64)

    grads = bg.per_sample_grads(model, loss_fn, x)

    for i in range(6):
        model.zero_grad(set_to_none=True)
        loss_fn(model, x[i : i + 1]).total.backward()
        torch.testing.assert_close(grads["weight"][i], model.weight.grad, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(grads["bias"][i], model.bias.grad, rtol=1e-12, atol=1e-14)


# -- lean traces: a signature whose plan has only layer rules -------------------------


@pytest.fixture
def tracers(monkeypatch):
    """Whether each real forward's tracer was lean, in order."""
    import batchgrad._per_sample_plan as per_sample_plan
    from batchgrad._per_sample_trace import Tracer

    seen = []

    class Spy(Tracer):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            if self.probe is not None:
                seen.append(self.lean is not None)

    monkeypatch.setattr(per_sample_plan, "Tracer", Spy)
    return seen


def _loop(model, loss_fn, x, p):
    return torch.stack(
        [torch.autograd.grad(loss_fn(model, x[i : i + 1]).total, p)[0] for i in range(len(x))]
    )


def test_later_calls_of_a_signature_with_only_layer_rules_trace_no_module_calls(tracers):
    from batchgrad._per_sample_trace import _PROBES

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 2))
    model = model.double()
    x = torch.randn(4, 1, 4, 4, dtype=torch.float64)
    for _ in range(3):
        grads = bg.per_sample_grads(model, values, x)
        norms = bg.per_sample_norms(model, values, x)
    assert tracers == [False, True, True, True, True, True]  # the first call fully traced
    (probe,) = _PROBES[model].values()
    assert list(probe.lean.values()) == [frozenset()]  # no module call read
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], _loop(model, values, x, p), rtol=1e-10, atol=1e-12)
    expected = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    torch.testing.assert_close(norms, expected, rtol=1e-10, atol=1e-12)


def test_a_rule_registered_after_a_lean_call_is_used(tracers):
    """A rule registered since: the signature is traced fully again, so the rule is seen."""
    from batchgrad._per_sample_modules import MODULE_RULES

    class Wide(nn.Linear):
        pass

    torch.manual_seed(0)
    model = nn.Sequential(Wide(3, 2)).double()
    x = torch.randn(4, 3, dtype=torch.float64)
    bg.per_sample_grads(model, values, x)
    bg.per_sample_grads(model, values, x)
    calls = []

    def rule(module, args, grad_outputs):
        calls.append(module)
        (a,), (g,) = args, grad_outputs
        return {"weight": g[:, :, None] * a[:, None, :], "bias": g}

    bg.register_per_sample_rule(Wide)(rule)
    try:
        grads = bg.per_sample_grads(model, values, x)
    finally:
        MODULE_RULES.pop(Wide, None)
    assert calls == [model[0]]
    assert tracers == [False, True, False]
    torch.testing.assert_close(
        grads["0.weight"], _loop(model, values, x, model[0].weight), rtol=1e-10, atol=1e-12
    )


def test_a_lean_trace_records_the_calls_of_the_modules_with_a_rule_only(tracers):
    from batchgrad._per_sample_modules import MODULE_RULES
    from batchgrad._per_sample_trace import _PROBES

    class Gain(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.randn(4, dtype=torch.float64))

        def forward(self, x):
            return x * self.weight

    @bg.register_per_sample_rule(Gain)
    def rule(module, args, grad_outputs):
        (x,), (g,) = args, grad_outputs
        return {"weight": x * g}

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), Gain(), nn.Linear(4, 2)).double()
    x = torch.randn(5, 3, dtype=torch.float64)
    try:
        for _ in range(3):
            grads = bg.per_sample_grads(model, values, x)
        (probe,) = _PROBES[model].values()
        assert list(probe.lean.values()) == [frozenset({id(model[2])})]
    finally:
        MODULE_RULES.pop(Gain, None)
    assert tracers == [False, True, True]
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], _loop(model, values, x, p), rtol=1e-10, atol=1e-12)


class Kept(nn.Module):
    """Keeps the rows whose first feature is positive: a shape that follows the values."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        kept = x[:, 0] > 0
        out = x.new_zeros(len(x), 2)
        out[kept] = self.lin(x[kept])
        return out


def test_a_lean_call_whose_plan_needs_more_is_traced_again_fully(tracers):
    """The same functions on the same parameters, but one use's input no longer holds
    the samples in a dimension of their own: the lean plan cannot stand, so the call
    is traced fully and ends as it does on a fresh model."""

    def loss_fn(model, x):
        return bg.Loss.from_values(model(x).pow(2).sum(1))

    torch.manual_seed(0)
    model = Kept().double()
    x = torch.randn(4, 3, dtype=torch.float64).abs()
    bg.per_sample_grads(model, loss_fn, x)
    grads = bg.per_sample_grads(model, loss_fn, x)
    assert tracers == [False, True]
    expected = _loop(model, loss_fn, x, model.lin.weight)
    torch.testing.assert_close(grads["lin.weight"], expected, rtol=1e-10, atol=1e-12)
    x[1, 0] = -1.0
    with pytest.raises(bg.PerSampleError) as lean:
        bg.per_sample_grads(model, loss_fn, x)
    assert tracers[2:] == [True, False]
    fresh = Kept().double()
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(bg.PerSampleError) as full:
        bg.per_sample_grads(fresh, loss_fn, x)
    assert str(lean.value) == str(full.value)
    assert "module" in str(lean.value)  # named where a fully traced call names it


class Swap(nn.Module):
    """No parameters: ``[B, T, D] <-> [T, B, D]``."""

    def forward(self, h):
        return h.transpose(0, 1)


class Swapping(nn.Module):
    """Time-first around its linear layer only when the data says so: with T == B the
    linear layer's shapes are the same either way; only the module calls differ."""

    def __init__(self):
        super().__init__()
        self.swap, self.lin = Swap(), nn.Linear(3, 2)

    def forward(self, x):
        if bool(x[0, 0, 0] > 100):
            return self.swap(self.lin(self.swap(x)))
        return self.lin(x)


def test_a_lean_call_through_other_modules_than_the_probe_is_probed_again(tracers):
    """A lean trace hooks no module without a rule, yet notices that other modules ran
    (it used to read time as the samples here: wrong gradients without an error)."""

    def loss_fn(model, x):
        return bg.Loss.from_values(model(x).pow(2).sum((1, 2)))

    torch.manual_seed(0)
    model = Swapping().double()
    for _ in range(2):
        bg.per_sample_grads(model, loss_fn, torch.randn(4, 4, 3, dtype=torch.float64))
    x = torch.randn(4, 4, 3, dtype=torch.float64)
    x[0, 0, 0] = 1000.0
    grads = bg.per_sample_grads(model, loss_fn, x)
    assert tracers[:3] == [False, True, True]
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], _loop(model, loss_fn, x, p), rtol=1e-10, atol=1e-12)


def test_a_lean_call_with_fewer_uses_than_the_probe_ends_as_on_a_fresh_model():
    class Repeated(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3, 3)

        def forward(self, x):
            for _ in range(1 + 2 * int(x[:, 0].max() < 100)):  # three times, or once
                x = self.lin(x)
            return x

    torch.manual_seed(0)
    model = Repeated().double()
    x = torch.randn(4, 3, dtype=torch.float64)
    for _ in range(2):
        bg.per_sample_grads(model, values, x)
    y = x.clone()
    y[2, 0] = 1000.0  # not among the probe's rows (0, 1): the batch runs it once
    with pytest.raises(bg.PerSampleError, match="runs differently") as lean:
        bg.per_sample_grads(model, values, y)
    fresh = Repeated().double()
    fresh.load_state_dict(model.state_dict())
    with pytest.raises(bg.PerSampleError, match="runs differently") as full:
        bg.per_sample_grads(fresh, values, y)
    assert str(lean.value) == str(full.value)
