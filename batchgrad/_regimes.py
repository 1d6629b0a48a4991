"""Batch regimes side by side, and a batch size read off the gradient noise scale.

Gradient descent's regimes differ only in the batch behind each step (see
`batchgrad.fit`): full-batch (the exact gradient of the training loss, one step per
epoch), stochastic (one sample per step) and mini-batch. `compare` trains the same
initial model in each, at a learning rate picked for each by a small sweep, and
records the training loss against epochs, steps, samples seen and wall time.

`advise` picks a batch size from the gradient noise scale (McCandlish et al. 2018,
"An Empirical Model of Large-Batch Training"). The optimizer steps ``S`` and the
samples ``E = S B`` that training needs to reach a given loss trade off as

    S = S_min (1 + B_noise / B),    E = E_min (1 + B / B_noise),    E_min = S_min B_noise,

so at ``B = B_noise`` training takes twice the fewest steps and twice the fewest
samples: a larger batch barely saves steps, a smaller one barely saves samples.
``B_simple = tr Σ / ‖G‖²`` (`batchgrad.NoiseScale`), measured from gradients alone,
approximates ``B_noise`` (it takes the Hessian as a multiple of the identity). For
SGD the best learning rate grows with the batch as ``ε(B) = ε_max / (1 + B_noise /
B)``: linearly while ``B ≪ B_noise``, hardly at all beyond, so moving from a batch
``B0`` to ``B`` multiplies it by `lr_scale`. `steps_to_target` measures ``S(B)``
directly and fits ``S_min`` and ``B_noise``, to hold the estimate against.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, NamedTuple

import torch
from torch import nn

from ._data import digits
from ._errors import ConfigError, NonFiniteError
from ._fit import (
    BatchSize,
    History,
    MetricFn,
    _dataset_size,
    _metric_fns,
    evaluation_sums,
    fit,
)
from ._loss import Loss, LossFn
from ._models import mlp
from ._noise import NoiseScale
from ._report import Table, new_figure, save_figure
from ._split import Batch

if TYPE_CHECKING:
    from matplotlib.axes import Axes

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


# ---- training runs, evaluated as they go -------------------------------------------


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
) -> _Trained:
    """SGD from a copy of ``initial``, evaluated after each of the step counts ``stops``.

    The run is one `fit` continued from stop to stop (the same trajectory as one
    call), so the evaluations do not count in its wall time. It ends early once the
    training loss is at most ``target``, or when it diverges (a NaN/inf loss).
    """
    model = copy.deepcopy(initial)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    curve = [_evaluate(model, problem, None, held_out)]
    history: History | None = None
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
                noise=noise if noise is not None else False,
                history=history,
                progress=False,
            )
        except NonFiniteError:
            return _Trained(history, curve, diverged=True)
        curve.append(_evaluate(model, problem, history, held_out))
        if not math.isfinite(curve[-1].train_loss):
            return _Trained(history, curve, diverged=True)
        if target is not None and curve[-1].train_loss <= target:
            break
    return _Trained(history, curve, diverged=False)


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


# ---- learning-rate sweeps ----------------------------------------------------------


@dataclass(frozen=True)
class SweepPoint:
    """One learning rate of a sweep, and its loss: the mean of the evaluations over the
    second half of its budget (at a constant lr the loss of the last step alone
    fluctuates, more at lrs near instability), NaN when it diverged."""

    lr: float
    loss: float
    diverged: bool


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
) -> list[SweepPoint]:
    """Each lr trained ``steps`` steps; diverged runs (NaN/inf) are kept, marked."""
    stops = sorted({max(1, round(steps * k / 8)) for k in range(4, 9)})
    points = []
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
        )
        losses = [p.eval_loss if select == "eval" else p.train_loss for p in run.curve[1:]]
        loss = math.fsum(v or 0.0 for v in losses) / len(losses) if losses else math.nan
        diverged = run.diverged or not math.isfinite(loss)
        points.append(SweepPoint(lr, math.nan if diverged else loss, diverged))
    return points


def _at_edge(lr: float, sweep: Sequence[SweepPoint]) -> bool:
    """``lr`` is the smallest or the largest of a sweep of several lrs."""
    lrs = [p.lr for p in sweep]
    return len(lrs) > 1 and lr in (min(lrs), max(lrs))


def _ranked(sweep: Sequence[SweepPoint], batch_size: BatchSize) -> list[SweepPoint]:
    """The sweep's lrs from the lowest loss, diverged ones left out."""
    kept = sorted((p for p in sweep if not p.diverged), key=lambda p: p.loss)
    if not kept:
        raise ConfigError(
            f"Every learning rate of the sweep diverged at batch size {batch_size} "
            f"({', '.join(f'{p.lr:g}' for p in sweep)}); pass smaller ones (lr_grid=, --lrs)."
        )
    return kept


# ---- compare -----------------------------------------------------------------------


@dataclass(frozen=True)
class RegimeRun:
    """One regime of `compare`: its chosen learning rate, its sweep and its run.

    Attributes:
        regime: ``"stochastic"`` (B = 1), ``"mini-batch"`` or ``"full-batch"`` (B = n).
        batch_size: samples per step.
        label: the batch size as asked for (``"full"`` or the number).
        lr: the chosen learning rate.
        sweep: every lr tried, with its selection loss.
        curve: the evaluations along the run (step 0 first).
        history: `fit`'s step-by-step history of the run.
        tuning_time: seconds the sweep took.
        diverged_lrs: lrs that won the sweep but diverged on the full run.
    """

    regime: str
    batch_size: int
    label: str
    lr: float
    sweep: tuple[SweepPoint, ...]
    curve: tuple[CurvePoint, ...]
    history: History
    tuning_time: float
    diverged_lrs: tuple[float, ...] = ()

    @property
    def final(self) -> CurvePoint:
        return self.curve[-1]

    @property
    def lr_at_edge(self) -> bool:
        """The chosen lr is the smallest or largest tried: widen the grid."""
        return _at_edge(self.lr, self.sweep)

    def to_dict(self) -> dict[str, Any]:
        return {
            "regime": self.regime,
            "batch_size": self.batch_size,
            "label": self.label,
            "lr": self.lr,
            "lr_at_edge": self.lr_at_edge,
            "steps": self.final.step,
            "epochs": self.final.epoch,
            "samples_seen": self.final.samples_seen,
            "wall_time": self.final.wall_time,
            "tuning_time": self.tuning_time,
            "train_loss": self.final.train_loss,
            "eval_loss": self.final.eval_loss,
            "metrics": self.final.metrics,
            "diverged_lrs": list(self.diverged_lrs),
            "sweep": [vars(p) for p in self.sweep],
            "curve": [vars(p) for p in self.curve],
        }


@dataclass(frozen=True)
class Comparison:
    """What `compare` measured: one `RegimeRun` per batch size, same initial model."""

    problem: str
    dataset_size: int
    epochs: int
    momentum: float
    select: Select
    runs: tuple[RegimeRun, ...]

    @property
    def histories(self) -> dict[str, History]:
        return {run.label: run.history for run in self.runs}

    def table(self) -> Table:
        names = sorted({name for run in self.runs for name in run.final.metrics})
        return Table(
            f"{self.problem}: {self.epochs} epochs ({self.epochs * self.dataset_size} samples "
            f"seen) of SGD{f' with momentum {self.momentum:g}' if self.momentum else ''} "
            f"from the same initial weights",
            ["regime", "B", "lr", "steps", "train loss", "held-out loss", *names, "time (s)"],
            [
                [
                    run.regime,
                    str(run.batch_size),
                    f"{run.lr:g}{'*' if run.lr_at_edge else ''}",
                    str(run.final.step),
                    f"{run.final.train_loss:.4f}",
                    "–" if run.final.eval_loss is None else f"{run.final.eval_loss:.4f}",
                    *(f"{run.final.metrics.get(name, math.nan):.3f}" for name in names),
                    f"{run.final.wall_time:.2f}",
                ]
                for run in self.runs
            ],
        )

    @property
    def common_loss(self) -> float:
        """The highest final training loss: a level every run reached."""
        return max(run.final.train_loss for run in self.runs)

    def reach(self) -> dict[str, CurvePoint]:
        """Each run's first evaluation at or below `common_loss`, by label."""
        level = self.common_loss
        return {r.label: next(p for p in r.curve if p.train_loss <= level) for r in self.runs}

    def reach_table(self) -> Table:
        reached = self.reach()
        return Table(
            f"The cost of reaching training loss {self.common_loss:.4f} (the highest final "
            f"loss, so every run got there; at the first evaluation below it)",
            ["regime", "B", "epochs", "steps", "samples", "time (s)"],
            [
                [
                    run.regime,
                    str(run.batch_size),
                    f"{reached[run.label].epoch:.2f}",
                    str(reached[run.label].step),
                    str(reached[run.label].samples_seen),
                    f"{reached[run.label].wall_time:.3f}",
                ]
                for run in self.runs
            ],
        )

    def findings(self) -> str:
        """What the runs show, in a few Markdown sentences."""
        reached = self.reach()

        def fewest(key: str) -> RegimeRun:
            return min(self.runs, key=lambda r: float(getattr(reached[r.label], key)))

        lowest = min(self.runs, key=lambda r: r.final.train_loss)
        small = min(self.runs, key=lambda r: r.batch_size)
        big = max(self.runs, key=lambda r: r.batch_size)
        ms = {r.label: 1000 * r.final.wall_time / r.final.step for r in self.runs}
        by_steps = fewest("step")
        why = ": a step on more samples follows a less noisy gradient" if by_steps is big else ""
        lines = [
            f"- **Per epoch**, that is per sample seen (samples = epochs × n in every "
            f"regime), {_name(lowest)} ends lowest after {self.epochs} epochs "
            f"({lowest.final.train_loss:.4f}), and {_name(fewest('samples_seen'))} reaches "
            f"{self.common_loss:.4f} on the fewest samples.",
            f"- **Per step** {_name(by_steps)} needs the fewest{why}.",
            f"- **Per second** {_name(fewest('wall_time'))} gets there first. A step took "
            f"{ms[small.label]:.2f} ms at B={small.batch_size} and {ms[big.label]:.2f} ms at "
            f"B={big.batch_size}: {big.batch_size / small.batch_size:.0f}× the samples for "
            f"{ms[big.label] / ms[small.label]:.1f}× the time.",
            "- At a constant lr the loss keeps fluctuating (see the curves), the more so the "
            "noisier the steps.",
        ]
        edge = [r for r in self.runs if r.lr_at_edge]
        if edge:
            lines.append(
                "- \\* the chosen lr is at the edge of the grid ("
                + ", ".join(_name(r) for r in edge)
                + "): a wider grid may do better."
            )
        return "\n".join(lines)

    def markdown(self) -> str:
        return (
            f"# Batch regimes on {self.problem}\n\n"
            f"Each regime trains the same initial model with plain SGD at its own "
            f"learning rate: of `{', '.join(f'{p.lr:g}' for p in self.runs[0].sweep)}`, the "
            f"one with the lowest {self.select} loss over the second half of a short run.\n\n"
            f"{self.table().to_markdown()}\n\n{self.reach_table().to_markdown()}\n\n"
            f"{self.findings()}\n\n![compare](compare.png)\n"
        )

    def figure(self, path: Path) -> Path:
        """Training loss against epochs, steps, samples seen and wall time (4 panels)."""
        figure = new_figure(11, 8)
        axes = figure.subplots(2, 2)
        panels: list[tuple[Axes, str, str, bool]] = [
            (axes[0, 0], "epoch", "epochs", False),
            (axes[0, 1], "step", "optimizer steps (iterations)", True),
            (axes[1, 0], "samples_seen", "samples seen", True),
            (axes[1, 1], "wall_time", "wall time (s)", True),
        ]
        positive = all(p.train_loss > 0 for run in self.runs for p in run.curve)
        for ax, key, label, log in panels:
            for run in self.runs:
                points = [p for p in run.curve if not log or getattr(p, key) > 0]
                ax.plot(
                    [getattr(p, key) for p in points],
                    [p.train_loss for p in points],
                    marker="." if len(points) < 15 else None,
                    label=f"{_name(run)}, lr {run.lr:g}",
                )
            if log:
                ax.set_xscale("log")
            if positive:
                ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel("training loss (whole set)")
            ax.grid(True, which="both", alpha=0.3)
        axes[0, 0].legend(fontsize="small")
        figure.suptitle(f"{self.problem}: the same training, four clocks")
        return save_figure(figure, path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "dataset_size": self.dataset_size,
            "epochs": self.epochs,
            "momentum": self.momentum,
            "select": self.select,
            "runs": [run.to_dict() for run in self.runs],
        }


def _name(run: RegimeRun) -> str:
    return f"{run.regime} (B={run.batch_size})"


def compare(
    problem: Problem,
    batch_sizes: Sequence[BatchSize] = DEFAULT_BATCH_SIZES,
    *,
    epochs: int = 10,
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    sweep_epochs: float = 1.0,
    momentum: float = 0.0,
    select: Select = "train",
    seed: int = 0,
    on_progress: OnProgress | None = None,
) -> Comparison:
    """Train the same initial model with full-batch, stochastic and mini-batch SGD.

    For each batch size, every lr of ``lr_grid`` trains for a short budget
    (``sweep_epochs`` epochs, at least `MIN_SWEEP_STEPS` steps, at most the whole
    run); the lr with the lowest loss over the second half of that budget
    (``select``: over the whole training set, or the held-out one) then trains for
    ``epochs`` epochs. Runs that diverge
    (NaN/inf loss) are dropped; if the chosen lr diverges on the long run, the next
    best takes its place. Every run starts from the same initial weights and draws
    the same shuffled orders (``seed``).

    Args:
        problem: the model, loss and data (see `Problem`).
        batch_sizes: ints ``1 <= b <= n`` and ``"full"``.
        epochs: passes over the training set, the same for every regime.
        lr_grid: the learning rates of the sweep.
        sweep_epochs: the sweep's budget per lr, in epochs.
        momentum: SGD's momentum.
        select: ``"train"`` or ``"eval"``: the loss that picks the lr.
        seed: the seed of the shuffled orders.
        on_progress: called before each run (see `OnProgress`).

    Raises:
        ConfigError: for bad settings, or when every lr of the grid diverges.
    """
    size = problem.size
    sizes = _batch_sizes(batch_sizes, size)
    lrs = _lrs(lr_grid)
    _positive("epochs", epochs)
    if not (isinstance(sweep_epochs, int | float) and 0 < sweep_epochs < math.inf):
        raise ConfigError(f"sweep_epochs must be a positive number, got {sweep_epochs!r}.")
    if select not in ("train", "eval"):
        raise ConfigError(f"select must be 'train' or 'eval', got {select!r}.")
    if select == "eval" and problem.eval_data is None:
        raise ConfigError("select='eval' picks the lr on held-out data: give eval_data.")
    initial = problem.initial_model()
    total = len(sizes) * (len(lrs) + 1)
    done = 0

    def report(what: str) -> None:
        nonlocal done
        if on_progress is not None:
            on_progress(what, min(done, total - 1), total)
        done += 1

    runs = []
    for batch_size in sizes:
        samples = size if batch_size == "full" else batch_size
        per_epoch = -(-size // samples)
        steps = epochs * per_epoch
        budget = min(steps, max(math.ceil(sweep_epochs * per_epoch), MIN_SWEEP_STEPS))
        started = time.perf_counter()
        sweep = _sweep(
            problem,
            initial,
            batch_size,
            lrs,
            budget,
            momentum=momentum,
            seed=seed,
            select=select,
            report=report,
        )
        tuning_time = time.perf_counter() - started
        diverged: list[float] = []
        for choice in _ranked(sweep, batch_size):
            report(f"B={batch_size}: lr {choice.lr:g}, {epochs} epochs ({steps} steps)")
            run = _train(
                problem,
                initial,
                batch_size,
                choice.lr,
                _curve_stops(steps),
                momentum=momentum,
                seed=seed,
            )
            if not run.diverged and run.history is not None:
                break
            diverged.append(choice.lr)
        else:
            raise ConfigError(
                f"Every learning rate diverged over {epochs} epochs at batch size "
                f"{batch_size}; pass smaller ones (lr_grid=, --lrs)."
            )
        runs.append(
            RegimeRun(
                _regime(samples, size),
                samples,
                str(batch_size),
                choice.lr,
                tuple(sweep),
                tuple(run.curve),
                run.history,
                tuning_time,
                tuple(diverged),
            )
        )
    return Comparison(problem.name, size, epochs, momentum, select, tuple(runs))


def _regime(batch_size: int, size: int) -> str:
    if batch_size >= size:
        return "full-batch"
    return "stochastic" if batch_size == 1 else "mini-batch"


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


# ---- steps to a target loss: S(B), and B_noise fitted ------------------------------


@dataclass(frozen=True)
class TargetRun:
    """The fewest steps one batch size took to reach the target loss.

    Attributes:
        steps: optimizer steps to the target, interpolated in log-loss between the
            evaluations around the crossing; None when no lr tried reached it.
        seconds: the training time to the target (`fit`'s clock), None likewise.
        lr: the lr that got there in the fewest steps, None likewise.
        tried: ``(lr, steps or None)`` for each lr tried, in order.
    """

    batch_size: int
    steps: float | None
    seconds: float | None
    lr: float | None
    tried: tuple[tuple[float, float | None], ...]

    @property
    def samples(self) -> float | None:
        return None if self.steps is None else self.steps * self.batch_size


@dataclass(frozen=True)
class CriticalBatch:
    """`steps_to_target`'s measurements and the fit ``S(B) = S_min (1 + B_noise / B)``."""

    problem: str
    target: float
    max_steps: int
    runs: tuple[TargetRun, ...]
    s_min: float
    b_noise: float

    @property
    def e_min(self) -> float:
        """The fewest samples: ``S_min B_noise``."""
        return self.s_min * self.b_noise

    def predicted_steps(self, batch_size: float) -> float:
        return self.s_min * (1 + self.b_noise / batch_size)

    def table(self) -> Table:
        return Table(
            f"Steps to training loss {self.target:g} (each B at its fastest lr of a search; "
            f"fit S_min = {self.s_min:.1f}, B_noise = {self.b_noise:.0f})",
            ["B", "lr", "steps", "samples", "time (s)", "fit S_min(1 + B_noise/B)", "lrs tried"],
            [
                [
                    str(run.batch_size),
                    "–" if run.lr is None else f"{run.lr:g}",
                    "not reached" if run.steps is None else f"{run.steps:.1f}",
                    "–" if run.samples is None else f"{run.samples:.0f}",
                    "–" if run.seconds is None else f"{run.seconds:.3f}",
                    f"{self.predicted_steps(run.batch_size):.1f}",
                    str(len(run.tried)),
                ]
                for run in self.runs
            ],
        )

    def figure(self, path: Path, advice: Advice | None = None) -> Path:
        """Steps and samples to the target against B (log-log), the fit, and B_simple."""
        figure = new_figure(15 if advice else 10, 4.5)
        axes = figure.subplots(1, 3 if advice else 2)
        reached = [run for run in self.runs if run.steps is not None]
        sizes = [run.batch_size for run in reached]
        every = [run.batch_size for run in self.runs]
        low, high = min(every) / 1.5, max(every) * 1.5
        dense = [low * (high / low) ** (k / 200) for k in range(201)]
        fitted = math.isfinite(self.s_min) and math.isfinite(self.b_noise)
        for ax, per_step in ((axes[0], True), (axes[1], False)):
            scale = [1.0 if per_step else b for b in sizes]
            ax.plot(
                sizes,
                [(run.steps or math.nan) * s for run, s in zip(reached, scale, strict=True)],
                "o",
                label="measured",
            )
            if fitted:
                ax.plot(
                    dense,
                    [self.predicted_steps(b) * (1 if per_step else b) for b in dense],
                    "-",
                    label=f"fit, B_noise = {self.b_noise:.0f}",
                )
                ax.axhline(
                    self.s_min if per_step else self.e_min,
                    color="grey",
                    linestyle=":",
                    label="S_min" if per_step else "E_min = S_min B_noise",
                )
                ax.axvline(self.b_noise, color="C1", linestyle="--")
            if advice is not None and advice.batch_size is not None:
                lo, hi = advice.b_range
                ax.axvspan(max(lo, low), min(hi, high), color="C2", alpha=0.15)
                ax.axvline(
                    advice.b_simple,
                    color="C2",
                    label=f"B_simple = {advice.b_simple:.0f} ± {advice.b_simple_std:.0f}",
                )
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("batch size B")
            ax.set_ylabel(f"{'steps' if per_step else 'samples'} to loss {self.target:g}")
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize="small")
        axes[0].set_title("S = S_min (1 + B_noise / B)")
        axes[1].set_title("E = E_min (1 + B / B_noise)")
        if advice is not None:
            points = advice.trajectory()
            ax = axes[2]
            ax.plot([p[0] for p in points], [p[2] for p in points], color="C2")
            ax.set_yscale("log")
            ax.set_xlabel(f"step (B = {advice.measured_batch_size})")
            ax.set_ylabel("B_simple (moving average)", color="C2")
            twin = ax.twinx()
            twin.plot([p[0] for p in points], [p[1] for p in points], color="grey", alpha=0.5)
            twin.set_yscale("log")
            twin.set_ylabel("batch loss", color="grey")
            ax.set_title("B_simple grows as the loss falls")
        figure.suptitle(f"{self.problem}: the critical batch size")
        return save_figure(figure, path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "target": self.target,
            "max_steps": self.max_steps,
            "s_min": self.s_min,
            "b_noise": self.b_noise,
            "e_min": self.e_min,
            "runs": [
                {
                    "batch_size": run.batch_size,
                    "steps": run.steps,
                    "samples": run.samples,
                    "seconds": run.seconds,
                    "lr": run.lr,
                    "predicted_steps": self.predicted_steps(run.batch_size),
                    "tried": [{"lr": lr, "steps": steps} for lr, steps in run.tried],
                }
                for run in self.runs
            ],
        }


def steps_to_target(
    problem: Problem,
    batch_sizes: Sequence[BatchSize],
    target: float,
    *,
    lr_grid: Sequence[float] = TARGET_LR_GRID,
    max_steps: int = 5000,
    momentum: float = 0.0,
    seed: int = 0,
    on_progress: OnProgress | None = None,
) -> CriticalBatch:
    """The fewest SGD steps each batch size takes to reach a training loss.

    Each batch size gets its own lr: a local search on ``lr_grid`` starts from the
    previous batch size's best (the middle of the grid for the first) and moves up,
    then down, while the steps to the target fall; each run stops at the target,
    or at the best count so far (it cannot win beyond it), or at ``max_steps``. The
    training loss is evaluated on the whole training set every ~5% of the steps and
    the crossing interpolated in log-loss. Then `fit_tradeoff` fits
    ``S(B) = S_min (1 + B_noise / B)`` to the batch sizes that reached the target.

    Raises:
        ConfigError: bad settings, or a target the initial model already meets.
    """
    size = problem.size
    sizes = [size if b == "full" else int(b) for b in _batch_sizes(batch_sizes, size)]
    lrs = sorted(_lrs(lr_grid))
    _positive("max_steps", max_steps)
    if not (isinstance(target, int | float) and 0 < target < math.inf):
        raise ConfigError(f"target must be a positive loss, got {target!r}.")
    initial = problem.initial_model()
    start_loss = _evaluate(initial, problem, None, held_out=False).train_loss
    if start_loss <= target:
        raise ConfigError(
            f"The initial model's training loss ({start_loss:.4g}) is already at most the "
            f"target {target:g}; choose a lower target."
        )
    start = len(lrs) // 2
    runs = []
    for i, batch_size in enumerate(sizes):
        if on_progress is not None:
            on_progress(f"B={batch_size}: steps to loss {target:g}", i, len(sizes))

        def steps_at(lr: float, cap: int, batch_size: int = batch_size) -> _Outcome:
            return _steps_to(problem, initial, batch_size, lr, target, cap, momentum, seed)

        best, tried = _fastest(steps_at, lrs, start, max_steps)
        won = None if best is None else tried[best]
        if best is not None:
            start = best
        runs.append(
            TargetRun(
                batch_size,
                None if won is None else won.steps,
                None if won is None else won.seconds,
                None if best is None else lrs[best],
                tuple((lrs[j], None if r is None else r.steps) for j, r in tried.items()),
            )
        )
    s_min, b_noise = fit_tradeoff(
        [run.batch_size for run in runs if run.steps is not None],
        [run.steps for run in runs if run.steps is not None],
    )
    return CriticalBatch(problem.name, target, max_steps, tuple(runs), s_min, b_noise)


class _Reached(NamedTuple):
    steps: float
    seconds: float


_Outcome = tuple[_Reached | None, bool]
"""A run towards the target: where it got there (None: it did not), whether it diverged."""


def _fastest(
    steps_at: Callable[[float, int], _Outcome],
    lrs: Sequence[float],
    start: int,
    max_steps: int,
) -> tuple[int | None, dict[int, _Reached | None]]:
    """The index of the lr reaching the target in the fewest steps, by local search."""
    tried: dict[int, _Reached | None] = {}
    best: _Reached | None = None
    index: int | None = None

    def better(j: int) -> bool | None:
        """True: lrs[j] is the fastest so far; False: slower; None: it diverged."""
        nonlocal best, index
        cap = max_steps if best is None else min(max_steps, math.ceil(best.steps))
        reached, diverged = steps_at(lrs[j], cap)
        tried[j] = reached
        if reached is not None and (best is None or reached.steps < best.steps):
            best, index = reached, j
            return True
        return None if diverged else False

    better(start)
    up = start + 1
    while up < len(lrs) and better(up):
        up += 1
    if index in (start, None):
        down = start - 1
        while down >= 0:
            outcome = better(down)
            # on down while faster, or while every lr so far diverged
            if outcome is False or (outcome is None and best is not None):
                break
            down -= 1
    return index, tried


def _steps_to(
    problem: Problem,
    initial: nn.Module,
    batch_size: int,
    lr: float,
    target: float,
    cap: int,
    momentum: float,
    seed: int,
) -> _Outcome:
    """Train until the training loss is at most ``target`` or for ``cap`` steps."""
    stops, step = [], 1
    while step < cap:
        stops.append(step)
        step = max(step + 1, round(step * 1.05))
    stops.append(cap)
    run = _train(
        problem,
        initial,
        batch_size,
        lr,
        stops,
        momentum=momentum,
        seed=seed,
        held_out=False,
        target=target,
    )
    before, last = run.curve[-2:] if len(run.curve) > 1 else run.curve * 2
    if run.diverged or last.train_loss > target:
        return None, run.diverged
    share = 1.0
    if last.train_loss > 0:
        share = math.log(before.train_loss / target) / math.log(before.train_loss / last.train_loss)
    return _Reached(
        before.step + (last.step - before.step) * share,
        before.wall_time + (last.wall_time - before.wall_time) * share,
    ), False


def fit_tradeoff(batch_sizes: Sequence[float], steps: Sequence[float]) -> tuple[float, float]:
    """``(S_min, B_noise)`` of ``S(B) = S_min (1 + B_noise / B)``, by least squares.

    The model is linear in ``S_min`` and ``S_min B_noise``; each point's error is
    taken relative to its steps (small batches take many more). NaNs when fewer
    than two points, or when the points do not fall with B.

    Example:
        >>> s_min, b_noise = fit_tradeoff([4, 16, 64], [110.0, 35.0, 16.25])
        >>> round(s_min, 6), round(b_noise, 6)
        (10.0, 40.0)
    """
    if len(batch_sizes) < 2 or len(batch_sizes) != len(steps):
        return math.nan, math.nan
    rows = [(1 / s, 1 / (b * s)) for b, s in zip(batch_sizes, steps, strict=True)]
    aa = math.fsum(u * u for u, _ in rows)
    ab = math.fsum(u * v for u, v in rows)
    bb = math.fsum(v * v for _, v in rows)
    ya = math.fsum(u for u, _ in rows)
    yb = math.fsum(v for _, v in rows)
    det = aa * bb - ab * ab
    if det <= 0:
        return math.nan, math.nan
    s_min = (ya * bb - yb * ab) / det
    slope = (aa * yb - ab * ya) / det  # S_min B_noise
    if s_min <= 0 or slope <= 0:
        return math.nan, math.nan
    return s_min, slope / s_min


# ---- advise ------------------------------------------------------------------------


def lr_scale(b_noise: float, from_batch: float, to_batch: float) -> float:
    """The factor on SGD's learning rate from batch ``from_batch`` to ``to_batch``.

    The best lr of SGD at batch ``B`` is ``ε(B) = ε_max / (1 + B_noise / B)``
    (McCandlish et al. 2018), so the factor is
    ``(1 + B_noise / from_batch) / (1 + B_noise / to_batch)``: about
    ``to_batch / from_batch`` (linear scaling) while both are much below
    ``B_noise``, about 1 when both are above.

    Example:
        >>> lr_scale(100, 10, 20)  # (1 + 10) / (1 + 5)
        1.8333333333333333
        >>> round(lr_scale(1e6, 10, 20), 3), round(lr_scale(1, 1000, 2000), 3)
        (2.0, 1.0)
    """
    return (1 + b_noise / from_batch) / (1 + b_noise / to_batch)


def recommend_batch_size(b_simple: float, size: int) -> int | None:
    """The power of two nearest ``b_simple`` (in log scale), at most ``size``.

    None when ``b_simple`` is not a positive number (no gradient above the noise).

    Example:
        >>> recommend_batch_size(90.0, 1000), recommend_batch_size(3000.0, 1000)
        (64, 1000)
    """
    if not (math.isfinite(b_simple) and b_simple > 0):
        return None
    return min(int(2 ** max(0, round(math.log2(b_simple)))), size)


@dataclass(frozen=True)
class Advice:
    """`advise`'s measurement of the noise scale, its batch size and its reasons.

    Attributes:
        batch_size: the recommended batch size, None when ``b_simple`` could not be
            measured (its ``‖G‖²`` estimate is not positive).
        b_simple: ``tr Σ / ‖G‖²`` from the moving averages at the end of the run.
        b_simple_std: its standard error, from the step-to-step spread.
        b_simple_early: the moving average after the first ``1 / (1 - beta)`` steps
            (the noise scale changes as training goes on).
        grad_sq, trace_cov: the averages behind ``b_simple``.
        measured_batch_size, micro_batch_size, micro_batches: how it was measured.
        beta: the `NoiseScale` averaging factor (about ``1 / (1 - beta)`` steps weigh).
        steps, lr, momentum: the measuring run (plain SGD).
        lr_tuned: whether ``lr`` is the best of a sweep (or was given).
        train_loss: the loss over the whole training set after the run.
        dataset_size: ``n``.
        sweep: the sweep that picked ``lr`` (empty when given).
        history: the measuring run's `fit` history (``b_simple`` at every step).
    """

    batch_size: int | None
    b_simple: float
    b_simple_std: float
    b_simple_early: float
    grad_sq: float
    trace_cov: float
    measured_batch_size: int
    micro_batch_size: int
    micro_batches: int
    beta: float
    steps: int
    lr: float
    lr_tuned: bool
    momentum: float
    train_loss: float
    dataset_size: int
    sweep: tuple[SweepPoint, ...]
    history: History = field(repr=False)

    @property
    def b_range(self) -> tuple[float, float]:
        """``b_simple ± b_simple_std``, the lower end at least 1."""
        return max(1.0, self.b_simple - self.b_simple_std), self.b_simple + self.b_simple_std

    @property
    def batch_range(self) -> tuple[int, int] | None:
        """The powers of two (at most ``n``) around `b_range`."""
        if self.batch_size is None:
            return None
        lo, hi = self.b_range
        top = self.dataset_size if not math.isfinite(hi) else 2 ** math.ceil(math.log2(hi))
        return min(2 ** math.floor(math.log2(lo)), self.dataset_size), min(top, self.dataset_size)

    @property
    def recommended_lr(self) -> float | None:
        """SGD's lr at `batch_size`: ``lr`` times `lr_scale` from the measured batch."""
        if self.batch_size is None:
            return None
        return self.lr * lr_scale(self.b_simple, self.measured_batch_size, self.batch_size)

    def tradeoff(self) -> list[dict[str, float]]:
        """Steps and samples (× the fewest) and SGD's lr, for powers of two around B."""
        if self.batch_size is None:
            return []
        b = self.b_simple
        around = (round(self.batch_size * 2.0**k) for k in range(-3, 4))
        sizes = sorted({min(max(1, size), self.dataset_size) for size in around})
        return [
            {
                "batch_size": size,
                "steps_over_min": 1 + b / size,
                "samples_over_min": 1 + size / b,
                "lr": self.lr * lr_scale(b, self.measured_batch_size, size),
            }
            for size in sizes
        ]

    def trajectory(self) -> list[tuple[int, float, float]]:
        """``(step, batch loss, b_simple moving average)`` along the measuring run."""
        return [
            (r.step, r.loss, r.b_simple)
            for r in self.history.steps
            if r.b_simple is not None and math.isfinite(r.b_simple)
        ]

    def table(self) -> Table:
        return Table(
            f"What each batch size costs, with B_noise ≈ B_simple = {self.b_simple:.0f}",
            ["B", "steps / S_min", "samples / E_min", "SGD lr"],
            [
                [
                    f"{row['batch_size']:.0f}"
                    + (" ←" if row["batch_size"] == self.batch_size else ""),
                    f"{row['steps_over_min']:.2f}",
                    f"{row['samples_over_min']:.2f}",
                    f"{row['lr']:.3g}",
                ]
                for row in self.tradeoff()
            ],
        )

    @property
    def text(self) -> str:
        """The recommendation and its reasons, in Markdown."""
        return _advice_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "batch_range": self.batch_range,
            "b_simple": self.b_simple,
            "b_simple_std": self.b_simple_std,
            "b_range": self.b_range,
            "b_simple_early": self.b_simple_early,
            "grad_sq": self.grad_sq,
            "trace_cov": self.trace_cov,
            "measured_batch_size": self.measured_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "micro_batches": self.micro_batches,
            "steps": self.steps,
            "lr": self.lr,
            "lr_tuned": self.lr_tuned,
            "momentum": self.momentum,
            "recommended_lr": self.recommended_lr,
            "train_loss": self.train_loss,
            "dataset_size": self.dataset_size,
            "sweep": [vars(p) for p in self.sweep],
            "tradeoff": self.tradeoff(),
            "trajectory": [
                {"step": s, "loss": loss, "b_simple": b} for s, loss, b in self.trajectory()
            ],
            "text": self.text,
        }


def advise(
    problem: Problem,
    batch_size: int = 64,
    micro_batches: int = 4,
    *,
    steps: int = 200,
    lr: float | None = None,
    lr_grid: Sequence[float] = DEFAULT_LR_GRID,
    momentum: float = 0.0,
    beta: float = 0.95,
    seed: int = 0,
    on_progress: OnProgress | None = None,
) -> Advice:
    """Measure the gradient noise scale in a short SGD run and recommend a batch size.

    ``steps`` steps of SGD at ``batch_size``, each logical batch accumulated in
    ``micro_batches`` micro-batches, measure ``B_simple`` with a `NoiseScale`
    (moving averages with factor ``beta``). Without ``lr``, each lr of ``lr_grid``
    first trains ``steps`` steps and the one with the lowest training loss is used.
    The advice is the power of two nearest ``B_simple``; see `Advice.text` for the
    reasons and the learning rate that goes with it.

    Raises:
        ConfigError: bad settings, or every lr of the sweep diverged.
        NonFiniteError: the measuring run diverged at the given ``lr``.
    """
    size = problem.size
    _positive("batch_size", batch_size)
    _positive("steps", steps)
    if _positive("micro_batches", micro_batches) < 2:
        raise ConfigError(
            "The noise scale compares the micro-batch gradients with the batch's: "
            "micro_batches must be at least 2."
        )
    if not micro_batches <= batch_size <= size:
        raise ConfigError(
            f"batch_size must be between micro_batches ({micro_batches}) and the training "
            f"set ({size} samples), got {batch_size}."
        )
    micro = -(-batch_size // micro_batches)
    initial = problem.initial_model()
    sweep: list[SweepPoint] = []
    runs = 1 + (0 if lr is not None else len(lr_grid))
    done = 0

    def report(what: str) -> None:
        nonlocal done
        if on_progress is not None:
            on_progress(what, done, runs)
        done += 1

    if lr is None:
        sweep = _sweep(
            problem,
            initial,
            batch_size,
            _lrs(lr_grid),
            steps,
            momentum=momentum,
            seed=seed,
            select="train",
            report=report,
        )
        chosen = _ranked(sweep, batch_size)[0].lr
    else:
        chosen = _lrs([lr])[0]
    report(f"B={batch_size}: measuring the noise scale over {steps} steps at lr {chosen:g}")
    scale = NoiseScale(beta)
    run = _train(
        problem,
        initial,
        batch_size,
        chosen,
        [steps],
        momentum=momentum,
        seed=seed,
        held_out=False,
        noise=scale,
        micro_batch_size=micro,
    )
    if run.diverged or run.history is None:
        raise NonFiniteError(
            f"SGD at lr {chosen:g} diverged while measuring the noise scale at batch size "
            f"{batch_size}; pass a smaller lr (or none, to sweep)."
        )
    measured = [r.b_simple for r in run.history.steps if r.b_simple is not None]
    early = measured[min(len(measured), round(1 / (1 - beta))) - 1] if measured else math.nan
    return Advice(
        batch_size=recommend_batch_size(scale.b_simple, size),
        b_simple=scale.b_simple,
        b_simple_std=scale.b_simple_std,
        b_simple_early=early,
        grad_sq=scale.grad_sq,
        trace_cov=scale.trace_cov,
        measured_batch_size=batch_size,
        micro_batch_size=micro,
        micro_batches=-(-batch_size // micro),
        beta=scale.beta,
        steps=steps,
        lr=chosen,
        lr_tuned=lr is None,
        momentum=momentum,
        train_loss=run.curve[-1].train_loss,
        dataset_size=size,
        sweep=tuple(sweep),
        history=run.history,
    )


def _advice_text(advice: Advice) -> str:
    b, std, b0 = advice.b_simple, advice.b_simple_std, advice.measured_batch_size
    window = round(1 / (1 - advice.beta))
    how = (
        f"Measured over {advice.steps} SGD steps at batch size {b0} ({advice.micro_batches} "
        f"micro-batches of ≤ {advice.micro_batch_size}), lr {advice.lr:g} "
        f"({'the best of a sweep' if advice.lr_tuned else 'as given'}); the training loss "
        f"is now {advice.train_loss:.4g}."
    )
    if advice.batch_size is None:
        return (
            f"{how}\n\nNo recommendation: the estimate of ‖G‖² (the squared true gradient) "
            f"averaged {advice.grad_sq:.3g}, not above 0, so the gradient is lost in the "
            f"noise of batches of {b0}. Measure with a larger batch size or more steps."
        )
    rec = advice.batch_size
    lo, hi = advice.b_range
    low, high = advice.batch_range or (rec, rec)
    half, double = max(1, rec // 2), min(2 * rec, advice.dataset_size)
    scale = lr_scale(b, b0, rec)
    capped = " (the whole training set: B_simple exceeds it)" if rec == advice.dataset_size else ""
    adaptive = (
        "With Adam or another adaptive optimizer the best lr grows more like √B (and also "
        "stops growing past B_noise): re-tune it rather than scale it."
    )
    given = (
        ""
        if advice.lr_tuned
        else " The lr was given, not tuned: the scaled lr is as good as the one you gave."
    )
    edge = ""
    if _at_edge(advice.lr, advice.sweep):
        edge = " The sweep's best lr is at the edge of its grid: a wider grid may do better."
    paragraphs = [
        how,
        f"**Noise scale.** B_simple = tr Σ / ‖G‖² = **{b:.0f} ± {std:.0f}** samples "
        f"(moving averages over about the last {window} steps; ± one "
        f"standard error), so B between {lo:.0f} and {hi:.0f}.",
        f"**Recommendation: batch size {rec}**{capped}, the power of two nearest B_simple; "
        f"anything from {low} to {high} is as well supported by this measurement.",
        f"**Why.** The steps S and samples E that training needs to reach a given loss "
        f"trade off as S = S_min (1 + B_noise/B) and E = E_min (1 + B/B_noise) (McCandlish "
        f"et al. 2018), and B_simple approximates B_noise. At B = B_noise training takes 2× "
        f"the fewest steps and 2× the fewest samples; at B = {rec}: "
        f"{1 + b / rec:.2f}× S_min steps and {1 + rec / b:.2f}× E_min samples. Doubling "
        f"to {double} would take {1 + b / double:.2f}× S_min steps "
        f"for {1 + double / b:.2f}× E_min samples; halving to {half}, "
        f"{1 + b / half:.2f}× S_min steps for {1 + half / b:.2f}× E_min samples. Past "
        f"B_noise a bigger batch barely saves steps; below it a smaller one barely saves samples.",
        f"**Learning rate (SGD).** The best lr grows with the batch as ε(B) = ε_max / "
        f"(1 + B_noise/B): from {b0} to {rec}, multiply it by (1 + B_noise/{b0}) / "
        f"(1 + B_noise/{rec}) = {scale:.2f}, lr {advice.lr:g} → **{advice.lr * scale:.3g}**. "
        f"That is about linear scaling (× B/{b0}) while B ≪ B_noise, and nothing gained "
        f"beyond. ε_max itself is bounded by the curvature (SGD diverges above about "
        f"2 / the largest Hessian eigenvalue): if the scaled lr diverges, take the largest "
        f"that does not.{given}{edge} {adaptive}",
        "**Caveats.** B_simple takes the Hessian as a multiple of the identity; it "
        "approximates the critical batch size B_crit, within a small factor in McCandlish "
        "et al.'s experiments. As a rule it grows as the loss falls (here: "
        f"{advice.b_simple_early:.0f} over the first {window} steps, {b:.0f} over the last "
        f"{window}): measure again later in training, where a larger batch may pay off.",
    ]
    return "\n\n".join(paragraphs)
