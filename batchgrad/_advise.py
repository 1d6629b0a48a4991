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
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ._errors import ConfigError, NonFiniteError
from ._fit import History
from ._noise import NoiseScale
from ._problem import DEFAULT_LR_GRID, OnProgress, Problem, _lrs, _positive
from ._report import Table
from ._runs import SweepPoint, _at_edge, _ranked, _sweep, _train


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
