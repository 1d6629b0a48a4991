"""FSDP's collectives of a step: recorded as a rank issues them, learned once the
step succeeded, and completed by a rank that failed in the middle of them.

FSDP2 issues a parameter group's all-gather in its ``unshard`` (in the forward, and
again in the backward when the forward resharded) and its reduce-scatter in its
``post_backward``. Which groups run, and in which order, follows the model's code
and autograd's order, which only running the model tells. So every step records
its sequence, and the sequences of the steps that succeeded are kept per model and
per key (the loss function's code, the groups' settings): the forward's, and the
backward's *by the forward's* (a model that skips a block in some steps has two).
A rank that raised in the middle of a step then issues the rest of the learned
sequence itself (`Schedule.complete`), and what cannot be known raises
`Unrecoverable`: a backward after a forward never seen succeed, or a sequence that
has differed between two steps after the same forward.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

Event = tuple[str, int]  # ("ag": an all-gather, "pb": a post-backward; group index)
Sequence = tuple[Event, ...]


@dataclass
class _Learned:
    """What the successful steps of one model issued, for one key."""

    forward: Sequence | None = None  # the last step's forward
    forward_varies: bool = False  # two steps of one call ran different forwards
    backward: dict[Sequence, Sequence] = field(default_factory=dict)  # by the forward's
    backward_varies: set[Sequence] = field(default_factory=set)  # forwards it differed after
    rehearsed: bool = False  # what is here comes from the 0-row rehearsal only


_LEARNED: weakref.WeakKeyDictionary[nn.Module, dict[object, _Learned]] = weakref.WeakKeyDictionary()


class Unrecoverable(Exception):
    """No sequence of collectives to complete, or this rank's part differs from it."""


class Schedule:
    """The collectives of this call's steps on this rank.

    Each parameter group's ``unshard`` (an all-gather, when it issues one) and
    ``post_backward`` (a reduce-scatter when gradients are synced, with HSDP's
    all-reduce) are wrapped for the call. The wrapped ``post_backward`` also notes
    which parameters got a gradient on this rank (the unused ones get None)."""

    def __init__(
        self, model: nn.Module, groups: list[Any], params: list[nn.Parameter], loss_fn: object
    ) -> None:
        self.model, self.groups = model, groups
        # FSDP sets its root up (its streams, the root's settings that the key holds)
        # in the model's first forward, which a rank may not reach before it has to
        # complete the others' collectives (a loss function raising before calling
        # the model): set it up now, as that forward would (a no-op afterwards).
        model._get_fsdp_state()._lazy_init()  # type: ignore[operator]
        # What decides the sequence besides the model's code: which blocks the loss
        # function runs, and the groups' settings (fixed during a call).
        self.key: object = (
            getattr(loss_fn, "__code__", type(loss_fn)),
            tuple(
                (
                    g.post_forward_mesh_info is not None,
                    g.unshard_in_backward,
                    g.reshard_after_backward,
                )
                for g in groups
            ),
        )
        self.events: list[Event] = []
        self.forward_end = 0
        self.call_forward: Sequence | None = None  # this call's last step's
        position = {id(p): i for i, p in enumerate(params)}
        self.used = [False] * len(params)
        self.where = [[position.get(id(f.sharded_param)) for f in g.fsdp_params] for g in groups]

    def unknown(self) -> bool:
        """Whether no step of this model with this key has run here yet (nor the
        rehearsal that would learn one)."""
        return self.key not in _LEARNED.get(self.model, {})

    def wrap(self) -> None:
        for index, group in enumerate(self.groups):
            group.unshard = self._unshard(group, index)
            group.post_backward = self._post_backward(group, index)

    def unwrap(self) -> None:
        for group in self.groups:
            group.__dict__.pop("unshard", None)
            group.__dict__.pop("post_backward", None)

    def _unshard(self, group: Any, index: int) -> Any:
        original = type(group).unshard

        def unshard(async_op: bool = False) -> None:
            pending = group._all_gather_result is None
            original(group, async_op)
            if pending and group._all_gather_result is not None:
                self.events.append(("ag", index))

        return unshard

    def _post_backward(self, group: Any, index: int) -> Any:
        original = type(group).post_backward
        where = self.where[index]

        def post_backward(*unused: Any) -> None:
            for fsdp_param, at in zip(group.fsdp_params, where, strict=True):
                if at is not None and not self.used[at] and _has_grad(fsdp_param):
                    self.used[at] = True
            original(group, *unused)
            self.events.append(("pb", index))

        return post_backward

    def begin(self) -> None:
        self.events = []
        self.forward_end = 0

    def forward_done(self) -> None:
        self.forward_end = len(self.events)

    def forward_events(self) -> Sequence:
        return tuple(self.events[: self.forward_end])

    def backward_events(self) -> list[Event]:
        return self.events[self.forward_end :]

    def learn(self, rehearsal: bool = False) -> None:
        """Keep this step's sequence (it succeeded on every rank)."""
        forward, backward = self.forward_events(), tuple(self.backward_events())
        learned = self._learned()
        # (a 0-row step may run other blocks than real ones: it only stands in)
        if not learned.rehearsed and learned.backward.get(forward, backward) != backward:
            learned.backward_varies.add(forward)
        learned.backward[forward] = backward
        learned.rehearsed = rehearsal
        if not rehearsal:
            self.ran(forward)

    def ran(self, forward: Sequence) -> None:
        """A step of this call ran this forward on every rank: the next step's is
        expected to be the same (a model's blocks may change between calls)."""
        learned = self._learned()
        if self.call_forward is not None and self.call_forward != forward:
            learned.forward_varies = True
        self.call_forward = learned.forward = forward

    def _learned(self) -> _Learned:
        return _LEARNED.setdefault(self.model, {}).setdefault(self.key, _Learned())

    def rehearsal_failed(self) -> None:
        """Nothing learned, and no other rehearsal for this key."""
        _LEARNED.setdefault(self.model, {}).setdefault(self.key, _Learned(rehearsed=True))

    def forget_used(self) -> None:
        """What a step that does not count (the rehearsal) used."""
        self.used = [False] * len(self.used)

    def expected(self, where: str) -> list[Event]:
        """The others' sequence of this step's forward, or of its backward (after the
        forward this rank ran)."""
        learned = _LEARNED.get(self.model, {}).get(self.key, _Learned())
        if where == "forward":
            if learned.forward is None:  # FSDP's own order: the modules', the root first
                return [("ag", index) for index in range(len(self.groups))]
            if learned.forward_varies:
                raise Unrecoverable(
                    "the model's forward has issued different collectives in two steps "
                    "of one call, so the others' is not known"
                )
            return list(learned.forward)
        forward = self.forward_events()
        if forward in learned.backward_varies:
            raise Unrecoverable(
                "the model's backward has issued different collectives after the same "
                "forward in different steps, so the others' is not known"
            )
        if forward not in learned.backward:
            raise Unrecoverable(
                "no backward of this model after this step's forward had succeeded yet, "
                "so the others' sequence of collectives is not known"
            )
        return list(learned.backward[forward])

    def complete(self, where: str, done: list[Event]) -> None:
        """Issue the collectives of ``where`` that follow ``done`` (this rank's part),
        with FSDP's own methods; what they contribute is thrown away."""
        from torch.distributed.fsdp._fully_shard._fsdp_common import TrainingState

        expected = self.expected(where)
        if expected[: len(done)] != done:
            raise Unrecoverable(f"this rank's {where} issued {done}, not the start of {expected}")
        with torch.no_grad():
            for kind, index in expected[len(done) :]:
                group = self.groups[index]
                with group.use_training_state(TrainingState.IDLE):
                    if kind == "ag":
                        if group._all_gather_result is not None:
                            group.wait_for_unshard()
                        group.reshard()
                        type(group).unshard(group)
                        group.wait_for_unshard()
                        group.reshard()
                    else:
                        type(group).post_backward(group)


def _has_grad(fsdp_param: Any) -> bool:
    """Whether this rank's backward gave the parameter a gradient so far."""
    if fsdp_param.unsharded_accumulated_grad is not None:
        return True
    unsharded = getattr(fsdp_param, "_unsharded_param", None)
    return unsharded is not None and unsharded.grad is not None
