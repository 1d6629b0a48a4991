"""Data-parallel accumulation: every process runs its share, one logical batch.

Under `torch.distributed` the logical batch ``B`` is the union of the ranks'
batches and ``N(B)`` their total count. Each rank runs all its micro-batches
locally (a DDP model under ``no_sync()``, so its reducer never waits on another
rank), and then every rank, whatever its data or failures, runs the same
collectives in the same order, so none is ever left waiting:

1. with a DDP model that has buffers and ``broadcast_buffers=True``, rank 0's
   buffers are broadcast once, before the first forward (DDP's own rule);
2. the control collective (`batchgrad._protocol.agree`): failures, settings,
   layouts, the global loss sum and count;
3. exactly one gradient synchronisation (`Replica.sync_grads`): one all-reduce of
   every gradient in a flat buffer, or, when the DDP model has a communication
   hook (``register_comm_hook``), that hook called once on that buffer.

Once a group has agreed on a layout (and without a hook), (2) and (3) are one
all-reduce: the control values ride at the end of the gradient buffer
(`Replica.pack`, `batchgrad._protocol.agree_in_sum`).

Nothing else talks to the other ranks: an error on one rank at any point is
reported in (2) and raised on every rank, and the DDP wrapper's state is as before,
so the next call works.
"""

from __future__ import annotations

import contextlib
import datetime
import multiprocessing
import multiprocessing.queues
import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch._C._distributed_c10d import TCPStore
from torch.nn.parallel import DistributedDataParallel

from ._errors import BatchError, ConfigError, DistributedError
from ._protocol import _batch_error_types

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
    # The DDP model's communication hook and its state, if it has one.
    hook: tuple[Callable[..., Any], object] | None = None
    # A reason this rank cannot take part, raised on every rank by the agreement.
    problem: ConfigError | None = None

    @property
    def module(self) -> nn.Module | None:
        return self.ddp.module if self.ddp is not None else None

    def agree(self, values: list[float]) -> list[float]:
        """Sum ``values`` over the ranks (one all-reduce, in float64)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        dist.all_reduce(tensor, group=self.group)
        result: list[float] = tensor.tolist()
        return result

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        """Forwards and backwards that talk to no other rank: DDP's ``no_sync()``,
        and no buffer broadcast in its forward (see `broadcast_buffers`)."""
        ddp = self.ddp
        if ddp is None:
            yield
            return
        forward_sync = ddp.require_forward_param_sync
        ddp.require_forward_param_sync = False
        try:
            with ddp.no_sync():
                yield
        finally:
            ddp.require_forward_param_sync = forward_sync

    def prepare(self) -> None:
        """The collectives a DDP forward may run, run here on every rank at once.

        DDP broadcasts rank 0's buffers in a forward (``broadcast_buffers=True``)
        and, once, rebuilds its buckets in the forward after the first synchronised
        step: in `quiet` forwards, on ranks holding different numbers of
        micro-batches, either would leave a rank waiting.
        """
        ddp = self.ddp
        if ddp is None:
            return
        if torch.is_grad_enabled():
            ddp.reducer._rebuild_buckets()
        if ddp.forward_sync_buffers and ddp.modules_buffers:
            ddp._sync_buffers()

    def flatten(
        self,
        params: list[nn.Parameter],
        grads: list[Tensor | None] | None = None,
        dtype: torch.dtype | None = None,
    ) -> Tensor:
        """Every ``p.grad`` (or ``grads``, one per parameter) in one flat buffer, zeros
        for a parameter without one, in ``dtype`` if given (every rank's buffer must
        have the same, also where it holds no gradient at all).

        Taken before the agreement, so that running out of memory here is a failure
        every rank hears of. Without a communication hook the buffer ends with one
        flag per parameter (has it a gradient here?), summed in the same all-reduce.
        """
        held = [p.grad for p in params] if grads is None else grads
        pieces = [
            (torch.zeros_like(p) if g is None else g).reshape(-1).to(self.device)
            for p, g in zip(params, held, strict=True)
        ]
        if self.hook is None and pieces:
            flags = [g is not None for g in held]
            pieces.append(torch.tensor(flags, dtype=pieces[0].dtype, device=self.device))
        if not pieces:
            return torch.zeros(0, device=self.device)
        flat = torch.cat(pieces) if len(pieces) > 1 else pieces[0].clone()
        return flat if dtype is None else flat.to(dtype)

    def sync_grads(
        self,
        params: list[nn.Parameter],
        flat: Tensor,
        normalise: Callable[[Tensor], None],
        with_unused: bool,
    ) -> tuple[list[Tensor], Tensor]:
        """Sum the gradients in ``flat`` (`flatten`) over the ranks in one collective,
        ``normalise`` d first (in place, on the buffer the collective sends: no pass
        of its own), and make them every ``p.grad``.

        With a DDP communication hook the hook reduces the buffer (and averages over
        the ranks, as DDP's hooks do). ``with_unused``: some rank left a parameter
        without a gradient; one that no rank gave a gradient keeps None, as in one
        process. Returns the gradients, views of one flat tensor where the dtypes
        and devices allow, and the summed buffer in its own dtype (which may be
        wider than the parameters': see `wide_sums`).
        """
        if not params:
            return [], flat
        total = sum(p.numel() for p in params)
        normalise(flat[:total])
        used: Tensor | None = None
        if self.hook is None:
            dist.all_reduce(flat, group=self.group)
            used = flat[total:] > 0 if with_unused else None
            flat = flat[:total]
        else:
            hook, state = self.hook
            result = hook(state, _Bucket(flat, params)).wait()
            flat = result[0] if isinstance(result, list | tuple) else result
            if with_unused:
                counts = torch.tensor(
                    [float(p.grad is not None) for p in params],
                    dtype=torch.float64,
                    device=self.device,
                )
                dist.all_reduce(counts, group=self.group)
                used = counts > 0
        return unpack(params, flat, None if used is None else used.tolist()), flat

    def pack(self, params: list[nn.Parameter], size: int, dtype: torch.dtype) -> Tensor:
        """`flatten`'s ``[gradients | flags]`` at the start of a buffer of ``size``
        elements (the rest, for the control values, is written by the agreement)."""
        flat = torch.empty(size, dtype=dtype, device=self.device)
        numel = sum(p.numel() for p in params)
        pieces = [
            (torch.zeros_like(p) if p.grad is None else p.grad).reshape(-1).to(self.device)
            for p in params
        ]
        torch.cat(pieces, out=flat[:numel])
        flags = [float(p.grad is not None) for p in params]
        flat[numel : numel + len(params)] = torch.tensor(flags, dtype=dtype)
        return flat

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


def wide_sums(params: list[nn.Parameter], flat: Tensor) -> dict[int, Tensor]:
    """By parameter id, the summed gradients in ``flat`` of the parameters whose dtype
    is narrower than the buffer's: what ``p.grad`` was rounded from (for adding the
    gradients held before the call with one rounding)."""
    sums: dict[int, Tensor] = {}
    offset = 0
    for p in params:
        if p.dtype != flat.dtype:
            sums[id(p)] = flat[offset : offset + p.numel()].view(p.shape)
        offset += p.numel()
    return sums


def unpack(params: list[nn.Parameter], flat: Tensor, keep: list[bool] | None) -> list[Tensor]:
    """Make the summed gradients in ``flat`` every ``p.grad`` (views where the dtype
    and device allow); a parameter whose ``keep`` is False gets None. Returns them."""
    grads: list[Tensor] = []
    offset = 0
    for index, p in enumerate(params):
        size = p.numel()
        if keep is not None and not keep[index]:
            p.grad = None
        else:
            grad = flat[offset : offset + size].view(p.shape)
            if grad.dtype != p.dtype or grad.device != p.device:
                grad = grad.to(device=p.device, dtype=p.dtype)
            p.grad = grad
            grads.append(grad)
        offset += size
    return grads


class _Bucket:
    """What a DDP communication hook is handed (`torch.distributed.GradBucket`'s
    methods): here the whole gradient, as one bucket."""

    def __init__(self, buffer: Tensor, params: list[nn.Parameter]) -> None:
        self._buffer, self._params = buffer, params

    def index(self) -> int:
        return 0

    def is_last(self) -> bool:
        return True

    def buffer(self) -> Tensor:
        return self._buffer

    def set_buffer(self, buffer: Tensor) -> None:
        self._buffer = buffer

    def parameters(self) -> list[nn.Parameter]:
        return self._params

    def gradients(self) -> list[Tensor]:
        views, offset = [], 0
        for p in self._params:
            views.append(self._buffer[offset : offset + p.numel()].view(p.shape))
            offset += p.numel()
        return views


def replica(model: nn.Module, group: dist.ProcessGroup | None) -> Replica | None:
    """The `Replica` of this process, or None outside `torch.distributed` (or alone).

    What only this rank may get wrong (a group, a model that cannot be used) is
    not raised here but carried as `Replica.problem`, so that every rank raises it
    together instead of leaving the others waiting.
    """
    if not (_AVAILABLE and dist.is_initialized()):
        if group is not None:
            raise ConfigError(
                "group= was given but torch.distributed is not initialised; call "
                "torch.distributed.init_process_group first (torchrun sets up the rest)."
            )
        return None
    ddp = model if isinstance(model, DistributedDataParallel) else None
    problem: ConfigError | None = None
    try:
        if ddp is not None:
            _refuse_sharded(model)
            _refuse_ddp_settings(ddp)
    except ConfigError as error:
        problem = error
    if ddp is not None and group is not None and group is not ddp.process_group:
        problem = problem or ConfigError(
            "group= differs from the process group the DistributedDataParallel model "
            "synchronises over; pass the same group, or none to use the model's."
        )
    if ddp is not None:
        group = ddp.process_group
    world_size = dist.get_world_size(group)
    if world_size == 1:
        if problem is not None:
            raise problem
        return None
    backend = dist.get_backend(group)
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if backend == "nccl"
        else torch.device("cpu")
    )
    hook = ddp._comm_hooks[-1] if ddp is not None and ddp._comm_hooks else None
    return Replica(group, dist.get_rank(group), world_size, ddp, device, hook, problem)


def _refuse_ddp_settings(ddp: DistributedDataParallel) -> None:
    if ddp.static_graph:
        raise ConfigError(
            "The DistributedDataParallel model was built with static_graph=True, whose "
            "reducer expects every forward to end in a synchronised backward (its "
            "first-step graph tracing fails under no_sync()). batchgrad synchronises "
            "once per logical batch itself, which is what static_graph would save: "
            "build the model without static_graph."
        )
    if not ddp._comm_hooks and ddp._get_ddp_logging_data().get("comm_hook"):
        raise ConfigError(
            "The DistributedDataParallel model has a built-in communication hook "
            f"({ddp._get_ddp_logging_data()['comm_hook']}), which runs inside DDP's C++ "
            "reducer only. Register its Python equivalent instead, e.g. "
            "ddp.register_comm_hook(None, default_hooks.fp16_compress_hook)."
        )


def _refuse_sharded(model: nn.Module) -> None:
    from torch.distributed.fsdp import FSDPModule, FullyShardedDataParallel

    for name, module in model.named_modules():
        if isinstance(module, FSDPModule | FullyShardedDataParallel):
            raise ConfigError(
                f"{name or 'the model'} is sharded with FSDP ({type(module).__name__}), "
                f"which this function does not support yet (bg.accumulate does). FSDP "
                f"gathers parameters in every forward, so every rank must run the same "
                f"number of forwards; use DDP here, or bg.accumulate for each step."
            )


def launch(
    fn: Callable[..., R],
    nproc: int,
    *args: Any,
    timeout: float = 120.0,
    may_die: tuple[int, ...] = (),
    init_group: bool = True,
) -> list[R]:
    """Run ``fn(*args)`` in ``nproc`` local processes joined in a gloo process group.

    The processes talk over 127.0.0.1 only (the rendezvous store included, see
    `_loopback_store`). Returns each rank's result, rank 0 first. ``fn`` and its
    arguments must be picklable (a module-level function). The ranks in
    ``may_die`` may end without a result (None): to test what the others do when a
    rank dies. With ``init_group=False`` only the environment
    that torchrun would set is set (``MASTER_ADDR``, ``RANK``, ``WORLD_SIZE``, ...),
    for code that creates its process group itself (trainers; their rendezvous
    listens where torch's ``env://`` puts it, on every interface).

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
            args=(rank, nproc, address, timeout, init_group, fn, args, results),
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
                for r in dead:
                    if r in may_die and r not in outcome:
                        outcome[r] = None
                dead = [r for r in dead if r not in may_die]
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
    init_group: bool,
    fn: Callable[..., Any],
    args: tuple[Any, ...],
    results: multiprocessing.queues.Queue[tuple[int, bool, Any]],
) -> None:
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")  # loopback only
    torch.set_num_threads(1)
    try:
        if not init_group:
            os.environ.update(
                MASTER_ADDR=address[0],
                MASTER_PORT=str(address[1]),
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(world_size),
                LOCAL_WORLD_SIZE=str(world_size),
                OMP_NUM_THREADS="1",
            )
            results.put((rank, True, pickle.dumps(fn(*args))))
            return
        wait = datetime.timedelta(seconds=timeout)
        dist.init_process_group(
            "gloo",
            store=_loopback_store(address, rank, world_size, wait),
            rank=rank,
            world_size=world_size,
            timeout=wait,
        )
        try:
            value = fn(*args)
        finally:
            if dist.is_initialized():  # fn may have shut it down (an aborted group)
                dist.destroy_process_group()
        # Plain pickle copies tensors: torch's queue reductions share memory that
        # would vanish with this process.
        results.put((rank, True, pickle.dumps(value)))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def _loopback_store(
    address: tuple[str, int], rank: int, world_size: int, timeout: datetime.timedelta
) -> TCPStore:
    """The rendezvous store, its server on rank 0 listening on 127.0.0.1 only: given
    a host alone, `TCPStore` listens on every interface, so rank 0 binds the socket
    itself and hands it over."""
    if rank != 0:
        return TCPStore(*address, world_size, False, timeout=timeout)
    listener = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(address)
    listener.listen()
    return TCPStore(*address, world_size, True, timeout=timeout, master_listen_fd=listener.detach())


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port
