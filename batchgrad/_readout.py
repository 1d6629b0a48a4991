"""Reading what a pass produced: gradient norms, losses and counts, in few transfers.

Every engine (`accumulate`, `bptt`) checks the same values after its micro-batches
or chunks: the losses and counts must be finite, the gradients' norm is reported.
Off the CPU each read waits for the device, so values are fetched together.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from ._errors import LossTypeError, NonFiniteError


def _grads(params: list[nn.Parameter]) -> list[Tensor]:
    return [p.grad for p in params if p.grad is not None]


_HALF = (torch.float16, torch.bfloat16)


def _norms(grads: list[Tensor]) -> list[Tensor]:
    """The L2 norm of each gradient, as 0-d tensors: one fused kernel per device where
    the device has one (foreach kernels take mixed devices and dtypes one by one).

    Float16 and bfloat16 gradients are normed in float32: a float16 gradient whose
    every entry is finite may have a norm above float16's largest value, 65504.
    """
    if not grads:
        return []
    half = [g for g in grads if g.dtype in _HALF]
    if not half:
        return list(torch._foreach_norm(grads))
    if len(half) == len(grads):
        return list(torch._foreach_norm(grads, 2, torch.float32))
    wide = iter(torch._foreach_norm([g for g in grads if g.dtype not in _HALF]))
    narrow = iter(torch._foreach_norm(half, 2, torch.float32))
    return [next(narrow) if g.dtype in _HALF else next(wide) for g in grads]


def _total_norm(grads: list[Tensor]) -> float:
    """The global L2 norm (the one pass over the gradients that checking them costs)."""
    return math.hypot(*_as_floats(_norms(grads)))


def _widened_norm(norm: float, grads: list[Tensor]) -> float:
    """``norm``, or where it is not finite, the norm taken again in float64: finite
    entries whose squares overflow a float32 sum have a finite float64 norm, so only a
    non-finite entry leaves it non-finite."""
    if math.isfinite(norm) or not grads:
        return norm
    return math.hypot(*_as_floats(list(torch._foreach_norm(grads, 2, torch.float64))))


def _check_losses(
    totals: list[Tensor], counts: list[int | float | Tensor], extra: Sequence[Tensor] = ()
) -> tuple[float, list[float], list[float]]:
    """The summed loss and the count of each micro-batch, all checked, and the values
    of ``extra``: one transfer for all."""
    k, m = len(totals), len(totals) + len(counts)
    fetched = _as_floats([*totals, *counts, *extra])
    values, unit_counts = fetched[:k], fetched[k:m]
    if all(map(math.isfinite, fetched[:m])) and min(unit_counts, default=0) >= 0:
        return math.fsum(values), unit_counts, fetched[m:]
    if not all(map(math.isfinite, values)):
        bad = [i for i, value in enumerate(values) if not math.isfinite(value)]
        raise NonFiniteError(
            f"The loss of micro-batch {bad[0]} is {values[bad[0]]} (non-finite losses in "
            f"micro-batches {bad[:10]}). Look at that micro-batch's data, and at the "
            f"model's outputs for it (log of 0, division by 0, overflow in low precision)."
        )
    index, count = next((i, c) for i, c in enumerate(unit_counts) if not 0 <= c < math.inf)
    raise LossTypeError(
        f"Loss.count of micro-batch {index} is {count}; a count must be a finite "
        f"number of units >= 0. Look at how loss_fn counts that micro-batch's units "
        f"(a mask or weights holding NaN, inf or negative values?)."
    )


def _as_floats(values: Sequence[int | float | Tensor]) -> list[float]:
    """Python floats of numbers and 0-d tensors (exactly: a Python float holds every
    tensor float and integer count).

    A CPU tensor is read alone, the cheapest there; an accelerator's are stacked and
    fetched together, one transfer (and one wait for the device) per dtype and device.
    """
    numbers: list[float] = []
    away: dict[tuple[torch.dtype, torch.device], list[int]] = {}
    for value in values:
        if not isinstance(value, Tensor):
            numbers.append(float(value))
        elif value.is_cpu:
            numbers.append(float(value.item()))  # item(): no detach() needed
        else:
            away.setdefault((value.dtype, value.device), []).append(len(numbers))
            numbers.append(math.nan)  # fetched below
    for indices in away.values():
        fetched = torch.stack([values[i].detach() for i in indices]).tolist()  # type: ignore[union-attr]
        for index, number in zip(indices, fetched, strict=True):
            numbers[index] = float(number)
    return numbers


def _as_number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value
