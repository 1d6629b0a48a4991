"""Reductions: how a loss over many units becomes one number."""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

Reduction = Literal["mean", "sum"]
"""``"mean"``: ``L(B) = Σ_u ℓ_u / N(B)``; ``"sum"``: ``L(B) = Σ_u ℓ_u``."""

REDUCTIONS: tuple[Reduction, ...] = ("mean", "sum")


def detect_reduction(
    criterion: Callable[[Tensor, Tensor], Tensor], output: Tensor, target: Tensor
) -> Literal["mean", "sum", "none", "unknown"]:
    """Tell how ``criterion`` reduces over the batch, by probing it.

    The batch is duplicated along dimension 0: a mean over units keeps its value,
    a sum doubles, an unreduced loss keeps a batch dimension. Anything else (a
    loss of zero, a value that does neither) is ``"unknown"``.

    Example:
        >>> import torch, batchgrad as bg
        >>> x, y = torch.randn(8, 3), torch.randint(0, 3, (8,))
        >>> bg.detect_reduction(torch.nn.CrossEntropyLoss(), x, y)
        'mean'
        >>> bg.detect_reduction(torch.nn.CrossEntropyLoss(reduction="sum"), x, y)
        'sum'
        >>> bg.detect_reduction(torch.nn.CrossEntropyLoss(reduction="none"), x, y)
        'none'
    """
    with torch.no_grad():
        once = criterion(output, target)
        if once.ndim > 0:
            return "none"
        twice = criterion(torch.cat([output, output]), torch.cat([target, target]))
    once_value, twice_value = once.double().item(), twice.double().item()
    if once_value == 0 or not torch.isfinite(once.double()):
        return "unknown"
    # Float rounding of the doubled sum: compare at a few ulps of float32.
    if abs(twice_value - once_value) <= 1e-5 * abs(once_value):
        return "mean"
    if abs(twice_value - 2 * once_value) <= 1e-5 * abs(once_value):
        return "sum"
    return "unknown"
