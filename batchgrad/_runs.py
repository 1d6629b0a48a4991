"""Training runs evaluated as they go, and learning-rate sweeps.

A run is one `batchgrad.fit` continued from stop to stop, evaluated on the whole
training (and held-out) set at each stop; a sweep trains each lr of a grid briefly.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.optim.swa_utils import AveragedModel

from ._errors import ConfigError, NonFiniteError
from ._fit import BatchSize, History, _metric_fns, evaluation_sums, fit
from ._loss import Loss
from ._noise import NoiseScale
from ._problem import CURVE_POINTS, EVAL_BATCH, Problem, Select
from ._split import Batch


@dataclass(frozen=True)
class CurvePoint:
    """The model after ``step`` optimizer steps, evaluated on the whole data sets.

    Attributes:
        train_loss: the loss over the whole training set (not a batch's).
        eval_loss: the loss over the held-out set, None without one.
        metrics: the held-out metrics.
        wall_time: seconds of training so far (`fit`'s clock: evaluations excluded).
    """

    step: int
    epoch: float
    samples_seen: int
    wall_time: float
    train_loss: float
    eval_loss: float | None
    metrics: dict[str, float]


@dataclass
class _Trained:
    history: History | None
    curve: list[CurvePoint]
    diverged: bool
    averaged: CurvePoint | None = None  # the tail-averaged weights, with ``average_from``


def _train(
    problem: Problem,
    initial: nn.Module,
    batch_size: BatchSize,
    lr: float,
    stops: Iterable[int],
    *,
    momentum: float,
    seed: int,
    held_out: bool = True,
    target: float | None = None,
    noise: NoiseScale | None = None,
    micro_batch_size: int | None = None,
    drop_last: bool = False,
    average_from: float | None = None,
) -> _Trained:
    """SGD from a copy of ``initial``, evaluated after each of the step counts ``stops``.

    The run is one `fit` continued from stop to stop (the same trajectory as one
    call), so the evaluations do not count in its wall time. It ends early once the
    training loss is at most ``target``, or when it diverges (a NaN/inf loss).

    With ``average_from``, the weights at every stop from that step on are averaged
    (Polyak–Ruppert tail averaging, `torch.optim.swa_utils.AveragedModel`) and the
    average is evaluated at the end: at a constant lr SGD's iterates bounce around
    where the run has got to, by more the smaller the batch, and their average is
    that place, free of the last step's luck. Buffers (BatchNorm's statistics) are
    the last iterate's.
    """
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    curve = [_evaluate(model, problem, None, held_out)]
    history: History | None = None
    tail: AveragedModel | None = None
    for stop in stops:
        try:
            history = fit(
                model,
                problem.loss_fn,
                problem.data,
                optimizer,
                batch_size=batch_size,
                micro_batch_size=micro_batch_size,
                steps=stop - (history.step if history else 0),
                seed=seed,
                drop_last=drop_last,
                noise=noise if noise is not None else False,
                history=history,
                progress=False,
            )
        except NonFiniteError:
            return _Trained(history, curve, diverged=True)
        curve.append(_evaluate(model, problem, history, held_out))
        if not math.isfinite(curve[-1].train_loss):
            return _Trained(history, curve, diverged=True)
        if average_from is not None and stop >= average_from:
            if tail is None:
                tail = AveragedModel(model)
            tail.update_parameters(model)
        if target is not None and curve[-1].train_loss <= target:
            break
    averaged = None
    if tail is not None:
        for mine, last in zip(tail.module.buffers(), model.buffers(), strict=True):
            mine.copy_(last)
        averaged = _evaluate(tail.module, problem, history, held_out)
    return _Trained(history, curve, diverged=False, averaged=averaged)


def _evaluate(
    model: nn.Module, problem: Problem, history: History | None, held_out: bool
) -> CurvePoint:
    """Loss over the whole training set (and held-out loss and metrics): Σ total / Σ count."""
    train_loss = _mean(model, [problem.loss_fn], problem.data)[0]
    eval_loss, metrics = None, {}
    if held_out and problem.eval_data is not None:
        chosen = _metric_fns(problem.metrics)
        eval_loss, *values = _mean(model, [problem.loss_fn, *chosen.values()], problem.eval_data)
        metrics = dict(zip(chosen, values, strict=True))
    if history is None:
        return CurvePoint(0, 0.0, 0, 0.0, train_loss, eval_loss, metrics)
    return CurvePoint(
        history.step,
        history.epoch,
        history.samples_seen,
        history.wall_time,
        train_loss,
        eval_loss,
        metrics,
    )


def _mean(
    model: nn.Module, fns: Sequence[Callable[[nn.Module, Any], Loss]], data: Batch
) -> list[float]:
    sums = evaluation_sums(model, list(fns), data, EVAL_BATCH)
    return [total / count if count else math.nan for total, count in sums]


def _curve_stops(total: int, points: int = CURVE_POINTS) -> list[int]:
    """Evaluation steps: ``points`` evenly spread, and ``√2`` apart from step 1 (log axes)."""
    even = {round(total * k / points) for k in range(1, points + 1)}
    geometric = {round(2 ** (k / 2)) for k in range(int(2 * math.log2(max(total, 1))) + 1)}
    return sorted(s for s in even | geometric if 1 <= s <= total)


@dataclass(frozen=True)
class StepTime:
    """Seconds per optimizer step over a run's steps: the median and quartiles.

    One timing of a few milliseconds says little on a shared machine; the spread
    over many steps says how far to trust a difference.
    """

    median: float
    low: float
    high: float
    count: int

    @classmethod
    def of(cls, history: History | None) -> StepTime:
        """From the step-to-step differences of `fit`'s clock (the first step included)."""
        clock = [0.0] + [r.wall_time for r in history.steps] if history else [0.0]
        times = sorted(b - a for a, b in itertools.pairwise(clock))
        if not times:
            return cls(math.nan, math.nan, math.nan, 0)
        return cls(
            _quantile(times, 0.5), _quantile(times, 0.25), _quantile(times, 0.75), len(times)
        )


def _quantile(ordered: Sequence[float], q: float) -> float:
    position = q * (len(ordered) - 1)
    low = math.floor(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


# ---- learning-rate sweeps ----------------------------------------------------------


MIN_FALL = 0.1
"""An lr of a sweep trained when it lowered the loss by at least this share of the
sweep's largest fall: a run stuck at the initial loss did not train, finite or not."""


@dataclass(frozen=True)
class SweepPoint:
    """One learning rate of a sweep, and its loss: the mean of the evaluations over the
    second half of its budget (at a constant lr the loss of the last step alone
    fluctuates, more at lrs near instability), NaN when it diverged.

    Attributes:
        diverged: the loss became NaN or infinite.
        stalled: the loss stayed finite but fell by less than `MIN_FALL` of the
            sweep's largest fall (or not at all): the lr did not train either.
        initial: the loss before training.
    """

    lr: float
    loss: float
    diverged: bool
    stalled: bool = False
    initial: float = math.nan

    @property
    def trained(self) -> bool:
        return not (self.diverged or self.stalled)

    @property
    def verdict(self) -> str:
        if self.diverged:
            return "diverged"
        return "did not train" if self.stalled else "trained"


def _sweep(
    problem: Problem,
    initial: nn.Module,
    batch_size: BatchSize,
    lrs: Sequence[float],
    steps: int,
    *,
    momentum: float,
    seed: int,
    select: Select,
    report: Callable[[str], None],
    drop_last: bool = False,
) -> list[SweepPoint]:
    """Each lr trained ``steps`` steps; failed runs (diverged or stalled) are kept, marked."""
    stops = sorted({max(1, round(steps * k / 8)) for k in range(4, 9)})
    points = []
    start = math.nan
    for lr in lrs:
        report(f"B={batch_size}: lr {lr:g}, sweep of {steps} steps")
        run = _train(
            problem,
            initial,
            batch_size,
            lr,
            stops,
            momentum=momentum,
            seed=seed,
            held_out=select == "eval",
            drop_last=drop_last,
        )
        first = run.curve[0]
        start = (first.eval_loss if select == "eval" else first.train_loss) or math.nan
        losses = [p.eval_loss if select == "eval" else p.train_loss for p in run.curve[1:]]
        loss = math.fsum(v or 0.0 for v in losses) / len(losses) if losses else math.nan
        diverged = run.diverged or not math.isfinite(loss)
        points.append(SweepPoint(lr, math.nan if diverged else loss, diverged))
    return _mark_stalled(points, start)


def _mark_stalled(points: Sequence[SweepPoint], initial: float) -> list[SweepPoint]:
    """`SweepPoint.stalled` set against the largest fall from ``initial`` of the sweep."""
    finite = [p.loss for p in points if not p.diverged]
    best_fall = initial - min(finite) if finite else math.nan
    return [
        SweepPoint(
            p.lr,
            p.loss,
            p.diverged,
            not p.diverged and not (best_fall > 0 and initial - p.loss >= MIN_FALL * best_fall),
            initial,
        )
        for p in points
    ]


def _at_edge(lr: float, sweep: Sequence[SweepPoint]) -> bool:
    """``lr`` is the smallest or the largest of a sweep of several lrs."""
    lrs = [p.lr for p in sweep]
    return len(lrs) > 1 and lr in (min(lrs), max(lrs))


def _ranked(sweep: Sequence[SweepPoint], batch_size: BatchSize) -> list[SweepPoint]:
    """The sweep's lrs that trained, from the lowest loss."""
    kept = sorted((p for p in sweep if p.trained), key=lambda p: p.loss)
    if not kept:
        diverged = [f"{p.lr:g}" for p in sweep if p.diverged]
        stalled = [f"{p.lr:g}" for p in sweep if p.stalled]
        why = "; ".join(
            part
            for part in (
                f"diverged: {', '.join(diverged)}" if diverged else "",
                f"did not lower the loss: {', '.join(stalled)}" if stalled else "",
            )
            if part
        )
        raise ConfigError(
            f"No learning rate of the sweep trained at batch size {batch_size} ({why}); "
            f"pass other ones (lr_grid=, --lrs): smaller if they diverged, larger if the "
            f"loss did not move."
        )
    return kept
