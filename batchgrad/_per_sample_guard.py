"""The per-sample guard: what checks that the per-sample gradients are the batch's.

See `batchgrad._per_sample` for what it checks and when it runs: paths from the loss
that bypass every use a rule reads (`sum_checked`), the per-sample sums against the
batch gradient (`verify_sums`), one sample against a forward and backward on it alone
(`check_sample_grads`, `check_sample_norm`), once per signature by default (`guarding`).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ._errors import PerSampleError
from ._loss import LossFn, unpack_loss
from ._per_sample_modules import KnownModule, rules_generation
from ._per_sample_plan import Traced
from ._per_sample_rules import RULES, Unit
from ._split import Batch, slice_batch

_EXACT: tuple[type[Unit], ...] = (*RULES.values(), KnownModule)
"""The built-in layer rules: for the inputs and output gradients they read, their sum over
samples is the batch gradient's own formula (one matrix product, one scatter), so what
the guard must establish for them is only that no other path reaches the parameter."""


def sum_checked(
    traced: Traced, units: list[Unit], params: list[nn.Parameter]
) -> list[nn.Parameter]:
    """The parameters whose per-sample sum the guard compares with the batch gradient:
    those with a generic or user-registered rule, those with no rule at all, and those
    that the loss reaches by a path through no use a built-in rule reads (a use the
    trace did not see). Found by a walk over the autograd graph before the backward,
    in which the output of every use a built-in rule reads leads only to that use's
    data inputs; a parameter reached there has such a path. Call before `backward`
    (which lets go of the rules' outputs)."""
    exact: set[nn.Parameter] = set()
    others: set[nn.Parameter] = set()
    cuts: dict[Any, list[Any]] = {}
    for unit in units:
        if not isinstance(unit, _EXACT):
            others.update(unit.params)
            continue
        exact.update(unit.params)
        ids = {id(p) for p in unit.params}
        onward = [
            get_gradient_edge(t).node
            for t in unit.site.inputs
            if isinstance(t, Tensor) and t.requires_grad and id(t) not in ids
        ]
        for t in unit.outputs():
            cuts.setdefault(get_gradient_edge(t).node, []).extend(onward)
    watched = {id(p): p for p in exact - others}
    total = traced.loss.total
    reached: set[nn.Parameter] = set()
    if watched and total.grad_fn is not None:
        seen: set[Any] = set()
        stack: list[Any] = [total.grad_fn]
        while stack:
            node = stack.pop()
            if node is None or node in seen:
                continue
            seen.add(node)
            variable = getattr(node, "variable", None)  # an AccumulateGrad node
            if variable is not None:
                if id(variable) in watched:
                    reached.add(watched[id(variable)])
                continue
            cut = cuts.get(node)
            stack.extend(cut if cut is not None else [n for n, _ in node.next_functions])
    return [p for p in params if p not in exact or p in others or p in reached]


def guarding(traced: Traced, verify: bool | None, task: str) -> bool:
    """Whether the guard runs on this micro-batch: always (``True``), never (``False``),
    or (``None``, the default) unless it already passed on a micro-batch of the same
    signature (the probe's key: the batch's structure and shapes, the modules and their
    modes, the trainable parameters, the loss function, the grad mode), for the same
    task, the same rules registered and a forward that drew random numbers or not
    alike."""
    if verify is not None:
        return verify
    return _guard_key(traced, task) not in traced.probe.guarded


def _guard_key(traced: Traced, task: str) -> tuple[str, int, bool]:
    return (task, rules_generation(), traced.random)


def guard_passed(traced: Traced, task: str) -> None:
    traced.probe.guarded.add(_guard_key(traced, task))


def checked_params(
    traced: Traced, units: list[Unit], params: list[nn.Parameter], verify: bool, thorough: bool
) -> list[nn.Parameter]:
    """The parameters whose batch gradient the backward forms for the guard."""
    if not verify:
        return []
    return list(params) if thorough else sum_checked(traced, units, params)


def _tolerance(dtype: torch.dtype) -> float:
    """Far above rounding, far below any real error: ``√ε`` of the dtype."""
    return float(torch.finfo(dtype).eps) ** 0.5 if dtype.is_floating_point else 1e-6


def _check_sums(
    stats: dict[nn.Parameter, tuple[float, float, float]],
    traced: Traced,
    index: int,
    scale: float,
) -> None:
    """``Σ_i g_i = ∇ total`` per parameter (``stats``: the error, ``‖∇ total‖`` and
    ``‖Σ_i g_i‖`` or a bound on it), to ``√ε`` of their norms; below ``64 ε`` of the
    whole gradient's size a difference is rounding (a gradient that is 0 in exact
    arithmetic, as a key bias before softmax, is rounding noise both ways)."""
    whole = scale + sum(w + g for _, w, g in stats.values())
    for p, (error, want_norm, got_norm) in stats.items():
        eps = float(torch.finfo(p.dtype).eps) if p.dtype.is_floating_point else 1e-12
        bound = _tolerance(p.dtype) * (want_norm + got_norm) + 64 * eps * whole
        if not error <= bound:
            raise PerSampleError(
                f"The per-sample gradients of parameter {traced.names.get(p, '?')!r} in "
                f"micro-batch {index} do not add up to its batch gradient (error "
                f"{error:.3g} against a norm of {want_norm:.3g}): some use of it has no "
                f"exact per-sample rule. Register one (batchgrad.register_per_sample_rule) "
                f"for the layer that uses it."
            )


def _single_sample(
    model: nn.Module, loss_fn: LossFn, micro_batch: Batch, row: int, params: list[nn.Parameter]
) -> list[Tensor]:
    """The gradient of one sample's total from a forward on that sample alone."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    try:
        loss = loss_fn(model, slice_batch(micro_batch, row, row + 1))
        total, _ = unpack_loss(loss, 0)
        if not total.requires_grad:
            return [torch.zeros_like(p) for p in params]
        grads = torch.autograd.grad(total, params, allow_unused=True)
    finally:
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _disagrees(what: str, traced: Traced, index: int, row: int) -> PerSampleError:
    return PerSampleError(
        f"The per-sample gradient of sample {row} in micro-batch {index} ({what}) differs "
        f"from the gradient of a forward and backward on that sample alone: some layer "
        f"lets samples interact (a batch statistic, a reshape across samples) or has no "
        f"exact per-sample rule. Find it by bisecting the model, or register a rule "
        f"(batchgrad.register_per_sample_rule)."
    )


def check_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    traced: Traced,
    index: int,
    found: dict[nn.Parameter, Tensor],
) -> None:
    params = list(found)
    row = traced.tracer.rows - 1
    reference = _single_sample(model, loss_fn, micro_batch, row, params)
    whole = sum(float(g.norm()) for g in reference)
    for p, expected in zip(params, reference, strict=True):
        got = found[p][row].to(expected.dtype)
        error = float((got - expected).norm())
        eps = float(torch.finfo(p.dtype).eps) if p.dtype.is_floating_point else 1e-12
        bound = _tolerance(p.dtype) * float(expected.norm() + got.norm()) + 64 * eps * whole
        if not error <= bound:
            raise _disagrees(f"parameter {traced.names.get(p, '?')!r}", traced, index, row)


def _single_sample_sq_norm(
    model: nn.Module, loss_fn: LossFn, micro_batch: Batch, row: int, params: list[nn.Parameter]
) -> Tensor:
    """``‖∇ total_row‖²`` from a forward and backward on that sample alone, each
    parameter's gradient reduced to its squared norm as soon as it is formed (a hook
    that hands autograd a zero-size stand-in), so at most one is held. ``autograd.grad``,
    not ``backward``: ``p.grad`` and the hooks that run after accumulation are not
    touched."""
    buffers = [(b, b.clone()) for b in model.buffers()]
    squares: list[Tensor] = []

    def take(grad: Tensor) -> Tensor:
        flat = grad.reshape(-1)  # no copy of the gradient, in its own dtype
        squares.append(flat.dot(flat).double())
        return grad.new_zeros(()).expand(grad.shape)

    handles = [p.register_hook(take) for p in params]
    try:
        loss = loss_fn(model, slice_batch(micro_batch, row, row + 1))
        total, _ = unpack_loss(loss, 0)
        if total.requires_grad:
            torch.autograd.grad(total, params, allow_unused=True)
    finally:
        for handle in handles:
            handle.remove()
        with torch.no_grad():
            for buffer, kept in buffers:
                buffer.copy_(kept)
    return torch.stack(squares).sum() if squares else torch.zeros((), dtype=torch.float64)


def check_sample_norm(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    traced: Traced,
    index: int,
    norm: Tensor,
    params: list[nn.Parameter],
) -> None:
    row = traced.tracer.rows - 1
    expected = _single_sample_sq_norm(model, loss_fn, micro_batch, row, params).sqrt()
    got = norm.double()
    dtype = params[0].dtype if params else torch.float64
    if not float((got - expected).abs()) <= _tolerance(dtype) * float(expected + got) + 1e-30:
        raise _disagrees("its norm", traced, index, row)


def verify_sums(
    units: list[Unit],
    batch_grads: dict[nn.Parameter, Tensor | None],
    traced: Traced,
    index: int,
    scale: float,
) -> None:
    """The sums half of the guard, for the parameters in ``batch_grads`` (those
    `sum_checked` picked): ``Σ_i g_i``, formed by each rule as its weighted sum with all
    weights 1, against the batch gradient. ``scale``: about ``Σ_i ‖g_i‖`` over all
    parameters, the size below which a difference is rounding.

    The guard holds no second copy of the gradients: a parameter with one use has its
    sum subtracted in place from its batch gradient (`Unit.subtract_sum`, which for
    `nn.Linear` writes the product straight into it); one with several uses is summed
    and compared after its last; ``batch_grads`` is emptied on the way, only three
    numbers per parameter kept until the verdict (`_check_sums`)."""
    checked = set(batch_grads)
    left: dict[nn.Parameter, int] = {}
    for unit in units:
        for p in unit.params:
            left[p] = left.get(p, 0) + 1
    alone = {p for p, n in left.items() if n == 1}
    stats: dict[nn.Parameter, tuple[float, float, float]] = {}
    partial: dict[nn.Parameter, Tensor] = {}

    def compare(p: nn.Parameter, got: Tensor) -> None:
        want = batch_grads.pop(p, None)
        got_norm = float(got.norm())
        if want is None:  # the loss does not reach it: every sample's gradient is 0
            stats[p] = (got_norm, 0.0, got_norm)
            return
        want_norm = float(want.norm())
        stats[p] = (float(want.sub_(got.to(want.dtype)).norm()), want_norm, got_norm)

    with torch.no_grad():
        for unit in units:
            if not any(p in checked for p in unit.params):
                continue
            targets: dict[nn.Parameter, Tensor] = {}
            for p in unit.params:
                want = batch_grads.get(p) if p in alone else None
                if want is not None:
                    targets[p] = want
            if targets and len(targets) == len(unit.params):
                for p in targets:
                    del batch_grads[p]
                norms = {p: float(t.norm()) for p, t in targets.items()}
                unit.subtract_sum(targets)  # now each holds ∇ total - Σ_i g_i
                for p, t in targets.items():
                    error = float(t.norm())
                    stats[p] = (error, norms[p], norms[p] + error)  # ‖Σ g_i‖ ≤ ‖∇‖ + error
                del targets
                continue
            ones = torch.ones(traced.tracer.rows, dtype=torch.float64)
            for p, g in unit.weighted(ones).items():
                if p not in checked:
                    continue
                g = partial.pop(p) + g if p in partial else g
                left[p] = left.get(p, 1) - 1
                if left[p] > 0:
                    partial[p] = g
                else:
                    compare(p, g)
        for p, g in partial.items():  # a rule that did not return a parameter it listed
            compare(p, g)
        for p in list(batch_grads):  # parameters no rule reached: per-sample gradients 0
            want = batch_grads.pop(p)
            norm = 0.0 if want is None else float(want.norm())
            stats[p] = (norm, norm, 0.0)
    _check_sums(stats, traced, index, scale)
