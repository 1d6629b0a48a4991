"""Per-sample gradients, their norms, and per-sample clipping.

The gradient of a batch's ``total`` is the sum of the gradients of its samples'
own totals (a sample may hold many units, e.g. tokens); under ``"mean"`` it is that
sum divided by ``N(B)``. batchgrad gets each sample's gradient from one forward
and one backward, without the parameters' own gradients:

1. the forward is traced (`batchgrad._per_sample_trace`, driven by
   `batchgrad._per_sample_plan`): every use of a trainable
   parameter by a torch function, wherever it happens (inside its module, in another
   module, in the loss function), with the dimension that holds the samples in each
   of its inputs and outputs, read from how shapes follow the number of rows (a
   second forward on a few rows of the batch), never from a size that happens to
   equal the batch size;
2. one ``autograd.grad`` call returns the gradient of the batch's total reaching
   each use's output; row ``i`` of it is sample ``i``'s own;
3. a rule per use forms each sample's gradient (`batchgrad._per_sample_rules`, the
   generic `_per_sample_vmap` and the module rules of `_per_sample_modules`); a
   parameter some use of which no rule can read is handled by the innermost module
   call enclosing all its uses, by ``torch.func.vmap`` over that call's samples.
   Every parameter is counted once per use, however many modules register it.

Norms use the Goodfellow / ghost-norm identities where they are cheaper than the
gradients (`nn.Linear`, Hugging Face's ``Conv1D``, `nn.Embedding`, convolutions on
unfolded patches when their Gram matrices are smaller than the per-sample kernels):
``‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)``; a convolution's per-sample gradients
otherwise, formed for its norms and kept for the clipped sum where they are no larger
than its output gradient (dropped otherwise). Clipping weighs each sample's output
gradients by ``min(1, C / ‖g_i‖)`` and forms the weighted sum per use directly (one
matrix product, as a plain backward does) where the rule allows (`nn.Linear`,
``Conv1D``, convolutions, `nn.Embedding`); other rules form their per-sample gradients.

**The guard** (`batchgrad._per_sample_guard`): every path from the loss to a parameter must run
through a use its rules read (a walk over the autograd graph before the backward, in
which each such use leads only to its data inputs); where one does not (a use the
trace did not see), and for parameters of the generic and user-registered rules, the
per-sample gradients must add up to the batch gradient from the same backward; and,
when the forward drew no random numbers, one sample's gradient (the last) must equal
the gradient of a forward and backward on that sample alone. Any disagreement beyond
rounding raises `PerSampleError` naming the parameter, so a pattern no rule
anticipated raises instead of returning wrong numbers. The built-in layer rules'
sums need no comparison: for the inputs and output gradients they read, their sum is
the batch gradient's own formula; so on models they cover the guard costs the walk
and the single-sample step, no weight gradient. (`batchgrad.check` compares every
parameter's sum.)

When it runs: ``verify=True`` on every micro-batch of every call; ``verify=False``
never; by default (``verify=None``) on the first micro-batch of each *signature* until
it passes there, the signature being what the probe's cached shapes are kept by (the
batch's structure and tensor shapes, dtypes and devices; every module and its training
mode; the trainable parameters; the loss function; the grad mode), together with the
task (gradients, norms, clipping), the registered rules and whether the forward drew
random numbers. A signature whose guard raised is checked again on its next call. What
the guard checks is a property of the computation, which for one signature is the same
on every call: the same functions use the same parameters in the same order (the real
forward is checked against the probe on every call and probed afresh, so guarded
afresh, where it is not). So the default catches on the first call of a signature all
that ``verify=True`` catches there. It does not protect against what changes between
calls of one signature without changing that sequence: a branch on the data's values
around operations without parameters (a layer that mixes samples, or a use the trace
cannot see, only for some batches), a registered rule wrong only for some values, code
changed between calls (a forward hook added, a method replaced). Pass
``verify=True`` where such code may run, as `batchgrad.check` does.

Modules that mix samples (BatchNorm in training mode) have no per-sample gradients
and are refused.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from ._errors import ConfigError, NonFiniteError
from ._loss import Loss, LossFn
from ._per_sample_guard import (
    check_sample_grads,
    check_sample_norm,
    checked_params,
    guard_passed,
    guarding,
    verify_sums,
)
from ._per_sample_plan import backward, trace
from ._per_sample_rules import Unit
from ._split import Batch, check_micro_batch_size, micro_batches


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    *,
    micro_batch_size: int | None = None,
    verify: bool | None = None,
) -> dict[str, Tensor]:
    """The gradient of each sample's own ``total``, per parameter: ``[B, *p.shape]``.

    Summed over samples they give the gradient of the batch's ``total`` (the
    ``"sum"`` loss); divided by ``N(B)`` as well, the gradient of the ``"mean"``
    loss. ``p.grad`` is not touched. Frozen parameters are left out; parameters the
    loss does not reach get zeros.

    Dropout is allowed anywhere: each sample's gradient is that of the masks drawn in
    this forward. Modules that mix samples (BatchNorm in training mode) are refused.

    Args:
        verify: the guard (see the module's documentation): a micro-batch's result
            checked for uses no rule read (against its batch gradient where one may be)
            and, when its forward draws no random numbers, one sample against a forward
            and backward on that sample alone; costs about a walk over the autograd
            graph and a one-sample step. ``True``: every micro-batch; ``False``: never;
            ``None`` (default): the first micro-batch of each batch signature (shapes,
            model, loss function), until it has passed there.

    Raises:
        PerSampleError: a use of a parameter has no exact rule, or ``verify`` found the
            result inconsistent. ConfigError: a layer that couples samples.

    Example:
        >>> import torch, batchgrad as bg
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return bg.Loss.from_criterion(torch.nn.CrossEntropyLoss(), model(x), y)
        >>> grads = bg.per_sample_grads(model, loss_fn, (x, y), micro_batch_size=2)
        >>> grads["weight"].shape
        torch.Size([5, 2, 3])
    """
    return _per_sample_grads(model, loss_fn, batch, micro_batch_size, verify, thorough=False)


def _per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    micro_batch_size: int | None,
    verify: bool | None,
    thorough: bool,
) -> dict[str, Tensor]:
    """`per_sample_grads`; ``thorough``: the guard compares every parameter's per-sample
    sum with its batch gradient, not only those `sum_checked` picks (`batchgrad.check`)."""
    check_micro_batch_size(micro_batch_size)
    named = _trainable(model)
    trainable = [p for _, p in named]
    parts: dict[nn.Parameter, list[Tensor]] = {p: [] for p in trainable}
    for index, micro_batch in enumerate(micro_batches(batch, micro_batch_size)):
        traced, units = trace(model, loss_fn, micro_batch, index)
        size = traced.tracer.rows
        guard = guarding(traced, verify, "grads")
        checked = checked_params(traced, units, trainable, guard, thorough)
        batch_grads = backward(traced, units, checked)
        found: dict[nn.Parameter, Tensor] = {}
        with torch.no_grad():
            for unit in units:
                for p, grad in unit.per_sample().items():
                    found[p] = found[p] + grad if p in found else grad
        complete = {p: found[p] if p in found else p.new_zeros(size, *p.shape) for p in trainable}
        if guard:
            with torch.no_grad():  # Σ_i ‖g_i‖, estimated from the last sample's
                last = sum(float(g[size - 1].norm()) for g in complete.values())
            verify_sums(units, batch_grads, traced, index, size * last)
            if not traced.random and trainable:
                check_sample_grads(model, loss_fn, micro_batch, traced, index, complete)
            guard_passed(traced, "grads")
        for p in trainable:
            parts[p].append(complete[p])
    return {name: parts[p][0] if len(parts[p]) == 1 else torch.cat(parts[p]) for name, p in named}


def per_sample_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    *,
    micro_batch_size: int | None = None,
    verify: bool | None = None,
) -> Tensor:
    """``[B]``: the L2 norm of each sample's gradient over all trainable parameters.

    Equal to the norms of `per_sample_grads`, but `nn.Linear`, Hugging Face ``Conv1D``
    and `nn.Embedding` layers used once (and convolutions with few output positions)
    use the Goodfellow
    and ghost-norm identities, so their per-sample gradients are never formed.
    ``verify`` as in `per_sample_grads` (the sum is checked through the per-use
    weighted sums, one sample through its norm; a signature guarded for gradients is
    guarded again for norms).
    """
    return _per_sample_norms(model, loss_fn, batch, micro_batch_size, verify, thorough=False)


def _per_sample_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    micro_batch_size: int | None,
    verify: bool | None,
    thorough: bool,
) -> Tensor:
    """`per_sample_norms`; ``thorough`` as in `_per_sample_grads`."""
    check_micro_batch_size(micro_batch_size)
    trainable = [p for _, p in _trainable(model)]
    norms = []
    for index, micro_batch in enumerate(micro_batches(batch, micro_batch_size)):
        traced, units = trace(model, loss_fn, micro_batch, index)
        guard = guarding(traced, verify, "norms")
        batch_grads = backward(
            traced, units, checked_params(traced, units, trainable, guard, thorough)
        )
        with torch.no_grad():
            norm = _sq_norms(units, traced.tracer.rows).sqrt()
        if guard:
            verify_sums(units, batch_grads, traced, index, float(norm.sum()))
            if not traced.random and trainable:
                row = traced.tracer.rows - 1
                check_sample_norm(model, loss_fn, micro_batch, traced, index, norm[row], trainable)
            guard_passed(traced, "norms")
        norms.append(norm)
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def _sq_norms(units: list[Unit], size: int) -> Tensor:
    """Per-sample squared norms; a parameter used by several units is formed whole."""
    uses: dict[nn.Parameter, int] = {}
    for unit in units:
        for p in unit.params:
            uses[p] = uses.get(p, 0) + 1
    shared = {p for p, n in uses.items() if n > 1}
    total: Tensor | None = None
    summed: dict[nn.Parameter, Tensor] = {}
    for unit in units:
        if any(p in shared for p in unit.params):
            for p, grad in unit.per_sample().items():
                summed[p] = summed[p] + grad if p in summed else grad
            continue
        sq = unit.sq_norms()
        total = sq if total is None else total + sq.to(total.dtype)
    for grad in summed.values():
        sq = grad.flatten(1).pow(2).sum(1)
        total = sq if total is None else total + sq.to(total.dtype)
    return total if total is not None else torch.zeros(size)


def clipped_sum(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    index: int,
    max_norm: float,
    verify: bool | None = None,
) -> tuple[Loss, Tensor]:
    """Add ``Σ_i min(1, C/‖g_i‖) g_i`` of one micro-batch into ``p.grad``.

    Returns the micro-batch's `Loss` (detached) and each sample's clipping factor
    ``min(1, C / (‖g_i‖ + 1e-6))`` (the small constant, as Opacus uses, keeps a zero
    gradient from dividing by 0). The weighted sum is formed per use from the
    recorded activations and output gradients, so no per-sample gradient is kept
    (but for rules that form them: the generic ones, and a parameter used twice).
    ``verify`` as in `per_sample_norms`: the guard of `per_sample_norms` on this
    micro-batch, by default unless it passed on a clipped micro-batch of the same
    signature.
    """
    trainable = [p for _, p in _trainable(model)]
    traced, units = trace(model, loss_fn, micro_batch, index)
    check = guarding(traced, verify, "clipped")
    size = traced.tracer.rows
    batch_grads = backward(traced, units, checked_params(traced, units, trainable, check, False))
    with torch.no_grad():
        norms = _sq_norms(units, size).sqrt()
    if not bool(torch.isfinite(norms).all()):
        bad = int((~torch.isfinite(norms)).nonzero()[0])
        raise NonFiniteError(
            f"The gradient of sample {bad} in micro-batch {index} is NaN or infinite, so it "
            f"cannot be clipped. Look at that sample's data and at the loss for it."
        )
    if check:
        verify_sums(units, batch_grads, traced, index, float(norms.sum()))
        if not traced.random and trainable:
            check_sample_norm(
                model, loss_fn, micro_batch, traced, index, norms[size - 1], trainable
            )
        guard_passed(traced, "clipped")
    weights = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for unit in units:
            for p, grad in unit.weighted(weights).items():
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.add_(grad)
    loss = traced.loss
    return Loss(loss.total.detach(), loss.count), weights


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def check_clipping(max_norm: object, noise_multiplier: object) -> None:
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, int | float)
        or not max_norm > 0
        or math.isinf(max_norm)
    ):
        raise ConfigError(
            f"clip_per_sample must be a positive finite number (the norm C), got {max_norm!r}."
        )
    if noise_multiplier is not None and (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, int | float)
        or noise_multiplier < 0
    ):
        raise ConfigError(
            f"noise_multiplier must be a number >= 0 (σ; the noise's std is σ·C), got "
            f"{noise_multiplier!r}."
        )
