"""Slicing a batch of sequences along time, and carrying a recurrent state.

A sequence batch has the structure of a batch (see `batchgrad._split`), with time
as dimension 1: every tensor leaf of 2 or more dimensions is ``[batch, time, ...]``
and is cut along time. 1-D leaves (one value per sample, e.g. lengths) and other
leaves belong to no time step and go whole to every chunk.

A recurrent state is ``None``, a tensor, or a (nested) tuple/list/dict of tensors
(an LSTM's ``(h, c)``); between chunks it is cut from the autograd graph.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

from torch import Tensor

from ._errors import BatchShapeError, ConfigError, StateError
from ._split import Batch, _map_leaves, batched_leaves

State = Any
"""``None``, a tensor, or a (nested) tuple/list/dict of tensors."""


def time_length(sequence: Batch) -> int:
    """The length of dimension 1 shared by every tensor leaf with 2 or more dimensions.

    Raises:
        BatchShapeError: two such leaves disagree, or there is none.
    """
    lengths: dict[int, str] = {}
    for path, tensor in batched_leaves(sequence, "sequence"):
        if tensor.ndim >= 2:
            lengths.setdefault(tensor.shape[1], path)
    if len(lengths) > 1:
        found = ", ".join(f"{path} has {length}" for length, path in lengths.items())
        raise BatchShapeError(
            f"Tensors in the sequence disagree on the time dimension (dimension 1): "
            f"{found}. Every [batch, time, ...] tensor must hold the same time steps; pad "
            f"them to one length and pass a mask."
        )
    if not lengths:
        raise BatchShapeError(
            f"The sequence holds no tensor shaped [batch, time, ...] (got "
            f"{type(sequence).__name__}); give the inputs batch first, time second."
        )
    return next(iter(lengths))


def time_slice(sequence: Batch, start: int, stop: int) -> Batch:
    """Time steps ``start:stop`` of every ``[batch, time, ...]`` leaf; others unchanged."""
    return _map_leaves(
        lambda leaf: leaf[:, start:stop] if isinstance(leaf, Tensor) and leaf.ndim >= 2 else leaf,
        sequence,
    )


def check_positive(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name} must be a positive int (time steps), got {value!r}.")
    return value


def chunk_bounds(steps: int, chunk: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of consecutive chunks of ``chunk`` steps (the last may be shorter)."""
    return [(start, min(start + chunk, steps)) for start in range(0, steps, chunk)]


def state_leaves(state: State, path: str = "state") -> Iterator[tuple[str, Tensor]]:
    """``(path, tensor)`` for each floating-point tensor of ``state`` (what carries a
    gradient), in a fixed order.

    Raises:
        StateError: a leaf is neither a tensor, ``None``, nor a plain number or string.
    """
    if isinstance(state, Mapping):
        for key, value in state.items():
            yield from state_leaves(value, f"{path}[{key!r}]")
    elif isinstance(state, tuple | list):
        for index, value in enumerate(state):
            yield from state_leaves(value, f"{path}[{index}]")
    elif isinstance(state, Tensor):
        if state.is_floating_point() or state.is_complex():
            yield path, state
    elif state is not None and not isinstance(state, bool | int | float | str):
        raise StateError(
            f"{path} is a {type(state).__name__}, which batchgrad cannot cut from the "
            f"autograd graph between time chunks. Return the state as a tensor or a "
            f"tuple/list/dict of tensors (e.g. an LSTM's (h, c))."
        )


def detach_state(state: State, *, requires_grad: bool = False) -> State:
    """A copy of ``state`` cut from the graph; floating leaves require grad if asked."""
    list(state_leaves(state))  # refuse what cannot be detached, naming it

    def detach(leaf: Any) -> Any:
        if not isinstance(leaf, Tensor):
            return leaf
        cut = leaf.detach()
        if requires_grad and (cut.is_floating_point() or cut.is_complex()):
            cut.requires_grad_()
        return cut

    return _map_leaves(detach, state)
