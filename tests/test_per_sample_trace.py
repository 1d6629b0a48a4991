"""Sample dimensions and parameter uses read from the forward, never from sizes."""

import torch
from torch import nn
from torch.nn import functional as F

import batchgrad as bg
from batchgrad._per_sample import _trace
from batchgrad._per_sample_trace import MIXED


def traced(model, loss_fn, batch):
    return _trace(model, loss_fn, batch, 0).tracer


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


def test_a_number_that_follows_the_batch_size_marks_the_call():
    h0 = nn.Parameter(torch.randn(1, 1, 2))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.h0 = h0

        def forward(self, x):
            return self.h0.expand(-1, x.shape[0], -1).transpose(0, 1) * x

    tracer = traced(Model(), values, torch.randn(3, 1, 2))
    (op,) = tracer.ops
    assert MIXED in op.in_dims  # the argument x.shape[0]


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
