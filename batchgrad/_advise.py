"""`advise`: a batch size read off the gradient noise scale, and SGD's lr there.

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
``B0`` to ``B`` multiplies it by `lr_scale`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigError, NonFiniteError
from ._fit import History
from ._noise import NoiseEstimate, NoiseScale
from ._problem import DEFAULT_LR_GRID, OnProgress, Problem, _lrs, _positive
from ._report import Table
from ._runs import SweepPoint, _at_edge, _mark_stalled, _ranked, _sweep, _train


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


MAX_REL_STD = 0.5
"""`advise` recommends a batch size only when B_simple's standard error is at most this
share of it (± one error then spans less than a factor 3); else it is inconclusive."""
MIN_TAIL = 10
"""The fewest steps B_simple is averaged over before its standard error is trusted."""
MARGIN = 1.5
"""``steps_needed`` is this much above the ``1 / √steps`` extrapolation: the error
measured on a short run is itself uncertain."""


class _Recorded(NoiseScale):
    """A `NoiseScale` that also keeps every step's estimates (for the tail's spread),
    measuring every micro-batch but the last: a measurement, where the variance of
    each step's estimate matters more than its cost."""

    def __init__(self, beta: float) -> None:
        super().__init__(beta, small_batches=None)
        self.estimates: list[NoiseEstimate] = []

    def update(self, step: NoiseEstimate) -> None:
        super().update(step)
        self.estimates.append(step)


def tail_noise_scale(estimates: Sequence[NoiseEstimate]) -> tuple[float, float, float, float]:
    """``(b_simple, its standard error, grad_sq, trace_cov)`` from per-step estimates.

    ``b_simple`` is the ratio of the means of ``tr Σ`` and ``‖G‖²`` over the steps;
    the error comes from their step-to-step spread and covariance (delta method),
    so it shrinks as ``1 / √steps``. NaN/inf when the mean ``‖G‖²`` is not positive.

    Example:
        >>> steps = [NoiseEstimate(g, t, t / g, 0.0, 8, 32) for g, t in [(1, 30), (2, 50)]]
        >>> b, std, g, t = tail_noise_scale(steps)
        >>> round(b, 3), g, t
        (26.667, 1.5, 40.0)
    """
    n = len(estimates)
    if n == 0:
        return math.nan, math.inf, math.nan, math.nan
    gs = [e.grad_sq for e in estimates]
    ts = [e.trace_cov for e in estimates]
    g, t = math.fsum(gs) / n, math.fsum(ts) / n
    if not (g > 0 and math.isfinite(t)):
        return (math.inf if g == 0 and t > 0 else math.nan), math.inf, g, t
    b = t / g
    if n < 2 or t == 0:
        return b, math.inf, g, t
    var_g = math.fsum((x - g) ** 2 for x in gs) / (n - 1)
    var_t = math.fsum((x - t) ** 2 for x in ts) / (n - 1)
    cov = math.fsum((x - g) * (y - t) for x, y in zip(gs, ts, strict=True)) / (n - 1)
    rel_var = (var_t / t**2 + var_g / g**2 - 2 * cov / (g * t)) / n
    return b, abs(b) * math.sqrt(max(rel_var, 0.0)), g, t


@dataclass(frozen=True)
class Advice:
    """`advise`'s measurement of the noise scale, its batch size and its reasons.

    Attributes:
        batch_size: the recommended batch size; None when the measurement is
            inconclusive (``b_simple_std`` above `MAX_REL_STD` of ``b_simple``: see
            ``steps_needed``) or ``b_simple`` could not be measured (its ``‖G‖²``
            estimate is not positive).
        nearest_batch_size: the power of two nearest ``b_simple`` (at most ``n``),
            whether or not the measurement is conclusive.
        b_simple: ``tr Σ / ‖G‖²``, the ratio of their means over the second half
            of the run (``tail_steps`` steps).
        b_simple_std: its standard error, from the step-to-step spread.
        b_simple_early: the moving average after the first ``1 / (1 - beta)`` steps
            (the noise scale changes as training goes on).
        b_simple_last: the moving average at the end of the run.
        grad_sq, trace_cov: the means behind ``b_simple``.
        tail_steps: the steps ``b_simple`` is averaged over.
        steps_needed: about how many steps would bring the standard error to
            `MAX_REL_STD` of ``b_simple`` (``steps`` when already there).
        measured_batch_size, micro_batch_size, micro_batches: how it was measured.
        beta: the `NoiseScale` averaging factor of the trajectory.
        steps, lr, momentum: the measuring run (plain SGD).
        lr_tuned: whether ``lr`` is the best of a sweep (or was given).
        train_loss: the loss over the whole training set after the run.
        dataset_size: ``n``.
        sweep: the sweep that picked ``lr`` at the measured batch size (empty when given).
        scaled_lr: ``lr`` times `lr_scale` to ``batch_size`` (None without one).
        verification: the runs at ``batch_size`` that checked the scaled lr and
            smaller ones, ``steps`` steps each (empty without a batch size).
        recommended_lr: the best lr of ``verification`` that trained, so at most
            ``scaled_lr`` and at most the largest lr that trained at ``batch_size``;
            None when none did (or without a batch size).
        history: the measuring run's `fit` history (``b_simple`` at every step).
    """

    batch_size: int | None
    nearest_batch_size: int | None
    b_simple: float
    b_simple_std: float
    b_simple_early: float
    b_simple_last: float
    grad_sq: float
    trace_cov: float
    tail_steps: int
    steps_needed: int
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
    scaled_lr: float | None
    verification: tuple[SweepPoint, ...]
    recommended_lr: float | None
    history: History = field(repr=False)

    @property
    def conclusive(self) -> bool:
        """The standard error is small enough to recommend a batch size."""
        return self.batch_size is not None

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

    def tradeoff(self) -> list[dict[str, float]]:
        """Steps and samples (× the fewest) and SGD's lr, for powers of two around B.

        The lr is the rule's (`lr_scale` from the measured batch), capped from the
        recommended batch size on by the recommended lr: the largest lr SGD
        tolerates is set by the curvature, which a bigger batch does not change.
        """
        if self.batch_size is None:
            return []
        b = self.b_simple
        cap = self.recommended_lr if self.recommended_lr is not None else math.inf
        around = (round(self.batch_size * 2.0**k) for k in range(-3, 4))
        sizes = sorted({min(max(1, size), self.dataset_size) for size in around})
        rows = []
        for size in sizes:
            lr = self.lr * lr_scale(b, self.measured_batch_size, size)
            rows.append(
                {
                    "batch_size": size,
                    "steps_over_min": 1 + b / size,
                    "samples_over_min": 1 + size / b,
                    "lr": min(lr, cap) if size >= self.batch_size else lr,
                }
            )
        return rows

    def trajectory(self) -> list[tuple[int, float, float]]:
        """``(step, batch loss, b_simple moving average)`` along the measuring run."""
        return [
            (r.step, r.loss, r.b_simple)
            for r in self.history.steps
            if r.b_simple is not None and math.isfinite(r.b_simple)
        ]

    def table(self) -> Table:
        return Table(
            f"What each batch size costs, B_noise ≈ B_simple = {self.b_simple:.0f}",
            ["B", "steps/S_min", "samples/E_min", "SGD lr"],
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

    def sweep_table(self) -> Table | None:
        """The lrs tried at the measured batch size, None when the lr was given."""
        if not self.sweep:
            return None
        return _sweep_table(
            f"lr sweep at B = {self.measured_batch_size}, {self.steps} steps each",
            self.sweep,
            self.lr,
        )

    def verification_table(self) -> Table | None:
        """The runs at the recommended batch size that checked its lr."""
        if not self.verification or self.batch_size is None:
            return None
        return _sweep_table(
            f"lr check at B = {self.batch_size}, {self.steps} steps each",
            self.verification,
            self.recommended_lr,
        )

    @property
    def text(self) -> str:
        """The recommendation and its reasons, in Markdown."""
        return _advice_text(self)

    def to_dict(self) -> dict[str, Any]:
        return {
            "batch_size": self.batch_size,
            "conclusive": self.conclusive,
            "nearest_batch_size": self.nearest_batch_size,
            "batch_range": self.batch_range,
            "b_simple": self.b_simple,
            "b_simple_std": self.b_simple_std,
            "b_range": self.b_range,
            "b_simple_early": self.b_simple_early,
            "b_simple_last": self.b_simple_last,
            "grad_sq": self.grad_sq,
            "trace_cov": self.trace_cov,
            "tail_steps": self.tail_steps,
            "steps_needed": self.steps_needed,
            "measured_batch_size": self.measured_batch_size,
            "micro_batch_size": self.micro_batch_size,
            "micro_batches": self.micro_batches,
            "steps": self.steps,
            "lr": self.lr,
            "lr_tuned": self.lr_tuned,
            "momentum": self.momentum,
            "scaled_lr": self.scaled_lr,
            "recommended_lr": self.recommended_lr,
            "train_loss": self.train_loss,
            "dataset_size": self.dataset_size,
            "sweep": [_point_dict(p) for p in self.sweep],
            "verification": [_point_dict(p) for p in self.verification],
            "tradeoff": self.tradeoff(),
            "trajectory": [
                {"step": s, "loss": loss, "b_simple": b} for s, loss, b in self.trajectory()
            ],
            "text": self.text,
        }


def _point_dict(point: SweepPoint) -> dict[str, Any]:
    return {**vars(point), "verdict": point.verdict}


def _sweep_table(title: str, points: Sequence[SweepPoint], chosen: float | None) -> Table:
    return Table(
        title,
        ["lr", "loss", "from", "verdict"],
        [
            [
                f"{p.lr:.3g}" + (" ←" if p.lr == chosen else ""),
                "nan" if p.diverged else f"{p.loss:.4g}",
                f"{p.initial:.4g}",
                p.verdict,
            ]
            for p in points
        ],
    )


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
    ``micro_batches`` micro-batches, measure ``B_simple`` from every step's noise
    estimates, averaged over the second half of the run. Without ``lr``, each lr
    of ``lr_grid`` first trains ``steps`` steps and the one with the lowest
    training loss among those that trained is used (an lr trains when the loss
    falls meaningfully: see `batchgrad._runs.SweepPoint`).

    The advice is the power of two nearest ``B_simple``, unless its standard error
    exceeds `MAX_REL_STD` of it: then none, and ``steps_needed`` says how many
    steps would do. With a batch size, its lr is checked before it is given: the
    lr the rule scales to it (`lr_scale`), then smaller ones of the grid while the
    loss improves, each for ``steps`` steps at that batch size; the best that
    trained is ``recommended_lr``. See `Advice.text` for the reasons.

    Raises:
        ConfigError: bad settings, or no lr of the sweep trained.
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
    grid = _lrs(lr_grid)
    micro = -(-batch_size // micro_batches)
    initial = problem.initial_model()
    sweep: list[SweepPoint] = []
    runs = 1 + (0 if lr is not None else len(grid)) + 2
    done = 0

    def report(what: str) -> None:
        nonlocal done, runs
        runs = max(runs, done + 1)
        if on_progress is not None:
            on_progress(what, done, runs)
        done += 1

    if lr is None:
        sweep = _sweep(
            problem,
            initial,
            batch_size,
            grid,
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
    scale = _Recorded(beta)
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
    tail = scale.estimates[len(scale.estimates) // 2 :]
    b_simple, b_std, grad_sq, trace_cov = tail_noise_scale(tail)
    nearest = recommend_batch_size(b_simple, size)
    relative = b_std / b_simple if nearest is not None else math.inf
    if len(tail) < MIN_TAIL:
        relative = max(relative, math.nextafter(MAX_REL_STD, math.inf))
    conclusive = relative <= MAX_REL_STD
    needed = steps
    if not conclusive and math.isfinite(relative):
        needed = math.ceil(MARGIN * steps * (relative / MAX_REL_STD) ** 2)
        needed = max(needed, 2 * MIN_TAIL, steps + 1)
    recommended = nearest if conclusive else None
    scaled = verified = None
    verification: list[SweepPoint] = []
    if recommended is not None:
        scaled = chosen * lr_scale(b_simple, batch_size, recommended)
        verification = _verify(
            problem,
            initial,
            recommended,
            scaled,
            grid,
            steps,
            momentum=momentum,
            seed=seed,
            report=report,
        )
        trained = [p for p in verification if p.trained]
        verified = min(trained, key=lambda p: p.loss).lr if trained else None
    if on_progress is not None:
        on_progress("done", done, done)
    return Advice(
        batch_size=recommended,
        nearest_batch_size=nearest,
        b_simple=b_simple,
        b_simple_std=b_std,
        b_simple_early=early,
        b_simple_last=scale.b_simple,
        grad_sq=grad_sq,
        trace_cov=trace_cov,
        tail_steps=len(tail),
        steps_needed=needed if math.isfinite(relative) else 0,
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
        scaled_lr=scaled,
        verification=tuple(verification),
        recommended_lr=verified,
        history=run.history,
    )


def _verify(
    problem: Problem,
    initial: Any,
    batch_size: int,
    scaled: float,
    grid: Sequence[float],
    steps: int,
    *,
    momentum: float,
    seed: int,
    report: Callable[[str], None],
) -> list[SweepPoint]:
    """Runs at ``batch_size`` from the scaled lr down the grid while the loss improves.

    The candidates are ``scaled`` and the grid's lrs below it (or ``scaled`` halved,
    when the grid has none below), largest first; the search stops at the first
    one whose loss is worse than the best so far, once one has lowered the loss.
    """
    below = sorted((lr for lr in grid if lr < scaled / 1.01), reverse=True)
    candidates = [scaled, *(below or [scaled / 2**k for k in range(1, 6)])]
    points: list[SweepPoint] = []
    start = math.nan
    for lr in candidates:
        point = _sweep(
            problem,
            initial,
            batch_size,
            [lr],
            steps,
            momentum=momentum,
            seed=seed,
            select="train",
            report=report,
        )[0]
        start = point.initial
        finite = [p.loss for p in points if not p.diverged and p.loss < start]
        if finite and (point.diverged or point.loss > min(finite)):
            points.append(point)
            break
        points.append(point)
    return _mark_stalled(points, start)


def _advice_text(advice: Advice) -> str:
    b, std, b0 = advice.b_simple, advice.b_simple_std, advice.measured_batch_size
    window = round(1 / (1 - advice.beta))
    how = (
        f"Measured over {advice.steps} SGD steps at batch size {b0} ({advice.micro_batches} "
        f"micro-batches of ≤ {advice.micro_batch_size}), lr {advice.lr:g} "
        f"({'the best of a sweep' if advice.lr_tuned else 'as given'}); the training loss "
        f"is now {advice.train_loss:.4g}."
    )
    if advice.nearest_batch_size is None:
        return (
            f"{how}\n\nNo recommendation: the estimate of ‖G‖² (the squared true gradient) "
            f"averaged {advice.grad_sq:.3g}, not above 0, so the gradient is lost in the "
            f"noise of batches of {b0}. Measure with a larger batch size or more steps."
        )
    noise = (
        f"**Noise scale.** B_simple = tr Σ / ‖G‖² = **{b:.0f} ± {std:.0f}** samples (the "
        f"means of the two estimates over the last {advice.tail_steps} steps; ± one "
        f"standard error)."
    )
    if advice.batch_size is None:
        return "\n\n".join(
            [
                how,
                noise,
                f"**Inconclusive: run more steps.** The standard error is "
                f"{std / b:.0%} of the estimate (over {advice.tail_steps} steps; at least "
                f"{MIN_TAIL} are needed), more than the {MAX_REL_STD:.0%} that "
                f"pins a power of two; the nearest one, {advice.nearest_batch_size}, is not "
                f"a recommendation. About **{advice.steps_needed} steps** (`--steps "
                f"{advice.steps_needed}`) would bring the error to {MAX_REL_STD:.0%}, "
                f"or measure at a larger batch size.",
            ]
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
    edge = ""
    if _at_edge(advice.lr, advice.sweep):
        edge = " The sweep's best lr is at the edge of its grid: a wider grid may do better."
    failed = [p for p in advice.verification if not p.trained]
    if advice.recommended_lr is None:
        lr_line = (
            f"None of the lrs checked at B = {rec} trained in {advice.steps} steps "
            f"({', '.join(f'{p.lr:.3g}: {p.verdict}' for p in advice.verification)}): "
            f"sweep the lr at B = {rec} yourself (`--batch-size {rec}`)."
        )
    else:
        checked = advice.verification_table()
        rows = len(checked.rows) if checked else 0
        why_lower = ""
        if advice.scaled_lr is not None and advice.recommended_lr < advice.scaled_lr:
            why_lower = (
                f" The rule's lr {advice.scaled_lr:.3g} "
                f"{'did not train' if failed else 'trained less well'} at B = {rec}, so "
                f"the lr is the best of the smaller ones that did."
            )
        lr_line = (
            f"Checked by {rows} run(s) of {advice.steps} steps at B = {rec}: lr "
            f"**{advice.recommended_lr:.3g}** took the training loss from "
            f"{advice.verification[0].initial:.4g} to "
            f"{min(p.loss for p in advice.verification if p.trained):.4g}.{why_lower}"
        )
    paragraphs = [
        how,
        noise + f" So B between {lo:.0f} and {hi:.0f}.",
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
        f"(1 + B_noise/{rec}) = {scale:.2f}, lr {advice.lr:g} → {advice.lr * scale:.3g}. "
        f"That is about linear scaling (× B/{b0}) while B ≪ B_noise, and nothing gained "
        f"beyond; ε_max itself is bounded by the curvature (SGD stalls or diverges above "
        f"about 2 / the largest Hessian eigenvalue). {lr_line}{edge} {adaptive}",
        "**Caveats.** B_simple takes the Hessian as a multiple of the identity; it "
        "approximates the critical batch size B_crit, within a small factor in McCandlish "
        "et al.'s experiments. As a rule it grows as the loss falls (here, as a moving "
        f"average: {advice.b_simple_early:.0f} over the first {window} steps, "
        f"{advice.b_simple_last:.0f} over the last {window}): measure again later in "
        "training, where a larger batch may pay off.",
    ]
    return "\n\n".join(paragraphs)
