"""Run a function in a few local processes that set up torch.distributed themselves.

Trainers (transformers via accelerate, Lightning) create their own gloo process
group from the usual environment variables; `batchgrad._distributed.launch` with
``init_group=False`` only sets them (127.0.0.1, a free port) and bounds everything
by a timeout.
"""

from __future__ import annotations

from batchgrad._distributed import launch


def spawn(fn, nproc, *args, timeout=240.0):
    """``fn(*args)`` in ``nproc`` processes; their results, rank 0 first."""
    return launch(fn, nproc, *args, timeout=timeout, init_group=False)
