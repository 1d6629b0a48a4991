"""Problems every accumulation strategy must get right, written as data.

Each case builds a model, a batch of ``n`` samples with an uneven spread of units
(masks, ignored labels, variable lengths), the `loss_fn` users would write with
batchgrad's helpers, and an independent reference: the whole batch's loss
computed with plain PyTorch, whose gradient is obviously correct.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F

import batchgrad as bg
from batchgrad._data import counting_sequences
from batchgrad._models import TinyLM, mlp, small_cnn


@dataclass(frozen=True)
class Case:
    id: str
    make_model: Callable[[], nn.Module]
    make_batch: Callable[[int, torch.Generator], Any]
    loss_fn: Callable[[nn.Module, Any], bg.Loss]
    # reference(model, batch, reduction) -> the whole batch's loss, plain PyTorch
    reference: Callable[[nn.Module, Any, str], Tensor]

    def build(self, n: int, dtype: torch.dtype, seed: int) -> tuple[nn.Module, Any]:
        torch.manual_seed(seed)
        model = self.make_model().to(dtype)
        batch = self.make_batch(n, torch.Generator().manual_seed(seed))
        return model, _cast(batch, dtype)


def _cast(batch: Any, dtype: torch.dtype) -> Any:
    if isinstance(batch, Tensor):
        return batch.to(dtype) if batch.is_floating_point() else batch
    if isinstance(batch, dict):
        return {k: _cast(v, dtype) for k, v in batch.items()}
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(_cast(v, dtype) for v in batch))
    return type(batch)(_cast(v, dtype) for v in batch)


# MLP classifier, labels partly ignored (ignore_index), so micro-batches count
# different numbers of units.
def _classes(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    x = torch.randn(n, 6, generator=g)
    y = torch.randint(0, 4, (n,), generator=g)
    return x, y.masked_fill(torch.rand(n, generator=g) < 0.4, -100)


def _mlp_ce_loss(model: nn.Module, batch: Any) -> bg.Loss:
    x, y = batch
    return bg.Loss.from_criterion(nn.CrossEntropyLoss(ignore_index=-100), model(x), y)


def _mlp_ce_reference(model: nn.Module, batch: Any, reduction: str) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, ignore_index=-100, reduction=reduction)


# Class-weighted cross-entropy: PyTorch's weighted mean divides by the summed
# weights of the targets, not by their number.
_CLASS_WEIGHT = torch.tensor([0.2, 1.0, 3.0, 0.5])


def _weighted_ce_loss(model: nn.Module, batch: Any) -> bg.Loss:
    x, y = batch
    weight = _CLASS_WEIGHT.to(x.dtype)
    return bg.Loss.from_criterion(nn.CrossEntropyLoss(weight=weight), model(x), y)


def _weighted_ce_reference(model: nn.Module, batch: Any, reduction: str) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, weight=_CLASS_WEIGHT.to(x.dtype), reduction=reduction)


def _labels(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 6, generator=g), torch.randint(0, 4, (n,), generator=g)


# Regression with a per-element boolean mask, in a dict batch with a non-tensor leaf.
def _masked_regression(n: int, g: torch.Generator) -> dict[str, Any]:
    return {
        "x": torch.randn(n, 5, generator=g),
        "y": torch.randn(n, 3, generator=g),
        "mask": torch.rand(n, 3, generator=g) < 0.6,
        "note": "non-tensor leaves reach every micro-batch",
    }


def _masked_mse_loss(model: nn.Module, batch: Any) -> bg.Loss:
    values = (model(batch["x"]) - batch["y"]).square()
    return bg.Loss.from_values(values, batch["mask"])


def _masked_mse_reference(model: nn.Module, batch: Any, reduction: str) -> Tensor:
    values = (model(batch["x"]) - batch["y"]).square()[batch["mask"]]
    return values.mean() if reduction == "mean" else values.sum()


# Small CNN on 1x8x8 images, every label counted.
def _images(n: int, g: torch.Generator) -> tuple[Tensor, Tensor]:
    return torch.randn(n, 1, 8, 8, generator=g), torch.randint(0, 3, (n,), generator=g)


def _cnn_loss(model: nn.Module, batch: Any) -> bg.Loss:
    x, y = batch
    return bg.Loss.from_criterion(nn.CrossEntropyLoss(), model(x), y)


def _cnn_reference(model: nn.Module, batch: Any, reduction: str) -> Tensor:
    x, y = batch
    return F.cross_entropy(model(x), y, reduction=reduction)


# Causal transformer LM on right-padded sequences of lengths 1..12: the loss
# counts the non-padded next-token predictions.
def _sequences(n: int, g: torch.Generator) -> Any:
    seed = int(torch.randint(0, 2**31, (1,), generator=g))
    return counting_sequences(n, vocab=11, min_len=1, max_len=12, seed=seed)


def _lm_loss(model: nn.Module, batch: Any) -> bg.Loss:
    return bg.Loss.from_causal_lm(model(batch.input_ids), batch.labels)


def _lm_reference(model: nn.Module, batch: Any, reduction: str) -> Tensor:
    logits = model(batch.input_ids)
    return F.cross_entropy(
        logits[:, :-1].flatten(0, 1), batch.labels[:, 1:].flatten(), reduction=reduction
    )


CASES = [
    Case("mlp-ce-ignore", lambda: mlp((6, 16, 4)), _classes, _mlp_ce_loss, _mlp_ce_reference),
    Case(
        "mlp-ce-weighted",
        lambda: mlp((6, 16, 4)),
        _labels,
        _weighted_ce_loss,
        _weighted_ce_reference,
    ),
    Case(
        "mlp-mse-mask",
        lambda: mlp((5, 8, 3)),
        _masked_regression,
        _masked_mse_loss,
        _masked_mse_reference,
    ),
    Case("cnn-ce", lambda: small_cnn(1, 3), _images, _cnn_loss, _cnn_reference),
    Case(
        "lm-padded",
        lambda: TinyLM(vocab=11, d_model=16, heads=2, layers=1, max_len=12),
        _sequences,
        _lm_loss,
        _lm_reference,
    ),
]
CASE_IDS = [case.id for case in CASES]


def reference_grads(case: Case, model: nn.Module, batch: Any, reduction: str) -> list[Tensor]:
    """The gradient of the whole batch's loss, from plain PyTorch."""
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(case.reference(model, batch, reduction), params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def rel_err(approx: list[Tensor], exact: list[Tensor]) -> float:
    diff = sum(
        float((a.double() - e.double()).square().sum()) for a, e in zip(approx, exact, strict=True)
    )
    norm = sum(float(e.double().square().sum()) for e in exact)
    if norm == 0:  # e.g. a "sum" over a batch whose units are all masked
        return 0.0 if diff == 0 else float("inf")
    return (diff / norm) ** 0.5


def current_grads(model: nn.Module) -> list[Tensor]:
    return [
        torch.zeros_like(p) if p.grad is None else p.grad.clone()
        for p in model.parameters()
        if p.requires_grad
    ]


TOLERANCE = {torch.float64: 1e-10, torch.float32: 1e-5}
