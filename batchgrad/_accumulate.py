"""Exact gradient accumulation over micro-batches.

The gradient of ``L(B) = Σ_u ℓ_u / N(B)`` is ``(Σ_k ∇ total_k) / N(B)``: each
micro-batch ``k`` backpropagates its own ``total_k = Σ_{u∈k} ℓ_u`` (so autograd sums
the micro-batch gradients into ``p.grad``), and the sum is divided, in one place,
`_normalise`, by ``N(B) = Σ_k count_k`` once the last forward has made it known. No
count needs to be known in advance (padding, masks and ignored tokens are counted by
the loss itself), and no micro-batch's mean is ever weighted against another's.

Dividing afterwards would cost a pass over every gradient. Instead each micro-batch
backpropagates ``total_k / N̂``, with ``N̂`` presumed from the first micro-batch (see
`_Presumption`): right whenever every row holds as many units, and then the result
is the hand-written loop's that counted ``N(B)`` first, bit for bit. Only a wrong
presumption (e.g. padded tokens) costs the pass. Under `torch.distributed` every rank
presumes the ranks' ``N(B)`` alike, and `_normalise` rescales the flat buffer the
one gradient all-reduce sends, once the ranks have agreed on ``N(B)``.

One micro-batch loop (`batchgrad._loop`) drives every engine; what a micro-batch
contributes is a `_Contribution` there (its gradient, the same counting its samples
for the noise scale, its clipped per-sample sum); one process finishes in `_local_finish` or
`_clipped_finish`, several in `_data_parallel`, whose failure protocol across
ranks is `batchgrad._protocol` and whose synchronisation is
`batchgrad._distributed.Replica`. The running sum (its dtype, ``accumulate_dtype``)
and the loss scale (``scaler``) are `batchgrad._precision`'s, driven by the same loop.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._distributed import Replica, replica, unpack, wide_sums
from ._errors import (
    ConfigError,
    DistributedError,
    EmptyBatchError,
    NonFiniteError,
    ZeroCountError,
)
from ._fsdp import GRAD_SYNCS, accumulate_sharded, is_sharded
from ._loop import (
    _add_noise,
    _backward,
    _Clipped,
    _Contribution,
    _counted_gradient,
    _gradient,
    _loop,
    _MicroBatchGrads,
    _presumed,
    _Presumption,
    _Run,
    _with_last,
)
from ._loss import LossFn
from ._noise import NoiseEstimate, NoiseScale, small_batches
from ._noise import estimate as noise_estimate
from ._per_sample import check_clipping
from ._precision import (
    RunningSum,
    Scaling,
    carried,
    check_accumulate_dtype,
    check_scaler,
    refuse_sparse,
)
from ._protocol import Fused, Local, agree, agree_in_sum, fusable, fused, layout, remember
from ._readout import _as_number, _check_losses, _grads, _norms, _total_norm, _widened_norm
from ._reduction import REDUCTIONS, Reduction
from ._split import Batch, is_structured, micro_batches
from ._state import (
    GradStash,
    RngSnapshot,
    _add_back,
    _into_stashed,
    _refuse_existing_grads,
    trainable_and_buffers,
)

ExistingGrad = Literal["error", "replace", "add"]
"""What `accumulate` does with gradients already in ``p.grad``.

- ``"error"`` (default): raise `ExistingGradError` if any is non-zero, so stale
  gradients (a forgotten ``optimizer.zero_grad()``) are never silently added to.
  All-zero gradients (``zero_grad(set_to_none=False)``) count as cleared.
- ``"replace"``: discard them; ``p.grad`` holds the gradient of ``L(B)``.
- ``"add"``: add the gradient of ``L(B)`` to them (e.g. a sum of several losses).
"""

_EXISTING_GRAD: tuple[ExistingGrad, ...] = ("error", "replace", "add")

GradSync = Literal["once", "per_micro_batch"]
"""When `accumulate` synchronises the gradients of a sharded (FSDP2) model; see there."""


@dataclass(frozen=True)
class AccumulateReport:
    """What one call of `accumulate` computed.

    Attributes:
        loss: ``L(B)``, the loss of the whole logical batch.
        count: ``N(B)``, the units in the logical batch (a float when units are
            weighted).
        micro_batches: how many micro-batches were run (under `torch.distributed`,
            by all ranks together; ``micro_batch_counts`` are this rank's).
        grad_norm: the global L2 norm of the gradients left in ``p.grad``.
        reduction: ``"mean"`` or ``"sum"``.
        micro_batch_counts: the units in each of this rank's micro-batches.
        world_size: the number of data-parallel ranks sharing the logical batch.
        clipped: with ``clip_per_sample``, the fraction of samples whose gradient
            was scaled down to the norm ``C``; else None.
        noise: with ``noise``, the gradient noise scale (`batchgrad.NoiseEstimate`):
            this step's estimates, or a `NoiseScale`'s averages; None with a single
            micro-batch (two batch sizes are needed) or after an overflow.
        overflow: with ``scaler``, some gradient (of some micro-batch, on some rank)
            was infinite or NaN at the scaler's scale: ``p.grad`` holds non-finite
            values, so ``scaler.step(optimizer)`` skips the step and
            ``scaler.update()`` lowers the scale. ``grad_norm`` is then not finite.
    """

    loss: float
    count: int | float
    micro_batches: int
    grad_norm: float
    reduction: Reduction
    micro_batch_counts: tuple[int | float, ...]
    world_size: int = 1
    clipped: float | None = None
    noise: NoiseEstimate | None = None
    overflow: bool = False


def accumulate(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    *,
    micro_batch_size: int | None = None,
    reduction: Reduction = "mean",
    existing_grad: ExistingGrad = "error",
    group: dist.ProcessGroup | None = None,
    clip_per_sample: float | None = None,
    noise_multiplier: float | None = None,
    generator: torch.Generator | None = None,
    noise: bool | NoiseScale = False,
    accumulate_dtype: torch.dtype | None = None,
    scaler: torch.amp.GradScaler | None = None,
    grad_sync: GradSync = "once",
) -> AccumulateReport:
    """Leave in every ``p.grad`` the gradient of the loss of the whole logical batch.

    The logical batch ``B`` is run in micro-batches, one forward and one backward
    each, so memory holds the activations of one micro-batch only. With
    ``loss_fn(model, micro_batch) = Loss(total_k, count_k)``:

    - ``"mean"``: ``L(B) = Σ_k total_k / Σ_k count_k``
    - ``"sum"``:  ``L(B) = Σ_k total_k``

    This equals the loss of the whole batch at once to floating-point rounding,
    however the units are spread over micro-batches. (The common recipe
    ``(total_k / count_k) / K`` weights a unit by ``1 / (K·count_k)`` instead of
    ``1 / N(B)``: wrong whenever micro-batches hold different numbers of units.)

    Only the parameters of ``model`` are normalised; a leaf outside it that the loss
    depends on would receive the unnormalised sum.

    Args:
        model: the module whose parameters receive the gradient.
        loss_fn: ``loss_fn(model, micro_batch) -> bg.Loss``.
        batch: a tensor, a (nested) tuple/list/dict of tensors sharing dimension 0
            (other leaves go to every micro-batch unchanged), or any other iterable
            yielding ready-made micro-batches.
        micro_batch_size: rows per micro-batch (the last may be smaller); ``None``
            runs a structured batch whole, and must be ``None`` for ready-made
            micro-batches.
        reduction: ``"mean"`` or ``"sum"`` over the units of the logical batch.
        existing_grad: ``"error"``, ``"replace"`` or ``"add"``; see `ExistingGrad`.
        group: under `torch.distributed`, the process group sharing the logical
            batch (default: the model's DDP group, else the default group). Each
            rank passes its own share; ``N(B)`` is the count over all ranks, and
            every rank ends with the same gradient, synchronised once (see
            `batchgrad._distributed`). Ranks may hold different numbers of
            micro-batches, or none.
        clip_per_sample: ``C``: clip each sample's gradient (of its own ``total``) to
            norm ``C`` before summing, as DP-SGD does; the sum is then normalised as
            ``reduction`` says. Norms come from the ghost-norm identities where the
            layer allows and the clipped sum is formed per use; linear and embedding
            layers never hold samples × parameters, convolutions only one layer's
            for its norms, other layers hold their per-sample gradients (see
            `batchgrad.per_sample_grads`). The per-sample guard checks the first
            micro-batch of each batch signature (its default, see `per_sample_grads`).
            Under `torch.distributed` each rank clips its own samples.
        noise_multiplier: ``σ``: with ``clip_per_sample``, add Gaussian noise of
            standard deviation ``σ·C`` to the clipped sum, once per call (under
            `torch.distributed`, drawn on rank 0 and carried to every rank by the
            gradient sum, so identical everywhere). Privacy accounting is not
            batchgrad's job: use Opacus' accountants for ε.
        generator: the `torch.Generator` the noise is drawn from (seedable; under
            `torch.distributed`, rank 0's: seeded like one process's, the result
            is one process's).
        noise: ``True`` or a `NoiseScale`: estimate the gradient noise scale from the
            first micro-batch's gradient and the logical batch's (see
            `batchgrad._noise`); it costs one gradient norm per step (more with
            `NoiseScale(small_batches=...)`). Under
            `torch.distributed` the small batches are the ranks' shares (one norm per
            rank, before the synchronisation) and the big one the logical batch. A
            `NoiseScale` is updated and keeps averages across steps.
        accumulate_dtype: the dtype of the running sum of the micro-batch gradients
            (see `batchgrad._precision`). ``None``: float32 for float16 and bfloat16
            parameters, the parameter's own dtype otherwise; a dtype narrower than a
            parameter's is not used for it. ``p.grad`` keeps the parameter's dtype and
            is rounded once, at the end; parameters summed in their own dtype cost
            nothing extra. Norms are taken in float32 or wider.
        scaler: a `torch.amp.GradScaler`: every micro-batch's backward is scaled by
            its scale and ``p.grad`` is left scaled, ready for
            ``scaler.step(optimizer)`` (call ``scaler.unscale_(optimizer)`` first to
            clip), then ``scaler.update()``, once per logical batch. An infinite or
            NaN gradient is an overflow (``report.overflow``), not an error; a
            non-finite loss still raises. ``report.loss`` and ``report.grad_norm``
            are unscaled.
        grad_sync: on a model sharded with FSDP2 (``fully_shard``), ``"once"``
            keeps the unsharded gradients between micro-batches and reduce-scatters
            once per logical batch; ``"per_micro_batch"`` reduce-scatters after every
            micro-batch, so that only sharded gradients are held (more
            communication, less memory). The result is the same. Elsewhere the
            gradients are synchronised once per logical batch (``"once"``).

    Returns:
        An `AccumulateReport`.

    Raises:
        BatchError: for bad input (see `batchgrad._errors`). Every ``p.grad`` and
            every buffer is then exactly as before the call; under
            `torch.distributed`, on every rank, the message naming the rank.

    Example:
        >>> import torch, batchgrad as bg
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(10, 3), torch.randn(10, 1)
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return bg.Loss.from_criterion(torch.nn.MSELoss(), model(x), y)
        >>> report = bg.accumulate(model, loss_fn, (x, y), micro_batch_size=4)
        >>> report.micro_batches, report.count, report.micro_batch_counts
        (3, 10, (4, 4, 2))
    """
    settings = {
        "reduction": reduction,
        "existing_grad": existing_grad,
        "clip_per_sample": clip_per_sample,
        "noise_multiplier": noise_multiplier,
        "noise": type(noise).__name__ if isinstance(noise, NoiseScale) else noise,
        "accumulate_dtype": str(accumulate_dtype),
        # The scale itself: ranks that scale differently would sum different things.
        "scaler": scaler.get_scale()
        if isinstance(scaler, torch.amp.GradScaler)
        else type(scaler).__name__,
    }
    if dist.is_available() and dist.is_initialized() and is_sharded(model):
        return accumulate_sharded(
            model,
            loss_fn,
            batch,
            micro_batch_size,
            {**settings, "grad_sync": grad_sync, "group": group is not None},
        )
    if grad_sync not in GRAD_SYNCS:  # nothing to choose: synchronised once (or never)
        raise ConfigError(f"grad_sync must be one of {GRAD_SYNCS}, got {grad_sync!r}.")
    peer = replica(model, group)
    if peer is not None:
        return _data_parallel(
            peer,
            model,
            loss_fn,
            batch,
            micro_batch_size,
            settings,
            generator,
            noise,
            accumulate_dtype,
            scaler,
        )
    _check_settings(reduction, existing_grad, clip_per_sample, noise_multiplier, noise)
    check_accumulate_dtype(accumulate_dtype)
    check_scaler(scaler, clip_per_sample)
    sparse: list[nn.Module] = []
    params, buffers = trainable_and_buffers(model, sparse)
    refuse_sparse(model, sparse)
    stash = GradStash.take(params)  # put back unchanged whatever fails below
    try:
        if existing_grad == "error":
            _refuse_existing_grads(model, stash)
        parts, _ = _with_last(micro_batches(batch, micro_batch_size))
        running = RunningSum.of(params, accumulate_dtype)
        scaling = Scaling.of(scaler)
        if clip_per_sample is not None:
            done = _clipped_finish(
                model,
                loss_fn,
                parts,
                reduction,
                params,
                clip_per_sample,
                noise_multiplier,
                generator,
                running,
            )
        else:
            run = _Run(None, scaling, running)
            done = _local_finish(
                run, model, loss_fn, parts, batch, micro_batch_size, reduction, params, noise
            )
        if not math.isfinite(done.grad_norm) and not done.overflow:
            raise _non_finite_grad_error(model, loss_fn, batch, micro_batch_size, None)
    except BaseException:
        stash.put_back()
        buffers.put_back()
        raise
    exact = None if running is None else running.exact_sums()
    return _report(done, stash, existing_grad, reduction, noise, 1, exact, scaling)


def _report(
    done: _Pass,
    stash: GradStash,
    existing_grad: ExistingGrad,
    reduction: Reduction,
    noise: bool | NoiseScale,
    world_size: int,
    exact: dict[int, Tensor] | None = None,
    scaling: Scaling | None = None,
) -> AccumulateReport:
    """The report; ``exact``: the new gradients before their rounding into ``p.grad``
    (a wider running sum), by parameter id, for ``"add"`` to round once."""
    estimate = done.noise
    if estimate is not None and isinstance(noise, NoiseScale):
        noise.update(estimate)
        estimate = noise.estimate()
    if existing_grad == "add":
        grad_norm = _add_back(stash, exact)
        if scaling is not None:
            grad_norm /= scaling.scale
    else:
        _into_stashed(stash)
        grad_norm = done.grad_norm
    return AccumulateReport(
        loss=done.loss_sum / done.divisor,
        count=_as_number(done.count),
        micro_batches=done.micro_batches,
        grad_norm=grad_norm,
        reduction=reduction,
        micro_batch_counts=tuple(map(_as_number, done.unit_counts)),
        world_size=world_size,
        clipped=done.clipped,
        noise=estimate,
        overflow=done.overflow,
    )


def _check_settings(
    reduction: object,
    existing_grad: object,
    clip_per_sample: float | None,
    noise_multiplier: float | None,
    noise: object,
) -> None:
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if existing_grad not in _EXISTING_GRAD:
        raise ConfigError(f"existing_grad must be one of {_EXISTING_GRAD}, got {existing_grad!r}.")
    if noise is not False and not (noise is True or isinstance(noise, NoiseScale)):
        raise ConfigError(f"noise must be True, False or a bg.NoiseScale, got {noise!r}.")
    if clip_per_sample is not None:
        check_clipping(clip_per_sample, noise_multiplier)
        if noise is not False:
            raise ConfigError(
                "noise= is not supported together with clip_per_sample: the noise scale "
                "of clipped gradients is not the one of the objective. Measure it without "
                "clipping."
            )
    elif noise_multiplier is not None:
        raise ConfigError("noise_multiplier needs clip_per_sample: the noise is σ·C.")


@dataclass(slots=True)
class _Pass:
    """What the micro-batches of one call produced."""

    unit_counts: list[float]  # units in each of this process's micro-batches
    loss_sum: float  # Σ total over the whole logical batch (every rank)
    count: float  # N(B), over the whole logical batch (every rank)
    divisor: float  # N(B) under "mean", 1 under "sum"
    grad_norm: float  # of the gradient left in p.grad
    micro_batches: int  # over the whole logical batch (every rank)
    clipped: float | None = None  # the fraction of samples clipped, with clip_per_sample
    noise: NoiseEstimate | None = None  # this step's, with noise=
    overflow: bool = False  # with a scaler: a non-finite gradient


# ---- one process ---------------------------------------------------------------------


def _local_finish(
    run: _Run,
    model: nn.Module,
    loss_fn: LossFn,
    parts: Iterable[tuple[Batch, bool]],
    batch: Batch | Iterable[Batch],
    micro_batch_size: int | None,
    reduction: Reduction,
    params: list[nn.Parameter],
    noise: bool | NoiseScale,
) -> _Pass:
    """One process: run the micro-batches, then check the losses, the counts and the
    gradient norm (read together) and normalise.

    Every backward carries ``1 / N̂`` (see `_Presumption`): only a wrong presumption
    costs a pass over the gradients. This is the path of almost every call, kept flat:
    its cost is what `bg.accumulate` adds to the hand-written loop. With a running
    sum (`batchgrad._precision`), its parameters' ``p.grad`` are None until it is
    normalised and rounded into them at the end; with a scaler the gradients keep
    its scale.
    """
    presumption = _Presumption(batch, micro_batch_size) if reduction == "mean" else None
    run.presumption = presumption
    micro = _MicroBatchGrads(params, small_batches(noise)) if noise is not False else None
    _loop(run, model, loss_fn, parts, micro or _gradient)
    grads = _grads(params)  # with a running sum, the parameters outside it
    loss_sum, unit_counts, norms = _check_losses(run.totals, run.counts, _norms(grads))
    count = math.fsum(unit_counts)
    divisor = _divisor(count, reduction, f"its {len(unit_counts)} micro-batch(es)")
    grad_norm = math.hypot(*norms)
    presumed = 1.0 if presumption is None else presumption.divisor
    if presumed is not None and divisor != presumed:
        _normalise(grads, None, divisor, presumed)
        grad_norm = grad_norm * presumed / divisor
        if not math.isfinite(grad_norm):  # the sum may overflow where the mean does not
            grad_norm = _total_norm(grads)
    if run.running is not None:
        rounded = run.running.finish(carried(run.root, run.scaling) / divisor)
        grad_norm = math.hypot(grad_norm, _total_norm(rounded))
    if not math.isfinite(grad_norm):
        grad_norm = _widened_norm(grad_norm, _grads(params))
    overflow = False
    if run.scaling is not None:
        grad_norm /= run.scaling.scale
        overflow = not math.isfinite(grad_norm)
    estimate = None
    if micro is not None and len(micro.sizes) > 1 and not overflow:
        estimate = micro.estimate((grad_norm * divisor / sum(micro.sizes)) ** 2)
    return _Pass(
        unit_counts, loss_sum, count, divisor, grad_norm, len(unit_counts), None, estimate, overflow
    )


def _clipped_finish(
    model: nn.Module,
    loss_fn: LossFn,
    parts: Iterable[tuple[Batch, bool]],
    reduction: Reduction,
    params: list[nn.Parameter],
    max_norm: float,
    noise_multiplier: float | None,
    generator: torch.Generator | None,
    running: RunningSum | None,
) -> _Pass:
    """Sum each micro-batch's clipped per-sample gradients, add the noise, normalise
    (a running sum's parameters in its dtype, rounded once at the end)."""
    clipper = _Clipped(max_norm)
    run = _loop(_Run(None, None, running), model, loss_fn, parts, clipper)
    loss_sum, unit_counts, _ = _check_losses(run.totals, run.counts)
    count = math.fsum(unit_counts)
    divisor = _divisor(count, reduction, f"its {len(unit_counts)} micro-batch(es)")
    if noise_multiplier:
        _add_noise(params, noise_multiplier * max_norm, generator, running)
    _normalise(_grads(params), None, divisor)
    if running is not None:
        running.finish(1 / divisor)
    clipped, samples = clipper.clipped()
    grads = _grads(params)
    return _Pass(
        unit_counts,
        loss_sum,
        count,
        divisor,
        _widened_norm(_total_norm(grads), grads),
        len(unit_counts),
        clipped / samples if samples else None,
    )


# ---- several processes ---------------------------------------------------------------


def _data_parallel(
    peer: Replica,
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    micro_batch_size: int | None,
    settings: dict[str, Any],
    generator: torch.Generator | None,
    noise: bool | NoiseScale,
    accumulate_dtype: torch.dtype | None,
    scaler: torch.amp.GradScaler | None,
) -> AccumulateReport:
    """This rank's micro-batches, quietly; the agreement; one gradient sync.

    Whatever fails on this rank before the agreement is caught and reported there,
    so every rank raises it together (see `batchgrad._protocol`). Once the group
    has agreed on a layout and no comm hook is set, the agreement rides in the
    gradient all-reduce (`batchgrad._protocol.Fused`): one collective per call.
    """
    module = peer.module if peer.module is not None else model
    sparse: list[nn.Module] = []
    params, buffers = trainable_and_buffers(module, sparse)
    stash = GradStash.take(params)  # put back unchanged whatever fails below
    reduction: Reduction = settings["reduction"]
    existing_grad: ExistingGrad = settings["existing_grad"]
    max_norm: float | None = settings["clip_per_sample"]
    hook_name = None if peer.hook is None else getattr(peer.hook[0], "__qualname__", "a hook")
    settings = {**settings, "comm_hook": hook_name}
    layout_hash, entries = layout(module, params)
    mine = Local(settings, layout_hash, entries)
    agreed_layout = fused(peer.group)  # the same on every rank
    mine_fused: Fused | None = None  # this call's layout, if it can carry the agreement
    fits = False  # ... and it is the agreed one
    run = _Run(None)
    running: RunningSum | None = None
    exact: dict[int, Tensor] | None = None  # the new gradients before their rounding
    held: list[Tensor | None] | None = None
    flat_dtype: torch.dtype | None = None
    clipper: _Clipped | None = None
    unit_counts: list[float] = []
    flat: Tensor | None = None
    try:
        peer.prepare()  # collectives every rank runs, before anything can fail
        try:
            if peer.problem is not None:
                raise peer.problem
            _check_settings(reduction, existing_grad, max_norm, settings["noise_multiplier"], noise)
            check_accumulate_dtype(accumulate_dtype)
            check_scaler(scaler, max_norm)
            refuse_sparse(module, sparse)
            running = RunningSum.of(params, accumulate_dtype)
            if running is not None:
                flat_dtype = running.flat_dtype(params)
            run.running, run.scaling = running, Scaling.of(scaler)
            if running is None and peer.hook is None:
                # A running sum in another dtype cannot ride in the parameters' buffer.
                # Whether there is one follows from the settings and the layout, which
                # the ranks agree on, so every rank that gets this far decides alike.
                mine_fused = fusable(params, layout_hash)
            fits = agreed_layout is not None and agreed_layout.same_layout(mine_fused)
            if existing_grad == "error":
                _refuse_existing_grads(module, stash)
            parts, works = _with_last(micro_batches(batch, micro_batch_size, allow_empty=True))
            contribute: _Contribution = _counted_gradient if noise is not False else _gradient
            if max_norm is not None:
                contribute = clipper = _Clipped(max_norm)
            elif reduction == "mean":
                run.presumption = _Presumption(batch, micro_batch_size, alone=False)
                # A hook averages over the ranks: presume this rank's share of N(B).
                run.presumption.ranks = 1 if peer.hook is not None else peer.world_size
                if fits:  # the gradients are summed before any rank can rescale its own
                    run.presumption.known = agreed_layout.divisor  # type: ignore[union-attr]
            with peer.quiet():
                _loop(run, model, loss_fn, parts, contribute)
            mine.works = works
            held = None if running is None else running.held(params)
            if run.totals:
                grads = _grads(params) if held is None else [g for g in held if g is not None]
                extra = _norms(grads) if noise is not False else ()
                loss_sum, unit_counts, norms = _check_losses(run.totals, run.counts, extra)
                mine.loss_sum, mine.count = loss_sum, math.fsum(unit_counts)
                mine.micro_batches = len(unit_counts)
                mine.unused = len(grads) < len(params)
                if run.samples:
                    presumed = _carried(run) / (run.scaling.scale if run.scaling else 1.0)
                    mine.sq_norm = (math.hypot(*norms) * presumed / run.samples) ** 2
                    mine.samples = run.samples
                if clipper is not None:
                    mine.clipped, mine.clip_samples = clipper.clipped()
            if max_norm is not None and settings["noise_multiplier"] and peer.rank == 0:
                # Drawn once, on rank 0 (before the agreement, so that a bad generator
                # fails where every rank hears of it): the sum carries it to every rank.
                _add_noise(params, settings["noise_multiplier"] * max_norm, generator, running)
            if fits:
                assert agreed_layout is not None
                flat = peer.pack(params, agreed_layout.size(peer.world_size), agreed_layout.dtype)
            else:
                flat = peer.flatten(params, held, flat_dtype)
        except BaseException as error:  # reported to every rank below, so none waits
            mine.failure = error
            mine.failed_at = None if run.done or run.index < 0 else run.index
        in_sum = None
        if agreed_layout is not None:
            if not fits or flat is None or mine.failure is not None:
                # Zeros of the agreed size: the other ranks' buffers are that size.
                send = torch.zeros(
                    agreed_layout.size(peer.world_size),
                    dtype=agreed_layout.dtype,
                    device=peer.device,
                )
            else:
                send = flat
            in_sum = agree_in_sum(
                peer.group,
                peer.rank,
                peer.world_size,
                send,
                agreed_layout,
                mine,
                not fits and mine.failure is None,  # a failure is raised by every rank anyway
                _carried(run),
            )
            if in_sum is None:  # some rank's layout changed: agree apart, as on a first call
                remember(peer.group, None)
                if fits and mine.failure is None:
                    try:  # the fused buffer was summed: flatten the gradients again
                        flat = peer.flatten(params, held, flat_dtype)
                    except BaseException as error:
                        mine.failure, mine.failed_at = error, None
        if in_sum is None:
            agreed = agree(peer.group, peer.rank, peer.world_size, peer.device, mine)
        else:
            agreed, presumptions = in_sum
        if len(agreed.idle) == peer.world_size:
            raise EmptyBatchError(
                f"Every one of the {peer.world_size} ranks has an empty batch; there is no "
                f"gradient to compute. Check the distributed sampler and the data loader."
            )
        divisor = _divisor(agreed.count, reduction, f"all {peer.world_size} ranks")
        # A DDP comm hook averages over the ranks: divide by N(B) / world_size then.
        averaged = divisor / peer.world_size if peer.hook is not None else divisor
        presumed = _carried(run)
        assert flat is not None
        if in_sum is not None:
            assert agreed_layout is not None
            if len(set(presumptions)) > 1:  # the same settings presume alike: cannot be
                raise DistributedError(
                    f"The ranks' gradients carry different divisors ({presumptions}); "
                    f"this is a bug in batchgrad, please report it."
                )
            numel = agreed_layout.numel
            _normalise([flat[:numel]], None, averaged, presumptions[0] if presumptions else 1.0)
            used = flat[numel : numel + agreed_layout.params].gt(0).tolist()
            grads = unpack(params, flat, used)
            agreed_layout.divisor = averaged
        else:
            noised = max_norm is not None and bool(settings["noise_multiplier"])
            grads, summed = peer.sync_grads(
                params,
                flat,
                lambda sums: _normalise([sums], None, averaged, presumed),
                agreed.some_unused and not noised,
            )
            if running is not None and existing_grad == "add":
                exact = wide_sums(params, summed)
            if mine_fused is not None:  # no hook on any rank: the settings agreed
                mine_fused.divisor = averaged
                remember(peer.group, mine_fused)
        grad_norm = _widened_norm(_total_norm(grads), grads)
        overflow = False
        if run.scaling is not None:
            # The same summed gradient on every rank: all see the overflow together.
            grad_norm /= run.scaling.scale
            overflow = not math.isfinite(grad_norm)
        if not math.isfinite(grad_norm) and not overflow:
            raise _non_finite_grad_error(module, loss_fn, batch, micro_batch_size, peer)
    except BaseException:
        stash.put_back()
        buffers.put_back()
        raise
    estimate = None
    if noise is not False and len(agreed.samples) > 1 and not overflow:
        big = sum(agreed.samples)
        means = agreed.sq_norms
        estimate = noise_estimate(means, agreed.samples, (grad_norm * divisor / big) ** 2, big)
    done = _Pass(
        unit_counts,
        agreed.loss_sum,
        agreed.count,
        divisor,
        grad_norm,
        agreed.micro_batches,
        agreed.clipped,
        estimate,
        overflow,
    )
    return _report(
        done, stash, existing_grad, reduction, noise, peer.world_size, exact, run.scaling
    )


def _carried(run: _Run) -> float:
    """The divisor this rank's gradients carry, with the scale factored out: the
    presumed one, or, with a running sum, the one its root was rounded to."""
    if run.running is None:
        return _presumed(run.presumption)
    return carried(run.root, run.scaling)


def _divisor(count: float, reduction: Reduction, where: str) -> float:
    """``N(B)`` under ``"mean"``, 1 under ``"sum"``; ``where`` names the batch's parts."""
    if reduction == "sum":
        return 1.0
    if count == 0:
        raise ZeroCountError(
            f"The logical batch has 0 units over {where} (e.g. every token is padding "
            f"or ignore_index), so its mean loss is undefined. Skip such batches, or use "
            f"reduction='sum'."
        )
    return float(count)


def _normalise(
    grads: list[Tensor], last: Tensor | None, divisor: float, presumed: float | None = 1.0
) -> None:
    """The one place where gradients are divided by ``N(B)``.

    Called once ``N(B)`` is known: divides, in place, the gradient sums accumulated
    so far, already divided by ``presumed`` (see `_Presumption`; None: by ``N(B)``),
    by the rest of ``N(B)`` (nothing after a right presumption), then backpropagates
    the last micro-batch's ``total / N(B)``, which autograd adds in.
    `batchgrad.bptt` and its relatives divide their sums here too.
    """
    if presumed is not None and divisor != presumed and grads:
        torch._foreach_div_(grads, divisor / presumed)
    if last is not None:
        _backward(last, torch.full_like(last, 1 / divisor))


def _non_finite_grad_error(
    model: nn.Module,
    loss_fn: LossFn,
    batch: object,
    micro_batch_size: int | None,
    peer: Replica | None,
) -> NonFiniteError:
    """Name the parameters with non-finite gradients and, by replaying, the micro-batch.

    Under data parallelism every rank sees the same summed gradient; each replays
    its own micro-batches (no collective), and the ranks that find one are named.
    The replay draws fresh random numbers (dropout masks) and then puts the random
    state back: remembering the state before every call would cost each call more
    than this rare error is worth.
    """
    names = {p: name for name, p in model.named_parameters()}
    params = [p for p in names if p.requires_grad]
    bad_names = _non_finite(params, names)
    where = None
    if is_structured(batch):
        rng = RngSnapshot.take()
        try:
            for index, micro_batch in enumerate(
                micro_batches(batch, micro_batch_size, allow_empty=True)
            ):
                for p in params:
                    p.grad = None
                loss_fn(model, micro_batch).total.backward()
                replayed = _non_finite(params, names)
                if replayed:
                    where, bad_names = f"micro-batch {index}", replayed
                    break
        except Exception:  # a replay that fails only loses the "where"
            where = None  # (and under torch.distributed must not skip the gathering below)
        finally:
            rng.put_back()
    shown = f"{', '.join(bad_names[:3])}{', ...' if len(bad_names) > 3 else ''}"
    advice = (
        "although every loss was finite. Look for operations with infinite derivatives at "
        "the values reached (sqrt or norm at 0, log near 0), or run that micro-batch under "
        "torch.autograd.detect_anomaly() to find the operation."
    )
    if where is None:
        where = (
            "a micro-batch that did not fail again when replayed alone with fresh random numbers"
            if is_structured(batch)
            else "an unknown micro-batch (ready-made micro-batches cannot be replayed)"
        )
    elif peer is not None:
        peer.raise_failures(
            NonFiniteError(f"The gradient of {shown} is NaN or infinite in {where}, {advice}")
        )
    if peer is not None:
        peer.raise_failures(None)  # this rank found none: learn which rank did
    return NonFiniteError(
        f"The gradient of {shown} is NaN or infinite (first seen in {where}), {advice}"
    )


def _non_finite(params: list[nn.Parameter], names: dict[nn.Parameter, str]) -> list[str]:
    return [names[p] for p in params if p.grad is not None and not p.grad.isfinite().all()]
