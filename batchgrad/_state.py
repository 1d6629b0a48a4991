"""Taking and putting back the parts of a model a computation may change.

`accumulate` must leave gradients and buffers exactly as they were when it raises,
and `check` must leave the whole model as it found it. Gradients are moved aside
(no copy) and put back as the same tensor objects; buffers are cloned and copied
back (unconditionally: BatchNorm's kernel updates running statistics without
bumping the tensors' version counters).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from ._errors import ExistingGradError
from ._readout import _grads, _total_norm, _widened_norm


@dataclass
class GradStash:
    """The ``.grad`` of each parameter, moved aside so the parameters start clean."""

    params: list[nn.Parameter]
    grads: list[Tensor | None]

    @classmethod
    def take(cls, params: list[nn.Parameter]) -> GradStash:
        stash = cls(params, [p.grad for p in params])
        for p in params:
            p.grad = None
        return stash

    def put_back(self) -> None:
        """Make every ``p.grad`` the very tensor (or None) it was before `take`."""
        for p, grad in zip(self.params, self.grads, strict=True):
            p.grad = grad


@dataclass
class BufferSnapshot:
    """Every buffer of a model: the tensor object and a copy of its value."""

    entries: list[tuple[nn.Module, str, Tensor, Tensor]]

    @classmethod
    def take(cls, model: nn.Module) -> BufferSnapshot:
        snapshot = cls([])
        for module in model.modules():
            snapshot.add_own(module)
        return snapshot

    def add_own(self, module: nn.Module) -> None:
        """Add the buffers of ``module`` itself (not of its children)."""
        for name, buffer in module._buffers.items():
            if buffer is not None:
                self.entries.append((module, name, buffer, buffer.detach().clone()))

    def put_back(self) -> None:
        with torch.no_grad():
            for module, name, buffer, value in self.entries:
                module._buffers[name] = buffer
                buffer.copy_(value)


_SPARSE_LAYERS = (nn.Embedding, nn.EmbeddingBag)


def trainable_and_buffers(
    model: nn.Module, sparse: list[nn.Module] | None = None
) -> tuple[list[nn.Parameter], BufferSnapshot]:
    """The parameters that require grad, as ``model.parameters()`` lists them, and a
    `BufferSnapshot`, from one walk over the modules (`accumulate` takes both on every
    call). ``sparse``: append to it the layers built with ``sparse=True`` (their
    gradients are sparse tensors), found on the same walk."""
    params: list[nn.Parameter] = []
    seen: set[int] = set()  # by id: Tensor.__hash__ runs Python code
    buffers = BufferSnapshot([])
    for module in model.modules():
        if sparse is not None and isinstance(module, _SPARSE_LAYERS) and module.sparse:
            sparse.append(module)
        for p in module._parameters.values():
            if p is not None and p.requires_grad and id(p) not in seen:
                seen.add(id(p))
                params.append(p)
        if module._buffers:
            buffers.add_own(module)
    return params, buffers


@dataclass
class RngSnapshot:
    """The state of torch's CPU generator and of every initialised CUDA generator."""

    cpu: Tensor
    cuda: list[Tensor]

    @classmethod
    def take(cls) -> RngSnapshot:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else []
        return cls(torch.get_rng_state(), cuda)

    def same_as(self, other: RngSnapshot) -> bool:
        return torch.equal(self.cpu, other.cpu) and all(
            torch.equal(a, b) for a, b in zip(self.cuda, other.cuda, strict=True)
        )

    def put_back(self) -> None:
        torch.set_rng_state(self.cpu)
        if self.cuda:
            torch.cuda.set_rng_state_all(self.cuda)


@dataclass
class ModelSnapshot:
    """Parameters (values and gradients), buffers and RNG: all `check` may disturb."""

    values: list[Tensor]
    grads: GradStash
    buffers: BufferSnapshot
    rng: RngSnapshot

    @classmethod
    def take(cls, model: nn.Module) -> ModelSnapshot:
        params = list(model.parameters())
        return cls(
            values=[p.detach().clone() for p in params],
            grads=GradStash.take(params),
            buffers=BufferSnapshot.take(model),
            rng=RngSnapshot.take(),
        )

    def reset(self) -> None:
        """Back to the state of `take`, with gradients cleared (ready for a new run)."""
        with torch.no_grad():
            for p, value in zip(self.grads.params, self.values, strict=True):
                p.copy_(value)
                p.grad = None
        self.buffers.put_back()
        self.rng.put_back()

    def put_back(self) -> None:
        """Back to the state of `take`, gradients included."""
        self.reset()
        self.grads.put_back()


# ---- writing the result into the gradients held before a call -----------------------


def _into_stashed(stash: GradStash) -> None:
    """Write each new gradient into the tensor ``p.grad`` held before the call, where
    there was one (cleared with ``zero_grad(set_to_none=False)``, or replaced).

    Autograd accumulates into an existing ``p.grad`` in place, and code may rely on
    it: gradients that are views of one flat buffer (DDP's ``gradient_as_bucket_view``,
    optimizers over contiguous gradient buffers) would otherwise keep reading zeros.
    """
    for p, old in zip(stash.params, stash.grads, strict=True):
        new = p.grad
        if (
            old is not None
            and new is not None
            and old.layout == new.layout == torch.strided
            and old.shape == new.shape
            and old.dtype == new.dtype
            and old.device == new.device
        ):
            with torch.no_grad():
                old.copy_(new)
            p.grad = old


def _add_back(stash: GradStash, exact: dict[int, Tensor] | None = None) -> float:
    """Add the new gradients into the stashed ones (in place, like autograd does).

    ``exact``: by parameter id, the new gradient before its rounding into ``p.grad``
    (a wider running sum): the old one is added to it first, so the result is
    rounded once.
    """
    for p, old in zip(stash.params, stash.grads, strict=True):
        if old is not None:
            if p.grad is not None:
                wide = None if exact is None else exact.get(id(p))
                if wide is None:
                    old.add_(p.grad)
                else:
                    old.copy_(wide.add_(old))
            p.grad = old
    grads = _grads(stash.params)
    return _widened_norm(_total_norm(grads), grads)


def _refuse_existing_grads(model: nn.Module, stash: GradStash) -> None:
    """Raise if any gradient found before the call (now in ``stash``) is non-zero."""
    present = [(p, g) for p, g in zip(stash.params, stash.grads, strict=True) if g is not None]
    if not present:
        return
    nonzero = torch.stack([g.detach().ne(0).any() for _, g in present])
    if not bool(nonzero.any()):
        return
    names = {p: name for name, p in model.named_parameters()}
    stale = [names[p] for (p, _), flag in zip(present, nonzero.tolist(), strict=True) if flag]
    raise ExistingGradError(
        f"{len(stale)} parameter(s) already hold non-zero gradients ({', '.join(stale[:3])}"
        f"{', ...' if len(stale) > 3 else ''}); accumulate would add the new gradient to "
        f"stale ones. Call optimizer.zero_grad() first, or pass existing_grad='replace' "
        f"to overwrite them or existing_grad='add' to add to them on purpose."
    )
