"""How many threads torch uses for the small models of the tour and the CLI.

torch starts one thread per core. For models of a few thousand parameters the
threads only add synchronisation, and on a machine busy with other work they
stall each other: the tour took minutes on a shared 2-core machine with the
default and half a minute on one thread. So small models run on one thread
unless asked otherwise (``--threads``).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from torch import nn

SMALL_MODEL = 1_000_000
"""Parameters below which a model runs on one thread by default."""


def default_threads(model: nn.Module | None = None) -> int | None:
    """1 for a small model (or the embedded ones: ``model=None``), None (torch's own
    choice) for a larger one."""
    if model is None:
        return 1
    return 1 if sum(p.numel() for p in model.parameters()) < SMALL_MODEL else None


@contextmanager
def torch_threads(count: int | None) -> Iterator[None]:
    """Run with ``count`` intra-op threads (None: leave torch's setting), then restore."""
    import torch

    if count is None:
        yield
        return
    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)
