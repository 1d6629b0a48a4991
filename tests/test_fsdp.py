"""Accumulation on FSDP2 models (`fully_shard`) with real gloo processes on 127.0.0.1.

Each world size is launched once (bounded by a timeout) and runs every scenario and
fault on its ranks; the parent compares each rank's full gradients
(``p.grad.full_tensor()``) with one process on the whole batch.
"""

from __future__ import annotations

import importlib.util
import itertools
import json
import random
import re
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType

import pytest
import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

import batchgrad as bg
from batchgrad import _check, _distributed
from batchgrad._distributed import launch
from batchgrad.cli import main
from tests import factories
from tests.cases import CASES, reference_grads, rel_err

CASE = {case.id: case for case in CASES}
N = 12

# (id, case, shard bounds per rank, micro_batch_size, reduction, grad_sync)
SCENARIOS = {
    2: [
        ("uneven-once", "mlp-ce-ignore", [(0, 3), (3, 12)], 2, "mean", "once"),
        ("uneven-per-mb-sum", "mlp-ce-ignore", [(0, 7), (7, 12)], 2, "sum", "per_micro_batch"),
        ("idle-once", "mlp-mse-mask", [(0, 0), (0, 12)], 5, "mean", "once"),
        (
            "idle-iterable-per-mb",
            "mlp-mse-mask",
            [(0, 12), (12, 12)],
            None,
            "sum",
            "per_micro_batch",
        ),
        ("tokens-once", "lm-padded", [(0, 4), (4, 12)], 3, "mean", "once"),
        ("tokens-per-mb", "lm-padded", [(0, 7), (7, 12)], 2, "mean", "per_micro_batch"),
        ("tokens-idle-sum", "lm-padded", [(0, 12), (12, 12)], 5, "sum", "once"),
    ],
    3: [
        ("uneven-once", "mlp-ce-ignore", [(0, 2), (2, 7), (7, 12)], 2, "mean", "once"),
        ("idle-per-mb", "lm-padded", [(0, 5), (5, 5), (5, 12)], 2, "mean", "per_micro_batch"),
        ("tokens-sum-once", "lm-padded", [(0, 1), (1, 6), (6, 12)], 2, "sum", "once"),
    ],
}


def _random_scenarios(count: int, nproc: int, seed: int) -> list[tuple]:
    """Random splits over the ranks (some idle), micro-batch sizes, reductions and
    grad-sync modes, drawn reproducibly."""
    rng = random.Random(seed)
    out = []
    for index in range(count):
        cuts = sorted(rng.randint(0, N) for _ in range(nproc - 1))
        bounds = [0, *cuts, N]
        shards = list(itertools.pairwise(bounds))
        case = rng.choice(["mlp-ce-ignore", "mlp-mse-mask", "lm-padded"])
        size = rng.randint(1, 5)
        out.append(
            (
                f"random-{index}",
                case,
                shards,
                size,
                rng.choice(["mean", "sum"]),
                rng.choice(["once", "per_micro_batch"]),
            )
        )
    return out


SCENARIOS[3] += _random_scenarios(6, 3, seed=19)


def _shard(model: nn.Module, **kwargs: object) -> nn.Module:
    """``fully_shard`` per block (the transformer's layers, the MLP's linears), then
    at the root."""
    blocks = (
        list(model.blocks.layers)
        if hasattr(model, "blocks")
        else [m for m in model.modules() if isinstance(m, nn.Linear)]
    )
    for block in blocks:
        fully_shard(block, **kwargs)
    fully_shard(model, **kwargs)
    return model


def _full(model: nn.Module) -> list[torch.Tensor]:
    return [
        torch.zeros(p.shape, dtype=p.dtype) if p.grad is None else p.grad.full_tensor().clone()
        for p in model.parameters()
    ]


def _local(batch, shards, size, rank):  # type: ignore[no-untyped-def]
    start, stop = shards[rank]
    local = bg._split.slice_batch(batch, start, stop)
    if size is None:  # ready-made micro-batches of uneven sizes (an empty list if none)
        cuts = [*range(start, stop, 5), stop] if stop > start else []
        local = iter([bg._split.slice_batch(batch, a, b) for a, b in itertools.pairwise(cuts)])
    return local


def _scenarios(nproc: int) -> dict[str, object]:
    rank = dist.get_rank()
    out = {}
    for name, case_id, shards, size, reduction, grad_sync in SCENARIOS[nproc]:
        case = CASE[case_id]
        model, batch = case.build(N, torch.float64, seed=7)
        _shard(model)
        report = bg.accumulate(
            model,
            case.loss_fn,
            _local(batch, shards, size, rank),
            micro_batch_size=size,
            reduction=reduction,
            grad_sync=grad_sync,
        )
        out[name] = (_full(model), report)
    return out


def _index(calls: Iterator[int], micro_batch: object) -> int | None:
    """The index of a real micro-batch among a loss_fn's calls; None for a 0-row one
    (a padding step, or the rehearsal that starts a model's first call)."""
    return next(calls) if bg._split.batch_length(micro_batch) else None


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()


FAULTS = [
    # (fault, expected class on every rank, text of the message)
    ("nan-loss", "NonFiniteError", r"micro-batch 1: The loss of micro-batch 1 is nan"),
    ("raise-in-loss-fn", "DistributedError", r"micro-batch 0: ValueError: bad row"),
    ("negative-count", "LossTypeError", r"Loss.count of micro-batch 0 is -1"),
    ("bad-grad-sync", "ConfigError", r"grad_sync must be one of"),
    ("reduction-mismatch", "ConfigError", r"reduction: rank 0: 'mean'"),
    ("stale-grads", "ExistingGradError", r"already hold non-zero gradients"),
    ("scaler", "ConfigError", r"scaler= and accumulate_dtype= are not supported on FSDP"),
    ("group", "ConfigError", r"group= is not used on FSDP models"),
]


def _faults() -> dict[str, object]:
    """Each fault on one rank (the last), on one model reused throughout: the error
    on every rank, the gradients before the call kept (same tensors, same values),
    and the next call on the same model exact."""
    rank, world = dist.get_rank(), dist.get_world_size()
    failing = world - 1
    model = _shard(_net())
    x = torch.randn(5 * world, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    local = x[5 * rank : 5 * (rank + 1)]

    def square(m, b):  # type: ignore[no-untyped-def]
        return bg.Loss.from_values(m(b).square())

    def faulty(fault: str):  # type: ignore[no-untyped-def]
        calls = itertools.count()

        def loss_fn(m, b):  # type: ignore[no-untyped-def]
            index = _index(calls, b)
            loss = square(m, b)
            if rank != failing:
                return loss
            if fault == "nan-loss" and index == 1:
                return bg.Loss(loss.total * float("nan"), loss.count)
            if fault == "raise-in-loss-fn":
                raise ValueError("bad row")
            if fault == "negative-count":
                return bg.Loss(loss.total, -1)
            return loss

        return loss_fn

    out: dict[str, object] = {}
    bg.accumulate(model, square, local, micro_batch_size=2)
    for grad_sync in ("once", "per_micro_batch"):
        for fault, _, _ in FAULTS:  # each call after a failure is the next one's start
            before = [p.grad for p in model.parameters()]
            values = _full(model)
            kwargs: dict[str, object] = {"micro_batch_size": 2, "grad_sync": grad_sync}
            kwargs["existing_grad"] = "error" if fault == "stale-grads" else "add"
            if rank == failing and fault == "bad-grad-sync":
                kwargs["grad_sync"] = "sometimes"
            if rank == failing and fault == "reduction-mismatch":
                kwargs["reduction"] = "sum"
            if rank == failing and fault == "scaler":
                kwargs["scaler"] = torch.amp.GradScaler("cpu")
            if rank == failing and fault == "group":
                kwargs["group"] = dist.group.WORLD
            try:
                bg.accumulate(model, faulty(fault), local, **kwargs)
                got, message = "no error", ""
            except bg.BatchError as error:
                got, message = type(error).__name__, str(error)
            kept = all(p.grad is b for p, b in zip(model.parameters(), before, strict=True))
            same = rel_err(_full(model), values) == 0.0
            model.zero_grad()
            report = bg.accumulate(model, square, local, micro_batch_size=2, grad_sync=grad_sync)
            out[f"{fault}-{grad_sync}"] = (got, message, kept and same, _full(model), report)
    # existing_grad="add": the old gradient plus the new one
    bg.accumulate(model, square, local, micro_batch_size=2, existing_grad="replace")
    old = _full(model)
    report = bg.accumulate(model, square, local, micro_batch_size=3, existing_grad="add")
    out["add"] = (old, _full(model), report)
    try:  # check runs the model whole in one process: refused, pointing to fsdp=True
        bg.check(model, square, local, micro_batch_size=2)
        out["check"] = "no error"
    except bg.ConfigError as error:
        out["check"] = str(error)
    return {"faults": out, "x": x}


def _mixed_precision() -> tuple[list[torch.Tensor], list[torch.Tensor], str]:
    """bf16 parameters, float32 reduction: against the float32 hand-written loop."""
    rank = dist.get_rank()
    case = CASE["lm-padded"]
    model, batch = case.build(N, torch.float32, seed=7)
    _shard(model, mp_policy=MixedPrecisionPolicy(torch.bfloat16, torch.float32))
    local = _local(batch, [(0, 5), (5, 12)], 2, rank)
    bg.accumulate(model, case.loss_fn, local, micro_batch_size=2)
    mine = _full(model)
    dtype = str(next(model.parameters()).grad.dtype)
    return mine, [], dtype


def _fit_data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(5)
    return torch.randn(14, 3, generator=g, dtype=torch.float64), torch.randn(14, 1, generator=g)


def _fit_loss(model, batch):  # type: ignore[no-untyped-def]
    x, y = batch
    return bg.Loss.from_values((model(x) - y.double()).square())


def _fit(sharded: bool) -> list[tuple[float, float, int]]:
    """Three steps of `bg.fit` (SGD with momentum), sharded on every rank or alone."""
    model = _net()
    if sharded:
        _shard(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    history = bg.fit(
        model,
        _fit_loss,
        _fit_data(),
        optimizer,
        batch_size=5,
        micro_batch_size=2,
        steps=3,
        progress=False,
    )
    return [(r.loss, r.grad_norm, r.count) for r in history.steps]


class _Relay(torch.autograd.Function):
    """The identity forward, an exception in the backward."""

    @staticmethod
    def forward(ctx, x):  # type: ignore[no-untyped-def]
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        raise RuntimeError("raised in backward")


def _deep(reshard_after_forward: bool = True) -> nn.Module:
    """Three sharded linear blocks (first, middle, last) and the root."""
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
    ).double()
    for block in (model[0], model[2], model[4]):
        fully_shard(block, reshard_after_forward=reshard_after_forward)
    fully_shard(model, reshard_after_forward=reshard_after_forward)
    return model


def _deep_x(world: int) -> torch.Tensor:
    return torch.randn(
        5 * world, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3)
    )


# (where, micro-batch): an exception in a block's forward (a pre-hook: after that
# block's all-gather), or in the backward at a block's output (before any of the
# backward's collectives, or between the last block's reduce-scatter and the others')
INNER = [
    ("forward-first", 0),
    ("forward-middle", 1),
    ("forward-middle", 2),
    ("backward-last", 1),
    ("backward-middle", 1),
    ("backward-middle", 2),
]


# (failing rank: the first or the last, grad_sync, reshard_after_forward): half of
# the 8 combinations, every pair of values of two of them once
COMBOS = [
    ("first", "once", True),
    ("first", "per_micro_batch", False),
    ("last", "once", False),
    ("last", "per_micro_batch", True),
]


def _inner_cases(world: int) -> list[tuple[str, int, int, str, bool]]:
    return [
        (where, at, 0 if failing == "first" else world - 1, grad_sync, reshard)
        for where, at in INNER
        for failing, grad_sync, reshard in COMBOS
    ]


def _square(m, b):  # type: ignore[no-untyped-def]
    return bg.Loss.from_values(m(b).square())


def _inner_faults() -> dict[object, object]:
    """An exception inside one rank's forward or backward, in the middle of FSDP's
    collectives, for every case of `_inner_cases`: the error on every rank, the
    gradients before the call kept, the next call exact; on one model per
    ``reshard_after_forward``, reused throughout."""
    rank, world = dist.get_rank(), dist.get_world_size()
    models = {reshard: _deep(reshard) for reshard in (True, False)}
    local = _deep_x(world)[5 * rank : 5 * (rank + 1)]
    for model in models.values():  # learns the sequence of collectives
        bg.accumulate(model, _square, local, micro_batch_size=2)
    out: dict[object, object] = {}  # each call after a failure is the next one's start
    for case in _inner_cases(world):
        where, at, failing, grad_sync, reshard = case
        model = models[reshard]
        block = {"first": model[0], "middle": model[2], "last": model[4]}[where.split("-")[1]]
        calls = itertools.count()

        def loss_fn(m, b, where=where, at=at, failing=failing, block=block, calls=calls):  # type: ignore[no-untyped-def]
            if rank != failing or _index(calls, b) != at:
                return _square(m, b)
            if where.startswith("forward"):
                handle = block.register_forward_pre_hook(_raise_in_forward)
            else:
                handle = block.register_forward_hook(lambda _m, _a, out: _Relay.apply(out))
            try:
                return _square(m, b)
            finally:
                handle.remove()

        before = [p.grad for p in model.parameters()]
        values = _full(model)
        try:
            bg.accumulate(
                model, loss_fn, local, micro_batch_size=2, grad_sync=grad_sync, existing_grad="add"
            )
            got, message = "no error", ""
        except bg.BatchError as error:
            got, message = type(error).__name__, str(error)
        kept = all(p.grad is b for p, b in zip(model.parameters(), before, strict=True))
        same = rel_err(_full(model), values) == 0.0
        model.zero_grad()
        bg.accumulate(model, _square, local, micro_batch_size=2, grad_sync=grad_sync)
        out[case] = (got, message, kept and same, _full(model))
    out["lm"] = _lm_backward_fault()
    return out


def _lm_backward_fault() -> tuple[str, str, bool, list[torch.Tensor]]:
    """The transformer LM (embeddings and head in the root, the layer sharded): the
    last rank's backward raises at the layer's output in its second micro-batch."""
    rank, world = dist.get_rank(), dist.get_world_size()
    case = CASE["lm-padded"]
    model, batch = case.build(N, torch.float64, seed=7)
    _shard(model)
    shards = [(N * r // world, N * (r + 1) // world) for r in range(world)]
    local = _local(batch, shards, 2, rank)
    bg.accumulate(model, case.loss_fn, local, micro_batch_size=2)
    before = [p.grad for p in model.parameters()]
    values = _full(model)
    calls = itertools.count()

    def loss_fn(m, b):  # type: ignore[no-untyped-def]
        if rank != world - 1 or _index(calls, b) != 1:
            return case.loss_fn(m, b)
        layer = m.blocks.layers[0]
        handle = layer.register_forward_hook(lambda _m, _a, out: _Relay.apply(out))
        try:
            return case.loss_fn(m, b)
        finally:
            handle.remove()

    try:
        bg.accumulate(model, loss_fn, local, micro_batch_size=2, existing_grad="add")
        got, message = "no error", ""
    except bg.BatchError as error:
        got, message = type(error).__name__, str(error)
    kept = all(p.grad is b for p, b in zip(model.parameters(), before, strict=True))
    kept = kept and rel_err(_full(model), values) == 0.0
    model.zero_grad()
    bg.accumulate(model, case.loss_fn, local, micro_batch_size=2)
    return got, message, kept, _full(model)


def _raise_in_forward(module, args):  # type: ignore[no-untyped-def]
    raise RuntimeError("raised in forward")


def _deep_reference(x: torch.Tensor) -> list[torch.Tensor]:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 8), nn.Tanh(), nn.Linear(8, 1)
    ).double()
    return list(torch.autograd.grad(model(x).square().mean(0).sum(), list(model.parameters())))


def _first_forward_fault() -> tuple[str, str, list[torch.Tensor]]:
    """An exception inside the last rank's very first forward of a fresh model
    (nothing learned yet: FSDP's own order of its modules is completed), then the
    next call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _deep()
    local = _deep_x(world)[5 * rank : 5 * (rank + 1)]
    handle = model[2].register_forward_pre_hook(_raise_in_forward) if rank == world - 1 else None
    try:
        bg.accumulate(model, _square, local, micro_batch_size=2)
        got, message = "no error", ""
    except bg.BatchError as error:
        got, message = type(error).__name__, str(error)
    if handle is not None:
        handle.remove()
    bg.accumulate(model, _square, local, micro_batch_size=2)
    return got, message, _full(model)


def _fetch_fault() -> tuple[str, str, list[torch.Tensor]]:
    """The last rank's iterable of micro-batches raises at its third, while the
    others run that step's forward (and its all-gathers); then the next call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _deep()
    local = _deep_x(world)[5 * rank : 5 * (rank + 1)]

    def parts():  # type: ignore[no-untyped-def]
        for start in range(0, 5, 2):
            if rank == world - 1 and start == 4:
                raise OSError("the data loader broke")
            yield local[start : start + 2]

    try:
        bg.accumulate(model, _square, parts(), grad_sync="per_micro_batch")
        got, message = "no error", ""
    except bg.BatchError as error:
        got, message = type(error).__name__, str(error)
    bg.accumulate(model, _square, local, micro_batch_size=2)
    return got, message, _full(model)


class _Unused(nn.Module):
    """A block holding a layer that no loss reaches (in the same parameter group)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used, self.spare = nn.Linear(3, 2).double(), nn.Linear(3, 2).double()

    def forward(self, x):  # type: ignore[no-untyped-def]
        return self.used(x)


def _unused_model() -> nn.Module:
    model = nn.Sequential(_Unused(), nn.Linear(2, 1).double())
    fully_shard(model[0])
    fully_shard(model)
    return model


def _unused() -> dict[str, object]:
    """A parameter no rank's loss reaches: batchgrad against plain FSDP2 (its
    defaults, a hand-written loop)."""
    rank = dist.get_rank()
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    local = x[4 * rank : 4 * (rank + 1)] if rank < 2 else x[:0]
    out: dict[str, object] = {}
    for grad_sync in ("once", "per_micro_batch"):
        model = _unused_model()
        bg.accumulate(model, _square, local, micro_batch_size=3, grad_sync=grad_sync)
        out[grad_sync] = [p.grad is None for p in model.parameters()]
    model = _unused_model()
    for start in range(0, 4, 2):  # plain FSDP2: every rank runs two micro-batches
        model(local[start : start + 2]).square().sum().backward()
    out["plain"] = [p.grad is None for p in model.parameters()]
    return out


def _outcome(call) -> tuple[str, str]:  # type: ignore[no-untyped-def]
    """The class and message of the `BatchError` that ``call()`` raised, if any."""
    try:
        call()
    except bg.BatchError as error:
        return type(error).__name__, str(error)
    return "no error", ""


def _relaying(fails: bool, state: dict[str, bool]):  # type: ignore[no-untyped-def]
    """`_square`, raising in the backward of its real micro-batches while
    ``state["fail"]`` on the rank that ``fails``."""

    def loss_fn(m, b):  # type: ignore[no-untyped-def]
        out = m(b)
        if fails and state["fail"] and len(b):
            out = _Relay.apply(out)
        return bg.Loss.from_values(out.square())

    return loss_fn


def _first_backward_fault() -> tuple[str, str, bool, list[torch.Tensor]]:
    """An exception inside one rank's first real backward of a fresh model (its
    0-row rehearsal went through), then the next call."""
    rank = dist.get_rank()
    model = _shard(_net())
    x = _deep_x(2)[5 * rank : 5 * (rank + 1)]
    state = {"fail": True}
    loss_fn = _relaying(rank == 1, state)

    got, message = _outcome(lambda: bg.accumulate(model, loss_fn, x, micro_batch_size=2))
    untouched = all(p.grad is None for p in model.parameters())
    state["fail"] = False
    bg.accumulate(model, loss_fn, x, micro_batch_size=2)
    return got, message, untouched, _full(model)


class _Counting(nn.Module):
    """A linear block counting its forwards in a buffer, and refusing 0 rows when
    told to."""

    def __init__(self, refuse_empty: bool) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.linear = nn.Linear(3, 1).double()
        self.refuse_empty = refuse_empty
        self.register_buffer("forwards", torch.zeros((), dtype=torch.int64))

    def forward(self, x):  # type: ignore[no-untyped-def]
        if self.refuse_empty and not len(x):
            raise ValueError("no rows")
        self.forwards += 1
        return self.linear(x)


def _rehearsals() -> dict[str, object]:
    """What a model's first call does besides its micro-batches: its 0-row rehearsal
    changes no buffer, runs once per model and loss_fn, and a model that refuses 0
    rows (an even split: no padding step) still gets the exact gradient."""
    rank = dist.get_rank()
    x = _deep_x(2)[5 * rank : 5 * (rank + 1)]
    out: dict[str, object] = {}
    for refuse in (False, True):
        model = _Counting(refuse)
        fully_shard(model.linear)
        fully_shard(model)
        empty = [0]

        def loss_fn(m, b, empty=empty):  # type: ignore[no-untyped-def]
            empty[0] += not len(b)
            return bg.Loss.from_values(m(b).square())

        counts = []
        for _ in range(2):
            bg.accumulate(model, loss_fn, x, micro_batch_size=5, existing_grad="replace")
            counts.append(int(model.forwards))
        out[f"refuse={refuse}"] = (counts, empty[0], _full(model))
    # micro-batches batchgrad cannot slice 0 rows of (no padding, no rehearsal), on a
    # fresh model: every rank raises before its forward, completes it, goes on
    model = _shard(_net())
    parts = [_Rows(x[start : start + 2]) for start in range(0, 5, 2)]
    bg.accumulate(model, lambda m, b: _square(m, b.x), iter(parts))
    out["unstructured"] = _full(model)
    return out


class _Rows:
    """A micro-batch of a type batchgrad does not know."""

    def __init__(self, x: torch.Tensor) -> None:
        self.x = x


def _rehearsal_faults() -> dict[str, object]:
    """The rehearsal's own failures that do not stop the group, each followed by
    the next call: the last rank raising in the rehearsal's backward where it knew
    the sequence and rank 0 did not (rank 0 asked for the rehearsal), and a
    KeyboardInterrupt in the rehearsal's forward on the last rank."""
    from batchgrad import _fsdp_schedule

    rank, world = dist.get_rank(), dist.get_world_size()
    x = _deep_x(world)[5 * rank : 5 * (rank + 1)]
    out: dict[str, object] = {}
    model = _shard(_net())
    state = {"fail": False}

    def raising(m, b):  # type: ignore[no-untyped-def]
        value = m(b)
        if state["fail"] and rank == world - 1 and not len(b):
            value = _Relay.apply(value)
        return bg.Loss.from_values(value.square())

    bg.accumulate(model, raising, x, micro_batch_size=2)
    before, values = [p.grad for p in model.parameters()], _full(model)
    if rank == 0:
        _fsdp_schedule._LEARNED.pop(model)
    state["fail"] = True
    got, message = _outcome(
        lambda: bg.accumulate(model, raising, x, micro_batch_size=2, existing_grad="add")
    )
    kept = all(p.grad is b for p, b in zip(model.parameters(), before, strict=True))
    kept = kept and rel_err(_full(model), values) == 0.0
    state["fail"] = False
    bg.accumulate(model, raising, x, micro_batch_size=2, existing_grad="replace")
    out["told"] = (got, message, kept, _full(model))

    model = _shard(_net())

    def interrupted(m, b):  # type: ignore[no-untyped-def]
        if state["fail"] and rank == world - 1 and not len(b):
            raise KeyboardInterrupt
        return _square(m, b)

    state["fail"] = True
    got, message = _outcome(lambda: bg.accumulate(model, interrupted, x, micro_batch_size=2))
    untouched = all(p.grad is None for p in model.parameters())
    state["fail"] = False
    bg.accumulate(model, interrupted, x, micro_batch_size=2)
    out["interrupted"] = (got, message, untouched, _full(model))
    return out


def _backward_fault() -> tuple[str, str]:
    """An exception inside one rank's every backward, the 0-row rehearsal's of a
    fresh model included: no sequence of the backward's collectives known, so every
    rank raises `DistributedError` at once (the group is shut down)."""
    rank = dist.get_rank()
    model = _shard(_net())
    x = torch.randn(6, 3, dtype=torch.float64)

    def loss_fn(m, b):  # type: ignore[no-untyped-def]
        out = m(b)
        if rank == 1:
            out = _Relay.apply(out)
        return bg.Loss.from_values(out.square())

    try:
        bg.accumulate(model, loss_fn, x, micro_batch_size=2)
    except bg.BatchError as error:
        return type(error).__name__, str(error)
    return "no error", ""


BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
BENCHMARK_QUICK = (8, [4], 1, 2)  # sequences per rank, micro-batch counts, repeats, layers


def _fsdp_benchmark() -> ModuleType:
    """``benchmarks/fsdp_communication.py`` from its file (benchmarks/ is no package)."""
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))  # as when it runs as a script: finds common.py
    name = "benchmarks_fsdp_communication"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, BENCHMARKS / "fsdp_communication.py")
        assert spec is not None
        assert spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


class _Skipping(nn.Module):
    """Three sharded blocks; the middle one skipped while ``skip`` is set."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.blocks = nn.ModuleList(nn.Linear(3, 3).double() for _ in range(3))
        self.skip = False

    def forward(self, x):  # type: ignore[no-untyped-def]
        for index, block in enumerate(self.blocks):
            if not (self.skip and index == 1):
                x = block(x)
        return x


def _skipping_model(skip: bool) -> nn.Module:
    model = _Skipping()
    model.skip = skip
    for block in model.blocks:
        fully_shard(block)
    fully_shard(model)
    return model


def _skipping_reference(x: torch.Tensor) -> list[torch.Tensor]:
    model = _Skipping()
    return list(torch.autograd.grad(model(x).square().mean(), list(model.parameters())))


def _skipping_fault() -> tuple[str, str, list[torch.Tensor]]:
    """A model that skips a block in some steps (the same loss_fn): an exception in
    the last rank's backward after a forward seen before is completed from what
    that forward's backward issued; then the next call."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _skipping_model(skip=False)
    local = _deep_x(world)[5 * rank : 5 * (rank + 1)]
    state = {"fail": False}
    loss_fn = _relaying(rank == world - 1, state)

    for skip in (False, True):
        model.skip = skip
        bg.accumulate(model, loss_fn, local, micro_batch_size=2, existing_grad="replace")
    model.skip, state["fail"] = False, True
    got, message = _outcome(
        lambda: bg.accumulate(model, loss_fn, local, micro_batch_size=2, existing_grad="replace")
    )
    state["fail"] = False
    bg.accumulate(model, loss_fn, local, micro_batch_size=2, existing_grad="replace")
    return got, message, _full(model)


def _unseen_forward_fault() -> tuple[str, str]:
    """An exception in the last rank's backward after a forward never seen to
    succeed (the block skipped until then, the rehearsal's included): not completed
    but every rank stops at once (the group is shut down)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    model = _skipping_model(skip=True)
    local = _deep_x(world)[5 * rank : 5 * (rank + 1)]
    state = {"fail": False}
    loss_fn = _relaying(rank == world - 1, state)

    bg.accumulate(model, loss_fn, local, micro_batch_size=2)
    model.skip, state["fail"] = False, True
    return _outcome(
        lambda: bg.accumulate(model, loss_fn, local, micro_batch_size=2, existing_grad="replace")
    )


def _run(nproc: int) -> dict[str, object]:
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    results: dict[str, object] = {"scenarios": _scenarios(nproc), **_faults()}
    results["inner"] = _inner_faults()
    results["first-forward"] = _first_forward_fault()
    results["fetch"] = _fetch_fault()
    if nproc == 2:
        results["mixed"] = _mixed_precision()
        results["fit"] = _fit(sharded=True)
        # what `python benchmarks/fsdp_communication.py --quick` runs on each rank
        results["benchmark"] = _fsdp_benchmark()._worker(*BENCHMARK_QUICK)
        results["first-backward"] = _first_backward_fault()
        results["rehearsals"] = _rehearsals()
        results["rehearsal-faults"] = _rehearsal_faults()
        results["backward"] = _backward_fault()  # last: it shuts the group down
    else:
        results["unused"] = _unused()
        # what `batchgrad check tests/factories.py:exact --nproc 3 --fsdp` runs on each rank
        results["check"] = _check._rank_check(factories.exact, 4, "mean", None, True)
        results["skipping"] = _skipping_fault()
        results["unseen"] = _unseen_forward_fault()  # last: it shuts the group down
    return results


HSDP_SHARDS = [(0, 2), (2, 2), (2, 7), (7, 12)]  # rank 1 idle


def _hsdp() -> dict[str, object]:
    """HSDP: 2 replicas of 2 shards (``init_device_mesh("cpu", (2, 2))``), 4 ranks."""
    warnings.filterwarnings("ignore", message=".*returned a view tensor.*")
    mesh = init_device_mesh("cpu", (2, 2), mesh_dim_names=("replicate", "shard"))
    case = CASE["lm-padded"]
    out = {}
    for grad_sync in ("once", "per_micro_batch"):
        model, batch = case.build(N, torch.float64, seed=7)
        _shard(model, mesh=mesh)
        local = _local(batch, HSDP_SHARDS, 2, dist.get_rank())
        report = bg.accumulate(model, case.loss_fn, local, micro_batch_size=2, grad_sync=grad_sync)
        out[grad_sync] = (_full(model), report)
    # the last rank's backward raises in its second micro-batch; then the next call
    before, values, calls = [p.grad for p in model.parameters()], _full(model), itertools.count()

    def loss_fn(m, b):  # type: ignore[no-untyped-def]
        if dist.get_rank() != 3 or _index(calls, b) != 1:
            return case.loss_fn(m, b)
        handle = m.blocks.layers[0].register_forward_hook(lambda _m, _a, o: _Relay.apply(o))
        try:
            return case.loss_fn(m, b)
        finally:
            handle.remove()

    try:
        bg.accumulate(model, loss_fn, local, micro_batch_size=2, existing_grad="add")
        got = "no error"
    except bg.BatchError as error:
        got = f"{type(error).__name__}: {error}"
    kept = all(p.grad is b for p, b in zip(model.parameters(), before, strict=True))
    kept = kept and rel_err(_full(model), values) == 0.0
    model.zero_grad()
    bg.accumulate(model, case.loss_fn, local, micro_batch_size=2)
    out["fault"] = (got, kept, _full(model))
    return out


def test_hsdp_on_a_2d_mesh_equals_one_process_on_the_whole_batch():
    results = launch(_hsdp, 4, timeout=240)
    case = CASE["lm-padded"]
    model, batch = case.build(N, torch.float64, seed=7)
    expected = reference_grads(case, model, batch, "mean")
    norm = sum(float(g.square().sum()) for g in expected) ** 0.5
    for grad_sync in ("once", "per_micro_batch"):
        for rank in range(4):
            grads, report = results[rank][grad_sync]
            assert rel_err(grads, expected) <= 1e-10, (grad_sync, rank)
            assert report.count == float(case.loss_fn(model, batch).count)
            assert report.micro_batches == 1 + 0 + 3 + 3
            assert report.world_size == 4
            assert report.grad_norm == pytest.approx(norm, rel=1e-10)
    for rank in range(4):  # a failure inside one rank's backward, contained
        got, kept, after = results[rank]["fault"]
        assert got.startswith("DistributedError: On rank 3, micro-batch 1: RuntimeError"), got
        assert kept, rank
        assert rel_err(after, expected) <= 1e-10, rank


@pytest.fixture(scope="module")
def world2():
    return 2, launch(_run, 2, 2, timeout=240)


@pytest.fixture(scope="module")
def world3():
    return 3, launch(_run, 3, 3, timeout=240)


@pytest.fixture(scope="module", params=[2, 3], ids=["2-ranks", "3-ranks"])
def world(request):
    """Each world size launched once, shared with the tests of one size only."""
    return request.getfixturevalue(f"world{request.param}")


def test_every_scenario_equals_one_process_on_the_whole_batch(world):
    nproc, results = world
    for name, case_id, shards, size, reduction, _ in SCENARIOS[nproc]:
        case = CASE[case_id]
        model, batch = case.build(N, torch.float64, seed=7)
        expected = reference_grads(case, model, batch, reduction)
        expected_loss = float(case.reference(model, batch, reduction).detach())
        expected_count = float(case.loss_fn(model, batch).count)
        expected_norm = sum(float(g.square().sum()) for g in expected) ** 0.5
        mine = [
            len(list(_local(batch, shards, size, r))) if size is None else 0 for r in range(nproc)
        ]
        micro = sum(len(results[r]["scenarios"][name][1].micro_batch_counts) for r in range(nproc))
        for rank in range(nproc):
            grads, report = results[rank]["scenarios"][name]
            assert rel_err(grads, expected) <= 1e-10, (name, rank)
            assert report.loss == pytest.approx(expected_loss, rel=1e-10), (name, rank)
            assert report.count == expected_count
            assert report.world_size == nproc
            assert report.micro_batches == micro  # the micro-batches of every rank
            assert report.grad_norm == pytest.approx(expected_norm, rel=1e-10)
            if size is None:
                assert len(report.micro_batch_counts) == mine[rank]
        # the split is the one asked for: ceil(rows / size) micro-batches per rank
        if size is not None:
            rows = [stop - start for start, stop in shards]
            assert micro == sum(-(-r // size) for r in rows)


def _square_reference(x: torch.Tensor, reduction: str = "mean") -> list[torch.Tensor]:
    model = _net()
    loss = model(x).square().sum() / (x.shape[0] if reduction == "mean" else 1)
    return list(torch.autograd.grad(loss, list(model.parameters())))


@pytest.mark.parametrize("grad_sync", ["once", "per_micro_batch"])
@pytest.mark.parametrize(("fault", "error", "text"), FAULTS)
def test_a_failure_on_one_rank_raises_on_every_rank_keeps_gradients_and_the_next_call_works(
    world, fault, error, text, grad_sync
):
    nproc, results = world
    expected = _square_reference(results[0]["x"])
    for rank in range(nproc):
        got, message, kept, after, report = results[rank]["faults"][f"{fault}-{grad_sync}"]
        assert got == error, (rank, message)
        assert re.search(text, message), (rank, message)
        if fault not in ("bad-grad-sync", "reduction-mismatch", "stale-grads"):
            assert message.startswith(f"On rank {nproc - 1}"), (rank, message)
        assert kept, rank
        assert rel_err(after, expected) <= 1e-10, rank
        assert report.micro_batches == 3 * nproc


def test_existing_grad_add_adds_the_new_gradient(world):
    nproc, results = world
    expected = _square_reference(results[0]["x"])
    for rank in range(nproc):
        old, new, report = results[rank]["faults"]["add"]
        assert rel_err(old, expected) <= 1e-10
        assert rel_err(new, [2 * g for g in expected]) <= 1e-10
        assert report.grad_norm == pytest.approx(
            2 * sum(float(g.square().sum()) for g in expected) ** 0.5, rel=1e-10
        )


def test_check_in_one_process_refuses_a_sharded_model_and_names_the_way(world):
    nproc, results = world
    for rank in range(nproc):
        assert (
            "batchgrad check MODULE:FACTORY --nproc N --fsdp" in (results[rank]["faults"]["check"])
        )


def test_bf16_parameters_with_float32_reduction_are_exact_to_bf16_rounding(world2):
    nproc, results = world2
    case = CASE["lm-padded"]
    model, batch = case.build(N, torch.float32, seed=7)
    expected = reference_grads(case, model, batch, "mean")
    for rank in range(nproc):
        mine, _, dtype = results[rank]["mixed"]
        assert dtype == "torch.float32"  # the sharded gradients, summed in float32
        assert rel_err(mine, expected) <= 2e-2, rank  # bf16 has 8 bits of mantissa


def test_fit_on_a_sharded_model_follows_one_process(world2):
    nproc, results = world2
    expected = _fit(sharded=False)
    for rank in range(nproc):
        got = results[rank]["fit"]
        assert [c for _, _, c in got] == [c for _, _, c in expected]
        for (loss, norm, _), (loss_1, norm_1, _) in zip(got, expected, strict=True):
            assert loss == pytest.approx(loss_1, rel=1e-10)
            assert norm == pytest.approx(norm_1, rel=1e-10)


@pytest.mark.parametrize(("failing", "grad_sync", "reshard"), COMBOS)
@pytest.mark.parametrize(("where", "at"), INNER)
def test_an_exception_inside_one_ranks_forward_or_backward_raises_everywhere_and_recovers(
    world, where, at, failing, grad_sync, reshard
):
    nproc, results = world
    expected = _deep_reference(_deep_x(nproc))
    case = (where, at, 0 if failing == "first" else nproc - 1, grad_sync, reshard)
    kind = where.split("-")[0]
    for rank in range(nproc):
        got, message, kept, after = results[rank]["inner"][case]
        assert got == "DistributedError", (case, rank, message)
        assert message.startswith(
            f"On rank {case[2]}, micro-batch {at}: RuntimeError: raised in {kind}"
        ), (case, rank, message)
        assert kept, (case, rank)  # the same tensors, the same values
        assert rel_err(after, expected) <= 1e-10, (case, rank)


def test_an_exception_in_one_ranks_backward_of_a_transformer_lm_raises_and_recovers(world):
    nproc, results = world
    case = CASE["lm-padded"]
    model, batch = case.build(N, torch.float64, seed=7)
    expected = reference_grads(case, model, batch, "mean")
    outcomes = [results[rank]["inner"]["lm"] for rank in range(nproc)]
    _assert_contained(
        outcomes, f"On rank {nproc - 1}, micro-batch 1: RuntimeError: raised in", expected
    )


def _assert_contained(outcomes, prefix, expected):  # type: ignore[no-untyped-def]
    """Each rank's ``(class, message, [kept...,] gradients after the next call)``:
    `DistributedError` starting with ``prefix``, the gradients kept (where the
    outcome says), and the next call equal to ``expected``."""
    for rank, (got, message, *kept, after) in enumerate(outcomes):
        assert got == "DistributedError", message
        assert message.startswith(prefix), (rank, message)
        assert all(kept), rank
        assert rel_err(after, expected) <= 1e-10, rank


def test_an_exception_in_a_fresh_models_first_forward_is_completed_in_fsdps_order(world):
    nproc, results = world
    expected = _deep_reference(_deep_x(nproc))
    outcomes = [results[rank]["first-forward"] for rank in range(nproc)]
    _assert_contained(
        outcomes, f"On rank {nproc - 1}, micro-batch 0: RuntimeError: raised in", expected
    )


def test_a_data_loader_failing_mid_call_on_one_rank_raises_everywhere_and_recovers(world):
    nproc, results = world
    expected = _deep_reference(_deep_x(nproc))
    outcomes = [results[rank]["fetch"] for rank in range(nproc)]
    _assert_contained(
        outcomes, f"On rank {nproc - 1}, micro-batch 2: OSError: the data loader", expected
    )


def test_a_parameter_no_rank_uses_has_no_gradient_as_in_one_process(world3):
    nproc, results = world3
    # used.weight, used.bias, spare.weight, spare.bias, then the root's layer; rank 2
    # is idle
    unused = [False, False, True, True, False, False]
    for rank in range(nproc):
        out = results[rank]["unused"]
        assert out["once"] == out["per_micro_batch"] == unused, rank
        assert out["plain"] == unused, rank  # FSDP2's own defaults


def test_an_exception_in_a_fresh_models_first_backward_is_completed_from_its_rehearsal(world2):
    nproc, results = world2
    expected = _square_reference(_deep_x(nproc)[:10])
    outcomes = [results[rank]["first-backward"] for rank in range(nproc)]
    _assert_contained(
        outcomes, "On rank 1, micro-batch 0: RuntimeError: raised in backward", expected
    )


def test_the_rehearsals_own_failures_on_one_rank_raise_everywhere_and_recover(world2):
    nproc, results = world2
    expected = _square_reference(_deep_x(nproc)[:10])
    told = [results[rank]["rehearsal-faults"]["told"] for rank in range(nproc)]
    rehearsal = "the 0-row rehearsal of the model's first call"
    _assert_contained(told, f"On rank 1, {rehearsal}: RuntimeError: raised in backward", expected)
    interrupted = [results[rank]["rehearsal-faults"]["interrupted"] for rank in range(nproc)]
    _assert_contained(interrupted, f"On rank 1, {rehearsal}: KeyboardInterrupt", expected)


def test_the_rehearsal_runs_once_changes_no_buffer_and_may_fail_on_0_rows(world2):
    nproc, results = world2
    x = _deep_x(nproc)[:10]
    torch.manual_seed(0)
    reference = nn.Linear(3, 1).double()
    expected = list(torch.autograd.grad(reference(x).square().mean(), list(reference.parameters())))
    for rank in range(nproc):
        for refuse in (False, True):
            counts, empty, after = results[rank]["rehearsals"][f"refuse={refuse}"]
            assert counts == [1, 2], (rank, refuse)  # one micro-batch a call, nothing more
            assert empty == 1, (rank, refuse)  # the first call's rehearsal only
            assert rel_err(after, expected) <= 1e-10, (rank, refuse)
        unstructured = results[rank]["rehearsals"]["unstructured"]
        assert rel_err(unstructured, _square_reference(x)) <= 1e-10, rank


def test_an_exception_in_every_backward_rehearsal_included_stops_every_rank(world2):
    _, results = world2
    (kind0, text0), (kind1, text1) = results[0]["backward"], results[1]["backward"]
    assert kind0 == kind1 == "DistributedError"
    assert "Another rank failed inside the sharded model's backward" in text0
    assert text1.startswith(
        "On rank 1, the 0-row rehearsal of the model's first call: RuntimeError: raised in backward"
    )
    assert "no backward of this model after this step's forward had succeeded yet" in text1


def test_the_cli_check_across_processes_sharded_with_fsdp(world3, monkeypatch, capsys):
    """`batchgrad check ... --nproc 3 --fsdp`, its launch being the 3-rank one above."""
    nproc, results = world3

    def launched(fn, n, make, size, reduction, tolerance, fsdp, timeout):  # type: ignore[no-untyped-def]
        assert (fn, n, size, reduction, tolerance, fsdp) == (
            _check._rank_check,
            3,
            4,
            "mean",
            None,
            True,
        )
        return [results[rank]["check"] for rank in range(nproc)]

    monkeypatch.setattr(_check, "launch", launched)
    assert main(["check", "tests/factories.py:exact", "--nproc", "3", "--fsdp"]) == 0
    captured = capsys.readouterr()
    out = " ".join((captured.out + captured.err).split())
    assert "on 3 ranks" in out
    assert "OK" in out
    assert results[0]["check"].ok
    assert results[1]["check"] is results[2]["check"] is None


def test_the_fsdp_communication_benchmark_counts_the_same_gradient_traffic(
    world2, monkeypatch, tmp_path
):
    """`python benchmarks/fsdp_communication.py --quick`, its launch the 2-rank one."""
    nproc, results = world2

    def launched(fn, n, *args, timeout):  # type: ignore[no-untyped-def]
        assert (fn.__name__, n, args) == ("_worker", 2, BENCHMARK_QUICK)
        return [results[rank]["benchmark"] for rank in range(nproc)]

    monkeypatch.setattr(_distributed, "launch", launched)
    out = tmp_path / "fsdp.json"
    _fsdp_benchmark().main(["--quick", "--out", str(out)])
    rows = {row["method"]: row for row in json.loads(out.read_text())["rows"]}
    titan, no_sync = rows["torchtitan loop"], rows["no-sync loop"]
    every, once = rows["batchgrad per_micro_batch"], rows["batchgrad once"]
    groups = 3  # 2 layers and the root, each its own fully_shard
    assert titan["reduce_scatters"] == every["reduce_scatters"] == 4 * groups  # 4 micro-batches
    assert no_sync["reduce_scatters"] == once["reduce_scatters"] == groups
    assert every["reduce_scatter_bytes"] == titan["reduce_scatter_bytes"]
    assert once["reduce_scatter_bytes"] == no_sync["reduce_scatter_bytes"]
    for row in (every, once):
        assert row["all_gathers"] == titan["all_gathers"]  # even shares: no padding step
        assert row["control_all_reduces"] == 4 + 2  # one per step, one before, one after
        assert row["max_rel_diff_vs_torchtitan"] <= 1e-5  # float32
    # the first call's rehearsal: the forward's all-gathers and the backward's (the
    # root keeps its parameters), no reduce-scatter, its one agreement
    first = json.loads(out.read_text())["first_call_extra"]
    assert first["all_gathers"] == groups + 2
    assert first["reduce_scatters"] == 0
    assert first["control_all_reduces"] == 1
    # unsharded gradients kept between micro-batches: twice the shard on 2 ranks
    assert once["peak_grad_bytes"] == 2 * every["peak_grad_bytes"]


def test_an_exception_after_a_forward_seen_before_is_completed_on_a_model_that_skips(world3):
    nproc, results = world3
    expected = _skipping_reference(_deep_x(nproc))
    outcomes = [results[rank]["skipping"] for rank in range(nproc)]
    _assert_contained(
        outcomes, f"On rank {nproc - 1}, micro-batch 0: RuntimeError: raised in", expected
    )


def test_an_exception_after_a_forward_never_seen_stops_every_rank(world3):
    nproc, results = world3
    for rank in range(nproc):
        kind, text = results[rank]["unseen"]
        assert kind == "DistributedError", (rank, text)
    text = results[nproc - 1]["unseen"][1]
    assert text.startswith(f"On rank {nproc - 1}, micro-batch 0: RuntimeError: raised in backward")
    assert "no backward of this model after this step's forward had succeeded yet" in text
