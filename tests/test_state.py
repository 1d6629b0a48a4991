import torch
from torch import nn

from batchgrad._state import BufferSnapshot, trainable_and_buffers


def _tangled_model():
    """Shared submodules and parameters, a frozen parameter, buffers, an empty
    container and a None child: everything the module walk must get right."""
    shared = nn.Linear(3, 3)
    model = nn.Sequential(
        nn.Linear(2, 3),
        nn.BatchNorm1d(3),
        nn.Sequential(shared, nn.ReLU(), shared, nn.Sequential()),
        nn.Linear(3, 3),
    )
    model[0].bias.requires_grad_(False)
    model[3].weight = shared.weight
    model.register_module("absent", None)
    return model


def test_trainable_and_buffers_walks_like_parameters_and_buffers():
    model = _tangled_model()
    params, buffers = trainable_and_buffers(model)
    assert params == [p for p in model.parameters() if p.requires_grad]
    assert [entry[2] for entry in buffers.entries] == list(model.buffers())
    assert [entry[2] for entry in BufferSnapshot.take(model).entries] == list(model.buffers())


def test_buffer_snapshot_puts_back_values_and_objects():
    model = _tangled_model()
    batch_norm = model[1]
    mean = batch_norm.running_mean
    before = mean.clone()
    _, buffers = trainable_and_buffers(model)
    batch_norm.train()(torch.randn(4, 3))
    batch_norm.running_mean = torch.zeros(3)
    buffers.put_back()
    assert batch_norm.running_mean is mean
    assert torch.equal(mean, before)
