"""The critical batch size: steps to a target loss at each batch size, and the fit.

Training needs ``S`` optimizer steps and ``E = S B`` samples to reach a given loss;
McCandlish et al. (2018) found them to trade off as
``S = S_min (1 + B_noise / B)``. `steps_to_target` measures ``S(B)`` directly and
`fit_tradeoff` fits ``S_min`` and ``B_noise``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

from torch import nn

from ._errors import ConfigError
from ._fit import BatchSize
from ._problem import TARGET_LR_GRID, OnProgress, Problem, _batch_sizes, _lrs, _positive
from ._report import Table
from ._runs import StepTime, _evaluate, _train

if TYPE_CHECKING:
    from ._advise import Advice


@dataclass(frozen=True)
class TargetRun:
    """The fewest steps one batch size took to reach the target loss.

    Attributes:
        steps: optimizer steps to the target, interpolated in log-loss between the
            evaluations around the crossing; None when no lr tried reached it.
        seconds: the training time to the target (`fit`'s clock), None likewise.
        step_time: seconds per step of that run (median and quartiles), to judge
            differences in ``seconds`` by; None likewise.
        lr: the lr that got there in the fewest steps, None likewise.
        tried: ``(lr, steps or None)`` for each lr tried, in order.
    """

    batch_size: int
    steps: float | None
    seconds: float | None
    lr: float | None
    tried: tuple[tuple[float, float | None], ...]
    step_time: StepTime | None = None

    @property
    def seconds_range(self) -> tuple[float, float] | None:
        """Steps to the target times the quartiles of the seconds per step."""
        if self.steps is None or self.step_time is None:
            return None
        return self.steps * self.step_time.low, self.steps * self.step_time.high

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

    def quickest(self) -> TargetRun | None:
        """The batch size that reached the target first beyond the spread of the
        timings (its upper quartile below every other's lower one); None if none."""
        timed = [(run, run.seconds_range) for run in self.runs if run.seconds_range]
        if len(timed) < 2:
            return None
        best, (_, top) = min(timed, key=lambda pair: pair[0].seconds or math.inf)
        if all(top < low for run, (low, _) in timed if run is not best):
            return best
        return None

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
        from ._plots import critical_figure

        return critical_figure(self, path, advice)

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
                    "seconds_range": list(run.seconds_range or ()) or None,
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
                None if won is None else won.step_time,
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
    step_time: StepTime


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
        StepTime.of(run.history),
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
