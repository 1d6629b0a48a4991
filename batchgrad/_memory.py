"""Large per-sample outputs on the CPU, in transparent huge pages.

Per-sample gradients are ``B`` times the parameters' size, written once into fresh
memory. glibc serves a block larger than its largest mmap threshold (32 MiB on 64-bit
Linux) from a mapping of its own, every time: each of its 4 KiB pages then costs a page
fault when first written, most of the time of filling it (measured: 51 MB of fresh
memory took 3.5× as long to fill as the same memory again). Anonymous memory advised
as huge pages (``MADV_HUGEPAGE``, honoured under Linux's default
``transparent_hugepage=madvise``) faults once per 2 MiB instead: half the time. PyTorch's
CPU allocator does the same only when the process starts with ``THP_MEM_ALLOC_ENABLE=1``.
Smaller blocks stay with the allocator: glibc reuses freed memory for them (after the
first free of a block its threshold rises to that size), which a fresh mapping cannot
beat (measured: 1.5× slower at 4 MB). The tensors are ordinary ones over that memory,
freed with their last reference, just not resizable in place.
"""

from __future__ import annotations

import math
import mmap
import sys
from pathlib import Path

import torch
from torch import Tensor

LARGE = 32 << 20
"""Bytes above which an output goes into huge pages: glibc's largest mmap threshold."""


def _huge_pages() -> bool:
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_HUGEPAGE"):
        return False
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[never]" not in setting


HUGE_PAGES = _huge_pages()


def _mapped(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor | None:
    """Fresh anonymous memory in huge pages (zeros), if large, on the CPU and possible."""
    size = math.prod(shape) * dtype.itemsize
    if not HUGE_PAGES or device.type != "cpu" or size <= LARGE:
        return None
    memory = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    memory.madvise(mmap.MADV_HUGEPAGE)
    return torch.frombuffer(memory, dtype=dtype).view(shape)  # keeps ``memory`` alive


def empty(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.empty(shape)``, in huge pages where `_mapped` can."""
    out = _mapped(shape, dtype, device)
    return torch.empty(shape, dtype=dtype, device=device) if out is None else out


def zeros(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> Tensor:
    """``torch.zeros(shape)``, in huge pages where `_mapped` can."""
    out = _mapped(shape, dtype, device)
    return torch.zeros(shape, dtype=dtype, device=device) if out is None else out
