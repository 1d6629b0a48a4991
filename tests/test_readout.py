"""batchgrad._readout: values fetched from tensors in few transfers."""

import torch

from batchgrad._readout import _as_floats


class _Elsewhere(torch.Tensor):
    """A CPU tensor that says it is not on the CPU, as an accelerator's tensor would."""

    @property
    def is_cpu(self):
        return False


def test_values_off_the_cpu_are_fetched_with_one_stack_per_dtype(monkeypatch):
    def elsewhere(value, dtype):
        return torch.tensor(value, dtype=dtype).as_subclass(_Elsewhere)

    stacks = []
    stack = torch.stack

    def counted_stack(tensors, *args, **kwargs):
        stacks.append(len(tensors))
        return stack(tensors, *args, **kwargs)

    monkeypatch.setattr(torch, "stack", counted_stack)
    values = [
        elsewhere(1.5, torch.float32),
        2,
        torch.tensor(3.25),
        elsewhere(4, torch.int64),
        5.5,
        elsewhere(6.75, torch.float64),
        elsewhere(7.5, torch.float32),
    ]
    floats = _as_floats(values)
    assert floats == [1.5, 2.0, 3.25, 4.0, 5.5, 6.75, 7.5]
    assert all(type(number) is float for number in floats)
    assert sorted(stacks) == [1, 1, 2]  # float32 (two values), int64, float64
