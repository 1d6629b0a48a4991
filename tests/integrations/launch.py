"""Run a function in a few local processes that set up torch.distributed themselves.

Trainers (transformers via accelerate, Lightning) create their own gloo process
group from the usual environment variables; this launcher only sets them
(127.0.0.1, a free port) and bounds everything by a timeout.
"""

from __future__ import annotations

import multiprocessing
import os
import pickle
import queue
import socket
import time
import traceback


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _main(rank, world_size, port, fn, args, results):
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_WORLD_SIZE=str(world_size),
        GLOO_SOCKET_IFNAME="lo",
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    try:
        # Pickled here: tensors sent as they are would be shared memory that dies with us.
        results.put((rank, True, pickle.dumps(fn(*args))))
    except BaseException:
        results.put((rank, False, traceback.format_exc()))


def spawn(fn, nproc, *args, timeout=240.0):
    """``fn(*args)`` in ``nproc`` processes; their results, rank 0 first."""
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    port = _free_port()
    processes = [
        context.Process(target=_main, args=(r, nproc, port, fn, args, results), daemon=True)
        for r in range(nproc)
    ]
    for process in processes:
        process.start()
    outcome = {}
    deadline = time.monotonic() + timeout
    try:
        while len(outcome) < nproc:
            if time.monotonic() > deadline:
                raise TimeoutError(f"ranks {sorted(set(range(nproc)) - set(outcome))} timed out")
            try:
                rank, ok, value = results.get(timeout=0.5)
            except queue.Empty:
                dead = [r for r, p in enumerate(processes) if p.exitcode not in (None, 0)]
                if any(r not in outcome for r in dead):
                    raise RuntimeError(f"ranks {dead} died without a result") from None
                continue
            if not ok:
                raise RuntimeError(f"rank {rank} failed:\n{value}")
            outcome[rank] = pickle.loads(value)
    finally:
        for process in processes:
            process.join(timeout=5)
            if process.is_alive():
                process.kill()
                process.join()
    return [outcome[r] for r in range(nproc)]
