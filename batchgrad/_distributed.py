"""Data-parallel accumulation: every process runs its share, one logical batch.

Under `torch.distributed` the logical batch ``B`` is the union of the ranks'
batches and ``N(B)`` their total count. Each rank backpropagates the sums of its
own micro-batches, and the ranks then agree in a fixed sequence of collectives
that every rank runs whatever its data, so none is ever left waiting:

1. `Replica.agree`: one small all-reduce before the loop (does any rank have no
   micro-batch, did any fail to start);
2. `Replica.agree` again after the loop: any failure, the global loss sum and the
   global count ``N(B)``;
3. exactly one gradient synchronisation: through DDP's own reducer on the last
   micro-batch's backward when the model is wrapped in
   `DistributedDataParallel` and every rank has a micro-batch, else one
   coalesced all-reduce (`Replica.sum_grads`).

DDP averages over its world size ``W``; the engine then divides by ``N(B) / W``
instead of ``N(B)``, in the same one place as in a single process.
"""

from __future__ import annotations

import datetime
import multiprocessing
import multiprocessing.queues
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from ._errors import BatchError, ConfigError, DistributedError

R = TypeVar("R")

_AVAILABLE = dist.is_available()  # fixed when torch was built


@dataclass(frozen=True)
class Replica:
    """This process's place in a data-parallel logical batch."""

    group: dist.ProcessGroup | None
    rank: int
    world_size: int
    ddp: DistributedDataParallel | None
    device: torch.device

    @property
    def module(self) -> nn.Module | None:
        return self.ddp.module if self.ddp is not None else None

    def agree(self, values: list[float]) -> list[float]:
        """Sum ``values`` over the ranks (one all-reduce, in float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.group)
        result: list[float] = tensor.tolist()
        return result

    def sum_grads(self, params: list[nn.Parameter]) -> None:
        """Sum every ``p.grad`` over the ranks in one coalesced all-reduce.

        A parameter without a gradient on this rank contributes zeros; after the
        call every parameter has the same gradient on every rank.
        """
        if not params:
            return
        flat = torch.cat(
            [
                (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).to(self.device)
                for p in params
            ]
        )
        dist.all_reduce(flat, group=self.group)
        offset = 0
        for p in params:
            grad = flat[offset : offset + p.numel()].view_as(p).to(p.device)
            offset += p.numel()
            p.grad = grad if p.grad is None else p.grad.copy_(grad)

    def raise_failures(self, local: BaseException | None) -> None:
        """Every rank raises if any rank failed; a rank that did not fail names those that did.

        Runs one all-gather of the failures' descriptions; call it on every rank.
        """
        mine = None if local is None else (type(local).__name__, str(local))
        gathered: list[tuple[str, str] | None] = [None] * self.world_size
        dist.all_gather_object(gathered, mine, group=self.group)
        failures = [(rank, f) for rank, f in enumerate(gathered) if f is not None]
        if not failures:
            return
        first_rank, (kind, message) = failures[0]
        others = [rank for rank, _ in failures[1:]]
        also = f" (ranks {others} failed too)" if others else ""
        if local is not None and not isinstance(local, BatchError):
            raise local  # the user's own error, with its traceback, where it happened
        error_type = _batch_error_types().get(kind, DistributedError)
        if error_type is DistributedError:
            message = (
                f"{kind}: {message}. Every rank stops so that none is left waiting in a "
                f"collective; look at rank {first_rank}'s traceback"
            )
        raise error_type(f"On rank {first_rank}: {message}{also}")


def _batch_error_types() -> dict[str, type[BatchError]]:
    types: dict[str, type[BatchError]] = {}
    pending: list[type[BatchError]] = [BatchError]
    while pending:
        cls = pending.pop()
        types[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return types


def replica(model: nn.Module, group: dist.ProcessGroup | None) -> Replica | None:
    """The `Replica` of this process, or None outside `torch.distributed` (or alone)."""
    if not (_AVAILABLE and dist.is_initialized()):
        if group is not None:
            raise ConfigError(
                "group= was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun sets up the rest)."
            )
        return None
    _refuse_sharded(model)
    ddp = model if isinstance(model, DistributedDataParallel) else None
    if ddp is not None and group is not None and group is not ddp.process_group:
        raise ConfigError(
            "group= differs from the process group the DistributedDataParallel model "
            "synchronises over; pass the same group, or none to use the model's."
        )
    if ddp is not None:
        group = ddp.process_group
    world_size = dist.get_world_size(group)
    if world_size == 1:
        return None
    backend = dist.get_backend(group)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    return Replica(group, dist.get_rank(group), world_size, ddp, device)


def _refuse_sharded(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, FSDPModule | FullyShardedDataParallel):
            raise ConfigError(
                f"{name or 'the model'} is sharded with FSDP ({type(module).__name__}), "
                f"which batchgrad does not support yet. FSDP gathers parameters in every "
                f"forward, so every rank must run the same number of micro-batches and no "
                f"rank may stop early on bad input, two guarantees batchgrad gives for "
                f"DistributedDataParallel. Use DDP, or accumulate with FSDP's "
                f"set_requires_gradient_sync(False) and a loss divided by the global unit "
                f"count yourself."
            )


def launch(fn: Callable[..., R], nproc: int, *args: Any, timeout: float = 120.0) -> list[R]:
    """Run ``fn(*args)`` in ``nproc`` local processes joined in a gloo process group.

    The processes talk over 127.0.0.1 only. Returns each rank's result, rank 0
    first. ``fn`` and its arguments must be picklable (a module-level function).

    Raises:
        DistributedError: a process failed (its traceback is in the message) or
            they did not all finish within ``timeout`` seconds; every process is
            stopped either way.
    """
    context = multiprocessing.get_context("spawn")
    results: multiprocessing.queues.Queue[tuple[int, bool, Any]] = context.Queue()
    address = ("127.0.0.1", _free_port())
    processes = [
        context.Process(
            target=_process_main,
            args=(rank, nproc, address, timeout, fn, args, results),
            daemon=True,
        )
        for rank in range(nproc)
    ]
    for process in processes:
        process.start()
    outcome: dict[int, Any] = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < nproc:
            if time.monotonic() > deadline:
                raise DistributedError(
                    f"{nproc - len(outcome)} of {nproc} processes did not finish within "
                    f"{timeout:.0f} s (ranks done: {sorted(outcome)}); all were stopped."
                )
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
                if dead and all(r not in outcome for r in dead):
                    raise DistributedError(
                        f"Process(es) of rank {dead} died (exit codes "
                        f"{[processes[r].exitcode for r in dead]}) without a result."
                    ) from None
                continue
            if not ok:
                raise DistributedError(f"Rank {rank} failed:\n{value}")
            outcome[rank] = pickle.loads(value)
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return [outcome[rank] for rank in range(nproc)]


def _process_main(
    rank: int,
    world_size: int,
    address: tuple[str, int],
    timeout: float,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: multiprocessing.queues.Queue[tuple[int, bool, Any]],
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{address[0]}:{address[1]}",
            rank=rank,
            world_size=world_size,
            timeout=datetime.timedelta(seconds=timeout),
        )
        try:
            value = fn(*args)
        finally:
            dist.destroy_process_group()
        # Plain pickle copies tensors: torch's queue reductions share memory that
        # would vanish with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
