"""Accumulation on models sharded with FSDP2 (`torch.distributed.fsdp.fully_shard`).

FSDP all-gathers a block's parameters in its forward (and again in the backward
when they were resharded) and reduce-scatters its gradients in the backward: the
forwards and backwards are themselves collectives, so every rank must run the same
number of them, in the same order, whatever its data. The engine therefore runs the
logical batch in *steps*: in step ``k`` every rank runs its ``k``-th micro-batch, or,
when it has no more (or none at all), a *padding* micro-batch with 0 rows (its
gradient is exactly 0; an idle rank is sent the structure of one by a working rank).
Between each forward and its backward the ranks exchange five numbers (`_step`):
whether one failed, the step's loss and count, and whether any has another
micro-batch. So:

- a failure in ``loss_fn`` or in the loss checks (a NaN loss, a bad count), or
  while fetching a micro-batch, is known to every rank before any backward: every
  rank skips it, puts every gradient back and raises the same `BatchError`; the
  next call works, because every rank's FSDP state is the same (forward run,
  backward not) and is reset (`_Knobs.reset`);
- the last step is known before its backward: with ``grad_sync="once"`` it is the
  only one that reduce-scatters (``set_requires_gradient_sync``), with
  ``"per_micro_batch"`` every step's backward does;
- FSDP sums (``set_gradient_divide_factor(1.0)`` with
  ``set_force_sum_reduction_for_comms(True)``: gloo has no PREMUL_SUM), and the
  sharded sum is divided by ``N(B)`` once, on each rank's shard.

An exception *inside* the model's forward or backward on one rank (a hook, a
custom autograd Function) leaves it out of the all-gathers and reduce-scatters the
others are in. That rank then *completes their schedule* (`_fsdp_schedule`): the
sequence of FSDP's collectives is learned from the steps that succeeded, and the
failing rank issues the rest of the step's sequence itself through FSDP's own
methods (its contributions are thrown away with everything else of the call). It
then tells the others at their next agreement (the step's, after a forward; the
next step's or the final one, after a backward), every rank puts every gradient
back, resets FSDP's state of the pass (``_reset_iter_state``) and raises the same
`DistributedError`; the process group stays usable and the next call is exact.

So that a sequence is known before the first real backward, the first call of a
model with a loss function (and FSDP settings) starts with a *rehearsal*
(`_Steps.rehearse`): every rank runs its padding micro-batch, forward and a zero
backward, with the gradient sync off. It costs one step's all-gathers and no
reduce-scatter, once, and changes nothing (no gradient, buffers and RNG put back).

What is still fatal (`DistributedError`, the process group shut down at once so
that no rank waits for its timeout): a failure with no sequence to complete (the
rehearsal's own backward failing, a backward after a forward never seen to
succeed, a forward that differed between two steps of one call, a rank whose part
does not match), an exception
inside FSDP's own collectives, a rank that died. Restart the job from the last
checkpoint then. Not detected: a step whose backward issues other collectives than
the last successful one after the same forward did (autograd reaching other
blocks), failing on one rank; it can wait for the process group's timeout.

Unused parameters: FSDP reduce-scatters every parameter of a group (so that the
ranks' collectives match whatever each used), a zero for one a rank did not use;
a parameter that no rank used gets ``None``, as in one process (the ranks agree on
it in the final all-reduce).
"""

from __future__ import annotations

import contextlib
import itertools
import math
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._errors import (
    ConfigError,
    DistributedError,
    EmptyBatchError,
    LossTypeError,
    NonFiniteError,
)
from ._fsdp_schedule import Event, Schedule, Unrecoverable
from ._loop import _backward, _loop, _Run
from ._loss import LossFn, unpack_loss
from ._protocol import Local, agree, layout, raise_failures
from ._readout import _as_floats
from ._split import Batch, batch_length, is_structured, micro_batches, slice_batch
from ._state import (
    BufferSnapshot,
    GradStash,
    RngSnapshot,
    _refuse_existing_grads,
    trainable_and_buffers,
)

if TYPE_CHECKING:
    from ._accumulate import AccumulateReport

GRAD_SYNCS = ("once", "per_micro_batch")


def is_sharded(model: nn.Module) -> bool:
    """Whether any module of ``model`` is sharded with FSDP2's ``fully_shard``."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # a torch built without distributed
        return False
    return any(isinstance(module, FSDPModule) for module in model.modules())


class _Stop(Exception):
    """Some rank failed in this step: every rank stops (raised after the agreement)."""


class _Padding:
    """The item a rank without a micro-batch runs in a step (0 rows)."""


_PAD = _Padding()


@dataclass
class _Failed:
    """Fetching this rank's next micro-batch raised (micro-batch ``at``, when a read
    ahead failed)."""

    error: BaseException
    at: int | None = None


class _FetchFailed(Exception):
    """Reading micro-batch ``at`` ahead of its step raised ``error``."""

    def __init__(self, at: int, error: BaseException) -> None:
        super().__init__(at, error)
        self.at, self.error = at, error


@dataclass(slots=True)
class _Steps:
    """What the steps so far agreed on, and this rank's part in them."""

    group: dist.ProcessGroup | None
    once: bool
    knobs: _Knobs
    template: Batch | None  # a 0-row micro-batch, for padding steps
    schedule: Schedule
    more: bool = True  # some rank holds a micro-batch for the next step
    loss_sum: float = 0.0  # over every rank
    count: float = 0.0  # over every rank
    micro_batches: int = 0  # real ones, over every rank
    unit_counts: list[float] = field(default_factory=list)  # this rank's
    failure: BaseException | None = None
    failed_at: int | str | None = None  # a micro-batch, or where else
    steps: int = 0
    rank: int = 0
    tell_at_the_end: bool = False  # this rank's last backward failed: say so at the end
    inside: bool = False  # the root module's forward is running

    def watch(self, model: nn.Module) -> list[Any]:
        """Hooks telling whether an error came from inside the model's forward."""

        def enter(*_: object) -> None:
            self.inside = True

        def leave(*_: object) -> None:
            self.inside = False

        return [model.register_forward_pre_hook(enter), model.register_forward_hook(leave)]

    def parts(self, own: Iterator[tuple[Batch, bool]]) -> Iterator[tuple[Any, bool]]:
        """This rank's micro-batches, then padding while another rank has more."""
        while True:
            try:
                item = next(own)
            except StopIteration:
                break
            except _FetchFailed as failed:  # reported at the step's agreement
                yield _Failed(failed.error, failed.at), True
                return
            except BaseException as error:
                yield _Failed(error), True
                return
            yield item
        while self.more:
            yield _PAD, True

    def __call__(
        self,
        run: _Run,
        model: nn.Module,
        loss_fn: LossFn,
        micro_batch: Any,
        index: int,
        last: bool,
    ) -> None:
        """One step: the forward, the agreement, then (if no rank failed) the backward."""
        total: Tensor | None = None
        real = not isinstance(micro_batch, _Padding | _Failed)
        count = 0.0
        value = 0.0
        failure: BaseException | None = None
        self.schedule.begin()
        try:
            if isinstance(micro_batch, _Failed):
                raise micro_batch.error
            if real:
                total, raw = unpack_loss(loss_fn(model, micro_batch), index)
                value, count = _as_floats([total, raw])
                if not math.isfinite(value):
                    raise NonFiniteError(
                        f"The loss of micro-batch {index} is {value}. Look at that "
                        f"micro-batch's data, and at the model's outputs for it (log of "
                        f"0, division by 0, overflow in low precision)."
                    )
                if not 0 <= count < math.inf:
                    raise LossTypeError(
                        f"Loss.count of micro-batch {index} is {count}; a count must be a "
                        f"finite number of units >= 0. Look at how loss_fn counts that "
                        f"micro-batch's units (a mask or weights holding NaN, inf or "
                        f"negative values?)."
                    )
            else:
                if self.template is None:  # cannot happen: a template was agreed on
                    raise DistributedError("No padding micro-batch for this rank.")
                total = loss_fn(model, self.template).total
        except BaseException as error:  # reported to every rank below, so none waits
            self.finish_forward(error, index)
            failure = error
        self.schedule.forward_done()
        more = real and not last
        agreed = _step(self.group, [float(failure is not None), value, count, float(real), more])
        self.steps += 1
        if agreed[0]:
            if failure is not None:
                at = None if isinstance(micro_batch, _Padding) else index
                if isinstance(micro_batch, _Failed) and micro_batch.at is not None:
                    at = micro_batch.at
                self.failure, self.failed_at = failure, at
            raise _Stop
        self.loss_sum += agreed[1]
        self.count += agreed[2]
        self.micro_batches += int(agreed[3])
        self.more = agreed[4] > 0
        if real:
            self.unit_counts.append(count)
        assert total is not None
        if self.once:
            self.knobs.sync(not self.more)  # reduce-scatter in the last step only
        try:
            _backward(total, None if real else torch.zeros_like(total))
        except BaseException as error:  # FSDP's collectives run inside the backward
            self.complete(error, index, "backward", self.schedule.backward_events())
            self.tell(error, index if real else None)
        self.schedule.learn()

    def rehearse(self, model: nn.Module, loss_fn: LossFn, buffers: BufferSnapshot) -> None:
        """The 0-row step before a model's first real one (see the module's
        docstring): it learns the sequence of FSDP's collectives. A forward that
        fails on 0 rows (on any rank) only leaves the sequence unknown, as without
        a rehearsal. ``buffers``: as the call found them, put back after it."""
        rng = RngSnapshot.take()
        self.knobs.sync(False)
        self.schedule.begin()
        total: Tensor | None = None
        failure: BaseException | None = None
        try:
            if self.template is None:
                raise ConfigError("no 0-row micro-batch to rehearse with")
            total = loss_fn(model, self.template).total
        except BaseException as error:
            self.finish_forward(error, _REHEARSAL)
            failure = error
        self.schedule.forward_done()
        interrupted = float(failure is not None and not isinstance(failure, Exception))
        failed, stop, *_ = _step(self.group, [float(failure is not None), interrupted, 0, 0, 0])
        if stop:  # a KeyboardInterrupt (or the like) on some rank: every rank stops
            self.failure, self.failed_at = failure, _REHEARSAL
            raise _Stop
        if not failed:
            assert total is not None
            try:
                _backward(total, torch.zeros_like(total))
            except BaseException as error:
                # fatal where nothing was learned; else (another rank had no sequence)
                # told at the first step's agreement
                self.complete(error, _REHEARSAL, "backward", self.schedule.backward_events())
                self.tell(error, _REHEARSAL)
            self.schedule.learn(rehearsal=True)
        else:
            self.schedule.rehearsal_failed()
        reset_pass(self.knobs)  # drops the unsharded gradients of the 0 rows
        self.schedule.forget_used()
        buffers.put_back()
        rng.put_back()
        self.knobs.sync(not self.once)

    def finish_forward(self, error: BaseException, index: int | str) -> None:
        """The others run the whole forward: issue the all-gathers this rank missed.
        Nothing is missing when the error came after the model's forward (a NaN
        loss, a bad count), whatever was learned."""
        done, inside = self.schedule.events, self.inside
        self.inside = False
        if not inside and done:  # the model ran; loss_fn raised afterwards
            try:
                expected = self.schedule.expected("forward")
            except Unrecoverable:
                return
            if len(done) >= len(expected) or expected[: len(done)] != done:
                return  # (a strict prefix: raised between two calls of the model)
        self.complete(error, index, "forward", done)

    def complete(
        self, error: BaseException, index: int | str | None, where: str, done: list[Event]
    ) -> None:
        """Issue the rest of this step's forward or backward collectives that the
        other ranks are in (`Schedule.complete`); what cannot be completed stops the
        process group (`abandon`)."""
        if _peer_gone(error):
            raise DistributedError(
                f"Another rank failed inside the sharded model's {where} ({_at(index)} "
                f"here), in the middle of FSDP's collectives ({error}). The process "
                f"group cannot be used any more: look at the other ranks' tracebacks, and "
                f"restart the job from your last checkpoint (torchrun --max-restarts)."
            ) from error
        try:
            self.schedule.complete(where, list(done))
        except BaseException as reason:
            self.abandon(error, index, where, reason)

    def tell(self, error: BaseException, index: int | str | None) -> None:
        """After this rank's backward failed (and its collectives were completed):
        join the others at their next agreement, the next step's (after its forward's
        all-gathers) or the final one, with the failure."""
        self.failure, self.failed_at = error, index
        reset_pass(self.knobs)
        if not self.more:
            self.tell_at_the_end = True
            raise _Stop
        try:
            self.schedule.ran(self.schedule.forward_events())  # the next step runs it too
            self.schedule.begin()
            self.schedule.complete("forward", [])
        except BaseException as reason:
            self.abandon(error, index, "backward", reason)
        _step(self.group, [1.0, 0.0, 0.0, 0.0, 0.0])
        raise _Stop

    def abandon(
        self, error: BaseException, index: int | str | None, where: str, reason: BaseException
    ) -> None:
        """An error in the middle of FSDP's collectives that this rank cannot take its
        place in any more (`Schedule.complete` could not): shut the process group
        down, so that the others hear of it now (the closed connection) instead of at
        its timeout, and raise `DistributedError` here as there."""
        with contextlib.suppress(Exception):
            # Closes this rank's connections; the others' collectives fail at once.
            dist.distributed_c10d._abort_process_group()
        raise DistributedError(
            f"On rank {self.rank}, {_at(index)}: {type(error).__name__}: {error}, "
            f"raised inside the sharded model's {where}, in the middle of FSDP's "
            f"collectives, where this rank could not take its place in the others' "
            f"collectives ({reason}). The process group was shut down so that they stop "
            f"now (not at its timeout); fix the error (see the traceback) and restart the "
            f"job from your last checkpoint."
        ) from error


# Where a step failed, in messages: a micro-batch's index, this, or None (a padding step).
_REHEARSAL = "the 0-row rehearsal of the model's first call"


def _at(index: int | str | None) -> str:
    if index is None:
        return "a padding step (0 rows)"
    return index if isinstance(index, str) else f"micro-batch {index}"


def reset_pass(knobs: _Knobs) -> None:
    """Put FSDP's state of an interrupted forward or backward back to that of a new
    pass: every parameter group sharded, no gradient kept unsharded."""
    root = knobs.modules[0]._get_fsdp_state() if knobs.modules else None
    if root is not None and getattr(root, "_is_root", False):
        reset = getattr(root, "_reset_iter_state", None)
        if reset is not None:
            reset()
        else:  # an older torch: what it resets that the next pass would trip on
            root._state_ctx.post_backward_final_callback_queued = False
            root._state_ctx.iter_forward_root = None
            root._comm_ctx.post_forward_order.clear()
            for group in knobs.groups:
                group._post_forward_indices.clear()
    knobs.reset()


def _peer_gone(error: BaseException) -> bool:
    """Whether a collective failed because another rank's connection closed."""
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        sign in text for sign in ("Connection closed", "Connection reset", "Broken pipe")
    )


def _step(group: dist.ProcessGroup | None, values: list[float]) -> list[float]:
    """The per-step agreement: one all-reduce of five float64 numbers."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_device(group))
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as error:
        raise DistributedError(
            f"Could not reach the other ranks between a forward and its backward ({error}). "
            f"A rank has probably died or hangs in a collective; the process group cannot "
            f"be used any more. Restart the job from your last checkpoint."
        ) from error
    got: list[float] = tensor.tolist()
    return got


def _final(group: dist.ProcessGroup | None, values: list[float]) -> list[float]:
    """The final agreement: one all-reduce of float64 numbers."""
    tensor = torch.tensor(values, dtype=torch.float64, device=_device(group))
    dist.all_reduce(tensor, group=group)
    got: list[float] = tensor.tolist()
    return got


def _device(group: dist.ProcessGroup | None) -> torch.device:
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Knobs:
    """FSDP's reduction settings of every parameter group, set for one call and put
    back afterwards: sums (no averaging), every parameter reduce-scattered (also one
    that a micro-batch left without a gradient, so that the ranks' reduce-scatters
    match), and the gradient sync switched per step."""

    _NAMES = (
        "reduce_grads",
        "all_reduce_grads",
        "gradient_divide_factor",
        "force_sum_reduction_for_comms",
        "reduce_scatter_unused_params",
    )

    def __init__(self, model: nn.Module) -> None:
        from torch.distributed.fsdp import FSDPModule

        self.modules = [m for m in model.modules() if isinstance(m, FSDPModule)]
        self.groups = [
            group for m in self.modules for group in m._get_fsdp_state()._fsdp_param_groups
        ]
        self.saved = [tuple(getattr(g, name) for name in self._NAMES) for g in self.groups]

    def for_call(self, once: bool) -> None:
        for group in self.groups:
            group.gradient_divide_factor = 1.0
            group.force_sum_reduction_for_comms = True
            group.reduce_scatter_unused_params = True
        self.sync(not once)

    def sync(self, on: bool) -> None:
        for group in self.groups:
            group.reduce_grads = group.all_reduce_grads = on

    def reset(self) -> None:
        """After a stopped call: drop the unsharded gradients kept between micro-
        batches and free the parameters a forward left unsharded (all local)."""
        for group in self.groups:
            for fsdp_param in group.fsdp_params:
                fsdp_param.unsharded_accumulated_grad = None
                unsharded = getattr(fsdp_param, "_unsharded_param", None)
                if unsharded is not None:
                    unsharded.grad = None
        for module in self.modules:
            module.reshard()

    def put_back(self) -> None:
        for group, values in zip(self.groups, self.saved, strict=True):
            for name, value in zip(self._NAMES, values, strict=True):
                setattr(group, name, value)


def _locals(grads: Iterable[Tensor]) -> list[Tensor]:
    """The local shards of (DTensor) gradients."""
    return [g.to_local() if hasattr(g, "to_local") else g for g in grads]


def _mesh_group(params: list[nn.Parameter]) -> tuple[dist.ProcessGroup | None, int]:
    """The process group spanning the model's device mesh, and how many replicas
    each shard has (HSDP; 1 on a 1-D mesh)."""
    meshes: list[Any] = []
    for p in params:
        mesh = getattr(p, "device_mesh", None)
        if mesh is not None and all(mesh is not m and mesh != m for m in meshes):
            meshes.append(mesh)
    if len(meshes) != 1:
        raise ConfigError(
            f"The sharded model's trainable parameters live on {len(meshes)} device meshes; "
            f"batchgrad supports one mesh (fully_shard with the same mesh everywhere)."
        )
    mesh = meshes[0]
    if mesh.size() != dist.get_world_size():
        raise ConfigError(
            f"The model's device mesh has {mesh.size()} of the {dist.get_world_size()} "
            f"ranks; batchgrad needs the mesh to span every rank of the job."
        )
    replicas = mesh.size(0) if mesh.ndim == 2 else 1
    if mesh.ndim > 2:
        raise ConfigError(f"A {mesh.ndim}-D device mesh is not supported (1-D or 2-D HSDP).")
    return None, replicas


def accumulate_sharded(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    micro_batch_size: int | None,
    settings: dict[str, Any],
) -> AccumulateReport:
    """`batchgrad.accumulate` on an FSDP2 model (see the module's docstring)."""
    from torch.distributed.fsdp import FSDPModule

    from ._accumulate import AccumulateReport, _check_settings, _divisor

    if not isinstance(model, FSDPModule):
        name, inner = next((n, m) for n, m in model.named_modules() if isinstance(m, FSDPModule))
        raise ConfigError(
            f"{name} is sharded with fully_shard ({type(inner).__name__}) but the model "
            f"itself is not; call fully_shard on the root module too (after its blocks), "
            f"as FSDP2 expects: its root runs the forward's and backward's bookkeeping."
        )
    params, buffers = trainable_and_buffers(model)
    group, replicas = _mesh_group(params)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    reduction = settings["reduction"]
    existing_grad = settings["existing_grad"]
    grad_sync = settings["grad_sync"]
    stash = GradStash.take(params)  # put back unchanged whatever fails below
    knobs = _Knobs(model)
    layout_hash, entries = layout(model, params)
    mine = Local(settings, layout_hash, entries)
    own: Iterator[tuple[Batch, bool]] = iter(())
    template: Batch | None = None
    schedule = Schedule(model, knobs.groups, params, loss_fn)
    steps = _Steps(group, grad_sync == "once", knobs, None, schedule, rank=rank)
    schedule.wrap()
    handles = steps.watch(model)
    try:
        try:
            _check_settings(
                reduction,
                existing_grad,
                settings["clip_per_sample"],
                settings["noise_multiplier"],
                settings["noise"],
            )
            if settings["clip_per_sample"] is not None or settings["noise"] is not False:
                raise ConfigError(
                    "clip_per_sample and noise= are not supported on FSDP models yet "
                    "(the per-sample rules need the whole parameters); use DDP for them."
                )
            if grad_sync not in GRAD_SYNCS:
                raise ConfigError(f"grad_sync must be one of {GRAD_SYNCS}, got {grad_sync!r}.")
            if settings["group"]:
                raise ConfigError(
                    "group= is not used on FSDP models: the ranks sharing the logical batch "
                    "are those of the model's device mesh. Leave group= out (shard the model "
                    "on a mesh over the ranks you mean)."
                )
            # (the settings hold what the ranks agree on: the scale, the dtype's name)
            if settings["scaler"] != "NoneType" or settings["accumulate_dtype"] != "None":
                raise ConfigError(
                    "scaler= and accumulate_dtype= are not supported on FSDP models yet: "
                    "FSDP2 sums the gradients in its MixedPrecisionPolicy's reduce_dtype "
                    "(MixedPrecisionPolicy(param_dtype=torch.bfloat16, "
                    "reduce_dtype=torch.float32) for a float32 sum)."
                )
            if existing_grad == "error":
                _refuse_existing_grads(model, GradStash(params, _locals_or_none(stash.grads)))
            parts = micro_batches(batch, micro_batch_size, allow_empty=True)
            if isinstance(parts, list):
                mine.works = bool(parts)
                template = _empty(parts[0] if parts else batch)
                own = _pairs(parts)
            else:  # ready-made: read the first to know whether this rank works
                own = _ahead(iter(parts))
                first = next(own, None)
                if first is not None:
                    mine.works = True
                    template = _empty(first[0])
                    own = _chain(first, own)
        except BaseException as error:  # reported to every rank below, so none waits
            mine.failure = error.error if isinstance(error, _FetchFailed) else error
        mine.rehearse = schedule.unknown()
        agreed = agree(group, rank, world_size, _device(group), mine)
        if len(agreed.idle) == world_size:
            raise EmptyBatchError(
                f"Every one of the {world_size} ranks has an empty batch; there is no "
                f"gradient to compute. Check the distributed sampler and the data loader."
            )
        steps.template = _shared_template(group, template, agreed.idle)
        knobs.for_call(steps.once)
        try:
            if agreed.rehearse:  # some rank has not seen this model's collectives yet
                steps.rehearse(model, loss_fn, buffers)
            _loop(_Run(None), model, loss_fn, steps.parts(own), steps)
        except _Stop:
            reset_pass(knobs)
            if steps.tell_at_the_end:  # the others are in the final agreement
                _final(group, [0.0, 0.0, 1.0] + [0.0] * len(params))
            raise_failures(group, rank, world_size, steps.failure, steps.failed_at)
            raise DistributedError("A rank failed but did not say how.") from None
        divisor = _divisor(steps.count, reduction, f"all {world_size} ranks")
        new = [p.grad for p in params]
        shards = _locals(g for g in new if g is not None)
        if divisor != 1.0 and shards:
            torch._foreach_div_(shards, divisor)
        new_sq = _sq_norm(shards)  # non-finite iff some gradient is
        if existing_grad == "add":
            final = [
                old if n is None else n if old is None else old + n
                for old, n in zip(_locals_or_none(stash.grads), _locals_or_none(new), strict=True)
            ]
            sq = _sq_norm([t for t in final if t is not None])
        else:
            sq = new_sq
        finite = math.isfinite(new_sq)
        # with whether a rank's last backward failed, and which parameters each used
        used = [float(u) for u in schedule.used]
        bad, sq_sum, failed, *users = _final(
            group, [float(not finite), sq if finite else 0.0, 0.0, *used]
        )
        if failed:
            reset_pass(knobs)
            raise_failures(group, rank, world_size, None)
            raise DistributedError("A rank failed but did not say how.")
        if bad:
            raise NonFiniteError(
                f"The summed gradient is NaN or infinite on {int(bad)} of {world_size} ranks' "
                f"shards, although every loss was finite. Look for operations with infinite "
                f"derivatives at the values reached (sqrt or norm at 0, log near 0), or run "
                f"the micro-batches under torch.autograd.detect_anomaly()."
            )
        for p, n_users in zip(params, users, strict=True):
            if not n_users:  # no rank's loss reached it: None, as in one process
                p.grad = None
        new = [p.grad for p in params]
        if existing_grad == "add":
            for p, old, n in zip(params, stash.grads, new, strict=True):
                if old is not None:
                    if n is not None:
                        old.add_(n)
                    p.grad = old
        else:
            for p, old, n in zip(params, stash.grads, new, strict=True):
                if old is not None and n is not None and old.shape == n.shape:
                    with torch.no_grad():
                        old.copy_(n)
                    p.grad = old
    except BaseException:
        stash.put_back()
        buffers.put_back()
        raise
    finally:
        schedule.unwrap()
        knobs.put_back()
        for handle in handles:
            handle.remove()
    return AccumulateReport(
        loss=steps.loss_sum / divisor,
        count=_number(steps.count),
        micro_batches=steps.micro_batches,
        grad_norm=math.sqrt(sq_sum / replicas),
        reduction=reduction,
        micro_batch_counts=tuple(map(_number, steps.unit_counts)),
        world_size=world_size,
    )


def _sq_norm(tensors: list[Tensor]) -> float:
    """The squared L2 norm of these local shards, one fused kernel and one read."""
    if not tensors:
        return 0.0
    norms = torch.stack([n.double() for n in torch._foreach_norm(tensors)])
    return float(norms.square().sum())


def _number(value: float) -> int | float:
    return int(value) if float(value).is_integer() else value


def _locals_or_none(grads: Iterable[Tensor | None]) -> list[Tensor | None]:
    return [None if g is None else _locals([g])[0] for g in grads]


def _empty(batch: Batch) -> Batch | None:
    """A 0-row micro-batch shaped like ``batch`` (None if it has no rows to slice)."""
    if not is_structured(batch):
        return None
    batch_length(batch)
    return slice_batch(batch, 0, 0)


def _shared_template(
    group: dist.ProcessGroup | None, template: Batch | None, idle: list[int]
) -> Batch | None:
    """Every rank's padding micro-batch: an idle rank that has none (its batch was an
    empty iterable) gets one from the lowest working rank; one broadcast, only when a
    rank is idle."""
    if not idle:
        return template
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    source = min(set(range(world_size)) - set(idle))
    box: list[object] = [template if rank == source else None]
    dist.broadcast_object_list(box, src=dist.get_global_rank(group, source) if group else source)
    return template if template is not None else box[0]


def _pairs(parts: list[Batch]) -> Iterator[tuple[Batch, bool]]:
    for index, part in enumerate(parts):
        yield part, index == len(parts) - 1


def _ahead(items: Iterator[Batch]) -> Iterator[tuple[Batch, bool]]:
    """``(item, is_last)``, reading one ahead (a failure to read one names it)."""
    try:
        current = next(items)
    except StopIteration:
        return
    for at in itertools.count(1):
        try:
            following = next(items)
        except StopIteration:
            break
        except Exception as error:
            raise _FetchFailed(at, error) from error
        yield current, False
        current = following
    yield current, True


def _chain(
    first: tuple[Batch, bool], rest: Iterator[tuple[Batch, bool]]
) -> Iterator[tuple[Batch, bool]]:
    yield first
    yield from rest


__all__ = ["GRAD_SYNCS", "accumulate_sharded", "is_sharded"]
