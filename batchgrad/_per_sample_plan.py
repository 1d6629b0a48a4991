"""One micro-batch of per-sample work up to its backward: traced, planned, backpropagated.

`trace` runs the probe forward (a few rows of the batch, cached per signature) and the
real forward under `batchgrad._per_sample_trace.Tracer`, lean where the signature allows;
`plan` picks the rule of every parameter use (each counted once, however many modules
register it); `backward` is the one ``autograd.grad`` that gives the rules their output
gradients (and the guard the batch gradients it compares).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from ._errors import BatchError, PerSampleError
from ._loss import Loss, LossFn, unpack_loss
from ._per_sample_modules import UserModule, known_rule, known_unit, rules_generation, user_rule
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
from ._split import Batch, _map_leaves, batch_length


@dataclass
class Traced:
    tracer: Tracer
    loss: Loss
    random: bool  # the forward drew random numbers (dropout): no single-sample check
    names: dict[nn.Parameter, str]
    probe: Probe  # the signature's probe, which keeps what the guard found consistent


def _devices(model: nn.Module) -> list[torch.device]:
    return sorted({p.device for p in model.parameters() if p.device.type == "cuda"}, key=str)


def trace(
    model: nn.Module, loss_fn: LossFn, micro_batch: Batch, index: int
) -> tuple[Traced, list[Unit]]:
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
) -> tuple[Traced, list[Unit]]:
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
            units = plan(traced)
        except PerSampleError:
            units = []  # escalated to a module call a lean trace did not record
        if _lean(units) == lean:
            return traced, units
        del probe.lean[generation]
        del traced, units
        _restore(model, before, buffers)
    traced = _real_forward(model, loss_fn, micro_batch, index, rows, probe, buffers, None)
    units = plan(traced)
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
) -> Traced:
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
    return Traced(tracer, Loss(total, count), random, names, probe)


def _restore(model: nn.Module, rng: list[Tensor], buffers: list[tuple[Tensor, Tensor]]) -> None:
    torch.set_rng_state(rng[0])
    for device, state in zip(_devices(model), rng[1:], strict=False):
        torch.cuda.set_rng_state(state, device)
    with torch.no_grad():
        for buffer, saved in buffers:
            buffer.copy_(saved)


def plan(traced: Traced) -> list[Unit]:
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


def backward(
    traced: Traced, units: list[Unit], params: list[nn.Parameter]
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
