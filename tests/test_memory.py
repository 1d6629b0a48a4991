"""Large per-sample outputs in huge pages: plain tensors, the same numbers."""

import pytest
import torch
from torch import nn

import batchgrad as bg
from batchgrad import _memory as memory

CPU = torch.device("cpu")
LARGE_SHAPE = (16, 1024, 640)  # 40 MiB of float32, above `memory.LARGE`


@pytest.mark.parametrize("make", [memory.empty, memory.zeros], ids=["empty", "zeros"])
def test_a_large_output_is_an_ordinary_writable_tensor(make):
    out = make(LARGE_SHAPE, torch.float32, CPU)
    assert out.shape == LARGE_SHAPE
    assert out.dtype == torch.float32
    assert out.is_contiguous()
    if make is memory.zeros:
        assert not out.any()
    out.fill_(2)
    view = out[3]
    del out
    assert float(view.sum()) == 2 * 1024 * 640  # a view keeps the memory alive
    if memory.HUGE_PAGES:
        assert not view.untyped_storage().resizable()  # mapped, not the allocator's


def test_small_or_other_device_outputs_come_from_the_allocator():
    small = memory.zeros((4, 4), torch.float64, CPU)
    assert small.untyped_storage().resizable()
    assert not small.any()
    meta = memory.empty(LARGE_SHAPE, torch.float32, torch.device("meta"))
    assert meta.device.type == "meta"
    assert meta.shape == LARGE_SHAPE


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_large_per_sample_gradients_are_exact(dtype, monkeypatch):
    """Layers whose per-sample gradients count as large here (linear, embedding; the
    threshold lowered to 1 MiB): against the loop."""
    monkeypatch.setattr(memory, "LARGE", 1 << 20)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Embedding(512, 64), nn.Flatten(), nn.Linear(4 * 64, 512)).to(dtype)
    ids = torch.randint(0, 512, (16, 4))

    def loss_fn(model, ids):
        return bg.Loss.from_values(model(ids).tanh().pow(2).sum(1))

    grads = bg.per_sample_grads(model, loss_fn, ids)
    if memory.HUGE_PAGES:
        assert not grads["0.weight"].untyped_storage().resizable()  # mapped, zeros
        assert not grads["2.weight"].untyped_storage().resizable()
    tolerance = 1e-10 if dtype == torch.float64 else 1e-5
    for name, p in model.named_parameters():
        expected = torch.stack(
            [torch.autograd.grad(loss_fn(model, ids[i : i + 1]).total, p)[0] for i in range(16)]
        )
        error = float((grads[name] - expected).norm() / expected.norm())
        assert error <= tolerance, (name, error)
