"""What `compare`, `advise` and the critical-batch measurements train: a `Problem`.

A problem is a model at its initial weights, a mean loss and whole data sets; the
embedded default is the digits MLP. The settings checks they share live here too.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch
from torch import nn

from ._data import digits
from ._errors import ConfigError
from ._fit import BatchSize, MetricFn, _dataset_size, _metric_fns
from ._loss import Loss, LossFn
from ._models import mlp
from ._split import Batch

DEFAULT_BATCH_SIZES: tuple[BatchSize, ...] = (1, 16, 128, "full")
DEFAULT_LR_GRID = (0.01, 0.03, 0.1, 0.3, 1.0, 3.0)
"""Learning rates `compare` and `advise` try (plain SGD on a mean loss)."""
TARGET_LR_GRID = tuple(2.0**k for k in range(-7, 3))
"""Learning rates `steps_to_target` searches, 1/128 to 4, a factor 2 apart."""
MIN_SWEEP_STEPS = 100
"""The sweep of `compare` trains each lr at least this many steps (or the whole run)."""
CURVE_POINTS = 40
"""Evaluations evenly spread over a run, on top of those at steps 1, 2, 3, 4, 6, 8..."""
EVAL_BATCH = 1024

OnProgress = Callable[[str, int, int], None]
"""``on_progress(what, done, total)``: called before each training run starts."""

Select = Literal["train", "eval"]


@dataclass(frozen=True)
class Problem:
    """A model, its loss and its data: what `compare` and `advise` train.

    Attributes:
        model: the model at its initial weights, or a function without arguments
            that builds it; every run trains a deep copy of the same initial model.
        loss_fn: ``loss_fn(model, batch) -> bg.Loss``, reduced as a mean.
        data: the training set, a tensor or a tuple/list/dict of tensors sharing
            dimension 0.
        eval_data: held-out data like ``data``, or None.
        metrics: name → metric of the held-out data, as in `batchgrad.fit`
            (``"accuracy"`` for ``(inputs, labels)`` classification batches).
        name: what reports call the problem.
    """

    model: nn.Module | Callable[[], nn.Module]
    loss_fn: LossFn
    data: Batch
    eval_data: Batch | None = None
    metrics: Mapping[str, MetricFn | Literal["accuracy"]] = field(default_factory=dict)
    name: str = "your model"

    def __post_init__(self) -> None:
        _dataset_size(self.data, "data")
        if self.eval_data is not None:
            _dataset_size(self.eval_data, "eval_data")
        elif self.metrics:
            raise ConfigError("metrics= are computed on eval_data=, which is missing.")
        _metric_fns(self.metrics)  # checked now, not after minutes of training

    @property
    def size(self) -> int:
        """``n``, the samples of the training set."""
        return _dataset_size(self.data, "data")

    def initial_model(self) -> nn.Module:
        """The model at its initial weights (a copy: the runs never touch ``model``)."""
        model = self.model if isinstance(self.model, nn.Module) else self.model()
        if not isinstance(model, nn.Module):
            raise ConfigError(f"The model factory returned {type(model).__name__}, not a module.")
        return copy.deepcopy(model)


def digits_problem(seed: int = 0) -> Problem:
    """The embedded default: scikit-learn's digits, a 64-64-10 ReLU MLP, cross-entropy.

    1438 training images and 359 held-out ones (`batchgrad._data.digits`), with
    held-out accuracy as the metric; the initial weights depend on ``seed`` only.
    """
    split = digits()
    return Problem(
        partial(_digits_model, seed),
        cross_entropy,
        split.train,
        split.test,
        {"accuracy": "accuracy"},
        "digits (MLP 64-64-10, cross-entropy)",
    )


def _digits_model(seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return mlp((64, 64, 10))


def cross_entropy(model: nn.Module, batch: Any) -> Loss:
    """``loss_fn`` of an ``(inputs, labels)`` classifier: cross-entropy per sample."""
    inputs, labels = batch
    return Loss.from_criterion(nn.CrossEntropyLoss(), model(inputs), labels)


def _batch_sizes(batch_sizes: Sequence[BatchSize], size: int) -> list[BatchSize]:
    if isinstance(batch_sizes, str) or not batch_sizes:
        raise ConfigError(f"batch_sizes must be a non-empty list, got {batch_sizes!r}.")
    chosen: list[BatchSize] = []
    for b in batch_sizes:
        if b == "full":
            pass
        elif isinstance(b, bool) or not isinstance(b, int) or b < 1:
            raise ConfigError(f"A batch size is a positive int or 'full', got {b!r}.")
        elif b > size:
            raise ConfigError(
                f"Batch size {b} is larger than the training set ({size} samples); use "
                f"'full' for full-batch gradient descent."
            )
        if b in chosen:
            raise ConfigError(f"Batch size {b!r} is given twice.")
        chosen.append(b)
    return chosen


def _lrs(lr_grid: Sequence[float]) -> list[float]:
    lrs = list(lr_grid)
    if not lrs or not all(
        isinstance(lr, int | float) and not isinstance(lr, bool) and 0 < lr < math.inf for lr in lrs
    ):
        raise ConfigError(f"lr_grid must hold positive learning rates, got {lr_grid!r}.")
    return [float(lr) for lr in lrs]


def _positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int, got {value!r}.")
    return value
