"""The critical batch size measured directly, by branching short runs from checkpoints.

``B_simple`` (`batchgrad._advise`) is a proxy: it assumes a well-conditioned
Hessian. Merrill et al. (2025, "Critical Batch Size Revisited") measure the
critical batch size itself: from one checkpoint, branch short runs at several
batch sizes, each with the same budget of samples and its own learning rate, and
see up to which batch size the loss reached stays that of the small batches. Up
to there a larger batch reaches the same loss in proportionally fewer steps;
beyond, it wastes samples. Done at a few checkpoints along training, it shows the
critical batch size growing as the loss falls, so a batch-size warmup (small
batches first, larger ones later) saves steps at no cost in samples.

`branch_critical_batch` does this: it trains the problem's model for some steps
at a small batch (the checkpoints), and from each checkpoint gives every batch
size ``samples`` samples (``samples // B`` steps) at the best lr of a grid, and
reads the loss reached (the mean of the whole-set loss over the second half of
the branch, as the sweeps do).
"""

from __future__ import annotations

import copy
import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from ._advise import _Recorded, tail_noise_scale
from ._errors import ConfigError
from ._problem import OnProgress, Problem, _lrs, _positive
from ._report import Table
from ._runs import SweepPoint, _evaluate, _sweep, _train

DEFAULT_BRANCH_SIZES = (4, 8, 16, 32, 64, 128, 256, 512)
BRANCH_LR_GRID = (0.1, 0.3, 1.0)
"""The lrs each branch tries (plain SGD on a mean loss), a factor about 3 apart."""
TOLERANCE = 0.1
"""A batch size is within the critical one while its loss is at most ``1 + TOLERANCE``
times the lowest of the checkpoint's branches."""


@dataclass(frozen=True)
class Branch:
    """One batch size branched from a checkpoint: its best lr and the loss reached.

    Attributes:
        steps: ``samples // batch_size`` steps from the checkpoint.
        loss: the loss reached at the best lr (NaN when no lr trained).
        lr: the best lr of the grid, None when none trained.
        sweep: every lr tried, with its loss and verdict.
    """

    batch_size: int
    steps: int
    loss: float
    lr: float | None
    sweep: tuple[SweepPoint, ...]


@dataclass(frozen=True)
class Checkpoint:
    """The branches from one point of training, and the critical batch size there.

    Attributes:
        step: the steps of warm-up training before the checkpoint (at
            ``warm_batch_size``).
        start_loss: the training loss at the checkpoint.
        branches: one per batch size.
        critical: the largest batch size whose loss is within `TOLERANCE` of the
            lowest (None when no branch trained).
        b_simple, b_simple_std: the gradient noise scale measured at the checkpoint.
    """

    step: int
    start_loss: float
    branches: tuple[Branch, ...]
    critical: int | None
    b_simple: float
    b_simple_std: float

    @property
    def best_loss(self) -> float:
        finite = [b.loss for b in self.branches if math.isfinite(b.loss)]
        return min(finite) if finite else math.nan


@dataclass(frozen=True)
class BranchedCritical:
    """What `branch_critical_batch` measured: one `Checkpoint` per point of training."""

    problem: str
    samples: int
    warm_batch_size: int
    warm_lr: float
    checkpoints: tuple[Checkpoint, ...]

    def table(self) -> Table:
        sizes = [b.batch_size for b in self.checkpoints[0].branches]

        def cell(checkpoint: Checkpoint, branch: Branch) -> str:
            if not math.isfinite(branch.loss):
                return "–"
            within = checkpoint.critical is not None and branch.batch_size <= checkpoint.critical
            return f"{branch.loss:.3f}" + ("*" if within else "")

        rows = [
            [str(size), *(cell(c, c.branches[i]) for c in self.checkpoints)]
            for i, size in enumerate(sizes)
        ]
        rows.append(
            ["B_crit", *("–" if c.critical is None else str(c.critical) for c in self.checkpoints)]
        )
        rows.append(
            ["B_simple", *(f"{c.b_simple:.0f} ± {c.b_simple_std:.0f}" for c in self.checkpoints)]
        )
        return Table(
            f"Training loss after {self.samples} samples from each checkpoint, per batch "
            f"size (best lr each; * within the critical batch size)",
            ["B", *(f"from step {c.step}" for c in self.checkpoints)],
            rows,
        )

    def schedule(self) -> list[tuple[int, int]]:
        """A batch-size warmup read off the checkpoints: ``(from step, batch size)``."""
        return [(c.step, c.critical) for c in self.checkpoints if c.critical is not None]

    def text(self) -> str:
        """What the branches show, in Markdown."""
        lines = []
        for c in self.checkpoints:
            crit = (
                "no branch lowered the loss" if c.critical is None else f"B_crit = **{c.critical}**"
            )
            lines.append(
                f"- From step {c.step} (training loss {c.start_loss:.3f}): {crit}; "
                f"B_simple = {c.b_simple:.0f} ± {c.b_simple_std:.0f}."
            )
        schedule = self.schedule()
        warmup = ", ".join(f"B = {b} from step {s}" for s, b in schedule)
        return (
            f"Each batch size trained {self.samples} samples from each checkpoint (a "
            f"checkpoint is the model after that many SGD steps at B = "
            f"{self.warm_batch_size}, lr {self.warm_lr:g}), at the best lr of its own; "
            f"B_crit is the largest batch size whose loss stayed within "
            f"{TOLERANCE:.0%} of the lowest: up to it a larger batch reaches the same loss "
            f"in proportionally fewer steps, beyond it the samples are partly wasted "
            f"(Merrill et al. 2025).\n\n"
            + "\n".join(lines)
            + "\n\n"
            + (f"A batch-size warmup read off these: {warmup}. " if schedule else "")
            + "B_simple (McCandlish et al. 2018) assumes a well-conditioned Hessian; where it "
            "and B_crit disagree, B_crit is the measurement, B_simple the proxy."
        )

    def markdown(self) -> str:
        return (
            f"# The critical batch size of {self.problem}, measured\n\n"
            f"{self.table().to_markdown()}\n\n{self.text()}\n\n![critical](critical.png)\n"
        )

    def figure(self, path: Path) -> Path:
        from ._plots import branch_figure

        return branch_figure(self, path)

    def to_dict(self) -> dict[str, Any]:
        return {
            "problem": self.problem,
            "samples": self.samples,
            "warm_batch_size": self.warm_batch_size,
            "warm_lr": self.warm_lr,
            "tolerance": TOLERANCE,
            "schedule": self.schedule(),
            "checkpoints": [
                {
                    "step": c.step,
                    "start_loss": c.start_loss,
                    "best_loss": c.best_loss,
                    "critical": c.critical,
                    "b_simple": c.b_simple,
                    "b_simple_std": c.b_simple_std,
                    "branches": [
                        {
                            "batch_size": b.batch_size,
                            "steps": b.steps,
                            "loss": b.loss,
                            "lr": b.lr,
                            "sweep": [{**vars(p), "verdict": p.verdict} for p in b.sweep],
                        }
                        for b in c.branches
                    ],
                }
                for c in self.checkpoints
            ],
        }


def critical_from(start: float, branches: Sequence[Branch]) -> int | None:
    """The largest batch size whose loss is at most ``1 + TOLERANCE`` times the lowest;
    None when no branch lowered the loss from ``start``.

    Example:
        >>> runs = [Branch(b, 0, loss, 0.1, ()) for b, loss in [(4, 1.0), (8, 1.08), (16, 1.5)]]
        >>> critical_from(2.0, runs)  # 8 is 8% above the lowest, 16 is 50%
        8
    """
    finite = [b for b in branches if math.isfinite(b.loss)]
    if not finite:
        return None
    best = min(b.loss for b in finite)
    if not best < start:
        return None
    return max(b.batch_size for b in finite if b.loss <= (1 + TOLERANCE) * best)


def branch_critical_batch(
    problem: Problem,
    batch_sizes: Sequence[int] = DEFAULT_BRANCH_SIZES,
    *,
    samples: int = 4096,
    checkpoints: Sequence[int] = (0, 100, 400),
    warm_batch_size: int = 16,
    warm_lr: float = 0.3,
    lr_grid: Sequence[float] = BRANCH_LR_GRID,
    noise_batch_size: int = 64,
    noise_steps: int = 40,
    seed: int = 0,
    on_progress: OnProgress | None = None,
) -> BranchedCritical:
    """Measure the critical batch size by branching runs from checkpoints of training.

    The model trains ``max(checkpoints)`` steps of SGD at ``warm_batch_size`` and
    ``warm_lr``; at each step count of ``checkpoints`` every batch size of
    ``batch_sizes`` branches off for ``samples`` samples at each lr of ``lr_grid``
    (the best that trained is kept), and the gradient noise scale is measured
    there too (``noise_steps`` steps at ``noise_batch_size``, 4 micro-batches, at a
    tiny lr so the model stays put), to hold ``B_simple`` against the measured
    critical batch size.

    Raises:
        ConfigError: bad settings.
    """
    size = problem.size
    sizes = sorted({_positive("batch size", b) for b in batch_sizes})
    if not sizes or sizes[-1] > size:
        raise ConfigError(f"batch_sizes must be positive ints up to the data set ({size}).")
    _positive("samples", samples)
    if samples < sizes[-1]:
        raise ConfigError(
            f"samples ({samples}) must be at least the largest batch size ({sizes[-1]}), "
            f"for one step."
        )
    stops = sorted({int(c) for c in checkpoints})
    if not stops or stops[0] < 0:
        raise ConfigError(f"checkpoints must be step counts ≥ 0, got {checkpoints!r}.")
    grid = _lrs(lr_grid)
    _lrs([warm_lr])
    _positive("warm_batch_size", warm_batch_size)
    total = len(stops) * (len(sizes) * len(grid) + 1)
    done = 0

    def report(what: str) -> None:
        nonlocal done
        if on_progress is not None:
            on_progress(what, min(done, total - 1), total)
        done += 1

    model = problem.initial_model()
    warm = _Warm(problem, model, warm_batch_size, warm_lr, seed)
    measured = []
    for stop in stops:
        checkpoint = warm.to(stop)
        start_loss = _evaluate(checkpoint, problem, None, held_out=False)
        branches = []
        for batch_size in sizes:
            steps = samples // batch_size
            sweep = _sweep(
                problem,
                checkpoint,
                batch_size,
                grid,
                steps,
                momentum=0.0,
                seed=seed + 1 + stop,
                select="train",
                report=functools.partial(_prefixed, report, f"from step {stop}: "),
            )
            trained = [p for p in sweep if p.trained]
            best = min(trained, key=lambda p: p.loss) if trained else None
            branches.append(
                Branch(
                    batch_size,
                    steps,
                    math.nan if best is None else best.loss,
                    None if best is None else best.lr,
                    tuple(sweep),
                )
            )
        report(f"from step {stop}: noise scale")
        b_simple, b_std = _noise_at(problem, checkpoint, noise_batch_size, noise_steps, seed)
        measured.append(
            Checkpoint(
                stop,
                start_loss.train_loss,
                tuple(branches),
                critical_from(start_loss.train_loss, branches),
                b_simple,
                b_std,
            )
        )
    return BranchedCritical(problem.name, samples, warm_batch_size, warm_lr, tuple(measured))


def _prefixed(report: Callable[[str], None], prefix: str, what: str) -> None:
    report(prefix + what)


class _Warm:
    """The warm-up run, continued from checkpoint to checkpoint."""

    def __init__(self, problem: Problem, model: nn.Module, batch: int, lr: float, seed: int):
        self.problem, self.model, self.batch, self.lr, self.seed = problem, model, batch, lr, seed
        self.step = 0
        self.run: Any = None

    def to(self, step: int) -> nn.Module:
        if step > self.step:
            import torch

            from ._fit import fit

            if self.run is None:
                self.optimizer = torch.optim.SGD(self.model.parameters(), lr=self.lr)
            self.run = fit(
                self.model,
                self.problem.loss_fn,
                self.problem.data,
                self.optimizer,
                batch_size=self.batch,
                steps=step - self.step,
                seed=self.seed,
                history=self.run,
                drop_last=True,
                progress=False,
            )
            self.step = step
        return copy.deepcopy(self.model)


def _noise_at(
    problem: Problem, model: nn.Module, batch_size: int, steps: int, seed: int
) -> tuple[float, float]:
    """B_simple and its error at ``model``, from steps at an lr too small to move it."""
    batch_size = min(batch_size, problem.size)
    scale = _Recorded(0.95)
    _train(
        problem,
        model,
        batch_size,
        1e-8,
        [steps],
        momentum=0.0,
        seed=seed,
        held_out=False,
        noise=scale,
        micro_batch_size=-(-batch_size // 4),
    )
    b_simple, b_std, _, _ = tail_noise_scale(scale.estimates)
    return b_simple, b_std
