"""How the ranks of a data-parallel `accumulate` agree: one control collective, or
none of its own (carried in the gradient all-reduce).

Every rank runs its micro-batches without talking to the others (DDP's reducer
stays quiet under ``no_sync()``), catching whatever fails, and then every rank,
whatever happened to it, enters the same single all-reduce (`agree`) of a small
float64 vector:

- summed over the ranks: the loss sum, the count ``N(B)``, the micro-batches (and,
  on FSDP models, the ranks that ask for a rehearsal: `batchgrad._fsdp`);
- one block per rank, the others' zero: whether and where it failed, a hash of
  its settings and one of its trainable parameters' layout, whether it holds
  any sample, whether it left a parameter without a gradient, and the squared
  norm and samples of its local gradient (for the noise scale).

A sum of blocks that only their own rank fills is an all-gather, so after the one
collective every rank knows every other's state and all take the same decision:
raise the same error, or synchronise the gradients (the only other collective, see
`batchgrad._distributed`). Only a failure or a mismatch costs more, one
`all_gather_object` for the messages. Nothing waits on a rank that stopped early;
a rank that died breaks the connection, which gloo and NCCL report at once
(`DistributedError`).

Once the ranks of a group have agreed on their trainable parameters' layout, the
same blocks travel inside the gradient all-reduce instead (`Fused`,
`agree_in_sum`): one collective per logical batch. Its size comes from that
agreement, so every rank sends as many elements whatever it holds; a rank whose
layout changed sends zeros with a flag, and then every rank agrees apart with
`agree`, as on a group's first call.
"""

from __future__ import annotations

import math
import struct
import weakref
import zlib
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from ._errors import BatchError, ConfigError, DistributedError

_HEADER = 6  # loss sum, count, micro-batches, clipped and all samples, rehearsals: summed
_BLOCK = 8  # values per rank, below
_FAILED, _WHERE, _SETTINGS, _LAYOUT, _WORKS, _UNUSED, _SQ_NORM, _SAMPLES = range(_BLOCK)
_HASH_BITS = 24  # a float64 holds the hash exactly, also summed over many ranks


@dataclass(slots=True)
class Local:
    """What this rank brings to the agreement."""

    settings: dict[str, object]
    layout_hash: int
    layout_entries: list[str]  # "name:shape:dtype" per parameter, to name a mismatch
    failure: BaseException | None = None
    failed_at: int | None = None  # the micro-batch that failed; None: outside the loop
    works: bool = False  # holds at least one micro-batch
    unused: bool = False  # a parameter got no gradient from its micro-batches
    loss_sum: float = 0.0
    count: float = 0.0
    micro_batches: int = 0
    clipped: int = 0  # samples whose gradient was clipped, with clip_per_sample
    clip_samples: int = 0  # samples clipped or not, with clip_per_sample
    sq_norm: float = 0.0  # ‖local gradient‖², with noise=
    samples: int = 0
    rehearse: bool = False  # (FSDP) this rank has not learned the model's collectives

    def header(self) -> list[float]:
        """The `_HEADER` values, summed over the ranks."""
        return [
            self.loss_sum,
            self.count,
            float(self.micro_batches),
            float(self.clipped),
            float(self.clip_samples),
            float(self.rehearse),
        ]

    def block(self) -> list[float]:
        """The `_BLOCK` values only this rank fills."""
        return [
            float(self.failure is not None),
            -1.0 if self.failed_at is None else float(self.failed_at),
            float(settings_hash(self.settings)),
            float(self.layout_hash),
            float(self.works),
            float(self.unused),
            self.sq_norm,
            float(self.samples),
        ]


@dataclass(frozen=True, slots=True)
class Agreement:
    """What every rank knows after `agree`."""

    loss_sum: float
    count: float
    micro_batches: int
    clipped: float | None  # the fraction of samples clipped, with clip_per_sample
    idle: list[int]  # ranks without a micro-batch
    some_unused: bool  # a working rank left a parameter without a gradient
    sq_norms: list[float]  # of each working rank's local gradient
    samples: list[int]  # of each working rank
    rehearse: bool  # (FSDP) some rank asked for a rehearsal step


def settings_hash(settings: dict[str, object]) -> int:
    return zlib.crc32(repr(sorted(settings.items())).encode()) % (1 << _HASH_BITS)


_LAYOUTS: weakref.WeakKeyDictionary[nn.Module, tuple[tuple[object, ...], int, list[str]]] = (
    weakref.WeakKeyDictionary()
)


def layout(model: nn.Module, params: Sequence[nn.Parameter]) -> tuple[int, list[str]]:
    """A hash of the trainable parameters' names, shapes and dtypes, and their list.

    The names are looked up once per model and set of parameters (remembered while
    the model lives); shapes and dtypes are read on every call.
    """
    key = tuple((id(p), p.shape, p.dtype) for p in params)
    known = _LAYOUTS.get(model)
    if known is not None and known[0] == key:
        return known[1], known[2]
    names = {id(p): name for name, p in model.named_parameters()}
    entries = [f"{names.get(id(p), '?')}:{tuple(p.shape)}:{p.dtype}" for p in params]
    value = zlib.crc32(";".join(entries).encode()) % (1 << _HASH_BITS)
    _LAYOUTS[model] = (key, value, entries)
    return value, entries


def agree(
    group: dist.ProcessGroup | None, rank: int, world_size: int, device: torch.device, mine: Local
) -> Agreement:
    """The one control collective; raises the same `BatchError` on every rank if any
    rank failed or the ranks' settings or layouts differ."""
    values = [0.0] * (_HEADER + _BLOCK * world_size)
    values[0:_HEADER] = mine.header()
    block = _HEADER + _BLOCK * rank
    values[block : block + _BLOCK] = mine.block()
    tensor = torch.tensor(values, dtype=torch.float64, device=device)
    try:
        dist.all_reduce(tensor, group=group)
    except RuntimeError as error:  # a rank died or the connection broke
        raise _unreachable(rank, error) from mine.failure
    got: list[float] = tensor.tolist()
    blocks = [got[_HEADER + _BLOCK * r : _HEADER + _BLOCK * (r + 1)] for r in range(world_size)]
    return _decide(group, rank, world_size, mine, got[:_HEADER], blocks)


def _decide(
    group: dist.ProcessGroup | None,
    rank: int,
    world_size: int,
    mine: Local,
    header: list[float],
    blocks: list[list[float]],
) -> Agreement:
    """What every rank concludes from the summed header and the ranks' blocks: the
    same on every rank, raised or returned."""
    failed = [r for r, b in enumerate(blocks) if b[_FAILED]]
    if failed:
        where = {r: int(blocks[r][_WHERE]) for r in failed}
        raise_failures(group, rank, world_size, mine.failure, mine.failed_at, where)
    if len({b[_SETTINGS] for b in blocks}) > 1 or len({b[_LAYOUT] for b in blocks}) > 1:
        _raise_mismatch(group, world_size, mine)
    working = [b for b in blocks if b[_WORKS]]
    return Agreement(
        loss_sum=header[0],
        count=header[1],
        micro_batches=int(header[2]),
        clipped=header[3] / header[4] if header[4] else None,
        idle=[r for r, b in enumerate(blocks) if not b[_WORKS]],
        some_unused=any(b[_UNUSED] for b in working),
        sq_norms=[b[_SQ_NORM] for b in working],
        samples=[int(b[_SAMPLES]) for b in working],
        rehearse=header[5] > 0,
    )


# ---- the agreement carried in the gradient all-reduce ---------------------------------


@dataclass(slots=True)
class Fused:
    """The gradients' layout every rank of a group agreed on in its last agreement.

    While a call's trainable parameters have this layout, the agreement rides in the
    gradient all-reduce: one buffer ``[gradients | used | control]`` of `size`
    elements, the same on every rank because it comes from an agreement, not from
    the call. ``used`` counts the ranks that gave each parameter a gradient;
    ``control`` holds one block per rank (`_FUSED_BLOCK` values, each as
    `pieces` numbers of the gradients' dtype, exactly: `_encode`), the others' zero, so the sum is
    every rank's block, exactly.
    """

    layout_hash: int
    numel: int  # elements of the gradients
    params: int
    dtype: torch.dtype
    divisor: float = 1.0  # the group's last N(B): what every rank presumes now

    @property
    def pieces(self) -> int:
        return 1 if self.dtype == torch.float64 else 4  # see `_encode`

    def size(self, world_size: int) -> int:
        return self.numel + self.params + world_size * _FUSED_BLOCK * self.pieces

    def same_layout(self, other: Fused | None) -> bool:
        return other is not None and (
            (self.layout_hash, self.numel, self.params, self.dtype)
            == (other.layout_hash, other.numel, other.params, other.dtype)
        )


# One entry per process group; updated on every rank at the same points of the
# protocol (decided by collectives), so the ranks' entries never differ.
_FUSED: dict[object, Fused] = {}
# Each rank's block: a fallback flag, the `_BLOCK` values, then the `_HEADER` values
# (per rank here, summed in float64 after) and the divisor the gradients carry.
_FALLBACK = 0
_FUSED_BLOCK = 1 + _BLOCK + _HEADER + 1


def _group_key(group: dist.ProcessGroup | None) -> object:
    return dist.group.WORLD if group is None else group


def fused(group: dist.ProcessGroup | None) -> Fused | None:
    """The group's agreed layout, if its agreement can ride in the gradient sum."""
    return _FUSED.get(_group_key(group))


def remember(group: dist.ProcessGroup | None, entry: Fused | None) -> None:
    """Set (or with None, forget) the group's agreed layout; call on every rank alike."""
    if entry is None:
        _FUSED.pop(_group_key(group), None)
    else:
        _FUSED[_group_key(group)] = entry


def fusable(params: Sequence[nn.Parameter], layout_hash: int) -> Fused | None:
    """This call's layout as a `Fused`, if its gradients can carry the agreement:
    one dtype, float32 or float64 (a float16 sum would round the control values)."""
    dtypes = {p.dtype for p in params}
    if len(dtypes) != 1 or not dtypes <= {torch.float32, torch.float64}:
        return None
    return Fused(layout_hash, sum(p.numel() for p in params), len(params), dtypes.pop())


def agree_in_sum(
    group: dist.ProcessGroup | None,
    rank: int,
    world_size: int,
    flat: Tensor,
    entry: Fused,
    mine: Local,
    fallback: bool,
    presumed: float,
) -> tuple[Agreement, list[float]] | None:
    """The agreement inside the gradient all-reduce of ``flat`` (`Fused`'s layout).

    ``fallback``: this rank cannot take part (its layout differs from the agreed
    one; ``flat`` is zeros). Returns None, on every rank, when some rank falls back
    (then every rank runs `agree` and its own all-reduce); else the agreement and
    each working rank's ``presumed`` divisor, after raising as `agree` does.
    """
    values = [float(fallback), *mine.block(), *mine.header(), presumed]
    encoded = _encode(values, flat.dtype, entry.pieces)
    if encoded is None:  # a value the pieces cannot hold exactly (inf, overflow)
        encoded = _encode([1.0] + [0.0] * (_FUSED_BLOCK - 1), flat.dtype, entry.pieces)
        assert encoded is not None
    control = flat[entry.numel + entry.params :]
    control.zero_()
    width = _FUSED_BLOCK * entry.pieces
    control[rank * width : (rank + 1) * width] = encoded.to(flat.device)
    try:
        dist.all_reduce(flat, group=group)
    except RuntimeError as error:  # a rank died or the connection broke
        raise _unreachable(rank, error) from mine.failure
    got = _decode(control, entry.pieces)
    blocks = [got[r * _FUSED_BLOCK : (r + 1) * _FUSED_BLOCK] for r in range(world_size)]
    if any(b[_FALLBACK] for b in blocks):
        return None
    header = [math.fsum(b[1 + _BLOCK + i] for b in blocks) for i in range(_HEADER)]
    agreed = _decide(group, rank, world_size, mine, header, [b[1 : 1 + _BLOCK] for b in blocks])
    return agreed, [b[-1] for b in blocks if b[1 + _WORKS]]


_FLOAT32 = struct.Struct("f")


def _encode(values: list[float], dtype: torch.dtype, pieces: int) -> Tensor | None:
    """``values`` as ``pieces`` numbers of ``dtype`` each, that `_decode` turns back
    into them exactly; None if they cannot be (inf, nan).

    In float32: each value's mantissa (in [0.5, 1), 53 bits) as three float32 parts
    rounded in turn, 24 + 24 + 5 bits, none near float32's underflow, and its
    exponent, an integer float32 holds exactly.
    """
    if not all(map(math.isfinite, values)):
        return None
    if pieces == 1:
        return torch.tensor(values, dtype=dtype)
    parts: list[float] = []
    for value in values:
        mantissa, exponent = math.frexp(value)
        rest, split = mantissa, []
        for _ in range(pieces - 1):  # round to the nearest float32, keep the remainder
            (part,) = _FLOAT32.unpack(_FLOAT32.pack(rest))
            split.append(part)
            rest -= part
        if rest != 0.0:
            return None
        parts.extend(split)
        parts.append(float(exponent))
    return torch.tensor(parts, dtype=dtype)


def _decode(encoded: Tensor, pieces: int) -> list[float]:
    values: list[float] = encoded.double().tolist()
    if pieces == 1:
        return values
    decoded = []
    for i in range(0, len(values), pieces):
        mantissa = values[i]
        for part in values[i + 1 : i + pieces - 1]:
            mantissa += part
        decoded.append(math.ldexp(mantissa, int(values[i + pieces - 1])))
    return decoded


def _unreachable(rank: int, error: RuntimeError) -> DistributedError:
    return DistributedError(
        f"Rank {rank} could not reach the other ranks to agree on the logical batch "
        f"({error}). A rank has probably died or hangs; the process group cannot be "
        f"used any more. Restart the job (torchrun --max-restarts resumes from your "
        f"last checkpoint)."
    )


def raise_failures(
    group: dist.ProcessGroup | None,
    rank: int,
    world_size: int,
    local: BaseException | None,
    local_at: int | str | None = None,
    where: dict[int, int] | None = None,
) -> None:
    """Every rank raises if any rank failed; each names the first rank that did.

    One `all_gather_object` of the failures' descriptions; call it on every rank.
    A `BatchError` keeps its type on every rank; anything else (the user's own
    exception, a ``KeyboardInterrupt`` in ``loss_fn``) becomes a `DistributedError`,
    raised from the original on the rank where it happened.
    """
    mine = None if local is None else (type(local).__name__, str(local), local_at)
    gathered: list[tuple[str, str, int | str | None] | None] = [None] * world_size
    dist.all_gather_object(gathered, mine, group=group)
    failures = [(r, f) for r, f in enumerate(gathered) if f is not None]
    if not failures:
        return
    first, (kind, message, at) = failures[0]
    others = [r for r, _ in failures[1:]]
    also = f" (ranks {others} failed too)" if others else ""
    if where is not None and first in where and where[first] >= 0:
        at = where[first]
    place = f"On rank {first}" if at is None else f"On rank {first}, {_place(at)}"
    error_type = _batch_error_types().get(kind, DistributedError)
    if error_type is DistributedError:
        message = (
            f"{kind}: {message}. Every rank stops so that none is left waiting in a "
            f"collective; look at rank {first}'s traceback"
        )
        if first == rank:
            message += " (raised from it here)"
    error = error_type(f"{place}: {message}{also}")
    raise error from local


def _place(at: int | str) -> str:
    """Where on a rank: a micro-batch's index, or the place named."""
    return at if isinstance(at, str) else f"micro-batch {at}"


def _raise_mismatch(group: dist.ProcessGroup | None, world_size: int, mine: Local) -> None:
    """The ranks' settings or layouts differ: gather them and name the difference."""
    gathered: list[tuple[dict[str, object], list[str]] | None] = [None] * world_size
    dist.all_gather_object(gathered, (mine.settings, mine.layout_entries), group=group)
    theirs = [g for g in gathered if g is not None]
    lines = []
    for key in theirs[0][0]:
        seen = [s.get(key) for s, _ in theirs]
        if len({repr(v) for v in seen}) > 1:
            lines.append(f"{key}: " + ", ".join(f"rank {r}: {v!r}" for r, v in enumerate(seen)))
    layouts = [e for _, e in theirs]
    if any(e != layouts[0] for e in layouts):
        lines.append(_layout_difference(layouts))
    raise ConfigError(
        "The ranks disagree on "
        + "; ".join(lines)
        + ". Every rank must call bg.accumulate with the same settings on the same model "
        "(the same trainable parameters, names and shapes); each passes only its own data."
    )


def _layout_difference(layouts: list[list[str]]) -> str:
    reference = layouts[0]
    for r, entries in enumerate(layouts[1:], start=1):
        if entries != reference:
            only_0 = [e for e in reference if e not in entries][:3]
            only_r = [e for e in entries if e not in reference][:3]
            if len(entries) != len(reference):
                return (
                    f"the trainable parameters: rank 0 has {len(reference)}, rank {r} has "
                    f"{len(entries)} (rank 0 only: {only_0}, rank {r} only: {only_r})"
                )
            return (
                f"the trainable parameters (name:shape:dtype): rank 0 has {only_0}, rank {r} "
                f"has {only_r}"
            )
    return "the trainable parameters"


def _batch_error_types() -> dict[str, type[BatchError]]:
    types: dict[str, type[BatchError]] = {}
    pending: list[type[BatchError]] = [BatchError]
    while pending:
        cls = pending.pop()
        types[cls.__name__] = cls
        pending.extend(cls.__subclasses__())
    return types
