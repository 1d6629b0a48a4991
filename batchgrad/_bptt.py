"""Backpropagation through time: exact in bounded memory, truncated, and made visible.

A recurrent model reuses its weights at every time step, so by the chain rule the
gradient of a weight is the *sum* of the contributions of every step. Whether the
loss averages over its units (time steps, tokens) is a separate normalisation,
done as for any batch: the sums are divided once by ``N``, the units of the whole
sequence batch (`batchgrad._accumulate._normalise`).

`bptt` computes the full-sequence gradient chunk by chunk:

1. a forward pass without a graph runs the chunks in order and keeps only the
   state at each chunk boundary (and the random-number state, so dropout can be
   replayed);
2. a reverse pass recomputes each chunk, last first, from its boundary state with a
   graph, and backpropagates its loss together with the gradient that the later
   chunks sent back into the state it returned. The gradient reaching the chunk's
   own starting state is carried to the previous chunk.

Memory holds one chunk's activations and the boundary states; the cost is one
extra forward. `time_contributions` runs the same reverse pass a step at a time and
keeps what each step adds. `tbptt` is truncated BPTT (Williams and Peng): every
``k1`` steps, backpropagate through the last ``k2``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from ._accumulate import _EXISTING_GRAD, ExistingGrad, _divisor, _normalise
from ._errors import BatchShapeError, ConfigError, LossTypeError, NonFiniteError, StateError
from ._loss import Loss
from ._readout import _as_floats, _as_number, _grads, _total_norm, _widened_norm
from ._reduction import REDUCTIONS, Reduction
from ._sequence import (
    State,
    check_positive,
    chunk_bounds,
    detach_state,
    state_leaves,
    time_length,
    time_slice,
)
from ._split import Batch, check_micro_batch_size, micro_batches
from ._state import (
    BufferSnapshot,
    GradStash,
    RngSnapshot,
    _add_back,
    _into_stashed,
    _refuse_existing_grads,
    trainable_and_buffers,
)

StepFn = Callable[[nn.Module, Any, State], tuple[Loss, State]]
"""``step_fn(model, chunk, state) -> (bg.Loss, new_state)``."""


@dataclass(frozen=True)
class BPTTReport:
    """What one call of `bptt` (or `tbptt`) computed.

    Attributes:
        loss: the loss of the whole sequence batch (``Σ total / N`` under
            ``"mean"``, ``Σ total`` under ``"sum"``).
        count: ``N``, the units of the whole sequence batch.
        time_steps: the length of the sequences.
        chunks: how many time chunks (`tbptt`: windows) each sequence was cut into.
        micro_batches: how many micro-batches of sequences were run.
        grad_norm: the global L2 norm of the gradients left in ``p.grad`` (with an
            optimizer in `tbptt`: of the last window's gradient, before its step).
        reduction: ``"mean"`` or ``"sum"``.
        chunk_counts: the units in each chunk (window), summed over micro-batches.
    """

    loss: float
    count: int | float
    time_steps: int
    chunks: int
    micro_batches: int
    grad_norm: float
    reduction: Reduction
    chunk_counts: tuple[int | float, ...]


@dataclass(frozen=True)
class TimeContributions:
    """What each time step adds to the gradient (see `time_contributions`).

    Attributes:
        grads: per parameter name, ``[T, *p.shape]``: step ``t``'s contribution.
            Summed over ``t`` it is the full BPTT gradient. Empty without
            ``keep_grads``.
        step_norms: ``[T]``, the global L2 norm of each step's contribution.
        state_grad_norms: ``[T]``, the norm of the gradient of the losses of the
            later steps with respect to the state after step ``t`` (0 after the last
            step): how much the future depends on that state, the vanishing or
            exploding gradient, step by step.
        loss: the loss of the whole sequence batch.
        count: ``N``, its units.
    """

    grads: dict[str, Tensor]
    step_norms: Tensor
    state_grad_norms: Tensor
    loss: float
    count: int | float


def bptt(
    model: nn.Module,
    step_fn: StepFn,
    sequence: Batch,
    *,
    chunk: int,
    reduction: Reduction = "mean",
    initial_state: State = None,
    micro_batch_size: int | None = None,
    existing_grad: ExistingGrad = "error",
) -> BPTTReport:
    """Leave in every ``p.grad`` the exact full-sequence BPTT gradient, in bounded memory.

    With ``step_fn(model, chunk, state) = (Loss(total_c, count_c), new_state)`` over
    the time chunks ``c`` of the sequence, the loss is ``Σ_c total_c / Σ_c count_c``
    (``"mean"``) or ``Σ_c total_c`` (``"sum"``), and its gradient is the one
    backpropagation through the whole sequence at once would give, to rounding.
    Memory holds the activations of one chunk and the states at chunk boundaries;
    time is about one extra forward pass.

    Args:
        model: the module whose parameters receive the gradient.
        step_fn: runs the model over one chunk, ``[batch, chunk_len, ...]`` slices of
            every ``[batch, time, ...]`` tensor of ``sequence``, from ``state``, and
            returns its `Loss` and the state after the chunk. It is called twice per
            chunk (once without a graph), with the random-number state replayed, so
            dropout draws the same masks both times.
        sequence: a tensor, or a (nested) tuple/list/dict of tensors, batch first and
            time second; 1-D tensors (per sample, e.g. lengths) and other leaves go
            whole to every chunk. Pad variable lengths and mask the loss.
        chunk: time steps per chunk (the last may be shorter); ``chunk >= T`` is
            plain BPTT with one extra forward.
        reduction: ``"mean"`` or ``"sum"`` over the units of the whole batch.
        initial_state: the state of the first chunk (``None`` by default). With
            ``micro_batch_size``, its tensors must be batch first, to be split with
            the sequence.
        micro_batch_size: sequences per micro-batch (``None``: all at once); the
            micro-batches' gradients are summed and divided by the ``N`` of all.
        existing_grad: ``"error"``, ``"replace"`` or ``"add"``, as in `accumulate`.

    Returns:
        A `BPTTReport`.

    Raises:
        BatchError: for bad input; every ``p.grad``, every buffer and the random
            state are then as before the call.

    Example:
        >>> import torch, batchgrad as bg
        >>> rnn = torch.nn.RNN(2, 4, batch_first=True)
        >>> def step_fn(model, x, h):
        ...     out, h = model(x, h)
        ...     return bg.Loss.from_values(out.pow(2).sum(-1)), h
        >>> report = bg.bptt(rnn, step_fn, torch.randn(3, 10, 2), chunk=4)
        >>> report.chunks, report.count, report.chunk_counts
        (3, 30, (12, 12, 6))
    """
    _check_options(reduction, existing_grad)
    check_positive("chunk", chunk)
    check_micro_batch_size(micro_batch_size)
    steps = time_length(sequence)
    bounds = chunk_bounds(steps, chunk)
    with _guarded(model, existing_grad) as stash:
        params = stash.params
        loss_sum, chunk_counts, runs = 0.0, [0.0] * len(bounds), 0
        for index, (part, state) in enumerate(
            _with_states(sequence, initial_state, micro_batch_size)
        ):
            where = f" of micro-batch {index}" if micro_batch_size is not None else ""
            run = _ChunkedRun(model, step_fn, part, bounds, where)
            total, counts = run.forward(state)
            run.backward(params, _accumulate_into(params))
            loss_sum += total
            chunk_counts = [a + b for a, b in zip(chunk_counts, counts, strict=True)]
            runs += 1
        count = math.fsum(chunk_counts)
        divisor = _divisor(count, reduction, f"{len(bounds)} time chunk(s)")
        _normalise(_grads(params), None, divisor)
        grad_norm = _finite_norm(model, params)
    if existing_grad == "add":
        grad_norm = _add_back(stash)
    else:
        _into_stashed(stash)
    return BPTTReport(
        loss=loss_sum / divisor,
        count=_as_number(count),
        time_steps=steps,
        chunks=len(bounds),
        micro_batches=runs,
        grad_norm=grad_norm,
        reduction=reduction,
        chunk_counts=tuple(_as_number(c) for c in chunk_counts),
    )


def time_contributions(
    model: nn.Module,
    step_fn: StepFn,
    sequence: Batch,
    *,
    reduction: Reduction = "mean",
    initial_state: State = None,
    keep_grads: bool = True,
) -> TimeContributions:
    """How much each time step contributes to the gradient: the "sum over time", seen.

    Runs `bptt` a step at a time (``step_fn`` is called on chunks of one step) and
    keeps what each step's backward adds: the gradient of the loss with respect to
    the weights *as used at step t*. These contributions sum to the full gradient.
    Also records the norm of the gradient that the later steps' losses send back
    into the state after each step. The model, its gradients, buffers and the
    random state are left as they were.

    Args:
        keep_grads: keep each step's contribution per parameter (``T`` copies of
            the parameters); with ``False`` only the norms are kept.
        Others: as in `bptt`.
    """
    _check_options(reduction, "error")
    steps = time_length(sequence)
    bounds = chunk_bounds(steps, 1)
    named = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    params = [p for _, p in named]
    buffers, rng = BufferSnapshot.take(model), RngSnapshot.take()
    per_step: list[list[Tensor | None]] = [[] for _ in bounds]
    state_norms = torch.zeros(steps, dtype=torch.float64)
    step_norms = torch.zeros(steps, dtype=torch.float64)

    def keep(index: int, grads: list[Tensor | None], state_grads: list[Tensor]) -> None:
        present = [g for g in grads if g is not None]
        step_norms[index] = _total_norm(present)
        state_norms[index] = _total_norm(state_grads)
        if keep_grads:
            per_step[index] = grads

    try:
        run = _ChunkedRun(model, step_fn, sequence, bounds, "")
        loss_sum, counts = run.forward(initial_state)
        run.backward(params, keep)
        count = math.fsum(counts)
        divisor = _divisor(count, reduction, f"{steps} time step(s)")
    finally:
        buffers.put_back()
        rng.put_back()
    grads: dict[str, Tensor] = {}
    if keep_grads:
        for position, (name, p) in enumerate(named):
            grads[name] = torch.stack([_or_zeros(step[position], p) for step in per_step])
    _normalise([*grads.values(), step_norms, state_norms], None, divisor)
    return TimeContributions(
        grads=grads,
        step_norms=step_norms,
        state_grad_norms=state_norms,
        loss=loss_sum / divisor,
        count=_as_number(count),
    )


def tbptt(
    model: nn.Module,
    step_fn: StepFn,
    sequence: Batch,
    *,
    k1: int,
    k2: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
    reduction: Reduction = "mean",
    initial_state: State = None,
    existing_grad: ExistingGrad = "error",
) -> BPTTReport:
    """Truncated BPTT (Williams and Peng): every ``k1`` steps, backpropagate ``k2`` back.

    The sequence is cut into windows of ``k1`` steps (the last may be shorter).
    Window ``j``'s loss (the units of its own steps, each unit counted once over
    the sequence) is backpropagated through its steps and the ``k2 - k1`` steps
    before them, to the state there, cut from the graph. ``k2=None`` means
    ``k2 = k1``: the usual "detach the state every k1 steps" loop. With ``k2 > k1``
    the steps before the window are recomputed from the state saved ``k2 - k1``
    steps before it (with the random-number state replayed).

    Without ``optimizer`` the windows' gradients are summed into ``p.grad`` and
    divided once by ``N``, the units of the whole sequence batch, exactly as
    `bptt` does: the result is the truncated estimate of the gradient `bptt`
    computes exactly. With ``optimizer``, each window's gradient is normalised by
    its own units (``"mean"``) and followed by ``optimizer.step()`` and
    ``optimizer.zero_grad()``; later windows then run with the updated weights
    (online learning), and windows without units are skipped. Parameters already
    updated stay updated if a later window fails.

    Args:
        k1: steps per window (the forward stride), ``>= 1``.
        k2: ``>= k1`` (``None``: ``k1``); each window backpropagates through its own
            steps and the ``k2 - k1`` steps before them.
        optimizer: optional; see above.
        Others: as in `bptt`.
    """
    _check_options(reduction, existing_grad)
    check_positive("k1", k1)
    k2 = k1 if k2 is None else check_positive("k2", k2)
    if k2 < k1:
        raise ConfigError(
            f"k2={k2} is smaller than k1={k1}: the losses of the first k1-k2 steps of "
            f"each window would never be backpropagated. Use k2 >= k1 (k2=None means k1)."
        )
    if optimizer is not None and existing_grad == "add":
        raise ConfigError(
            "existing_grad='add' cannot be combined with an optimizer: every window "
            "steps and clears the gradients. Use 'error' or 'replace'."
        )
    steps = time_length(sequence)
    windows = chunk_bounds(steps, k1)
    starts = [max(0, first - (k2 - k1)) for first, _ in windows]
    cuts = sorted({0, steps, *(stop for _, stop in windows), *starts})
    with _guarded(model, existing_grad) as stash:
        params = stash.params
        saved: dict[int, State] = {0: initial_state}  # the state at each window's start
        replay: dict[int, RngSnapshot] = {}  # the random state entering each segment
        frontier: RngSnapshot | None = None  # the random state after the newest step
        loss_sum, window_counts, grad_norm = 0.0, list[float](), 0.0
        for index, ((first, stop), start) in enumerate(zip(windows, starts, strict=True)):
            where = f"window {index} (steps {first}-{stop - 1})"
            state = saved[start] if start == 0 else detach_state(saved[start])
            for kept in (saved, replay):  # later windows start here or later
                for point in [point for point in kept if point < start]:
                    del kept[point]
            totals: list[Tensor] = []
            counts: list[int | float | Tensor] = []
            for a, b in _segments(cuts, start, stop):
                if a in replay:  # steps an earlier window ran: the same dropout masks
                    replay[a].put_back()
                else:
                    if frontier is not None:
                        frontier.put_back()
                        frontier = None
                    replay[a] = RngSnapshot.take()
                chunk = time_slice(sequence, a, b)
                loss, state = _unpack_step(step_fn(model, chunk, state), where)
                if a >= first:
                    totals.append(loss.total)
                    counts.append(loss.count)
                if b in starts:
                    saved[b] = detach_state(state)
            frontier = RngSnapshot.take()
            value, count = _check_totals(totals, counts, where)
            loss_sum += value
            window_counts.append(count)
            attached = [t for t in totals if t.requires_grad]
            if optimizer is None:
                if attached:
                    torch.autograd.backward(attached)
            elif count > 0 and attached:
                torch.autograd.backward(attached)
                _normalise(_grads(params), None, _divisor(count, reduction, where))
                grad_norm = _finite_norm(model, params)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
        count_all = math.fsum(window_counts)
        divisor = _divisor(count_all, reduction, f"{len(windows)} window(s)")
        if optimizer is None:
            _normalise(_grads(params), None, divisor)
            grad_norm = _finite_norm(model, params)
    if existing_grad == "add" and optimizer is None:
        grad_norm = _add_back(stash)
    elif optimizer is None:
        _into_stashed(stash)
    return BPTTReport(
        loss=loss_sum / divisor,
        count=_as_number(count_all),
        time_steps=steps,
        chunks=len(windows),
        micro_batches=1,
        grad_norm=grad_norm,
        reduction=reduction,
        chunk_counts=tuple(_as_number(c) for c in window_counts),
    )


# -- the chunked forward and reverse passes ------------------------------------------


class _ChunkedRun:
    """One batch of sequences, cut into time chunks: the two passes of `bptt`."""

    def __init__(
        self,
        model: nn.Module,
        step_fn: StepFn,
        sequence: Batch,
        bounds: list[tuple[int, int]],
        where: str,
    ) -> None:
        self.model, self.step_fn, self.sequence = model, step_fn, sequence
        self.bounds, self.where = bounds, where
        self.states: list[State] = []  # the state entering each chunk
        self.rngs: list[RngSnapshot] = []  # the random state entering each chunk
        self.totals: list[Tensor] = []  # each chunk's loss in the forward pass

    def _chunk(self, index: int, state: State) -> tuple[Loss, State]:
        start, stop = self.bounds[index]
        where = f"time chunk {index} (steps {start}-{stop - 1}){self.where}"
        chunk = time_slice(self.sequence, start, stop)
        return _unpack_step(self.step_fn(self.model, chunk, state), where)

    def forward(self, initial_state: State) -> tuple[float, list[float]]:
        """Run the chunks in order without a graph, keeping the boundary states.

        Returns the summed loss and each chunk's count; leaves the buffers and the
        random state as one forward over the sequence leaves them.
        """
        totals: list[Tensor] = []
        counts: list[int | float | Tensor] = []
        state = initial_state
        with torch.no_grad():
            for index in range(len(self.bounds)):
                self.states.append(state)
                rng = RngSnapshot.take()
                if self.rngs and rng.same_as(self.rngs[-1]):  # nothing random ran: share
                    rng = self.rngs[-1]
                self.rngs.append(rng)
                loss, state = self._chunk(index, state)
                state = detach_state(state)
                totals.append(loss.total)
                counts.append(loss.count)
        loss_sum, chunk_counts = _check_chunk_losses(totals, counts, self.bounds, self.where)
        self.totals = totals
        self.after = RngSnapshot.take(), BufferSnapshot.take(self.model)
        return loss_sum, chunk_counts

    def backward(
        self,
        params: list[nn.Parameter],
        take: Callable[[int, list[Tensor | None], list[Tensor]], None],
    ) -> None:
        """Recompute the chunks last to first, each with its graph, and backpropagate.

        ``take(index, param_grads, state_grads)`` receives each chunk's gradient
        with respect to the parameters (None where unused) and the gradient the
        later chunks send back into the state this chunk returned (empty for the
        last chunk). Gradients are sums: nothing is divided here.
        """
        carried: list[Tensor | None] = []
        attached = False
        recomputed: list[Tensor] = []
        for index in reversed(range(len(self.bounds))):
            self.rngs[index].put_back()
            entering = self.states[index]
            state_in = entering if index == 0 else detach_state(entering, requires_grad=True)
            loss, state_out = self._chunk(index, state_in)
            recomputed.append(loss.total.detach())
            outputs: list[Tensor] = []
            grad_outputs: list[Tensor | None] = []
            if loss.total.requires_grad:
                attached = True
                outputs.append(loss.total)
                grad_outputs.append(None)
            out_leaves = [t for _, t in state_leaves(state_out)]
            if carried and len(out_leaves) != len(carried):
                raise StateError(
                    f"step_fn returned a state of {len(out_leaves)} tensor(s) for time "
                    f"chunk {index}{self.where} when recomputed, but {len(carried)} "
                    f"before; it must return a state of the same structure every time."
                )
            for leaf, grad in zip(out_leaves, carried, strict=False):
                if grad is not None and leaf.requires_grad:
                    outputs.append(leaf)
                    grad_outputs.append(grad)
            in_leaves = [t for _, t in state_leaves(state_in)] if index > 0 else []
            inputs = [*params, *in_leaves]
            grads: list[Tensor | None] = [None] * len(inputs)
            if outputs:
                grads = list(torch.autograd.grad(outputs, inputs, grad_outputs, allow_unused=True))
            take(index, grads[: len(params)], [g for g in carried if g is not None])
            carried = grads[len(params) :]
        if not attached:
            raise LossTypeError(
                f"No chunk's Loss.total{self.where} depends on a parameter that requires "
                f"grad, so there is nothing to backpropagate. Compute the loss from the "
                f"model's outputs, outside torch.no_grad()."
            )
        self._check_recomputed(recomputed[::-1])
        rng, buffers = self.after
        rng.put_back()
        buffers.put_back()

    def _check_recomputed(self, recomputed: list[Tensor]) -> None:
        """Refuse a chunk whose loss, recomputed from its boundary state, differs.

        The reverse pass is exact only if a chunk depends on nothing but its input,
        ``state`` and the random state. A step_fn that keeps its hidden state on the
        module (``self.hidden = h``) recomputes the later chunks from the wrong state
        and, silently, gives another gradient: this is where that shows.
        """
        before = torch.stack(self.totals).double()
        after = torch.stack(recomputed).to(before.device).double()
        finfo = torch.finfo(
            self.totals[0].dtype if self.totals[0].is_floating_point() else torch.float32
        )
        tolerance = 8 * math.sqrt(finfo.eps) * (before.abs() + after.abs() + finfo.tiny)
        off = ((before - after).abs() > tolerance).nonzero().flatten().tolist()
        if not off:
            return
        index = off[0]
        start, stop = self.bounds[index]
        raise StateError(
            f"The loss of time chunk {index} (steps {start}-{stop - 1}){self.where} was "
            f"{before[index].item():.6g} in the forward pass but {after[index].item():.6g} when "
            f"recomputed from the state entering it: step_fn depends on something other "
            f"than its chunk, its state argument and the random state, e.g. a hidden state "
            f"kept on the module (self.hidden = h). Return every such tensor as the new "
            f"state and take it from the state argument; the chunked gradient would "
            f"otherwise be wrong."
        )


@contextlib.contextmanager
def _guarded(model: nn.Module, existing_grad: ExistingGrad) -> Iterator[GradStash]:
    """Move the trainable parameters' gradients aside (refusing stale ones unless
    ``existing_grad`` says otherwise); if the body raises, put gradients, buffers and
    the random state back as they were."""
    params, buffers = trainable_and_buffers(model)
    rng = RngSnapshot.take()
    stash = GradStash.take(params)
    try:
        if existing_grad == "error":
            _refuse_existing_grads(model, stash)
        yield stash
    except BaseException:
        stash.put_back()
        buffers.put_back()
        rng.put_back()
        raise


def _accumulate_into(
    params: list[nn.Parameter],
) -> Callable[[int, list[Tensor | None], list[Tensor]], None]:
    """A `_ChunkedRun.backward` receiver that sums each chunk's gradient into ``p.grad``."""

    def add(index: int, grads: list[Tensor | None], state_grads: list[Tensor]) -> None:
        for p, grad in zip(params, grads, strict=True):
            if grad is None:
                continue
            if p.grad is None:
                p.grad = grad
            else:
                p.grad.add_(grad)

    return add


def _with_states(
    sequence: Batch, initial_state: State, micro_batch_size: int | None
) -> Iterable[tuple[Batch, State]]:
    """``(micro-batch, its initial state)`` pairs; batch-first states are split too."""
    if micro_batch_size is None or initial_state is None:
        for part in micro_batches(sequence, micro_batch_size):
            yield part, initial_state
        return
    try:
        yield from micro_batches((sequence, initial_state), micro_batch_size)
    except BatchShapeError as error:
        raise BatchShapeError(
            f"With micro_batch_size, initial_state must be batch first (its tensors "
            f"[batch, ...]) so that it can be split with the sequence: {error}"
        ) from error


def _segments(cuts: list[int], start: int, stop: int) -> list[tuple[int, int]]:
    """The consecutive pieces of ``[start, stop)`` between cut points."""
    inside = [c for c in cuts if start <= c <= stop]
    return list(itertools.pairwise(inside))


def _unpack_step(result: object, where: str) -> tuple[Loss, State]:
    """Check what ``step_fn`` returned for ``where``."""
    if not isinstance(result, tuple | list) or len(result) != 2:
        raise LossTypeError(
            f"step_fn returned {type(result).__name__} for {where}; it must return a "
            f"pair (bg.Loss(total, count), new_state)."
        )
    loss, state = result
    if not isinstance(loss, Loss):
        raise LossTypeError(
            f"step_fn returned ({type(loss).__name__}, state) for {where}; the first item "
            f"must be a bg.Loss, e.g. bg.Loss.from_values(values, mask)."
        )
    if not isinstance(loss.total, Tensor) or loss.total.ndim != 0:
        shape = tuple(loss.total.shape) if isinstance(loss.total, Tensor) else "no tensor"
        raise LossTypeError(
            f"Loss.total of {where} must be a 0-d tensor (the sum of the unit losses), "
            f"got {shape}. Reduce it with .sum(), or use bg.Loss.from_values."
        )
    return loss, state


def _check_chunk_losses(
    totals: list[Tensor],
    counts: list[int | float | Tensor],
    bounds: list[tuple[int, int]],
    where: str,
) -> tuple[float, list[float]]:
    """The summed loss and each chunk's count, checked (one transfer each)."""
    values = torch.stack(totals).tolist()
    for index, value in enumerate(values):
        if not math.isfinite(value):
            start, stop = bounds[index]
            raise NonFiniteError(
                f"The loss of time chunk {index} (steps {start}-{stop - 1}){where} is "
                f"{value}. Look at those steps' data and at the model's outputs there "
                f"(log of 0, division by 0, overflow), or an exploding state."
            )
    chunk_counts = _counts(counts, where)
    return math.fsum(values), chunk_counts


def _check_totals(
    totals: list[Tensor], counts: list[int | float | Tensor], where: str
) -> tuple[float, float]:
    value = math.fsum(torch.stack(totals).tolist()) if totals else 0.0
    if not math.isfinite(value):
        raise NonFiniteError(
            f"The loss of {where} is {value}. Look at those steps' data and at the model's "
            f"outputs there (log of 0, division by 0, overflow), or an exploding state."
        )
    return value, math.fsum(_counts(counts, f" in {where}"))


def _counts(counts: list[int | float | Tensor], where: str) -> list[float]:
    values = _as_floats([c.detach() if isinstance(c, Tensor) else c for c in counts])
    for value in values:
        if not math.isfinite(value) or value < 0:
            raise LossTypeError(
                f"A Loss.count{where} is {value}; a count must be a finite number of units >= 0."
            )
    return values


def _finite_norm(model: nn.Module, params: list[nn.Parameter]) -> float:
    grads = _grads(params)
    norm = _widened_norm(_total_norm(grads), grads)
    if not math.isfinite(norm):
        names = {p: name for name, p in model.named_parameters()}
        bad = [names[p] for p in params if p.grad is not None and not p.grad.isfinite().all()]
        raise NonFiniteError(
            f"The gradient of {', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''} is NaN "
            f"or infinite although every loss was finite: an exploding gradient through "
            f"time, or an operation with an infinite derivative. Look at "
            f"bg.time_contributions for where it grows, clip the state, or shorten k2."
        )
    return norm


def _or_zeros(grad: Tensor | None, param: nn.Parameter) -> Tensor:
    return torch.zeros_like(param) if grad is None else grad


def _check_options(reduction: object, existing_grad: object) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if existing_grad not in _EXISTING_GRAD:
        raise ConfigError(f"existing_grad must be one of {_EXISTING_GRAD}, got {existing_grad!r}.")
