"""`compare`: the batch regimes side by side.

Gradient descent's regimes differ only in the batch behind each step (see
`batchgrad.fit`): full-batch (the exact gradient of the training loss, one step per
epoch), stochastic (one sample per step) and mini-batch. `compare` trains the same
initial model in each, at a learning rate picked for each by a small sweep, and
records the training loss against epochs, steps, samples seen and wall time.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ._errors import ConfigError
from ._fit import BatchSize, History
from ._problem import (
    DEFAULT_BATCH_SIZES,
    DEFAULT_LR_GRID,
    MIN_SWEEP_STEPS,
    OnProgress,
    Problem,
    Select,
    _batch_sizes,
    _lrs,
    _positive,
)
from ._report import Table
from ._runs import (
    CurvePoint,
    StepTime,
    SweepPoint,
    _at_edge,
    _curve_stops,
    _ranked,
    _sweep,
    _train,
)

LAST_EPOCH_POINTS = 16
"""Evaluations spread over the last epoch of each run, at least (`RegimeRun.final_loss`)."""


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
        averaged: the average of the weights evaluated over the last half epoch,
            evaluated (see `final_loss`).
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
    averaged: CurvePoint
    diverged_lrs: tuple[float, ...] = ()

    @property
    def final(self) -> CurvePoint:
        return self.curve[-1]

    @property
    def last_epoch(self) -> list[CurvePoint]:
        """The evaluations after the start of the run's last epoch (at least the last)."""
        start = self.final.epoch - 1 - 1e-9
        return [p for p in self.curve if p.epoch > start and p.step > 0] or [self.final]

    @property
    def end(self) -> list[CurvePoint]:
        """The evaluations of the last half epoch (at least the last one)."""
        start = self.final.epoch - 0.5 - 1e-9
        return [p for p in self.curve if p.epoch > start and p.step > 0] or [self.final]

    @property
    def final_loss(self) -> float:
        """The training loss at the end: that of the average of the weights at the
        evaluations of the last half epoch (`end`; Polyak–Ruppert tail averaging). At a
        constant lr the iterates bounce around where the run has got to, the loss after
        a single step by several times at small batches and large lrs; their average
        ranks the regimes by where they are, not by their last step's luck (the
        iterates' own losses are in `iterate_loss` and `last_epoch_range`)."""
        return self.averaged.train_loss

    @property
    def iterate_loss(self) -> float:
        """The median training loss of the iterates evaluated over the last half epoch."""
        return statistics.median(p.train_loss for p in self.end)

    @property
    def last_epoch_range(self) -> tuple[float, float]:
        """The lowest and highest training loss evaluated in the last epoch."""
        values = [p.train_loss for p in self.last_epoch]
        return min(values), max(values)

    @property
    def final_eval_loss(self) -> float | None:
        """The held-out loss of the averaged weights (see `final_loss`), None without one."""
        return self.averaged.eval_loss

    @property
    def final_metrics(self) -> dict[str, float]:
        """The held-out metrics of the averaged weights (see `final_loss`)."""
        return self.averaged.metrics

    @property
    def step_time(self) -> StepTime:
        """Seconds per step over the run's steps (median and quartiles)."""
        return StepTime.of(self.history)

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
            "step_time": vars(self.step_time),
            "tuning_time": self.tuning_time,
            "train_loss": self.final_loss,
            "eval_loss": self.final_eval_loss,
            "metrics": self.final_metrics,
            "iterate_train_loss": self.iterate_loss,
            "last_epoch_range": list(self.last_epoch_range),
            "last_step": vars(self.final),
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
    drop_last: bool = True

    @property
    def histories(self) -> dict[str, History]:
        return {run.label: run.history for run in self.runs}

    def table(self) -> Table:
        names = sorted({name for run in self.runs for name in run.final_metrics})
        return Table(
            f"{self.epochs} epochs of SGD"
            f"{f' with momentum {self.momentum:g}' if self.momentum else ''} from the same "
            f"initial weights{self._dropped()}; losses and metrics: of the weights averaged "
            f"over the last half epoch (iterates: their median training loss)",
            ["B", "lr", "steps", "train", "iterates", "held-out", *names, "time (s)"],
            [
                [
                    run.label,
                    f"{run.lr:g}{'*' if run.lr_at_edge else ''}",
                    str(run.final.step),
                    f"{run.final_loss:.4f}",
                    f"{run.iterate_loss:.4f}",
                    "–" if run.final_eval_loss is None else f"{run.final_eval_loss:.4f}",
                    *(f"{run.final_metrics.get(name, math.nan):.3f}" for name in names),
                    f"{run.final.wall_time:.2f}",
                ]
                for run in self.runs
            ],
        )

    def _dropped(self) -> str:
        short = [r for r in self.runs if self.dataset_size % r.batch_size]
        if not short:
            return ""
        if self.drop_last:
            return " (the short last batch of each epoch skipped)"
        return " (the short last batch of each epoch kept: losses read after it are lifted)"

    @property
    def common_loss(self) -> float:
        """The highest of the runs' iterate losses (`RegimeRun.iterate_loss`): a level
        every run's iterates reached (the averaged weights are lower still)."""
        return max(run.iterate_loss for run in self.runs)

    def reach(self) -> dict[str, CurvePoint]:
        """Each run's first evaluation at or below `common_loss`, by label."""
        level = self.common_loss
        return {r.label: next(p for p in r.curve if p.train_loss <= level) for r in self.runs}

    def seconds_to_common(self) -> dict[str, tuple[float, float, float]]:
        """Seconds each run takes to `common_loss`: its steps there times the median,
        lower and upper quartile of its seconds per step, by label."""
        reached = self.reach()
        out = {}
        for run in self.runs:
            steps, time = reached[run.label].step, run.step_time
            out[run.label] = (steps * time.median, steps * time.low, steps * time.high)
        return out

    def reach_table(self) -> Table:
        reached = self.reach()
        seconds = self.seconds_to_common()
        return Table(
            f"The cost of reaching training loss {self.common_loss:.4f} (the highest of the "
            f"iterates' medians, so every run got there); time: steps × seconds per step, median "
            f"(quartiles) over the run's steps",
            ["B", "epochs", "steps", "samples", "time (s)"],
            [
                [
                    run.label,
                    f"{reached[run.label].epoch:.2f}",
                    str(reached[run.label].step),
                    str(reached[run.label].samples_seen),
                    "{:.3f} ({:.3f}–{:.3f})".format(*seconds[run.label]),
                ]
                for run in self.runs
            ],
        )

    def fastest(self) -> RegimeRun | None:
        """The run that reaches `common_loss` first beyond the spread of the timings:
        even at its upper quartile against every other run's lower one; None if none."""
        seconds = self.seconds_to_common()
        best = min(self.runs, key=lambda r: seconds[r.label][0])
        others = [r for r in self.runs if r is not best]
        if all(seconds[best.label][2] < seconds[r.label][1] for r in others):
            return best
        return None

    def findings(self) -> str:
        """What the runs show, in a few Markdown sentences."""
        reached = self.reach()

        def fewest(key: str) -> RegimeRun:
            return min(self.runs, key=lambda r: float(getattr(reached[r.label], key)))

        lowest = min(self.runs, key=lambda r: r.final_loss)
        small = min(self.runs, key=lambda r: r.batch_size)
        big = max(self.runs, key=lambda r: r.batch_size)
        times = {r.label: r.step_time for r in self.runs}

        def ms(run: RegimeRun) -> str:
            t = times[run.label]
            return (
                f"{1000 * t.median:.2f} ms ({1000 * t.low:.2f}–{1000 * t.high:.2f}, "
                f"{t.count} steps)"
            )

        by_steps = fewest("step")
        why = ": a step on more samples follows a less noisy gradient" if by_steps is big else ""
        fastest = self.fastest()
        if fastest is None:
            per_second = (
                "no regime is clearly first: the times to get there overlap within the "
                "step-to-step spread of the timings"
            )
        else:
            per_second = f"{_name(fastest)} gets there first, beyond the timings' spread"
        ratio = times[big.label].median / times[small.label].median
        samples = "samples = epochs × n" if not self.drop_last else "up to the skipped batches"
        low, high = lowest.last_epoch_range
        lines = [
            f"- **Per epoch**, that is per sample seen (the same in every regime, "
            f"{samples}), {_name(lowest)} ends lowest after {self.epochs} epochs "
            f"({lowest.final_loss:.4f} with its weights averaged over the last half epoch; "
            f"its iterates {low:.4f} to {high:.4f}), and {_name(fewest('samples_seen'))} reaches "
            f"{self.common_loss:.4f} on the fewest samples.",
            f"- **Per step** {_name(by_steps)} needs the fewest{why}.",
            f"- **Per second** {per_second}. A step took {ms(small)} at B={small.batch_size} "
            f"and {ms(big)} at B={big.batch_size} (median, quartiles): "
            f"{big.batch_size / small.batch_size:.0f}× the samples for {ratio:.1f}× the time.",
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
        from ._plots import compare_figure

        return compare_figure(self, path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "dataset_size": self.dataset_size,
            "epochs": self.epochs,
            "momentum": self.momentum,
            "select": self.select,
            "drop_last": self.drop_last,
            "fastest": getattr(self.fastest(), "label", None),
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
    drop_last: bool = True,
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

    With ``drop_last`` (the default) each epoch skips its short last batch: a step
    on a few samples is a noisy one, and the whole-set loss read right after it (at
    the end of every epoch, where the runs are compared) is lifted by it, so the
    regimes would be ranked by an artefact of ``n mod B``.

    Args:
        problem: the model, loss and data (see `Problem`).
        batch_sizes: ints ``1 <= b <= n`` and ``"full"``.
        epochs: passes over the training set, the same for every regime.
        lr_grid: the learning rates of the sweep.
        sweep_epochs: the sweep's budget per lr, in epochs.
        momentum: SGD's momentum.
        select: ``"train"`` or ``"eval"``: the loss that picks the lr.
        seed: the seed of the shuffled orders.
        drop_last: skip each epoch's short last batch (see above).
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
        per_epoch = size // samples if drop_last else -(-size // samples)
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
            drop_last=drop_last,
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
                sorted({*_curve_stops(steps), *_last_epoch_stops(steps, per_epoch)}),
                momentum=momentum,
                seed=seed,
                drop_last=drop_last,
                average_from=steps - per_epoch / 2,
            )
            if not run.diverged and run.history is not None and run.averaged is not None:
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
                run.averaged,
                tuple(diverged),
            )
        )
    return Comparison(problem.name, size, epochs, momentum, select, tuple(runs), drop_last)


def _last_epoch_stops(steps: int, per_epoch: int) -> list[int]:
    """`LAST_EPOCH_POINTS` evaluation steps spread over the last epoch."""
    points = LAST_EPOCH_POINTS
    return [steps - round(per_epoch * k / points) for k in range(points) if k < per_epoch]


def _regime(batch_size: int, size: int) -> str:
    if batch_size >= size:
        return "full-batch"
    return "stochastic" if batch_size == 1 else "mini-batch"
