"""Chapter: what the batch does in training, and which batch size to use.

On the embedded digits (1438 training images, an MLP 64-64-10, cross-entropy, plain
SGD), the chapter

1. trains the same initial model with stochastic (B = 1), mini-batch (B = 32) and
   full-batch descent, each at the lr that does best in a short sweep, and plots
   the training loss against epochs, steps, samples seen and wall time
   (`batchgrad._compare.compare`);
2. measures the steps each batch size from 4 to 1024 takes to reach a training
   loss of 0.1, each at its own lr (a factor-2 local search), and fits
   ``S(B) = S_min (1 + B_noise / B)`` (`batchgrad._critical_batch.steps_to_target`);
3. measures the gradient noise scale ``B_simple`` on the B = 64 run of step 2 as it
   reaches the target (`batchgrad._advise.advise`, 4 micro-batches per step), and
   holds it against the fitted ``B_noise``;
4. measures the critical batch size directly, by branching runs of equal samples at
   several batch sizes from checkpoints of training (`batchgrad._branch`).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

from .._advise import Advice, advise
from .._branch import branch_critical_batch
from .._compare import Comparison, compare
from .._critical_batch import CriticalBatch, steps_to_target
from .._fit import BatchSize
from .._problem import OnProgress, digits_problem
from .._report import Table
from . import Answer, Chapter, Context, one_thread

REGIMES: tuple[BatchSize, ...] = (1, 32, "full")
EPOCHS = 5
LR_GRID = (0.03, 0.1, 0.3, 1.0, 3.0)
SWEEP_EPOCHS = 0.25  # of B = 1: 360 steps per lr
CRITICAL_SIZES = tuple(2**k for k in range(2, 11))  # 4 ... 1024
TARGET = 0.1
MEASURED_AT = 64  # the batch size B_simple is measured at
MICRO_BATCHES = 4
BRANCH_SIZES = (4, 16, 64, 256)  # the critical batch size measured by branching
BRANCH_SAMPLES = 2048
BRANCH_CHECKPOINTS = (0, 300)
BRANCH_LRS = (0.1, 0.3, 1.0)


@contextmanager
def _progress(context: Context, description: str) -> Iterator[OnProgress]:
    """``on_progress`` on a task of the tour's progress display, removed afterwards."""
    task = context.progress.add_task(description, total=None)

    def update(what: str, done: int, total: int) -> None:
        context.progress.update(task, description=what, completed=done, total=total)

    try:
        yield update
    finally:
        context.progress.remove_task(task)


def run(context: Context) -> Answer:
    with one_thread():
        problem = digits_problem()
        with _progress(context, "regimes") as on_progress:
            comparison = compare(
                problem,
                REGIMES,
                epochs=EPOCHS,
                lr_grid=LR_GRID,
                sweep_epochs=SWEEP_EPOCHS,
                on_progress=on_progress,
            )
        with _progress(context, "steps to target") as on_progress:
            critical = steps_to_target(problem, CRITICAL_SIZES, TARGET, on_progress=on_progress)
        anchor = next(r for r in critical.runs if r.batch_size == MEASURED_AT)
        if anchor.steps is None or anchor.lr is None:
            raise RuntimeError(f"B={MEASURED_AT} did not reach the target loss {TARGET}")
        with _progress(context, "noise scale") as on_progress:
            # The B = 64 run of the search again (same weights, orders and lr), measured.
            advice = advise(
                problem,
                MEASURED_AT,
                MICRO_BATCHES,
                steps=math.ceil(anchor.steps),
                lr=anchor.lr,
                on_progress=on_progress,
            )
        with _progress(context, "branched runs") as on_progress:
            branched = branch_critical_batch(
                problem,
                BRANCH_SIZES,
                samples=BRANCH_SAMPLES,
                checkpoints=BRANCH_CHECKPOINTS,
                lr_grid=BRANCH_LRS,
                on_progress=on_progress,
            )
    figures = [
        comparison.figure(context.out_dir / "batch_size_regimes.png"),
        critical.figure(context.out_dir / "batch_size_critical.png", advice),
        branched.figure(context.out_dir / "batch_size_branched.png"),
    ]
    return Answer(
        _summary(comparison, critical, advice) + "\n\n**Measured directly.** " + branched.text(),
        [
            comparison.table(),
            comparison.reach_table(),
            critical.table(),
            _noise_table(advice),
            branched.table(),
        ],
        figures,
        {
            "regimes": comparison.to_dict(),
            "critical": critical.to_dict(),
            "advice": advice.to_dict(),
            "branched": branched.to_dict(),
        },
    )


def _noise_table(advice: Advice) -> Table:
    window = round(1 / (1 - advice.beta))
    return Table(
        f"Gradient noise scale on the B = {advice.measured_batch_size} run as it reaches the "
        f"target ({advice.micro_batches} micro-batches per step, {advice.steps} steps, "
        f"lr {advice.lr:g})",
        ["measure", "value"],
        [
            [f"B_simple = tr Σ / ‖G‖², last ~{window} steps", f"{advice.b_simple:.1f}"],
            ["± standard error", f"{advice.b_simple_std:.1f}"],
            [f"B_simple, first ~{window} steps", f"{advice.b_simple_early:.1f}"],
            ["‖G‖² (estimate)", f"{advice.grad_sq:.3g}"],
            ["tr Σ (estimate)", f"{advice.trace_cov:.3g}"],
            ["training loss at the end", f"{advice.train_loss:.4f}"],
            [
                "recommended batch size",
                str(advice.batch_size) if advice.conclusive else "inconclusive",
            ],
        ],
    )


def _summary(comparison: Comparison, critical: CriticalBatch, advice: Advice) -> str:
    runs = {run.regime: run for run in comparison.runs}
    sgd, mini, full = runs["stochastic"], runs["mini-batch"], runs["full-batch"]
    reached = comparison.reach()

    def fewest(key: str) -> str:
        best = min(comparison.runs, key=lambda r: float(getattr(reached[r.label], key)))
        return f"B = {best.batch_size}"

    def to_common(key: str) -> str:
        return ", ".join(
            f"{run.regime} {getattr(reached[run.label], key):d}" for run in comparison.runs
        )

    seconds = comparison.seconds_to_common()
    in_seconds = ", ".join(
        "{} {:.3f} s ({:.3f}–{:.3f})".format(run.regime, *seconds[run.label])
        for run in comparison.runs
    )
    fastest = comparison.fastest()
    first_in_seconds = (
        f"fastest beyond the timings' spread: B = {fastest.batch_size}"
        if fastest
        else "no regime clearly first: the quartiles overlap"
    )

    done = [r for r in critical.runs if r.steps is not None and r.lr is not None]
    first, last = done[0], done[-1]
    steps_ratio = (first.steps or 0) / (last.steps or 1)
    samples_ratio = (last.samples or 0) / (first.samples or 1)
    best_lrs = _lr_runs([(r.batch_size, r.lr or math.nan) for r in done])
    ratio = advice.b_simple / critical.b_noise
    quickest = critical.quickest()
    if quickest is None:
        timing = (
            "In seconds (this machine, one thread) no batch size got there clearly first: "
            "the times, steps × the quartiles of the seconds per step, overlap"
        )
    else:
        low, high = quickest.seconds_range or (math.nan, math.nan)
        timing = (
            f"In seconds (this machine, one thread) B = {quickest.batch_size} got there "
            f"first, in {low:.2f}–{high:.2f} s (steps × the quartiles of its seconds per "
            f"step), beyond the spread of every other batch size"
        )
    window = round(1 / (1 - advice.beta))
    advice_size = (
        f"B = {advice.batch_size}"
        if advice.conclusive
        else f"inconclusive (the error is large; about {advice.steps_needed} steps would do)"
    )
    sgd_low, sgd_high = sgd.last_epoch_range
    return f"""\
**Answer.** Each step follows the mean gradient of its batch, an unbiased estimate of
the full-batch gradient whose noise shrinks as `tr Σ / B`. The batch size sets how
noisy and how costly a step is, and so which clock training runs fast on.

- An **epoch** is a pass over the n = {comparison.dataset_size} training samples; a
  **step** (iteration) is one update; **samples seen** is steps × B, that is epochs ×
  n in every regime but for the short last batch of each epoch, which is skipped
  (the loss read right after a step on a few samples is lifted by it). In
  {comparison.epochs} epochs stochastic descent (B = 1, lr
  {sgd.lr:g}) made {sgd.final.step} steps and reached a training loss of
  {sgd.final_loss:.3f} (its weights averaged over the last half epoch: at a constant
  lr the iterates bounce around that point, between {sgd_low:.3f} and {sgd_high:.3f}
  in the last epoch); mini-batch (B = {mini.batch_size}, lr {mini.lr:g})
  {mini.final.step} steps and {mini.final_loss:.3f}; full-batch (lr {full.lr:g})
  {full.final.step} steps and {full.final_loss:.3f}. To reach
  {comparison.common_loss:.3f}, the loss every run's iterates reached, took in samples
  {to_common("samples_seen")} (fewest: {fewest("samples_seen")}); in steps
  {to_common("step")} (fewest: {fewest("step")}); in seconds
  {in_seconds} (steps × seconds per step, median and quartiles; {first_in_seconds}).
- **What a bigger batch buys: fewer steps, down to a floor.** To reach a training loss
  of {critical.target:g}, B = {first.batch_size} took {first.steps:.0f} steps and B =
  {last.batch_size} {last.steps:.0f}: {steps_ratio:.1f}× fewer steps for
  {last.batch_size // first.batch_size}× the batch, paid with {samples_ratio:.0f}× the
  samples. {timing}. The fit
  `S = S_min (1 + B_noise / B)` gives S_min = {critical.s_min:.0f}
  steps and B_noise = **{critical.b_noise:.0f}**: below B_noise doubling the batch
  nearly halves the steps; above it, it nearly doubles the samples and saves few
  steps. Each batch size trained at its own fastest lr ({best_lrs}); for SGD the rule
  `ε(B) = ε_max / (1 + B_noise / B)` has it grow about linearly below B_noise and level
  off above, where the largest lr that does not diverge caps it anyway.
- **Which size.** The gradient noise scale, measured from the
  {advice.micro_batches} micro-batch gradients of each step of the B =
  {advice.measured_batch_size} run as it reaches the target, is B_simple =
  **{advice.b_simple:.0f} ± {advice.b_simple_std:.0f}**, {ratio:.1f}× the B_noise fitted
  from the steps, without training at any other batch size; the advice (`batchgrad
  advise`) is {advice_size}. B_simple moves during training: it was
  {advice.b_simple_early:.0f} over the first {window} steps and {advice.b_simple:.0f} by the
  target, so the batch worth using changes as the loss falls.

Limits: one seed, one target loss, lrs a factor 2 apart, plain SGD at a constant lr
(its loss keeps fluctuating, so "steps to the target" is when the loss first dips
below it). B_simple treats the Hessian as a multiple of the identity; McCandlish et al.
(2018) found it within a small factor of the critical batch size."""


def _lr_runs(pairs: list[tuple[int, float]]) -> str:
    """``B = 4: 0.25, 8: 0.5, 16–1024: 1``: batch sizes sharing an lr, as ranges."""
    groups: list[list[tuple[int, float]]] = []
    for size, lr in pairs:
        if groups and groups[-1][-1][1] == lr:
            groups[-1].append((size, lr))
        else:
            groups.append([(size, lr)])
    parts = [f"{g[0][0]}{f'–{g[-1][0]}' if len(g) > 1 else ''}: {g[0][1]:g}" for g in groups]
    return "B = " + ", ".join(parts)


CHAPTER = Chapter(
    slug="batch-size",
    title="The batch in training: regimes and the critical batch size",
    question="What does the batch do, and which size should I use?",
    run=run,
    setup=(
        "scikit-learn's digits, embedded (1438 training and 359 held-out 8×8 images, 10 "
        "classes), and a ReLU MLP 64-64-10 with cross-entropy, trained with plain SGD."
    ),
)
