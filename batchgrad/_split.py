"""Splitting a logical batch into micro-batches.

A batch is a tensor, or a tuple/list/dict (nested freely) whose tensor leaves share
dimension 0, the batch dimension. Other leaves (strings, numbers, 0-d tensors,
``None``) belong to no sample and are passed to every micro-batch unchanged.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from torch import Tensor

from ._errors import BatchShapeError, ConfigError, EmptyBatchError

Batch = Any
"""A tensor, a (nested) tuple/list/dict of them and of other leaves."""


def is_structured(batch: object) -> bool:
    """True for the batch kinds that are sliced; other iterables hold micro-batches."""
    return isinstance(batch, Tensor | tuple | list | Mapping)


def _map_leaves(fn: Callable[[Any], Any], batch: Batch) -> Batch:
    if isinstance(batch, Mapping):
        mapped = {key: _map_leaves(fn, value) for key, value in batch.items()}
        return type(batch)(mapped)  # type: ignore[call-arg]  # dict-like types take a dict
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):  # namedtuple
        return type(batch)(*(_map_leaves(fn, value) for value in batch))
    if isinstance(batch, tuple | list):
        return type(batch)(_map_leaves(fn, value) for value in batch)
    return fn(batch)


def batched_leaves(batch: Batch, path: str = "batch") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for each tensor leaf with a batch dimension (ndim ≥ 1)."""
    if isinstance(batch, Mapping):
        for key, value in batch.items():
            yield from batched_leaves(value, f"{path}[{key!r}]")
    elif isinstance(batch, tuple | list):
        fields = getattr(batch, "_fields", None)
        for index, value in enumerate(batch):
            child = f"{path}.{fields[index]}" if fields else f"{path}[{index}]"
            yield from batched_leaves(value, child)
    elif isinstance(batch, Tensor) and batch.ndim > 0:
        yield path, batch


def batch_length(batch: Batch, where: str = "the batch") -> int:
    """The size of dimension 0 shared by every tensor leaf of ``batch`` (ndim ≥ 1).

    Raises:
        BatchShapeError: two tensor leaves disagree, or there is no tensor leaf.
    """
    if isinstance(batch, Tensor) and batch.ndim > 0:  # the common cases, without paths
        return batch.shape[0]
    if type(batch) in (tuple, list):
        rows = None
        for leaf in batch:
            if not isinstance(leaf, Tensor) or leaf.ndim == 0 or rows not in (None, leaf.shape[0]):
                break  # the walk below tells what is wrong, or finds nested tensors
            rows = leaf.shape[0]
        else:
            if rows is not None:
                return rows
    sizes: dict[int, str] = {}
    for path, tensor in batched_leaves(batch, "batch"):
        sizes.setdefault(tensor.shape[0], path)
    if len(sizes) > 1:
        found = ", ".join(f"{path} has {size}" for size, path in sizes.items())
        hint = (
            " If these are ready-made micro-batches, pass an iterator over them "
            "(e.g. iter(micro_batches)) and no micro_batch_size."
            if isinstance(batch, list | tuple)
            else ""
        )
        raise BatchShapeError(
            f"Tensors in {where} disagree on the batch dimension (dimension 0): {found}. "
            f"Every tensor must hold one row per sample; pass per-batch constants as "
            f"0-d tensors or plain Python values.{hint}"
        )
    if not sizes:
        raise BatchShapeError(
            f"{where.capitalize()} holds no tensor with a batch dimension "
            f"(got {type(batch).__name__}); give at least one tensor of shape [batch, ...]."
        )
    return next(iter(sizes))


def slice_batch(batch: Batch, start: int, stop: int) -> Batch:
    """Rows ``start:stop`` of every tensor leaf; other leaves unchanged."""
    return _map_leaves(
        lambda leaf: leaf[start:stop] if isinstance(leaf, Tensor) and leaf.ndim > 0 else leaf,
        batch,
    )


def _split_rows(batch: Batch, size: int) -> Iterator[Batch]:
    """Micro-batches of ``size`` rows: each tensor is split once, not sliced per part."""
    if isinstance(batch, Tensor):
        yield from batch.split(size)
        return
    if type(batch) in (tuple, list) and all(
        isinstance(leaf, Tensor) and leaf.ndim > 0 for leaf in batch
    ):  # the common (inputs, targets): no tree walk per micro-batch
        for rows in zip(*(leaf.split(size) for leaf in batch), strict=True):
            yield type(batch)(rows)
        return
    pieces: dict[int, tuple[Tensor, ...]] = {}

    def split(leaf: Any) -> Any:
        if isinstance(leaf, Tensor) and leaf.ndim > 0:
            pieces[id(leaf)] = leaf.split(size)
        return leaf

    _map_leaves(split, batch)
    parts = len(next(iter(pieces.values())))
    for index in range(parts):
        yield _map_leaves(functools.partial(_piece, pieces, index), batch)


def _piece(pieces: dict[int, tuple[Tensor, ...]], index: int, leaf: Any) -> Any:
    return pieces[id(leaf)][index] if id(leaf) in pieces else leaf


def check_micro_batch_size(micro_batch_size: object) -> int | None:
    """Validate ``micro_batch_size``: a positive int or None."""
    if micro_batch_size is None:
        return None
    if isinstance(micro_batch_size, bool) or not isinstance(micro_batch_size, int):
        raise ConfigError(
            f"micro_batch_size must be a positive int or None (the whole batch at once), "
            f"got {micro_batch_size!r}."
        )
    if micro_batch_size < 1:
        raise ConfigError(f"micro_batch_size must be at least 1, got {micro_batch_size}.")
    return micro_batch_size


def micro_batches(
    batch: Batch | Iterable[Batch], micro_batch_size: int | None, *, allow_empty: bool = False
) -> Iterable[Batch]:
    """The micro-batches of ``batch``, each checked for a consistent dimension 0.

    A structured batch (tensor, tuple, list, dict) is sliced into rows of
    ``micro_batch_size`` (the last may be smaller; ``None`` yields it whole), and the
    slices (views) are returned as a list. Any other iterable yields ready-made
    micro-batches, as they are, checked as they come.

    Raises:
        EmptyBatchError: the batch has no rows or the iterable yields nothing.
        BatchShapeError: tensors of a (micro-)batch disagree on dimension 0.
        ConfigError: ``micro_batch_size`` is given with ready-made micro-batches,
            or is not a positive int.

    With ``allow_empty`` (one rank's share of a data-parallel batch may be empty)
    an empty batch yields nothing instead of raising.
    """
    size = check_micro_batch_size(micro_batch_size)
    if not is_structured(batch):
        if size is not None:
            raise ConfigError(
                f"micro_batch_size={size} was given with an iterable of ready-made micro-"
                f"batches ({type(batch).__name__}); give one or the other: a tensor/tuple/"
                f"dict batch with micro_batch_size, or the micro-batches alone."
            )
        if not isinstance(batch, Iterable):
            raise BatchShapeError(
                f"The batch must be a tensor, a tuple/list/dict of tensors, or an iterable "
                f"of micro-batches; got {type(batch).__name__}."
            )
        return _ready_made(batch, allow_empty)
    length = batch_length(batch)
    if length == 0:
        if allow_empty:
            return []
        raise EmptyBatchError(
            "The batch has 0 samples (dimension 0 is empty); there is no gradient "
            "to compute. Skip empty batches before calling batchgrad."
        )
    if size is None or size >= length:
        return [batch]
    return list(_split_rows(batch, size))


def _ready_made(batch: Iterable[Batch], allow_empty: bool) -> Iterator[Batch]:
    """The micro-batches an iterable yields, each checked as it comes."""
    count = 0
    for count, micro_batch in enumerate(batch, start=1):
        if is_structured(micro_batch):
            batch_length(micro_batch, f"micro-batch {count - 1}")
        yield micro_batch
    if count == 0 and not allow_empty:
        raise EmptyBatchError(
            "The iterable of micro-batches yielded nothing; there is no gradient to "
            "compute. Check the data loader (an exhausted iterator?)."
        )
