"""`fit`: a small training loop over exact logical batches.

Three counters measure how far training has gone, and they are easy to confuse:

- a *step* (iteration) is one optimizer update, made from the gradient of one
  logical batch;
- an *epoch* is one pass over the ``n`` training samples in a fresh shuffled order:
  ``ceil(n / b)`` steps of ``b`` samples, the last one smaller (``n // b`` steps with
  ``drop_last``); epochs are counted fractionally, by the share of the pass done;
- *samples seen* adds up the samples behind every update, over all ranks.

The batch size ``b`` picks the regime. ``batch_size="full"`` is full-batch gradient
descent: each step follows the exact gradient of the whole training loss, one step
per epoch, accumulated in micro-batches so the data set never runs forward at once.
``batch_size=1`` is stochastic gradient descent: ``n`` cheap, noisy steps per epoch.
In between is mini-batch gradient descent: the mean gradient of ``b`` samples is an
unbiased estimate of the full one, its noise falling as ``1 / b``; ``noise=True``
measures ``B_simple``, the size beyond which a bigger batch stops saving steps.
Every logical batch is computed exactly by `batchgrad.accumulate`, so micro-batch
size and number of processes change memory and speed, never the trajectory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, ReduceLROnPlateau

from ._accumulate import accumulate
from ._data import IGNORE_INDEX
from ._distributed import Replica, replica
from ._errors import BatchError, ConfigError
from ._fsdp import is_sharded
from ._loss import Loss, LossFn
from ._noise import NoiseScale
from ._reduction import REDUCTIONS, Reduction
from ._report import write_json
from ._split import (
    Batch,
    _map_leaves,
    batch_length,
    check_micro_batch_size,
    is_structured,
    micro_batches,
)

BatchSize = int | Literal["full"]
"""Samples per optimizer step: an int ``b`` with ``1 <= b <= n``, or ``"full"`` (``n``)."""

MetricFn = Callable[[nn.Module, Any], Loss]
"""``metric(model, batch) -> bg.Loss(total, count)``: the metric is ``Σ total / Σ count``
over the evaluation set (e.g. correct predictions / predictions), exact however the
set is split into batches or ranks."""

FULL_BATCH_MICRO_BATCH_SIZE = 1024
"""The default micro-batch size of ``batch_size="full"`` (and of evaluation)."""

_HISTORY_VERSION = 1


@dataclass(frozen=True)
class StepRecord:
    """One optimizer step.

    Attributes:
        step: the number of optimizer steps taken, this one included (from 1).
        epoch: the epochs done after this step, fractionally (1.0: the end of the
            first pass over the data).
        samples_seen: samples behind all the steps so far, over every rank.
        batch_size: samples in this step's logical batch (the last of an epoch may
            be smaller).
        count: ``N(B)``, the units (samples, tokens, ...) of the logical batch.
        loss: ``L(B)`` of the logical batch, at the parameters before the update.
        grad_norm: the L2 norm of the logical batch's gradient.
        lr: the learning rate of the optimizer's first parameter group in this step.
        wall_time: seconds since training started (continued across resumed runs;
            each rank's own clock).
        b_simple: with ``noise``, the noise scale's ``b_simple`` (moving average),
            None when the step had a single micro-batch; likewise ``grad_sq`` and
            ``trace_cov``.
    """

    step: int
    epoch: float
    samples_seen: int
    batch_size: int
    count: int | float
    loss: float
    grad_norm: float
    lr: float
    wall_time: float
    b_simple: float | None = None
    grad_sq: float | None = None
    trace_cov: float | None = None


@dataclass(frozen=True)
class EvalRecord:
    """One evaluation on the held-out data, after ``step`` optimizer steps.

    Attributes:
        loss: the loss over the whole evaluation set (same ``loss_fn`` and
            reduction as training), in evaluation mode and without gradients.
        metrics: each metric's ``Σ total / Σ count`` over the evaluation set.
    """

    step: int
    epoch: float
    samples_seen: int
    loss: float
    metrics: dict[str, float]
    wall_time: float


@dataclass
class History:
    """What `fit` did, step by step, and where to continue from.

    Pass it back as ``fit(..., history=history)`` to continue a run: steps, epochs,
    samples seen and wall time are counted on, and training resumes at the sample
    where it stopped, in the same shuffled order, so a run split in two ends at
    the same parameters as one run (to rounding). `fit` saves no model: restore the
    model's, the optimizer's and the scheduler's ``state_dict`` taken when this
    history was returned, yourself.

    Attributes:
        steps: one `StepRecord` per optimizer step.
        evals: one `EvalRecord` per evaluation.
        step: optimizer steps taken.
        epoch: epochs done, fractionally.
        samples_seen: samples behind all the steps.
        wall_time: seconds spent in `fit`, over all runs.
        epoch_index: the epoch in progress (= completed epochs): its order is
            ``torch.randperm(n, generator=torch.Generator().manual_seed(seed +
            epoch_index))``.
        epoch_offset: the samples of that order already used.
        config: the settings of the last run (data set size, batch size, seed...).
        noise_state: the `NoiseScale` state, when one was kept.
    """

    steps: list[StepRecord] = field(default_factory=list)
    evals: list[EvalRecord] = field(default_factory=list)
    step: int = 0
    epoch: float = 0.0
    samples_seen: int = 0
    wall_time: float = 0.0
    epoch_index: int = 0
    epoch_offset: int = 0
    config: dict[str, Any] = field(default_factory=dict)
    noise_state: dict[str, Any] | None = None

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["version"] = _HISTORY_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> History:
        """The inverse of `to_dict`, also for JSON with non-finite floats as strings."""
        if data.get("version") != _HISTORY_VERSION:
            raise ConfigError(
                f"This history was written by another version of batchgrad (format "
                f"{data.get('version')!r}, expected {_HISTORY_VERSION})."
            )
        steps = [StepRecord(**_floats(row, _STEP_FLOATS)) for row in data["steps"]]
        evals = []
        for row in data["evals"]:
            row = _floats(row, ("epoch", "loss", "wall_time"))
            row["metrics"] = {name: float(value) for name, value in row["metrics"].items()}
            evals.append(EvalRecord(**row))
        return cls(
            steps=steps,
            evals=evals,
            step=int(data["step"]),
            epoch=float(data["epoch"]),
            samples_seen=int(data["samples_seen"]),
            wall_time=float(data["wall_time"]),
            epoch_index=int(data["epoch_index"]),
            epoch_offset=int(data["epoch_offset"]),
            config=dict(data["config"]),
            noise_state=data["noise_state"],
        )

    def to_json(self, path: str | Path) -> Path:
        """Write the history as JSON (non-finite floats as strings)."""
        return write_json(self.to_dict(), Path(path))

    @classmethod
    def from_json(cls, path: str | Path) -> History:
        return cls.from_dict(json.loads(Path(path).read_text()))


_STEP_FLOATS = ("epoch", "loss", "grad_norm", "lr", "wall_time", "b_simple", "grad_sq", "trace_cov")


def _floats(row: Mapping[str, Any], names: tuple[str, ...]) -> dict[str, Any]:
    """``row`` with the named values as floats (`write_json` writes ``inf`` as a string)."""
    return {k: float(v) if k in names and v is not None else v for k, v in row.items()}


def accuracy(model: nn.Module, batch: Any) -> Loss:
    """The ``"accuracy"`` metric for ``(inputs, labels)`` batches of a classifier.

    Correct ``argmax`` predictions over labels that are not ``-100`` (ignored).
    """
    if not (isinstance(batch, tuple | list) and len(batch) == 2):
        raise ConfigError(
            f"The 'accuracy' metric needs (inputs, labels) batches, got "
            f"{type(batch).__name__}; pass metrics={{'accuracy': fn}} with your own "
            f"fn(model, batch) -> bg.Loss(correct, count) instead."
        )
    inputs, labels = batch
    kept = labels != IGNORE_INDEX
    correct = (model(inputs).argmax(-1) == labels) & kept
    return Loss(correct.sum(), kept.sum())


@dataclass(frozen=True)
class _Plan:
    """The checked settings of one `fit` call."""

    size: int  # n, samples in the training set
    batch_size: int
    full: bool
    micro_batch_size: int | None
    epochs: int | None
    steps: int | None
    shuffle: bool
    seed: int
    drop_last: bool
    reduction: Reduction
    eval_every: int | None
    eval_batch_size: int
    metrics: dict[str, MetricFn]

    def order(self, epoch: int) -> Tensor | None:
        """The sample order of ``epoch``; None for the data set's own order."""
        if not self.shuffle:
            return None
        return torch.randperm(self.size, generator=torch.Generator().manual_seed(self.seed + epoch))

    def epoch_end(self, offset: int) -> int:
        """Where the epoch in progress ends, in samples, continuing from ``offset``."""
        if not self.drop_last:
            return self.size
        return offset + (self.size - offset) // self.batch_size * self.batch_size

    def planned_steps(self, offset: int) -> int:
        """Steps this call will take, from ``offset`` in the epoch in progress."""
        first = -(-(self.epoch_end(offset) - offset) // self.batch_size)
        per_epoch = -(-self.epoch_end(0) // self.batch_size)
        by_epochs = math.inf if self.epochs is None else first + (self.epochs - 1) * per_epoch
        by_steps = math.inf if self.steps is None else self.steps
        return int(min(by_epochs, by_steps))

    def describe(self, world_size: int) -> dict[str, Any]:
        return {
            "dataset_size": self.size,
            "batch_size": "full" if self.full else self.batch_size,
            "micro_batch_size": self.micro_batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "reduction": self.reduction,
            "world_size": world_size,
        }


def fit(
    model: nn.Module,
    loss_fn: LossFn,
    data: Batch,
    optimizer: Optimizer,
    *,
    batch_size: BatchSize,
    micro_batch_size: int | None = None,
    epochs: int | None = None,
    steps: int | None = None,
    reduction: Reduction = "mean",
    shuffle: bool = True,
    seed: int = 0,
    drop_last: bool = False,
    scheduler: LRScheduler | None = None,
    noise: bool | NoiseScale = False,
    eval_data: Batch | None = None,
    eval_every: int | None = None,
    eval_batch_size: int | None = None,
    metrics: Mapping[str, MetricFn | Literal["accuracy"]] | None = None,
    history: History | None = None,
    history_path: str | Path | None = None,
    progress: bool = True,
    group: dist.ProcessGroup | None = None,
) -> History:
    """Train ``model`` by gradient descent on exact logical batches of ``data``.

    Each step takes the next ``batch_size`` samples of the epoch's order, leaves the
    gradient of their loss ``L(B)`` in ``p.grad`` with `batchgrad.accumulate` (in
    micro-batches of ``micro_batch_size``), calls ``optimizer.step()`` and then
    ``scheduler.step()``. Epoch ``e`` visits the samples in the order
    ``torch.randperm(n, generator=torch.Generator().manual_seed(seed + e))`` (the
    data set's own order without ``shuffle``, and always with ``"full"``, where the
    order cannot change the gradient). `fit` does not switch the model between
    training and evaluation mode, except around evaluations.

    Under `torch.distributed` (the default process group when initialised, or
    ``group``) every rank passes the whole ``data`` and the same arguments; rank
    ``r`` of ``W`` computes positions ``r, r + W, ...`` of each logical batch, and
    `accumulate` combines them into the gradient one process would compute. Every
    rank returns the same history; only rank 0 writes ``history_path``.

    Args:
        model: the module to train (may be wrapped in `DistributedDataParallel`, or
            sharded with FSDP2's ``fully_shard``, without ``eval_data`` there).
        loss_fn: ``loss_fn(model, batch) -> bg.Loss``.
        data: the training set: a tensor or a (nested) tuple/list/dict of tensors
            sharing dimension 0, one row per sample.
        optimizer: a `torch.optim.Optimizer` over the model's parameters.
        batch_size: samples per step: ``1`` (stochastic), an int up to ``n``
            (mini-batch) or ``"full"`` (full-batch).
        micro_batch_size: samples per forward/backward within a step; default the
            whole logical batch, or ``min(n, 1024)`` for ``"full"``. Under
            `torch.distributed`, per rank.
        epochs: stop when this call has completed that many epochs; a run resumed
            mid-epoch first completes the epoch in progress.
        steps: stop after this many optimizer steps in this call. With both, stop
            at whichever comes first.
        reduction: ``"mean"`` or ``"sum"`` over the units of each logical batch.
        shuffle: draw a new order each epoch (see above).
        seed: the seed of the orders; give every rank the same.
        drop_last: skip the last, smaller batch of each epoch.
        scheduler: a learning-rate scheduler, stepped after every optimizer step
            (not `ReduceLROnPlateau`, which needs a metric: step it yourself).
        noise: ``True`` or a `NoiseScale`: measure the gradient noise scale at every
            step with at least 2 micro-batches, recorded in the history (moving
            averages). Single process only.
        eval_data: held-out data, evaluated at the end of each epoch (or every
            ``eval_every`` steps) and at the end of training.
        eval_every: evaluate every this many optimizer steps instead.
        eval_batch_size: samples per evaluation forward; default
            ``micro_batch_size`` or ``min(n_eval, 1024)``.
        metrics: name → ``metric(model, batch) -> bg.Loss(total, count)`` (see
            `MetricFn`), or ``"accuracy"`` for ``(inputs, labels)`` classification
            batches.
        history: a previous run's `History` to continue (see `History`).
        history_path: write the history as JSON there after every epoch, at the
            end, and when training stops on an error.
        progress: show a progress bar (rank 0 only).
        group: the process group sharing each logical batch.

    Returns:
        The `History` of every run so far (a new object; ``history`` is unchanged).

    Raises:
        ConfigError: for settings that cannot work (bad ``batch_size``, no
            ``epochs`` or ``steps``, a batch larger than the data set, an empty data
            set...), raised on every rank. `BatchError` subclasses from `accumulate`
            for bad data or non-finite losses.

    Example:
        >>> import torch, batchgrad as bg
        >>> x = torch.linspace(-1, 1, 10)[:, None]
        >>> model = torch.nn.Linear(1, 1)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return bg.Loss.from_criterion(torch.nn.MSELoss(), model(x), y)
        >>> optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        >>> history = bg.fit(
        ...     model, loss_fn, (x, 3 * x), optimizer, batch_size=4, epochs=2, progress=False
        ... )
        >>> [(r.step, r.epoch, r.samples_seen) for r in history.steps]
        [(1, 0.4, 4), (2, 0.8, 8), (3, 1.0, 10), (4, 1.4, 14), (5, 1.8, 18), (6, 2.0, 20)]
        >>> history.steps[-1].loss < history.steps[0].loss
        True
    """
    peer = replica(model, group)
    if peer is not None and eval_data is not None and is_sharded(model):
        raise ConfigError(
            "eval_data is not supported on a model sharded with fully_shard yet: the "
            "ranks' evaluation shares differ in size, and FSDP needs the same number of "
            "forwards on every rank. Evaluate the model yourself with equal shares."
        )
    plan = _plan_on_every_rank(
        peer,
        history,
        lambda: _check(
            data,
            batch_size,
            micro_batch_size,
            epochs,
            steps,
            reduction,
            shuffle,
            seed,
            drop_last,
            scheduler,
            noise,
            eval_data,
            eval_every,
            eval_batch_size,
            metrics,
            history,
            distributed=peer is not None,
        ),
    )
    log = _continue(history, plan.describe(1 if peer is None else peer.world_size))
    scale = noise if isinstance(noise, NoiseScale) else None
    if noise is True:
        scale = NoiseScale()
        if history is not None and history.noise_state is not None:
            scale.load_state_dict(history.noise_state)  # the averages go on
    path = None if history_path is None or (peer and peer.rank != 0) else Path(history_path)
    evaluated = bool(log.evals) and log.evals[-1].step == log.step
    started, wall_time = time.perf_counter(), log.wall_time

    def clock() -> float:
        return wall_time + time.perf_counter() - started

    def evaluate() -> None:
        loss, values = _evaluate(model, loss_fn, eval_data, plan, peer)
        log.evals.append(EvalRecord(log.step, log.epoch, log.samples_seen, loss, values, clock()))

    if plan.epoch_end(log.epoch_offset) <= log.epoch_offset > 0:
        # no batch left in the epoch in progress (drop_last with another batch size)
        log.epoch_index, log.epoch_offset = log.epoch_index + 1, 0
    epochs_done = steps_done = 0
    order = plan.order(log.epoch_index)
    end = plan.epoch_end(log.epoch_offset)
    rank, world = (0, 1) if peer is None else (peer.rank, peer.world_size)
    show = progress and rank == 0
    try:
        with _progress_bar(show, plan.planned_steps(log.epoch_offset)) as advance:
            while (plan.epochs is None or epochs_done < plan.epochs) and (
                plan.steps is None or steps_done < plan.steps
            ):
                start = log.epoch_offset
                stop = min(start + plan.batch_size, end)
                optimizer.zero_grad(set_to_none=True)
                report = accumulate(
                    model,
                    loss_fn,
                    _take(data, order, start + rank, stop, world),  # this rank's share
                    micro_batch_size=plan.micro_batch_size,
                    reduction=plan.reduction,
                    existing_grad="replace",
                    group=group,
                    noise=scale if scale is not None else False,
                )
                lr = float(optimizer.param_groups[0]["lr"])
                optimizer.step()
                if scheduler is not None:
                    scheduler.step()
                steps_done += 1
                log.step += 1
                log.samples_seen += stop - start
                log.epoch_offset = stop
                log.epoch = (log.epoch_index * end + stop) / end
                estimate = report.noise
                record = StepRecord(
                    step=log.step,
                    epoch=log.epoch,
                    samples_seen=log.samples_seen,
                    batch_size=stop - start,
                    count=report.count,
                    loss=report.loss,
                    grad_norm=report.grad_norm,
                    lr=lr,
                    wall_time=clock(),
                    b_simple=None if estimate is None else estimate.b_simple,
                    grad_sq=None if estimate is None else estimate.grad_sq,
                    trace_cov=None if estimate is None else estimate.trace_cov,
                )
                log.steps.append(record)
                advance(record)
                epoch_over = stop >= end
                if epoch_over:
                    epochs_done += 1
                    log.epoch_index += 1
                    log.epoch_offset = 0
                    order = plan.order(log.epoch_index)
                    end = plan.epoch_end(0)
                evaluated = False
                if eval_data is not None and (
                    log.step % plan.eval_every == 0 if plan.eval_every else epoch_over
                ):
                    evaluate()
                    evaluated = True
                if epoch_over:
                    _save(log, scale, clock(), path)
            if eval_data is not None and not evaluated:
                evaluate()
    finally:
        _save(log, scale, clock(), path)
    return log


def _check(
    data: Batch,
    batch_size: object,
    micro_batch_size: object,
    epochs: object,
    steps: object,
    reduction: object,
    shuffle: object,
    seed: object,
    drop_last: object,
    scheduler: object,
    noise: object,
    eval_data: Batch | None,
    eval_every: object,
    eval_batch_size: object,
    metrics: Mapping[str, MetricFn | Literal["accuracy"]] | None,
    history: object,
    *,
    distributed: bool,
) -> _Plan:
    """Every setting checked, before any work: the `_Plan` of the run."""
    size = _dataset_size(data, "data")
    full = isinstance(batch_size, str) and batch_size == "full"
    if full:
        samples = size
    elif isinstance(batch_size, bool) or not isinstance(batch_size, int):
        raise ConfigError(
            f"batch_size must be a positive int (1: stochastic, b: mini-batch) or 'full' "
            f"(full-batch gradient descent), got {batch_size!r}."
        )
    elif batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}.")
    elif batch_size > size:
        raise ConfigError(
            f"batch_size={batch_size} is larger than the data set ({size} samples); use "
            f"batch_size='full' for full-batch gradient descent (with micro_batch_size "
            f"to bound memory)."
        )
    else:
        samples = batch_size
    micro = check_micro_batch_size(micro_batch_size)
    if micro is None and full:
        micro = min(size, FULL_BATCH_MICRO_BATCH_SIZE)
    epoch_count = _positive_or_none("epochs", epochs)
    step_count = _positive_or_none("steps", steps)
    every = _positive_or_none("eval_every", eval_every)
    if epoch_count is None and step_count is None:
        raise ConfigError(
            "Give epochs= (passes over the data set) or steps= (optimizer steps), or both "
            "to stop at whichever comes first; fit has no default length."
        )
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ConfigError(f"seed must be an int >= 0, got {seed!r}.")
    for name, flag in (("shuffle", shuffle), ("drop_last", drop_last)):
        if not isinstance(flag, bool):
            raise ConfigError(f"{name} must be True or False, got {flag!r}.")
    if isinstance(scheduler, ReduceLROnPlateau):
        raise ConfigError(
            "ReduceLROnPlateau steps on a metric, which fit cannot choose for you; run fit "
            "one epoch at a time and call scheduler.step(metric) between the calls."
        )
    if scheduler is not None and not isinstance(scheduler, LRScheduler):
        raise ConfigError(f"scheduler must be a torch LRScheduler, got {type(scheduler).__name__}.")
    if not isinstance(noise, bool | NoiseScale):
        raise ConfigError(f"noise must be True, False or a bg.NoiseScale, got {noise!r}.")
    if noise is not False and distributed:
        raise ConfigError(
            "noise= is measured in a single process only for now; pass noise=False under "
            "torch.distributed, or measure the noise scale in one process."
        )
    if history is not None and not isinstance(history, History):
        raise ConfigError(
            f"history must be a bg.History (e.g. bg.History.from_json(path)), got "
            f"{type(history).__name__}."
        )
    if history is not None and history.epoch_offset > 0:
        _check_resumable(history, size, bool(shuffle), seed, full)
    eval_micro = _positive_or_none("eval_batch_size", eval_batch_size)
    chosen = _metric_fns(metrics)
    if eval_data is None:
        if eval_every is not None or metrics:
            raise ConfigError("eval_every= and metrics= need eval_data= (the held-out split).")
        eval_size = 0
    else:
        eval_size = _dataset_size(eval_data, "eval_data")
    return _Plan(
        size=size,
        batch_size=samples,
        full=full,
        micro_batch_size=micro,
        epochs=epoch_count,
        steps=step_count,
        shuffle=bool(shuffle) and not full,
        seed=seed,
        drop_last=bool(drop_last),
        reduction=reduction,
        eval_every=every,
        eval_batch_size=eval_micro or micro or min(eval_size, FULL_BATCH_MICRO_BATCH_SIZE),
        metrics=chosen,
    )


def _dataset_size(data: object, name: str) -> int:
    if not is_structured(data):
        raise ConfigError(
            f"{name} must be a tensor or a tuple/list/dict of tensors sharing dimension 0 "
            f"(the whole data set), got {type(data).__name__}; fit draws the batches "
            f"itself, so a DataLoader cannot be passed."
        )
    size = batch_length(data, name)
    if size == 0:
        raise ConfigError(f"{name} holds no samples (dimension 0 is empty); nothing to train on.")
    return size


def _positive_or_none(name: str, value: object) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(f"{name} must be a positive int or None, got {value!r}.")
    if value < 1:
        raise ConfigError(f"{name} must be at least 1, got {value}.")
    return value


def _metric_fns(
    metrics: Mapping[str, MetricFn | Literal["accuracy"]] | None,
) -> dict[str, MetricFn]:
    chosen: dict[str, MetricFn] = {}
    for name, metric in (metrics or {}).items():
        if metric == "accuracy":
            chosen[name] = accuracy
        elif callable(metric):
            chosen[name] = metric
        else:
            raise ConfigError(
                f"metrics[{name!r}] must be 'accuracy' or a function "
                f"metric(model, batch) -> bg.Loss(total, count), got {metric!r}."
            )
    return chosen


def _check_resumable(history: History, size: int, shuffle: bool, seed: int, full: bool) -> None:
    """A run stopped mid-epoch continues that epoch's order: it must be the same one."""
    before = history.config
    now = {"dataset_size": size, "shuffle": shuffle and not full, "seed": seed}
    changed = [f"{k}: {before.get(k)!r} -> {v!r}" for k, v in now.items() if before.get(k) != v]
    if changed:
        raise ConfigError(
            f"The history stopped in the middle of epoch {history.epoch_index} (after "
            f"{history.epoch_offset} of its samples), whose order depends on the data set "
            f"size, shuffle and seed; these changed ({'; '.join(changed)}). Keep them, or "
            f"continue from a history that ended at an epoch boundary."
        )


def _plan_on_every_rank(
    peer: Replica | None, history: History | None, check: Callable[[], _Plan]
) -> _Plan:
    """The checked settings; under `torch.distributed` every rank raises if any rank's
    settings are bad or differ from rank 0's, before any collective of training."""
    try:
        plan = check()
    except BatchError as error:
        if peer is None:
            raise
        peer.raise_failures(error)  # raises on every rank, naming this one
        raise
    if peer is not None:
        peer.raise_failures(None)
        _agree(peer, plan, history)
    return plan


def _agree(peer: Replica, plan: _Plan, history: History | None) -> None:
    """Every rank must draw the same logical batches: compare the settings once."""
    mine = {f.name: getattr(plan, f.name) for f in dataclasses.fields(plan)}
    mine["metrics"] = sorted(plan.metrics)
    mine["history"] = (
        None if history is None else (history.step, history.epoch_index, history.epoch_offset)
    )
    gathered: list[dict[str, Any]] = [{}] * peer.world_size
    dist.all_gather_object(gathered, mine, group=peer.group)
    for rank, theirs in enumerate(gathered):
        changed = [
            f"{name}={value!r} (rank 0: {gathered[0][name]!r})"
            for name, value in theirs.items()
            if value != gathered[0][name]
        ]
        if changed:
            raise ConfigError(
                f"Rank {rank} called fit with other settings than rank 0: {', '.join(changed)}. "
                f"Every rank must pass the same data set size, batch size, seed, length and "
                f"history, or the ranks would not share the same logical batches."
            )


def _continue(history: History | None, config: dict[str, Any]) -> History:
    """A new history that counts on from ``history``."""
    if history is None:
        return History(config=config)
    return dataclasses.replace(
        history, steps=list(history.steps), evals=list(history.evals), config=config
    )


def _take(data: Batch, order: Tensor | None, start: int, stop: int, step: int) -> Batch:
    """Rows ``order[start:stop:step]`` of every tensor leaf (views without an order)."""
    if order is None:
        rows = slice(start, stop, step)
        return _map_leaves(
            lambda leaf: leaf[rows] if isinstance(leaf, Tensor) and leaf.ndim > 0 else leaf, data
        )
    index = order[start:stop:step]
    return _map_leaves(
        lambda leaf: (
            leaf.index_select(0, index.to(leaf.device))
            if isinstance(leaf, Tensor) and leaf.ndim > 0
            else leaf
        ),
        data,
    )


def evaluation_sums(
    model: nn.Module,
    fns: list[Callable[[nn.Module, Any], Loss]],
    data: Batch,
    batch_size: int | None,
) -> list[tuple[float, float]]:
    """``(Σ total, Σ count)`` of each ``fn(model, batch)`` over ``data`` in batches,
    in evaluation mode and without gradients (each submodule's mode restored)."""
    totals: list[list[float]] = [[] for _ in fns]
    counts: list[list[float]] = [[] for _ in fns]
    modes = [(m, m.training) for m in model.modules()]
    try:
        model.eval()
        with torch.no_grad():
            for part in micro_batches(data, batch_size, allow_empty=True):
                for fn, total, count in zip(fns, totals, counts, strict=True):
                    value = fn(model, part)
                    total.append(float(value.total))
                    count.append(float(value.count))
    finally:
        for m, mode in modes:
            m.training = mode
    return [(math.fsum(t), math.fsum(c)) for t, c in zip(totals, counts, strict=True)]


def _evaluate(
    model: nn.Module, loss_fn: LossFn, data: Batch, plan: _Plan, peer: Replica | None
) -> tuple[float, dict[str, float]]:
    """Loss and metrics over the whole evaluation set, as ``Σ total / Σ count`` each.

    Each rank evaluates rows ``rank::world`` and the sums are added over the ranks
    (the unwrapped module runs, so DDP's forward collectives cannot hang).
    """
    module = model.module if isinstance(model, DistributedDataParallel) else model
    rank, world = (0, 1) if peer is None else (peer.rank, peer.world_size)
    fns: list[Callable[[nn.Module, Any], Loss]] = [loss_fn, *plan.metrics.values()]
    sums = [0.0] * (2 * len(fns))
    failure: BaseException | None = None
    try:
        share = _take(data, None, rank, batch_length(data), world)
        pairs = evaluation_sums(module, fns, share, plan.eval_batch_size)
        sums = [value for pair in pairs for value in pair]
    except Exception as error:
        if peer is None:
            raise
        failure = error  # reported to every rank below, so none waits
    if peer is not None:
        failed, *sums = peer.agree([float(failure is not None), *sums])
        if failed:
            peer.raise_failures(failure)
    loss_total, loss_count, *rest = sums
    loss = loss_total if plan.reduction == "sum" else _ratio(loss_total, loss_count)
    values = {name: _ratio(rest[2 * i], rest[2 * i + 1]) for i, name in enumerate(plan.metrics)}
    return loss, values


def _ratio(total: float, count: float) -> float:
    return total / count if count else math.nan


def _save(log: History, scale: NoiseScale | None, wall_time: float, path: Path | None) -> None:
    log.wall_time = wall_time
    if scale is not None:
        log.noise_state = scale.state_dict()
    if path is not None:
        log.to_json(path)


@contextlib.contextmanager
def _progress_bar(enabled: bool, total: int) -> Iterator[Callable[[StepRecord], None]]:
    """``advance(record)`` for a rich progress bar over the steps, or a no-op."""
    if not enabled:
        yield lambda record: None
        return
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    columns = (
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[status]}"),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns) as bar:
        task = bar.add_task("fit", total=total, status="")

        def advance(record: StepRecord) -> None:
            bar.update(
                task,
                advance=1,
                description=f"epoch {record.epoch:.2f}",
                status=f"loss {record.loss:.4g}",
            )

        yield advance
