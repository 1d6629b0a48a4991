"""Per-sample gradients, their norms, and per-sample clipping.

The gradient of a batch's ``total`` is the sum of the gradients of its samples'
own totals (a sample may hold many units, e.g. tokens); under ``"mean"`` it is that
sum divided by ``N(B)``. batchgrad gets each sample's gradient from one forward
and one backward, without the parameters' own gradients:

1. the forward is traced (`batchgrad._per_sample_trace`): every use of a trainable
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

**The guard**: every path from the loss to a parameter must run
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
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ._errors import BatchError, ConfigError, NonFiniteError, PerSampleError
from ._loss import Loss, LossFn, unpack_loss
from ._per_sample_modules import (
    KnownModule,
    UserModule,
    known_rule,
    known_unit,
    rules_generation,
    user_rule,
)
from ._per_sample_rules import RULES, OpRule, Unit
from ._per_sample_trace import (
    Diverged,
    ModuleCall,
    OpCall,
    Probe,
    Tracer,
    cached_probe,
    forget_probe,
    probe_key,
    remember_probe,
    rng_states,
)
from ._per_sample_vmap import VmapModule, VmapOp
from ._split import (
    Batch,
    _map_leaves,
    batch_length,
    check_micro_batch_size,
    micro_batches,
    slice_batch,
)

# -- tracing one micro-batch ----------------------------------------------------------


@dataclass
class _Traced:
    tracer: Tracer
    loss: Loss
    random: bool  # the forward drew random numbers (dropout): no single-sample check
    names: dict[nn.Parameter, str]
    probe: Probe  # the signature's probe, which keeps what the guard found consistent


def _devices(model: nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def _trace(
    model: nn.Module, loss_fn: LossFn, micro_batch: Batch, index: int
) -> tuple[_Traced, list[Unit]]:
    """The probe forward (a few rows), then the real forward, both traced, and the plan.

    The probe's shapes are kept per model and batch signature (`probe_key`): a batch of
    the same structure and shapes reuses them, and should its forward call other
    functions than the one probed (control flow on values), it is probed afresh."""
    rows = batch_length(micro_batch, f"micro-batch {index}")
    buffers = [(b, b.clone()) for b in model.buffers()]
    key = probe_key(model, loss_fn, micro_batch)
    probe = cached_probe(model, key)
    if probe is not None:
        before = rng_states(model)
        try:
            return _traced_plan(model, loss_fn, micro_batch, index, rows, probe, buffers)
        except Diverged:
            _restore(model, before, buffers)
            forget_probe(model, key)
    probe = _probe(model, loss_fn, micro_batch, index, rows, buffers, key)
    return _traced_plan(model, loss_fn, micro_batch, index, rows, probe, buffers)


def _lean(units: list[Unit]) -> frozenset[int] | None:
    """The modules whose calls a plan's rules read, if they read nothing else of the
    forward: layer rules read their uses, module rules their module's call; the generic
    rules may read any module call and the random state before a use."""
    if not units or any(isinstance(unit, VmapOp | VmapModule) for unit in units):
        return None
    return frozenset(id(unit.site.module) for unit in units if isinstance(unit.site, ModuleCall))


def _traced_plan(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    index: int,
    rows: int,
    probe: Probe,
    buffers: list[tuple[Tensor, Tensor]],
) -> tuple[_Traced, list[Unit]]:
    """The real forward and its plan. A signature whose plan, under the rules registered
    now, read only the uses and some module calls (`_lean`) records no more than that
    (`Tracer`'s ``lean``). Should its plan need more this time (a use no layer rule
    reads), the forward runs again, fully traced."""
    generation = rules_generation()
    lean = probe.lean.get(generation)
    if lean is not None:
        before = rng_states(model)
        traced = _real_forward(model, loss_fn, micro_batch, index, rows, probe, buffers, lean)
        try:
            units = _plan(traced)
        except PerSampleError:
            units = []  # escalated to a module call a lean trace did not record
        if _lean(units) == lean:
            return traced, units
        del probe.lean[generation]
        del traced, units
        _restore(model, before, buffers)
    traced = _real_forward(model, loss_fn, micro_batch, index, rows, probe, buffers, None)
    units = _plan(traced)
    lean = _lean(units)
    if lean is not None:
        probe.lean[generation] = lean
    return traced, units


def _probe(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    index: int,
    rows: int,
    buffers: list[tuple[Tensor, Tensor]],
    key: Any,
) -> Probe:
    probe_rows = 3 if rows == 2 else 2
    picked = torch.tensor([i % rows for i in range(probe_rows)])

    def pick(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            return leaf.index_select(0, picked.to(leaf.device))
        return leaf

    tracer = Tracer(model, probe_rows, expand=False)
    try:
        with torch.random.fork_rng(devices=_devices(model)), tracer:
            loss_fn(model, _map_leaves(pick, micro_batch))
    except BatchError:
        raise
    except Exception as error:
        raise PerSampleError(
            f"Per-sample gradients run the model on {probe_rows} rows of micro-batch "
            f"{index} to find which dimension holds the samples, and that forward failed: "
            f"{type(error).__name__}: {error}. The model must run on any number of samples."
        ) from error
    finally:
        tracer.remove()
        with torch.no_grad():
            for buffer, saved in buffers:
                buffer.copy_(saved)
    return remember_probe(model, key, tracer)


def _real_forward(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    index: int,
    rows: int,
    probe: Probe,
    buffers: list[tuple[Tensor, Tensor]],
    lean: frozenset[int] | None,
) -> _Traced:
    before = rng_states(model)
    tracer = Tracer(model, rows, probe, lean=lean)
    try:
        with tracer:
            loss = loss_fn(model, micro_batch)
        if lean is not None:
            tracer.check_lean()
        failed = False
    except BatchError:
        raise
    except Exception:
        if not tracer.expanded:
            raise  # the model's own error, as a plain forward would raise it
        failed = True
    finally:
        tracer.remove()
    if failed or tracer.opaque:
        # A shared output expanded over the batch was used other than by broadcasting
        # (permuted, reduced, dropped out): run again as is, leaving those uses to the
        # module calls around them.
        _restore(model, before, buffers)
        tracer = Tracer(model, rows, probe, expand=False, lean=lean)
        try:
            with tracer:
                loss = loss_fn(model, micro_batch)
            if lean is not None:
                tracer.check_lean()
        finally:
            tracer.remove()
    random = any(not torch.equal(a, b) for a, b in zip(before, rng_states(model), strict=True))
    total, count = unpack_loss(loss, index)
    names = {p: n for n, p in reversed(list(model.named_parameters()))}
    return _Traced(tracer, Loss(total, count), random, names, probe)


def _restore(model: nn.Module, rng: list[Tensor], buffers: list[tuple[Tensor, Tensor]]) -> None:
    torch.set_rng_state(rng[0])
    for device, state in zip(_devices(model), rng[1:], strict=False):
        torch.cuda.set_rng_state(state, device)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)


def _plan(traced: _Traced) -> list[Unit]:
    """The rule for every use of every trainable parameter, each counted once."""
    tracer, names = traced.tracer, traced.names
    units: list[Unit] = []
    covered: dict[ModuleCall, set[nn.Parameter]] = {}  # calls with a registered rule
    for call in tracer.calls:  # in the order the calls returned: inner ones first
        if user_rule(call.module) is None or _within_ruled(call):
            continue  # the outermost call with a rule covers all inside it
        registered = user_rule(call.module) is not known_rule(call.module)
        kind = UserModule if registered else known_unit(call.module)
        problem = kind.unsupported(call)
        if problem is not None:
            raise PerSampleError(
                f"Module {call.name!r} ({type(call.module).__name__}) has a registered "
                f"per-sample rule, but {problem}."
            )
        params = [p for p in call.module.parameters() if p.requires_grad]
        covered[call] = set(params)
        units.append(kind(call, params, tracer.rows))
    uses: dict[nn.Parameter, list[OpCall]] = {}
    live: list[tuple[OpCall, list[nn.Parameter]]] = []
    for op in tracer.ops:
        if not any(isinstance(t, Tensor) and t.requires_grad for t in op.outputs):
            continue  # under no_grad, or detached: no gradient flows through this use
        params = list(dict.fromkeys(op.params))
        if covered and op.scope is not None:
            done = set().union(*(covered.get(c, set()) for c in op.scope.enclosing()))
            params = [p for p in params if p not in done]
        if not params:
            continue
        live.append((op, params))
        for p in params:
            uses.setdefault(p, []).append(op)
    escalated: dict[nn.Parameter, str] = {}
    rules: dict[OpCall, type[OpRule]] = {}
    for op, params in live:
        rule = _registered_op_rule(op)
        if rule is not None and rule.unsupported(op, params) is None:
            rules[op] = rule
            continue
        reason = VmapOp.unsupported(op, params)
        if reason is None:
            rules[op] = VmapOp
            continue
        for p in params:
            escalated.setdefault(p, f"{op.where()}: {reason}")
    for op, params in live:
        kept = [p for p in params if p not in escalated]
        if kept:
            units.append(rules[op](op, kept, tracer.rows))
    scopes: dict[ModuleCall, list[nn.Parameter]] = {}
    for p, reason in escalated.items():
        scope = _enclosing(uses[p])
        why = reason
        while scope is not None:
            problem = VmapModule.unsupported(scope)
            if problem is None:
                break
            why = f"{why}; and in module {scope.name!r} ({type(scope.module).__name__}): {problem}"
            scope = scope.parent
        if scope is None:
            raise PerSampleError(
                f"No per-sample gradient of parameter {names.get(p, '?')!r}: it is used by "
                f"{why}, and no module call encloses all its uses with the samples in a "
                f"dimension of their own. Keep the samples in a dimension of their own "
                f"there, or register a per-sample rule (batchgrad.register_per_sample_rule)."
            )
        scopes.setdefault(scope, []).append(p)
    units += [VmapModule(scope, params, tracer.rows) for scope, params in scopes.items()]
    return units


def _within_ruled(call: ModuleCall) -> bool:
    """Whether a call happens inside the call of a module with a rule of its own."""
    return call.parent is not None and any(
        user_rule(c.module) is not None for c in call.parent.enclosing()
    )


def _enclosing(uses: list[OpCall]) -> ModuleCall | None:
    """The innermost module call around every one of ``uses``."""
    if any(op.scope is None for op in uses):
        return None
    first = uses[0].scope
    assert first is not None
    others = [set(op.scope.enclosing()) for op in uses[1:] if op.scope is not None]
    return next((c for c in first.enclosing() if all(c in o for o in others)), None)


def _registered_op_rule(op: OpCall) -> type[OpRule] | None:
    return RULES.get(op.func)


def _backward(
    traced: _Traced, units: list[Unit], params: list[nn.Parameter]
) -> dict[nn.Parameter, Tensor | None]:
    """One ``autograd.grad``: the gradient reaching every unit's outputs, and (for the
    guard) the batch gradient of ``params``.

    The outputs are asked for by their gradient edges, so that the tensors themselves
    can go before the backward: what the tracer recorded beyond the units' needs (every
    module call's inputs and outputs) and the outputs of the layer rules (which read
    only their inputs and output gradients) would otherwise outlive the activations a
    plain backward frees as it goes."""
    outputs = list({id(t): t for u in units for t in u.outputs()}.values())
    slot = {id(t): k for k, t in enumerate(outputs)}
    slots = [[slot.get(id(t)) for t in unit.site.outputs] for unit in units]
    edges = [get_gradient_edge(t) for t in outputs]
    del outputs, slot
    sites = {id(unit.site) for unit in units}
    records: list[ModuleCall | OpCall] = [*traced.tracer.calls, *traced.tracer.ops]
    for record in records:
        if id(record) not in sites:
            record.inputs, record.outputs, record.grads = [], [], []
    for unit in units:
        unit.release()
    total = traced.loss.total
    found: tuple[Tensor | None, ...] = (None,) * len(edges)
    batch: dict[nn.Parameter, Tensor | None] = dict.fromkeys(params)
    if total.requires_grad and (edges or params):
        wanted: list[Any] = [*edges, *params]  # edges and tensors may be mixed
        grads = torch.autograd.grad(total, wanted, allow_unused=True)
        found = grads[: len(edges)]
        batch = dict(zip(params, grads[len(edges) :], strict=True))
        del grads
    for unit, ks in zip(units, slots, strict=True):
        unit.site.grads = [None if k is None else found[k] for k in ks]
    return batch


# -- the guard ------------------------------------------------------------------------


_EXACT: tuple[type[Unit], ...] = (*RULES.values(), KnownModule)
"""The built-in layer rules: for the inputs and output gradients they read, their sum over
samples is the batch gradient's own formula (one matrix product, one scatter), so what
the guard must establish for them is only that no other path reaches the parameter."""


def _sum_checked(
    traced: _Traced, units: list[Unit], params: list[nn.Parameter]
) -> list[nn.Parameter]:
    """The parameters whose per-sample sum the guard compares with the batch gradient:
    those with a generic or user-registered rule, those with no rule at all, and those
    that the loss reaches by a path through no use a built-in rule reads (a use the
    trace did not see). Found by a walk over the autograd graph before the backward,
    in which the output of every use a built-in rule reads leads only to that use's
    data inputs; a parameter reached there has such a path. Call before `_backward`
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


def _guarding(traced: _Traced, verify: bool | None, task: str) -> bool:
    """Whether the guard runs on this micro-batch: always (``True``), never (``False``),
    or (``None``, the default) unless it already passed on a micro-batch of the same
    signature (the probe's key: the batch's structure and shapes, the modules and their
    modes, the trainable parameters, the loss function, the grad mode), for the same
    task, the same rules registered and a forward that drew random numbers or not
    alike."""
    if verify is not None:
        return verify
    return _guard_key(traced, task) not in traced.probe.guarded


def _guard_key(traced: _Traced, task: str) -> tuple[str, int, bool]:
    return (task, rules_generation(), traced.random)


def _guard_passed(traced: _Traced, task: str) -> None:
    traced.probe.guarded.add(_guard_key(traced, task))


def _checked(
    traced: _Traced, units: list[Unit], params: list[nn.Parameter], verify: bool, thorough: bool
) -> list[nn.Parameter]:
    """The parameters whose batch gradient the backward forms for the guard."""
    if not verify:
        return []
    return list(params) if thorough else _sum_checked(traced, units, params)


def _tolerance(dtype: torch.dtype) -> float:
    """Far above rounding, far below any real error: ``√ε`` of the dtype."""
    return float(torch.finfo(dtype).eps) ** 0.5 if dtype.is_floating_point else 1e-6


def _check_sums(
    stats: dict[nn.Parameter, tuple[float, float, float]],
    traced: _Traced,
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


def _disagrees(what: str, traced: _Traced, index: int, row: int) -> PerSampleError:
    return PerSampleError(
        f"The per-sample gradient of sample {row} in micro-batch {index} ({what}) differs "
        f"from the gradient of a forward and backward on that sample alone: some layer "
        f"lets samples interact (a batch statistic, a reshape across samples) or has no "
        f"exact per-sample rule. Find it by bisecting the model, or register a rule "
        f"(batchgrad.register_per_sample_rule)."
    )


def _check_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    traced: _Traced,
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


def _check_sample_norm(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    traced: _Traced,
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


# -- the public functions -----------------------------------------------------------


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
    sum with its batch gradient, not only those `_sum_checked` picks (`batchgrad.check`)."""
    check_micro_batch_size(micro_batch_size)
    named = _trainable(model)
    trainable = [p for _, p in named]
    parts: dict[nn.Parameter, list[Tensor]] = {p: [] for p in trainable}
    for index, micro_batch in enumerate(micro_batches(batch, micro_batch_size)):
        traced, units = _trace(model, loss_fn, micro_batch, index)
        size = traced.tracer.rows
        guard = _guarding(traced, verify, "grads")
        checked = _checked(traced, units, trainable, guard, thorough)
        batch_grads = _backward(traced, units, checked)
        found: dict[nn.Parameter, Tensor] = {}
        with torch.no_grad():
            for unit in units:
                for p, grad in unit.per_sample().items():
                    found[p] = found[p] + grad if p in found else grad
        complete = {p: found[p] if p in found else p.new_zeros(size, *p.shape) for p in trainable}
        if guard:
            with torch.no_grad():  # Σ_i ‖g_i‖, estimated from the last sample's
                last = sum(float(g[size - 1].norm()) for g in complete.values())
            _verify_sums(units, batch_grads, traced, index, size * last)
            if not traced.random and trainable:
                _check_sample_grads(model, loss_fn, micro_batch, traced, index, complete)
            _guard_passed(traced, "grads")
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
        traced, units = _trace(model, loss_fn, micro_batch, index)
        guard = _guarding(traced, verify, "norms")
        batch_grads = _backward(traced, units, _checked(traced, units, trainable, guard, thorough))
        with torch.no_grad():
            norm = _sq_norms(units, traced.tracer.rows).sqrt()
        if guard:
            _verify_sums(units, batch_grads, traced, index, float(norm.sum()))
            if not traced.random and trainable:
                row = traced.tracer.rows - 1
                _check_sample_norm(model, loss_fn, micro_batch, traced, index, norm[row], trainable)
            _guard_passed(traced, "norms")
        norms.append(norm)
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def _verify_sums(
    units: list[Unit],
    batch_grads: dict[nn.Parameter, Tensor | None],
    traced: _Traced,
    index: int,
    scale: float,
) -> None:
    """The sums half of the guard, for the parameters in ``batch_grads`` (those
    `_sum_checked` picked): ``Σ_i g_i``, formed by each rule as its weighted sum with all
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
    traced, units = _trace(model, loss_fn, micro_batch, index)
    check = _guarding(traced, verify, "clipped")
    size = traced.tracer.rows
    batch_grads = _backward(traced, units, _checked(traced, units, trainable, check, False))
    with torch.no_grad():
        norms = _sq_norms(units, size).sqrt()
    if not bool(torch.isfinite(norms).all()):
        bad = int((~torch.isfinite(norms)).nonzero()[0])
        raise NonFiniteError(
            f"The gradient of sample {bad} in micro-batch {index} is NaN or infinite, so it "
            f"cannot be clipped. Look at that sample's data and at the loss for it."
        )
    if check:
        _verify_sums(units, batch_grads, traced, index, float(norms.sum()))
        if not traced.random and trainable:
            _check_sample_norm(
                model, loss_fn, micro_batch, traced, index, norms[size - 1], trainable
            )
        _guard_passed(traced, "clipped")
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
