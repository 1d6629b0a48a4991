"""Mixed precision: the running sum of micro-batch gradients, and loss scaling.

Autograd adds each micro-batch's gradient into ``p.grad`` in the parameter's dtype,
rounding after every addition. In bfloat16 (8 significant bits, unit roundoff
``u = 2⁻⁸``) a sum of ``K`` terms then carries up to ``K - 1`` roundings of the
partial sums, and the later ones are the largest: the error of the sum grows with
``K`` while the terms' own errors average out. A float32 running sum
(``u = 2⁻²⁴``) makes the additions exact to bfloat16's eye, so the only rounding
left is the one into ``p.grad`` at the end: the accumulated gradient is then as good
as the exact gradient rounded once, whatever ``K``.

`RunningSum` holds, aside from ``p.grad``, the sum of the parameters narrower than
the chosen dtype (by default: float16 and bfloat16 ones, in float32); the others
keep accumulating in ``p.grad`` as autograd does, at no extra cost. After every
micro-batch it takes ``p.grad`` into the sum (``p.grad`` is cleared, so autograd
hands the next micro-batch's gradient over without an addition); at the end it
scales the sum by what is left of the normalisation and rounds it, once, into
``p.grad``.

`Scaling` carries a `torch.amp.GradScaler`: every micro-batch's backward starts from
``s / N̂`` instead of ``1 / N̂`` (``s`` the scaler's scale), so every gradient is
scaled as ``scaler.scale(loss).backward()`` would scale it, and ``p.grad`` is left
scaled, as ``scaler.step(optimizer)`` expects. A non-finite gradient then means the
scale was too large (an overflow), not bad input.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ._errors import ConfigError

_HALF = (torch.float16, torch.bfloat16)


def check_accumulate_dtype(value: object) -> None:
    """``None`` or a floating-point `torch.dtype`; anything else is a `ConfigError`."""
    if value is None:
        return
    if not isinstance(value, torch.dtype) or not value.is_floating_point:
        raise ConfigError(
            f"accumulate_dtype must be None (float32 for float16/bfloat16 parameters) "
            f"or a floating-point torch.dtype such as torch.float32, got {value!r}."
        )


def check_scaler(scaler: object, clip_per_sample: float | None) -> None:
    if scaler is None:
        return
    if not isinstance(scaler, torch.amp.GradScaler):
        raise ConfigError(
            f"scaler must be a torch.amp.GradScaler (or None), got {type(scaler).__name__}."
        )
    if clip_per_sample is not None and scaler.is_enabled():
        raise ConfigError(
            "scaler= is not supported together with clip_per_sample: each sample's "
            "gradient is clipped to a norm of the unscaled gradient. Clip per sample in "
            "float32 or bfloat16 without a scaler."
        )


def refuse_sparse(model: nn.Module, layers: list[nn.Module]) -> None:
    """Refuse, before any forward, ``layers`` (of ``model``) whose gradients are sparse
    tensors (`batchgrad._state.trainable_and_buffers` finds them).

    The running sum, the norms and the data-parallel synchronisation need dense
    gradients; a sparse ``p.grad`` would otherwise fail late in a norm kernel.
    """
    if not layers:
        return
    module = layers[0]
    name = next((n for n, m in model.named_modules() if m is module), "")
    raise ConfigError(
        f"{name or 'the model'} ({type(module).__name__}) has sparse=True, so its weight "
        f"gets a sparse gradient, which batchgrad does not accumulate (its running sum, "
        f"norms and synchronisation are dense). Build it with sparse=False (the "
        f"default); an optimizer such as torch.optim.SparseAdam is then replaced by "
        f"torch.optim.Adam."
    )


def sum_dtype(param_dtype: torch.dtype, accumulate_dtype: torch.dtype | None) -> torch.dtype:
    """The dtype a parameter's gradient is summed in: ``accumulate_dtype`` where it is
    wider than the parameter's (by default float32 for float16/bfloat16), else the
    parameter's own."""
    chosen = accumulate_dtype
    if chosen is None:
        chosen = torch.float32 if param_dtype in _HALF else param_dtype
    if chosen != param_dtype and torch.promote_types(chosen, param_dtype) == chosen:
        return chosen
    return param_dtype


class RunningSum:
    """The sum of the micro-batch gradients of the parameters summed in a wider dtype."""

    __slots__ = ("_index", "dtypes", "params", "sums")

    def __init__(self, params: list[nn.Parameter], dtypes: list[torch.dtype]) -> None:
        self.params = params
        self.dtypes = dtypes
        self.sums: list[Tensor | None] = [None] * len(params)
        self._index = {id(p): i for i, p in enumerate(params)}

    @classmethod
    def of(
        cls, params: list[nn.Parameter], accumulate_dtype: torch.dtype | None
    ) -> RunningSum | None:
        """The running sum for ``params``, or None when every one sums in its own
        dtype (then nothing at all changes: autograd sums into ``p.grad``)."""
        if accumulate_dtype is None:  # the common case, on every call: kept short
            half = [p for p in params if p.dtype in _HALF]
            return cls(half, [torch.float32] * len(half)) if half else None
        chosen, dtypes = [], []
        for p in params:
            dtype = sum_dtype(p.dtype, accumulate_dtype)
            if dtype != p.dtype:
                chosen.append(p)
                dtypes.append(dtype)
        return cls(chosen, dtypes) if chosen else None

    def absorb(self) -> None:
        """Move each ``p.grad`` (one micro-batch's gradient) into the sum."""
        into, grads = [], []
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            p.grad = None
            held = self.sums[i]
            if held is None:
                self.sums[i] = grad.to(self.dtypes[i], copy=True)
            else:
                into.append(held)
                grads.append(grad)
        if into:
            torch._foreach_add_(into, grads)

    def held(self, params: list[nn.Parameter]) -> list[Tensor | None]:
        """Each parameter's gradient so far: its sum here, or its ``p.grad``."""
        index = self._index
        return [p.grad if id(p) not in index else self.sums[index[id(p)]] for p in params]

    def flat_dtype(self, params: list[nn.Parameter]) -> torch.dtype:
        """The dtype that holds every parameter's sum: the data-parallel buffer's."""
        dtype = self.dtypes[0]
        for d in [*self.dtypes, *(p.dtype for p in params)]:
            dtype = torch.promote_types(dtype, d)
        return dtype

    def add_noise(self, p: nn.Parameter, noise: Tensor) -> bool:
        """Add ``noise`` to ``p``'s sum; False if ``p`` is not summed here."""
        i = self._index.get(id(p))
        if i is None:
            return False
        held = self.sums[i]
        self.sums[i] = noise.to(self.dtypes[i]) if held is None else held.add_(noise)
        return True

    def finish(self, factor: float) -> list[Tensor]:
        """Scale the sums by ``factor`` (what is left of the normalisation) and round
        each, once, into ``p.grad``; returns those gradients. The sums are kept
        (normalised) for `exact_sums`."""
        sums = [s for s in self.sums if s is not None]
        if factor != 1.0 and sums:
            torch._foreach_mul_(sums, factor)
        grads = []
        for p, held in zip(self.params, self.sums, strict=True):
            if held is not None:
                p.grad = held.to(p.dtype)
                grads.append(p.grad)
        return grads

    def exact_sums(self) -> dict[int, Tensor]:
        """The normalised sums by parameter id, for adding to existing gradients with
        one rounding (``existing_grad="add"``)."""
        return {id(p): s for p, s in zip(self.params, self.sums, strict=True) if s is not None}


class Scaling:
    """A `torch.amp.GradScaler`'s scale in every micro-batch's backward."""

    __slots__ = ("scale", "scaler")

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler
        self.scale = float(scaler.get_scale())  # read once per call

    @classmethod
    def of(cls, scaler: torch.amp.GradScaler | None) -> Scaling | None:
        return cls(scaler) if scaler is not None and scaler.is_enabled() else None

    def root(self, root: Tensor | None, total: Tensor) -> Tensor:
        """``s · root`` (root None: ``s``), like ``total``; through the scaler, which
        creates its scale on ``total``'s device on first use."""
        base = torch.ones_like(total) if root is None else root
        return self.scaler.scale(base).to(total.dtype)


def carried(root: Tensor | None, scaling: Scaling | None) -> float:
    """The divisor every micro-batch's gradient carries, read from the backward's root
    itself (so its rounding to the loss's dtype is undone too), with the scale
    factored out: the gradient is ``(s / carried) · Σ ∇ total``."""
    scale = 1.0 if scaling is None else scaling.scale
    return scale if root is None else scale / float(root)
