"""`Loss`: a partial loss, the sum of unit losses and the number of units.

A logical batch ``B`` is made of units (samples, tokens, pixels, whatever the loss
counts). Its loss is ``L(B) = (Σ_u ℓ_u) / N(B)`` under ``"mean"`` and ``Σ_u ℓ_u``
under ``"sum"``. Both are built from the two sums a micro-batch can report on its
own, its ``total = Σ_u ℓ_u`` and its ``count``; only the engine divides, once,
by the count summed over the whole logical batch.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from ._errors import LossTypeError

# Criteria whose mean divides by the (class-)weighted number of non-ignored targets.
_CLASS_CRITERIA = (nn.CrossEntropyLoss, nn.NLLLoss)
# Criteria whose mean divides by the number of elements of the broadcast inputs.
_ELEMENT_WISE_CRITERIA = (
    nn.MSELoss,
    nn.L1Loss,
    nn.SmoothL1Loss,
    nn.HuberLoss,
    nn.BCELoss,
    nn.BCEWithLogitsLoss,
    nn.SoftMarginLoss,
    nn.KLDivLoss,
)


@dataclass(frozen=True)
class Loss:
    """A partial loss over a (micro-)batch.

    Attributes:
        total: 0-d tensor, the sum of the unit losses ``Σ_u ℓ_u``; it carries the
            autograd graph.
        count: the number of units ``N`` (an int, float or 0-d tensor, may be 0). With
            weighted units it is the sum of the weights, exactly the denominator
            PyTorch's weighted ``"mean"`` uses.

    Example:
        >>> import torch, batchgrad as bg
        >>> values = torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]])
        >>> mask = torch.tensor([[True, True, False], [True, False, False]])
        >>> loss = bg.Loss.from_values(values, mask)
        >>> loss.total.item(), int(loss.count), loss.mean().item()
        (6.0, 3, 2.0)
    """

    total: Tensor
    count: int | float | Tensor

    def mean(self) -> Tensor:
        """``total / count``: the loss of this (micro-)batch on its own."""
        return self.total / self.count

    @classmethod
    def from_values(cls, values: Tensor, mask: Tensor | None = None) -> Loss:
        """Build a `Loss` from unreduced unit losses and an optional mask.

        Args:
            values: one loss per unit, any shape (e.g. ``[batch, time]``).
            mask: broadcastable to ``values``. A boolean mask keeps the units where
                it is True (masked values are dropped, even NaN ones, so padding
                cannot poison the sum). A floating mask weights each unit and
                ``count`` becomes the sum of the weights.
        """
        if mask is None:
            return cls(values.sum(), values.numel())
        if mask.dtype == torch.bool:
            mask = mask.expand_as(values)
            return cls(torch.where(mask, values, 0).sum(), mask.sum())
        weights = mask.expand_as(values).to(values.dtype)
        return cls((values * weights).sum(), weights.sum())

    @classmethod
    def from_criterion(cls, criterion: nn.Module, *inputs: Tensor) -> Loss:
        """Build a `Loss` from a standard PyTorch criterion and its inputs.

        ``total`` is the criterion's ``"sum"`` and ``count`` is the denominator of
        its ``"mean"``, so ``total / count`` equals ``criterion(*inputs)`` with
        ``reduction="mean"`` whatever ``reduction`` the criterion was built with:

        - `nn.CrossEntropyLoss` and `nn.NLLLoss` with class indices: the sum of
          the class weights of the targets that are not ``ignore_index`` (the number
          of such targets without ``weight``);
        - `nn.CrossEntropyLoss` with class probabilities: the number of samples
          (times spatial positions);
        - `nn.KLDivLoss` with ``reduction="batchmean"``: the batch size;
        - element-wise criteria (`nn.MSELoss`, `nn.L1Loss`, `nn.BCEWithLogitsLoss`,
          `nn.HuberLoss`, ...): the number of elements;
        - any other criterion with a ``reduction``: the number of values it returns
          under ``reduction="none"``.

        Raises:
            LossTypeError: ``criterion`` is not a PyTorch loss module with a
                ``reduction`` attribute, or its mean is no sum over units
                (`nn.CTCLoss`).

        Example:
            >>> import torch, batchgrad as bg
            >>> criterion = torch.nn.CrossEntropyLoss(ignore_index=-100)
            >>> logits, target = torch.randn(4, 3), torch.tensor([0, 2, -100, 1])
            >>> loss = bg.Loss.from_criterion(criterion, logits, target)
            >>> int(loss.count), torch.allclose(loss.mean(), criterion(logits, target))
            (3, True)
        """
        if isinstance(criterion, _CLASS_CRITERIA) and not inputs[1].is_floating_point():
            return cls(*_class_sum_and_count(criterion, *inputs))  # first: the common case
        if not isinstance(criterion, nn.Module) or not hasattr(criterion, "reduction"):
            raise LossTypeError(
                f"Loss.from_criterion needs a torch.nn loss module with a `reduction` "
                f"attribute, got {type(criterion).__name__}. For any other loss, compute "
                f"the unreduced values and use bg.Loss.from_values(values, mask)."
            )
        if isinstance(criterion, nn.CTCLoss):
            raise LossTypeError(
                "CTCLoss's mean divides each sequence by its target length before averaging, "
                "which is no sum over units; use reduction='none' and bg.Loss.from_values."
            )
        count: int | Tensor
        if isinstance(criterion, nn.CrossEntropyLoss):  # class probabilities
            logits = inputs[0]
            count = logits.numel() // logits.shape[1 if logits.ndim > 1 else 0]
        elif isinstance(criterion, nn.KLDivLoss) and criterion.reduction == "batchmean":
            count = inputs[0].shape[0] if inputs[0].ndim > 0 else 1
        elif isinstance(criterion, _ELEMENT_WISE_CRITERIA):
            count = math.prod(torch.broadcast_shapes(*(t.shape for t in inputs)))
        else:  # any other criterion: its unreduced values say what a unit is
            values = _with_reduction(criterion, "none")(*inputs)
            return cls(values.sum(), values.numel())
        return cls(_with_reduction(criterion, "sum")(*inputs), count)

    @classmethod
    def from_causal_lm(cls, logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Loss:
        """Build the next-token `Loss` of a causal language model.

        Position ``t`` predicts token ``t + 1``: logits ``[batch, time, vocab]`` are
        shifted against labels ``[batch, time]`` (the usual ``labels = input_ids``,
        with padding and prompt tokens set to ``ignore_index``). ``count`` is the
        number of predicted tokens that are not ignored.
        """
        if logits.ndim != 3 or labels.shape != logits.shape[:2]:
            raise LossTypeError(
                f"Loss.from_causal_lm needs logits [batch, time, vocab] and labels "
                f"[batch, time], got logits {tuple(logits.shape)} and labels "
                f"{tuple(labels.shape)}."
            )
        predicted = logits[:, :-1].reshape(-1, logits.shape[-1])
        targets = labels[:, 1:].reshape(-1)
        if _counts_exactly(predicted, targets):
            return cls(*_nll_sum_and_count(predicted.log_softmax(1), targets, None, ignore_index))
        total = F.cross_entropy(predicted, targets, ignore_index=ignore_index, reduction="sum")
        return cls(total, (targets != ignore_index).sum())


LossFn = Callable[[nn.Module, Any], Loss]
"""``loss_fn(model, micro_batch) -> bg.Loss``."""


def _class_sum_and_count(
    criterion: nn.CrossEntropyLoss | nn.NLLLoss, output: Tensor, target: Tensor
) -> tuple[Tensor, Tensor]:
    """The criterion's ``"sum"`` and the (weighted) count of its targets."""
    cross_entropy = isinstance(criterion, nn.CrossEntropyLoss)
    smoothing = criterion.label_smoothing if isinstance(criterion, nn.CrossEntropyLoss) else 0.0
    if smoothing == 0.0 and _counts_exactly(output, target):
        log_probs = output.log_softmax(1) if cross_entropy else output
        return _nll_sum_and_count(log_probs, target, criterion.weight, criterion.ignore_index)
    if cross_entropy:  # called functionally: no module copy
        total = F.cross_entropy(
            output,
            target,
            weight=criterion.weight,
            ignore_index=criterion.ignore_index,
            reduction="sum",
            label_smoothing=smoothing,
        )
    else:
        total = F.nll_loss(
            output,
            target,
            weight=criterion.weight,
            ignore_index=criterion.ignore_index,
            reduction="sum",
        )
    return total, _weighted_target_count(criterion, target)


def _counts_exactly(output: Tensor, target: Tensor) -> bool:
    """Whether `_nll_sum_and_count` applies: ``[N, C]`` scores whose dtype counts ``N``
    targets exactly (every integer up to 2**24 in float32)."""
    if output.ndim != 2 or target.ndim != 1:
        return False
    if output.dtype == torch.float64:
        return True
    return output.dtype == torch.float32 and target.numel() <= 2**24


_SUM = 2  # at::Reduction::Sum
_NLL_LOSS_FORWARD = torch.ops.aten.nll_loss_forward.default


def _nll_sum_and_count(
    log_probs: Tensor, target: Tensor, weight: Tensor | None, ignore_index: int
) -> tuple[Tensor, Tensor]:
    """``Σ -w[t]·log p[t]`` over the targets that are not ignored, and ``Σ w[t]``.

    The kernel behind ``F.nll_loss`` computes the count (its "total weight") in the
    same pass as the sum; taking it from there saves two operations per
    micro-batch over counting the targets separately.
    """
    total, count = _NLL_LOSS_FORWARD(log_probs, target, weight, _SUM, ignore_index)
    return total, count


def _with_reduction(criterion: nn.Module, reduction: str) -> nn.Module:
    """A shallow copy of ``criterion`` (sharing its weights) with another reduction."""
    copied = copy.copy(criterion)
    copied.reduction = reduction  # type: ignore[assignment]  # a str attribute
    return copied


def _weighted_target_count(criterion: nn.CrossEntropyLoss | nn.NLLLoss, target: Tensor) -> Tensor:
    valid = target != criterion.ignore_index
    weight = criterion.weight
    if weight is None:
        return valid.sum()
    return torch.where(valid, weight[torch.where(valid, target, 0)], 0).sum()


def unpack_loss(loss: object, index: int) -> tuple[Tensor, int | float | Tensor]:
    """Check what ``loss_fn`` returned for micro-batch ``index``."""
    if not isinstance(loss, Loss):
        raise LossTypeError(
            f"loss_fn returned {type(loss).__name__} for micro-batch {index}; it must "
            f"return bg.Loss(total, count), e.g. bg.Loss.from_criterion(criterion, output, "
            f"target) or bg.Loss.from_values(values, mask)."
        )
    total, count = loss.total, loss.count
    if not isinstance(total, Tensor) or total.ndim != 0:
        shape = tuple(total.shape) if isinstance(total, Tensor) else type(total).__name__
        raise LossTypeError(
            f"Loss.total of micro-batch {index} must be a 0-d tensor (the sum of the unit "
            f"losses), got {shape}. Reduce it with .sum(), or use bg.Loss.from_values."
        )
    if not total.requires_grad:
        raise LossTypeError(
            f"Loss.total of micro-batch {index} does not depend on any parameter that "
            f"requires grad, so there is nothing to backpropagate. Compute it from the "
            f"model's output, outside torch.no_grad()."
        )
    if isinstance(count, bool) or not isinstance(count, int | float | Tensor):
        raise LossTypeError(
            f"Loss.count of micro-batch {index} must be an int, float or 0-d tensor, "
            f"got {type(count).__name__}."
        )
    if isinstance(count, Tensor):
        if count.ndim != 0:
            raise LossTypeError(
                f"Loss.count of micro-batch {index} must be 0-d, got shape "
                f"{tuple(count.shape)}; count the units with .sum()."
            )
        if count.requires_grad:
            count = count.detach()
    return total, count
