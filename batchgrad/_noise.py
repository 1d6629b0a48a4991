"""The gradient noise scale (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A).

A per-sample gradient ``g_i`` has mean ``G`` and covariance ``Σ``. The mean gradient
of ``b`` samples drawn independently satisfies ``E‖ĝ_b‖² = ‖G‖² + tr Σ / b``, so two
batch sizes give unbiased estimates of both terms:

    ‖G‖² ≈ (B ‖ĝ_B‖² − b ‖ĝ_b‖²) / (B − b)
    tr Σ ≈ (‖ĝ_b‖² − ‖ĝ_B‖²) / (1/b − 1/B)

`accumulate(..., noise=...)` takes ``ĝ_b`` from its first micro-batch (or more of
them, `NoiseScale.small_batches`; never the last, whose norm would cost a pass more)
and ``ĝ_B`` from the logical batch; under
`torch.distributed` the small batches are the ranks' shares. With small batches
of different sizes ``n_k`` the mean of their ``‖ĝ‖²`` has expectation
``‖G‖² + tr Σ / b``, ``b`` the harmonic mean of the ``n_k``.

``B_simple = tr Σ / ‖G‖²`` counts samples: around it, doubling the batch stops
halving the number of steps to a given loss. The ratio of two noisy
estimates is biased, so `NoiseScale` averages numerator and denominator separately
(debiased exponential moving averages) before dividing.

A sample is a row of dimension 0 of the batch, and its gradient is that of its own
``Loss.total`` (its summed units), as in `batchgrad.per_sample_grads`; the
normalisation the loss uses does not change the estimate.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ._errors import ConfigError


@dataclass(frozen=True)
class NoiseEstimate:
    """One step's unbiased estimates, or a `NoiseScale`'s averages of them.

    Attributes:
        grad_sq: of ``‖G‖²``, the squared norm of the true (expected) gradient.
        trace_cov: of ``tr Σ``, the trace of the per-sample gradient covariance.
        b_simple: ``trace_cov / grad_sq``, in samples (``inf`` when ``grad_sq <= 0``:
            the gradient is lost in the noise).
        b_simple_std: the standard error of ``b_simple`` (delta method; for one step,
            from the spread of the small batches' ``‖ĝ‖²`` around ``‖G‖² + tr Σ / n``,
            ``inf`` with one small batch; a `NoiseScale`'s, from the spread across
            steps).
        small_batch: the small batch size ``b`` (harmonic mean of the small batches).
        big_batch: the big batch size ``B`` (the logical batch, in samples).
    """

    grad_sq: float
    trace_cov: float
    b_simple: float
    b_simple_std: float
    small_batch: float
    big_batch: float


def _ratio(trace_cov: float, grad_sq: float) -> float:
    return trace_cov / grad_sq if grad_sq > 0 else math.inf


def estimate(
    small_sq_norms: Sequence[float],
    small_sizes: Sequence[int],
    big_sq_norm: float,
    big_size: int,
) -> NoiseEstimate:
    """Unbiased estimates from small batches' ``‖ĝ_k‖²`` and the big batch's ``‖ĝ_B‖²``.

    Args:
        small_sq_norms: the squared norm of each small batch's *mean* per-sample
            gradient (``‖Σ_{i∈k} g_i / n_k‖²``); the micro-batches, or some of them.
        small_sizes: the samples ``n_k`` of each small batch.
        big_sq_norm: the squared norm of the big (logical) batch's mean gradient.
        big_size: the samples of the big batch (more than the small ones).
    """
    count = len(small_sizes)
    if count < 1 or len(small_sq_norms) != count:
        raise ConfigError("The noise scale needs a small batch and a big one.")
    big = float(big_size)
    small = count / sum(1.0 / n for n in small_sizes)  # E mean‖ĝ_k‖² = ‖G‖² + trΣ/small
    if not small < big:
        raise ConfigError(f"The big batch ({big_size}) must hold more samples than {small}.")
    mean_small = math.fsum(small_sq_norms) / count
    trace_cov = (mean_small - big_sq_norm) / (1.0 / small - 1.0 / big)
    grad_sq = (big * big_sq_norm - small * mean_small) / (big - small)
    b_simple = _ratio(trace_cov, grad_sq)
    b_std = math.inf
    if count > 1 and grad_sq > 0:
        # around the fit: small batches of different sizes differ by tr Σ / n too
        centre = mean_small - trace_cov / small
        residuals = [
            x - trace_cov / n - centre for x, n in zip(small_sq_norms, small_sizes, strict=True)
        ]
        spread = math.sqrt(math.fsum(r**2 for r in residuals) / (count - 1))
        # b_simple moves with mean_small through both estimates (in opposite directions)
        slope = (1.0 / (1.0 / small - 1.0 / big)) / grad_sq + trace_cov * small / (
            (big - small) * grad_sq**2
        )
        b_std = abs(slope) * spread / math.sqrt(count)
    return NoiseEstimate(grad_sq, trace_cov, b_simple, b_std, small, big)


class NoiseScale:
    """Debiased moving averages of the noise-scale estimates over training steps.

    Pass one to ``bg.accumulate(..., noise=scale)`` at every step; it is updated
    with the step's estimates and the report's ``noise`` holds its averages. The
    numerator and denominator are averaged separately, and ``b_simple`` is the
    ratio of the averages (the ratio of single-step estimates is biased and heavy
    tailed).

    Args:
        beta: the averaging factor per step (0.95: about the last 20 steps weigh).
        small_batches: how many micro-batches of each step, from the first, are
            measured as small batches. 1 (the default) costs one gradient norm per
            step; ``None`` measures every one but the last, for less variance per step
            at the cost of a norm and of the earlier sum held apart for each (5-9%
            of an MLP's step with 4 micro-batches, against 1-3% for one). The
            averages across steps are unbiased either way; `batchgrad.advise`
            measures every micro-batch.

    Example:
        >>> scale = NoiseScale(beta=0.9)
        >>> scale.update(NoiseEstimate(2.0, 40.0, 20.0, 5.0, 8, 32))
        >>> scale.update(NoiseEstimate(1.0, 60.0, 60.0, 5.0, 8, 32))
        >>> round(scale.b_simple, 3)
        34.286
    """

    def __init__(self, beta: float = 0.95, small_batches: int | None = 1) -> None:
        if isinstance(beta, bool) or not isinstance(beta, int | float) or not 0 <= beta < 1:
            raise ConfigError(f"beta must be a number in [0, 1), got {beta!r}.")
        if small_batches is not None and (
            isinstance(small_batches, bool)
            or not isinstance(small_batches, int)
            or small_batches < 1
        ):
            raise ConfigError(
                f"small_batches must be a positive int or None (every micro-batch but the "
                f"last), got {small_batches!r}."
            )
        self.beta = float(beta)
        self.small_batches = small_batches
        self.steps = 0
        self._sums = [0.0, 0.0, 0.0, 0.0]  # grad_sq, trace_cov and their squares
        self.last: NoiseEstimate | None = None

    def update(self, step: NoiseEstimate) -> None:
        self.steps += 1
        self.last = step
        values = (step.grad_sq, step.trace_cov, step.grad_sq**2, step.trace_cov**2)
        self._sums = [
            self.beta * s + (1 - self.beta) * v for s, v in zip(self._sums, values, strict=True)
        ]

    def _average(self, index: int) -> float:
        if self.steps == 0:
            return math.nan
        return self._sums[index] / (1 - self.beta**self.steps)

    @property
    def grad_sq(self) -> float:
        return self._average(0)

    @property
    def trace_cov(self) -> float:
        return self._average(1)

    @property
    def b_simple(self) -> float:
        return _ratio(self.trace_cov, self.grad_sq) if self.steps else math.nan

    @property
    def b_simple_std(self) -> float:
        """Standard error of `b_simple` from the step-to-step spread of the estimates."""
        if self.steps < 2:
            return math.inf
        g, t = self.grad_sq, self.trace_cov
        if g <= 0:
            return math.inf
        effective = min(float(self.steps), (1 + self.beta) / (1 - self.beta))
        var_g = max(self._average(2) - g**2, 0.0) / effective
        var_t = max(self._average(3) - t**2, 0.0) / effective
        return abs(t / g) * math.sqrt(var_t / t**2 + var_g / g**2) if t else math.inf

    def estimate(self) -> NoiseEstimate:
        """The averages, as a `NoiseEstimate` (batch sizes of the last step)."""
        last = self.last
        return NoiseEstimate(
            self.grad_sq,
            self.trace_cov,
            self.b_simple,
            self.b_simple_std,
            last.small_batch if last else math.nan,
            last.big_batch if last else math.nan,
        )

    def state_dict(self) -> dict[str, Any]:
        return {
            "beta": self.beta,
            "small_batches": self.small_batches,
            "steps": self.steps,
            "sums": list(self._sums),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.beta, self.steps, self._sums = (
            float(state["beta"]),
            int(state["steps"]),
            list(state["sums"]),
        )
        self.small_batches = state.get("small_batches", self.small_batches)


def small_batches(noise: bool | NoiseScale) -> int | None:
    """How many micro-batches a step measures for ``noise=`` (`NoiseScale`)."""
    return noise.small_batches if isinstance(noise, NoiseScale) else 1
