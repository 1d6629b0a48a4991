"""One micro-batch loop, and what each micro-batch contributes to the running sum.

Every engine of `batchgrad.accumulate` (one process, DDP, unwrapped under
`torch.distributed`) drives `_loop`: it runs each micro-batch's forward and hands it
to a `_Contribution` (its gradient, the same counting its samples for the noise
scale, its norm for the noise scale, its clipped per-sample sum). Each backward
carries ``1 / N̂``, with ``N̂`` presumed from the first micro-batch (`_Presumption`),
times a `GradScaler`'s scale with ``scaler=``; after each, a `RunningSum` takes the
gradients of the parameters summed in a wider dtype (`batchgrad._precision`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import torch
from torch import Tensor, nn
from torch.overrides import has_torch_function

from ._loss import LossFn, unpack_loss
from ._noise import NoiseEstimate
from ._noise import estimate as noise_estimate
from ._per_sample import clipped_sum
from ._precision import RunningSum, Scaling
from ._readout import _as_floats, _grads, _norms
from ._split import Batch, batch_length, is_structured

T = TypeVar("T")


# The engine entry point `torch.autograd.backward` calls once its checks are done.
_run_backward: Callable[..., Any] | None = getattr(
    torch.autograd.graph, "_engine_run_backward", None
)


@dataclass(slots=True)
class _Run:
    """What the micro-batch loop collected, and where it is."""

    presumption: _Presumption | None
    scaling: Scaling | None = None  # a GradScaler's scale in every backward
    running: RunningSum | None = None  # the sum kept aside from p.grad
    totals: list[Tensor] = field(default_factory=list)  # attached: read with item()
    counts: list[int | float | Tensor] = field(default_factory=list)
    root: Tensor | None = None  # s / N̂, backpropagated into every total (None: 1)
    samples: int = 0  # rows seen, where the contribution counts them
    index: int = -1  # the micro-batch being run
    done: bool = False


class _Contribution(Protocol):
    """What one micro-batch adds to ``p.grad``: its forward and backward, recorded in
    the `_Run` (its total and count)."""

    def __call__(
        self,
        run: _Run,
        model: nn.Module,
        loss_fn: LossFn,
        micro_batch: Batch,
        index: int,
        last: bool,
    ) -> None: ...


def _loop(
    run: _Run,
    model: nn.Module,
    loss_fn: LossFn,
    parts: Iterable[tuple[Batch, bool]],
    contribute: _Contribution,
) -> _Run:
    """The one micro-batch loop every engine drives."""
    running = run.running
    for index, (micro_batch, last) in enumerate(parts):
        run.index = index
        contribute(run, model, loss_fn, micro_batch, index, last)
        if running is not None:
            running.absorb()
    run.done = True
    return run


def _gradient(
    run: _Run, model: nn.Module, loss_fn: LossFn, micro_batch: Batch, index: int, last: bool
) -> None:
    """The micro-batch's gradient: backpropagate ``total / N̂`` (see `_Presumption`)."""
    total, count = unpack_loss(loss_fn(model, micro_batch), index)
    if index == 0:
        _first_root(run, total, count, last)
    _backward(total, run.root)
    run.totals.append(total)
    run.counts.append(count)


def _first_root(run: _Run, total: Tensor, count: int | float | Tensor, last: bool) -> None:
    """The root of every micro-batch's backward, set on the first: ``1 / N̂`` (see
    `_Presumption`), times the scale with a scaler."""
    root = None if run.presumption is None else run.presumption.root(total, count, only=last)
    if run.scaling is not None:
        root = run.scaling.root(root, total)
    run.root = root


def _counted_gradient(
    run: _Run, model: nn.Module, loss_fn: LossFn, micro_batch: Batch, index: int, last: bool
) -> None:
    """`_gradient`, counting the samples (rows) for the noise scale."""
    run.samples += batch_length(micro_batch, f"micro-batch {index}")
    _gradient(run, model, loss_fn, micro_batch, index, last)


class _Clipped:
    """The micro-batch's per-sample gradients, each clipped to norm ``C``, summed."""

    def __init__(self, max_norm: float) -> None:
        self.max_norm = max_norm
        self.factors: list[Tensor] = []

    def __call__(
        self,
        run: _Run,
        model: nn.Module,
        loss_fn: LossFn,
        micro_batch: Batch,
        index: int,
        last: bool,
    ) -> None:
        loss, factors = clipped_sum(model, loss_fn, micro_batch, index, self.max_norm)
        run.totals.append(loss.total)
        run.counts.append(loss.count.detach() if isinstance(loss.count, Tensor) else loss.count)
        self.factors.append(factors)

    def clipped(self) -> tuple[int, int]:
        """Samples clipped, and samples."""
        if not self.factors:
            return 0, 0
        factors = torch.cat(self.factors)
        return int((factors < 1).sum()), factors.numel()


def _add_noise(
    params: list[nn.Parameter],
    std: float,
    generator: torch.Generator | None,
    running: RunningSum | None = None,
) -> None:
    """Gaussian noise of standard deviation ``std`` on every parameter, drawn once
    (into the running sum for the parameters summed there)."""
    with torch.no_grad():
        for p in params:
            noise = torch.randn(p.shape, generator=generator, dtype=p.dtype, device=p.device)
            noise.mul_(std)
            if running is None or not running.add_noise(p, noise):
                p.grad = noise if p.grad is None else p.grad.add_(noise)


def _presumed(presumption: _Presumption | None) -> float:
    """The divisor the micro-batches' gradients already carry (1: none)."""
    if presumption is None or presumption.divisor is None:
        return 1.0
    return presumption.divisor


class _Presumption:
    """``N̂``, the divisor presumed from the first micro-batch before ``N(B)`` is known.

    A first micro-batch that is the only one presumes its own count, exactly. One of
    several presumes ``N̂ = count_0 · rows / rows_0``, exact whenever every row holds
    as many units (one label per sample, unpadded sequences); then `_normalise` has
    nothing left to divide. Nothing is presumed (``N̂ = 1``) under ``"sum"``, from a
    count that is not ``> 0``, or for the first of several ready-made micro-batches
    (they do not tell their rows).
    """

    __slots__ = ("alone", "batch", "divisor", "known", "micro_batch_size", "ranks")

    def __init__(self, batch: object, micro_batch_size: int | None, alone: bool = True) -> None:
        self.batch, self.micro_batch_size = batch, micro_batch_size
        self.alone = alone  # one process: a lone micro-batch's count is N(B) itself
        self.ranks = 1  # presume the count of this many ranks' batches
        self.divisor: float | None = 1.0  # N̂; None: exactly N(B)
        self.known: float | None = None  # presume this (the same on every rank)

    def root(self, total: Tensor, count: int | float | Tensor, only: bool) -> Tensor | None:
        """The gradient to backpropagate into every total, ``1 / N̂`` (None: 1)."""
        if self.known is not None:
            self.divisor = self.known
            return torch.full_like(total, 1 / self.known)
        if (
            only
            and self.alone
            and isinstance(count, Tensor)
            and count.dtype == total.dtype
            and count.device == total.device
        ):
            # The whole batch: its count is N(B), not read until the losses are
            # checked (a bad one raises then).
            self.divisor = None
            return count.reciprocal()
        first = float(count)  # read once, on the first micro-batch
        if not 0 < first < math.inf:
            return None
        if only:
            self.divisor = first * self.ranks
        elif self.micro_batch_size is not None and is_structured(self.batch):
            rows = batch_length(self.batch)
            self.divisor = first * rows * self.ranks / min(self.micro_batch_size, rows)
        else:
            return None
        return torch.full_like(total, 1 / self.divisor)


def _with_last(items: Iterable[T]) -> tuple[Iterator[tuple[T, bool]], bool]:
    """``(item, is_last)`` pairs, and whether there is any item (read one ahead)."""
    if isinstance(items, list):  # nothing to read ahead
        flags = [False] * len(items)
        if flags:
            flags[-1] = True
        return zip(items, flags, strict=True), bool(flags)
    iterator = iter(items)
    try:
        first = next(iterator)
    except StopIteration:
        return iter(()), False

    def pairs() -> Iterator[tuple[T, bool]]:
        current = first
        for following in iterator:
            yield current, False
            current = following
        yield current, True

    return pairs(), True


class _MicroBatchGrads:
    """Micro-batches' own gradient norms, for the noise scale: those of the first
    ``limit`` (None: every one but the last).

    Each measured micro-batch runs its backward on cleared ``p.grad``; its norm is
    taken and the sum of the earlier ones added back in (the addition autograd would
    have made). The first costs only its norm where ``p.grad`` starts empty; each later
    one its norm and the earlier sum held apart, a second set of gradients (measured
    on a CPU, the three of an MLP's four micro-batches cost 6-10% of its step, the
    norms' cold reads and the fresh memory's page faults). The last micro-batch is
    never measured: the estimator needs small batches and the whole one, which the
    final gradient gives. (Also measured: a norm in a gradient hook costs more in the
    hooks' calls, and the running sums' norms, prefixes of the batch, give a much
    noisier estimate for the same pass.)
    """

    def __init__(self, params: list[nn.Parameter], limit: int | None) -> None:
        self.params = params
        self.limit = limit
        self.sizes: list[int] = []  # samples per micro-batch, all of them
        self.norms: list[list[Tensor]] = []  # per parameter, of each measured one
        self.scale: float | None = None  # N̂, which every backward's gradient carries

    def __call__(
        self,
        run: _Run,
        model: nn.Module,
        loss_fn: LossFn,
        micro_batch: Batch,
        index: int,
        last: bool,
    ) -> None:
        self.sizes.append(batch_length(micro_batch, f"micro-batch {index}"))
        total, count = unpack_loss(loss_fn(model, micro_batch), index)
        if index == 0:
            _first_root(run, total, count, last)
        if last or (self.limit is not None and len(self.norms) >= self.limit):
            _backward(total, run.root)
        else:
            self.backward(total, run.root)
        run.totals.append(total)
        run.counts.append(count)

    def backward(self, total: Tensor, root: Tensor | None) -> None:
        """``total.backward(root)``, with ``root = 1 / N̂`` (the same for every
        micro-batch) or None (1)."""
        earlier = [p.grad for p in self.params]
        for p in self.params:
            p.grad = None
        _backward(total, root)
        if self.scale is None:  # read once: on an accelerator, reading waits for it
            self.scale = 1.0 if root is None else 1 / float(root)
        self.norms.append(_norms(_grads(self.params)))  # read at the end, all at once
        mine, theirs = [], []
        for p, grad in zip(self.params, earlier, strict=True):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = grad
            else:
                mine.append(p.grad)
                theirs.append(grad)
        if mine:
            torch._foreach_add_(mine, theirs)

    def estimate(self, big_sq_norm: float) -> NoiseEstimate:
        small = self.sizes[: len(self.norms)]
        scale = 1.0 if self.scale is None else self.scale
        means = [
            (math.hypot(*_as_floats(norms)) * scale / n) ** 2
            for norms, n in zip(self.norms, small, strict=True)
        ]
        return noise_estimate(means, small, big_sq_norm, sum(self.sizes))


def _backward(total: Tensor, root: Tensor | None) -> None:
    """``total.backward(root)``, with ``root`` None (1) or a tensor like ``total``.

    A plain tensor goes straight to autograd's engine: ``torch.autograd.backward``
    first re-checks its arguments in Python, some 30-50 µs a call on a CPU, paid
    once per micro-batch. The arguments are known good here; anything else (tensor
    subclasses, torch-function modes, a torch without this entry point) takes the
    public route.
    """
    if _run_backward is None or has_torch_function((total,)):
        total.backward(root)
        return
    if root is None:
        root = torch.ones_like(total)
    _run_backward((total,), (root,), False, False, (), allow_unreachable=True, accumulate_grad=True)
