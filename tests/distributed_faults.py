"""Scenarios run inside the launched gloo processes of `tests/test_distributed.py`.

Each function runs on every rank and returns plain data (error names, messages,
flags, relative errors) for the parent to assert on. One model is reused across a
whole matrix, so every case also proves that the call after a failure works.
"""

from __future__ import annotations

import copy
import itertools
import math

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook
from torch.nn.parallel import DistributedDataParallel

import batchgrad as bg

ROWS = 5  # rows per rank in the fault matrix (micro-batches of 2: 0, 1, 2)
LAST = 2


class Interrupted(KeyboardInterrupt):
    """A KeyboardInterrupt the matrix raises on purpose."""


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1)).double()


def _data(rows: int, seed: int = 1) -> Tensor:
    return torch.randn(rows, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def _square(model: nn.Module, x: Tensor) -> bg.Loss:
    return bg.Loss.from_values(model(x).square())


def _whole_batch_grads(
    module: nn.Module, x: Tensor, loss_fn=_square, reduction="mean"
) -> list[Tensor]:
    reference = copy.deepcopy(module)
    reference.zero_grad(set_to_none=True)
    loss = loss_fn(reference, x)
    value = loss.total / (float(loss.count) if reduction == "mean" else 1.0)
    params = [p for p in reference.parameters() if p.requires_grad]
    grads = torch.autograd.grad(value, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _alone() -> dist.ProcessGroup:
    """A group of this rank alone: `accumulate` in it is one process."""
    groups = [dist.new_group([r]) for r in range(dist.get_world_size())]  # every rank, each
    return groups[dist.get_rank()]


def rel(a: list[Tensor], b: list[Tensor]) -> float:
    diff = sum(float((x - y).square().sum()) for x, y in zip(a, b, strict=True))
    norm = sum(float(y.square().sum()) for y in b)
    return math.sqrt(diff / norm) if norm else math.sqrt(diff)


class _RaiseInBackward(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, kind):  # type: ignore[no-untyped-def]
        ctx.kind = kind
        return x.clone()

    @staticmethod
    def backward(ctx, grad):  # type: ignore[no-untyped-def]
        raise ctx.kind("raised in backward")


def _faulty_loss(point: str, kind: type[BaseException], rank: int):  # type: ignore[no-untyped-def]
    def loss_fn(model, x):  # type: ignore[no-untyped-def]
        index = int(x[0, 2].item())  # each row carries its micro-batch's index
        here = dist.get_rank() == rank
        if here and point == "forward-first" and index == 0:
            raise kind("raised in forward")
        if here and point == "forward-last" and index == LAST:
            raise kind("raised in forward")
        out = model(x)
        if here and point == "backward-last" and index == LAST:
            out = _RaiseInBackward.apply(out, kind)
        if here and point == "backward-hook" and index == 0:
            out.register_hook(lambda g: (_ for _ in ()).throw(kind("raised in a tensor hook")))
        loss = bg.Loss.from_values(out.square())
        if here and point == "count":
            return bg.Loss(loss.total, -1)
        return loss

    return loss_fn


POINTS = [
    # (point, exception types, expected class on every rank, text naming the place)
    ("settings", [None], "ConfigError", r"reduction must be one of"),
    ("split", [None], "BatchShapeError", r"disagree on the batch dimension"),
    ("forward-first", [RuntimeError, Interrupted], "DistributedError", r"micro-batch 0: "),
    ("forward-last", [RuntimeError, SystemExit], "DistributedError", r"micro-batch 2: "),
    ("backward-last", [RuntimeError, Interrupted], "DistributedError", r"micro-batch 2: "),
    ("backward-hook", [RuntimeError], "DistributedError", r"micro-batch 0: "),
    ("loss", [None], "NonFiniteError", r"The loss of micro-batch 1 is nan"),
    ("count", [None], "LossTypeError", r"Loss.count of micro-batch 0 is -1"),
]


def fault_matrix() -> dict[str, tuple[str, str, bool, float, bool]]:
    """Every point × failing rank × exception × (DDP, unwrapped) × (first call on the
    group, call after an agreement: the agreement in the gradient sum), on one model
    each.

    Returns, per case, this rank's (error class, message, gradients kept, relative
    error of the next call on the same model against one process, whether the failed
    call had the group's agreed layout)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = _data(world * ROWS)
    x[:, 2] = torch.arange(world * ROWS).remainder(ROWS).div(2, rounding_mode="floor").double()
    outcomes = {}
    for wrap, agreed in itertools.product(("ddp", "plain"), ("first", "cached")):
        module = _net()
        model = DistributedDataParallel(module) if wrap == "ddp" else module
        expected = _whole_batch_grads(module, x)
        local = x[rank * ROWS : (rank + 1) * ROWS]
        for point, kinds, _, _ in POINTS:
            for failing in sorted({0, world - 1}):
                for kind in kinds:
                    name = f"{wrap}-{agreed}-{point}-rank{failing}-"
                    name += kind.__name__ if kind else "input"
                    if agreed == "first":  # as on a fresh group (on every rank alike)
                        bg._protocol.remember(None, None)
                    cached = bg._protocol.fused(None) is not None
                    module.zero_grad(set_to_none=True)
                    module(x[:2]).sum().backward()  # gradients a failed call must keep
                    before = [p.grad.clone() for p in module.parameters()]
                    kwargs: dict[str, object] = {"micro_batch_size": 2, "existing_grad": "replace"}
                    batch: object = local
                    loss_fn = _faulty_loss(point, kind or RuntimeError, failing)
                    if rank == failing:
                        if point == "settings":
                            kwargs["reduction"] = "mean over ranks"
                        elif point == "split":
                            batch = (local, local[:-1])
                            loss_fn = lambda m, b: _square(m, b[0])  # noqa: E731
                        elif point == "loss":
                            batch = local.clone()
                            batch[3, 0] = math.nan
                    try:
                        bg.accumulate(model, loss_fn, batch, **kwargs)
                        outcome = ("no error", "")
                    except BaseException as error:
                        outcome = (type(error).__name__, str(error))
                    kept = all(
                        torch.equal(p.grad, b)
                        for p, b in zip(module.parameters(), before, strict=True)
                    )
                    module.zero_grad(set_to_none=True)
                    bg.accumulate(model, _square, local, micro_batch_size=2)
                    after = rel([p.grad for p in module.parameters()], expected)
                    outcomes[name] = (*outcome, kept, after, cached)
    return outcomes


def _split(x: Tensor, cuts: list[int]) -> Tensor:
    rank = dist.get_rank()
    return x[cuts[rank] : cuts[rank + 1]]


class _WithBuffers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.body = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
        self.register_buffer("scale", torch.tensor([0.5, 2.0, 1.0]))
        self.register_buffer("calls", torch.zeros((), dtype=torch.long))

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1  # a buffer the forward changes, as BatchNorm's counters do
        return self.body(x * self.scale)


class _WithUnused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.used = nn.Linear(3, 1)
        self.unused = nn.Linear(3, 1)
        self.sometimes = nn.Linear(3, 1)

    def forward(self, x: Tensor) -> Tensor:
        out = self.used(x)
        if float(x[:, 0].sum()) > 0:  # data-dependent: used on some ranks only
            out = out + self.sometimes(x)
        return out


def _micro_batch_grads(module: nn.Module, _: object, world: int) -> list[Tensor]:
    """One process over every rank's micro-batches of 2 (the model's graph depends
    on the micro-batch, so the whole batch at once is not the reference)."""
    shares: list[Tensor | None] = [None] * world
    dist.all_gather_object(shares, _[0])  # type: ignore[index]
    reference = copy.deepcopy(module)
    reference.zero_grad(set_to_none=True)
    parts = [
        share[i : i + 2] for share in shares if share is not None for i in range(0, len(share), 2)
    ]
    totals = [_square(reference, part) for part in parts]
    loss = sum(t.total for t in totals) / sum(float(t.count) for t in totals)
    params = list(reference.parameters())
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def ddp_configurations() -> dict[str, object]:
    """DDP as users configure it, under uneven and idle ranks; each case compared
    with one process on the whole batch, twice on the same wrapper."""
    rank, world = dist.get_rank(), dist.get_world_size()
    n = 4 * world + 3
    x = _data(n, seed=3)
    splits = {
        "uneven": [0, *[3 + 4 * r for r in range(1, world)], n],
        "idle": [0, 0, *[n] * (world - 1)],  # rank 0 holds nothing
    }
    results: dict[str, object] = {}

    def check(name, module, model, split, **kwargs):  # type: ignore[no-untyped-def]
        local = _split(x, splits[split])
        errors = []
        for _ in range(2):  # the same wrapper twice
            module.zero_grad(set_to_none=True)
            report = bg.accumulate(model, _square, local, micro_batch_size=2, **kwargs)
            expected = _whole_batch_grads(module, x)  # with rank 0's buffers, now here
            got = [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()]
            errors.append(rel(got, expected))
        results[f"{name}-{split}"] = (max(errors), report.count, report.world_size)

    for split in splits:
        module = _net()
        check(
            "bucket-view",
            module,
            DistributedDataParallel(module, gradient_as_bucket_view=True),
            split,
        )
        module = _net()
        check(
            "find-unused",
            module,
            DistributedDataParallel(module, find_unused_parameters=True),
            split,
        )
        module = _net()
        ddp = DistributedDataParallel(module)
        calls: list[int] = []

        def counting_hook(state, bucket, calls=calls):  # type: ignore[no-untyped-def]
            calls.append(bucket.buffer().numel())
            return allreduce_hook(state, bucket)

        ddp.register_comm_hook(dist.group.WORLD, counting_hook)
        check("comm-hook", module, ddp, split)
        results[f"comm-hook-calls-{split}"] = len(calls)
        module = _WithBuffers().double()
        ddp = DistributedDataParallel(module)
        if rank == 0:
            with torch.no_grad():
                module.scale.mul_(1.5)  # rank 0's buffers are broadcast, as DDP does
        check("buffers", module, ddp, split)

    # gradient_as_bucket_view: after a plain DDP step p.grad is a view of DDP's
    # bucket; "add" must add once, and a failed call must leave the old gradient.
    module = _net()
    ddp = DistributedDataParallel(module, gradient_as_bucket_view=True)
    for _ in range(2):
        module.zero_grad(set_to_none=True)
        ddp(x[:4]).square().sum().backward()
    old = [p.grad.clone() for p in module.parameters()]
    local = _split(x, splits["uneven"])
    bg.accumulate(ddp, _square, local, micro_batch_size=2, existing_grad="add")
    new = _whole_batch_grads(module, x)
    added = rel(
        [p.grad for p in module.parameters()], [a + b for a, b in zip(old, new, strict=True)]
    )
    kept = [p.grad.clone() for p in module.parameters()]
    bad = local.clone()
    if rank == world - 1:
        bad[-1, 0] = math.inf
    try:
        bg.accumulate(ddp, _square, bad, micro_batch_size=2, existing_grad="add")
        failed = "no error"
    except bg.BatchError as error:
        failed = type(error).__name__
    same = all(torch.equal(p.grad, k) for p, k in zip(module.parameters(), kept, strict=True))
    results["bucket-view-add"] = (added, failed, same)

    # Parameters no rank uses keep None; one some ranks use gets the sum.
    for wrap in ("ddp", "plain"):
        for split in splits:
            module = _WithUnused().double()
            model = (
                DistributedDataParallel(module, find_unused_parameters=True)
                if wrap == "ddp"
                else module
            )
            local = _split(x, splits[split]).clone()
            signs = torch.where(torch.arange(len(x)) < 5, 1.0, -1.0).double()
            full = x.clone()
            full[:, 0] = full[:, 0].abs() * signs
            local = _split(full, splits[split])
            bg.accumulate(model, _square, local, micro_batch_size=2)
            expected = _micro_batch_grads(module, [_split(full, splits[split])], world)
            got = [torch.zeros_like(p) if p.grad is None else p.grad for p in module.parameters()]
            results[f"unused-{wrap}-{split}"] = (
                module.unused.weight.grad is None and module.unused.bias.grad is None,
                module.sometimes.weight.grad is not None,
                rel(got, expected),
            )

    try:
        bg.accumulate(DistributedDataParallel(_net(), static_graph=True), _square, x[:2])
        results["static-graph"] = ("no error", "")
    except bg.BatchError as error:
        results["static-graph"] = (type(error).__name__, str(error))
    return results


class _Reshaped(nn.Module):
    def __init__(self, shape: tuple[int, int]) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.full(shape, 0.1, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        return (x @ self.w.reshape(3, 2)).sum(1, keepdim=True)


def mismatches() -> dict[str, tuple[str, str]]:
    """Ranks that disagree on settings or on the parameters' layout."""
    rank, world = dist.get_rank(), dist.get_world_size()
    x = _data(world * ROWS)[rank * ROWS : (rank + 1) * ROWS]
    results = {}

    def attempt(name, model, **kwargs):  # type: ignore[no-untyped-def]
        try:
            bg.accumulate(model, _square, x, micro_batch_size=2, **kwargs)
            results[name] = ("no error", "")
        except bg.BatchError as error:
            results[name] = (type(error).__name__, str(error))

    last = rank == world - 1
    ddp = DistributedDataParallel(_net())
    attempt("reduction", ddp, reduction="sum" if last else "mean")
    attempt("existing-grad", ddp, existing_grad="add" if last else "replace")
    attempt("clip", _net(), clip_per_sample=2.0 if last else 1.0)
    attempt("shapes", _Reshaped((3, 2) if last else (2, 3)))  # as many elements
    net = _net()
    if last:
        net[2].bias.requires_grad_(False)
    attempt("trainable", net)
    attempt("after", ddp)  # and the same wrapper works again
    return results


def dp_sgd_and_noise() -> dict[str, object]:
    """DP-SGD and the noise scale across ranks, against one process on the whole batch."""
    _rank, world = dist.get_rank(), dist.get_world_size()
    n = 4 * world + 3
    x = _data(n, seed=5)
    cuts = [0, *[3 + 4 * r for r in range(1, world)], n]
    local = _split(x, cuts)
    results: dict[str, object] = {}
    alone = _alone()
    for wrap in ("ddp", "plain"):
        for reduction in ("mean", "sum"):
            module = _net()
            model = DistributedDataParallel(module) if wrap == "ddp" else module
            reference = copy.deepcopy(module)
            kwargs = {"clip_per_sample": 0.05, "noise_multiplier": 1.3, "reduction": reduction}
            one = bg.accumulate(
                reference,
                _square,
                x,
                group=alone,
                micro_batch_size=3,
                generator=torch.Generator().manual_seed(9),
                **kwargs,
            )
            generator = torch.Generator().manual_seed(9)
            report = bg.accumulate(
                model, _square, local, micro_batch_size=2, generator=generator, **kwargs
            )
            results[f"dp-sgd-{wrap}-{reduction}"] = (
                rel(
                    [p.grad for p in module.parameters()], [p.grad for p in reference.parameters()]
                ),
                [p.grad.clone() for p in module.parameters()],
                report.clipped,
                one.clipped,
                report.loss,
                one.loss,
                report.grad_norm,
                one.grad_norm,
            )
        module = _net()
        model = DistributedDataParallel(module) if wrap == "ddp" else module
        report = bg.accumulate(model, _square, local, micro_batch_size=2, noise=True)
        # The small batches are the ranks' shares, the big one the whole batch.
        shares = [_split_at(x, cuts, r) for r in range(world)]
        means = [
            sum(float(g.square().sum()) for g in _whole_batch_grads(module, s, reduction="sum"))
            / len(s) ** 2
            for s in shares
        ]
        big = (
            sum(float(g.square().sum()) for g in _whole_batch_grads(module, x, reduction="sum"))
            / n**2
        )
        expected = bg._noise.estimate(means, [len(s) for s in shares], big, n)
        results[f"noise-{wrap}"] = (report.noise, expected)
    return results


def _split_at(x: Tensor, cuts: list[int], rank: int) -> Tensor:
    return x[cuts[rank] : cuts[rank + 1]]


def a_rank_dies(wrap: str) -> tuple[str, str, str]:
    """The last rank's process ends inside its loss_fn; the others must not wait.

    Returns the survivor's error type, its message and the message of its cause (what
    the collective reported: a closed connection, not a timeout).
    """
    import os

    world = dist.get_world_size()
    module = _net()
    model = DistributedDataParallel(module) if wrap == "ddp" else module

    def dies(model, x):  # type: ignore[no-untyped-def]
        if dist.get_rank() == world - 1:
            os._exit(7)  # no exception, no cleanup: as a killed process
        return _square(model, x)

    try:
        bg.accumulate(model, dies, _data(4), micro_batch_size=2)
        return ("no error", "", "")
    except bg.BatchError as error:
        return (type(error).__name__, str(error), str(error.__cause__))


def fused_agreement() -> dict[str, object]:
    """The agreement carried in the gradient all-reduce, and every way out of it.

    Each case: this rank's (error class or "no error", message, gradients kept,
    relative error against one process, agreed layout before the call)."""
    rank, world = dist.get_rank(), dist.get_world_size()
    last = rank == world - 1
    x = _data(world * ROWS, seed=11)
    local = x[rank * ROWS : (rank + 1) * ROWS]
    results: dict[str, object] = {}

    def attempt(name, module, model, batch=local, expected=None, **kwargs):  # type: ignore[no-untyped-def]
        module.zero_grad(set_to_none=True)
        module(local[:2].to(batch.dtype)).sum().backward()  # gradients a failed call must keep
        before = [p.grad.clone() for p in module.parameters() if p.requires_grad]
        entry = bg._protocol.fused(None)  # the agreed layout is this model's?
        cached = (
            entry is not None
            and entry.numel == sum(p.numel() for p in module.parameters() if p.requires_grad)
            and entry.dtype == batch.dtype
        )
        try:
            bg.accumulate(
                model, _square, batch, micro_batch_size=2, existing_grad="replace", **kwargs
            )
            outcome = ("no error", "")
        except BaseException as error:
            outcome = (type(error).__name__, str(error))
        grads = [p.grad for p in module.parameters() if p.requires_grad]
        kept = all(torch.equal(g, b) for g, b in zip(grads, before, strict=True))
        error = rel(grads, expected) if expected is not None and outcome[0] == "no error" else None
        results[name] = (*outcome, kept, error, cached)

    bg._protocol.remember(None, None)  # a fresh group, on every rank alike
    module = _net()
    ddp = DistributedDataParallel(module)
    expected = _whole_batch_grads(module, x)
    attempt("first", module, ddp, expected=expected)
    attempt("cached", module, ddp, expected=expected)
    # One rank freezes a parameter: its layout differs from the agreed one.
    if last:
        module[2].bias.requires_grad_(False)
    attempt("frozen-on-one-rank", module, ddp)
    module[2].bias.requires_grad_(True)
    attempt("after-frozen", module, ddp, expected=expected)
    attempt("after-frozen-cached", module, ddp, expected=expected)
    # Every rank freezes the same parameter: a new agreed layout, then in the sum.
    module[0].bias.requires_grad_(False)
    frozen = _whole_batch_grads(module, x)  # of the trainable parameters
    attempt("frozen-everywhere", module, ddp, expected=frozen)
    attempt("frozen-everywhere-cached", module, ddp, expected=frozen)
    module[0].bias.requires_grad_(True)
    attempt("unfrozen", module, ddp, expected=expected)
    # Settings that differ, inside the sum.
    attempt("settings", module, ddp, reduction="sum" if last else "mean")
    attempt("after-settings", module, ddp, expected=expected)
    attempt("after-settings-cached", module, ddp, expected=expected)
    # A failure on one rank inside the sum's call (its share of the buffer is zeros).
    bad = local.clone()
    if last:
        bad[1, 0] = math.nan
    attempt("failure", module, ddp, batch=bad)
    attempt("after-failure", module, ddp, expected=expected)
    # A different model on the same group: another layout, then the same layout.
    torch.manual_seed(1)
    other = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 1)).double()
    other_expected = _whole_batch_grads(other, x)
    attempt("other-model", other, other, expected=other_expected)
    attempt("other-model-cached", other, other, expected=other_expected)
    twin = _net()  # the first model's layout, another object
    with torch.no_grad():
        for p in twin.parameters():
            p.mul_(1.5)
    twin_expected = _whole_batch_grads(twin, x)
    attempt("back-to-first-layout", module, ddp, expected=expected)
    attempt("same-layout-other-model", twin, twin, expected=twin_expected)
    # float32: the control values travel as float32 numbers, exactly.
    torch.manual_seed(2)
    single = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 1))
    x32 = x.float()
    single_expected = _whole_batch_grads(single, x32)
    for name in ("float32-first", "float32-cached"):
        attempt(name, single, single, batch=local.float(), expected=single_expected)
    big = local.float() * 1e3 + 0.1  # float32 losses whose sum float32 would round
    single.zero_grad(set_to_none=True)
    report = bg.accumulate(single, _square, big, micro_batch_size=2)
    own = math.fsum(
        float(_square(single, big[i : i + 2]).total.detach()) for i in range(0, len(big), 2)
    )
    results["float32-report"] = (report.loss, report.count, own, len(big))
    # Parameters no rank uses keep None inside the sum too (second call: cached).
    unused = _WithUnused().double()
    nones = []
    for _ in range(2):
        unused.zero_grad(set_to_none=True)
        entry = bg._protocol.fused(None)
        nones.append(entry is not None and entry.numel == 12)  # the agreed layout is this one
        bg.accumulate(unused, _square, local, micro_batch_size=2)
        nones.append(unused.unused.weight.grad is None and unused.used.weight.grad is not None)
    results["unused-cached"] = nones
    return results
