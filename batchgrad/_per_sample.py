"""Per-sample gradients, their norms, and per-sample clipping.

The gradient of a batch's ``total`` is the sum of the gradients of its samples'
own totals (a sample may hold many units, e.g. tokens); under ``"mean"`` it is that
sum divided by ``N(B)``. batchgrad gets each sample's gradient from one forward
and one backward, without the parameters' own gradients: forward hooks keep what
enters each module with parameters, one ``autograd.grad`` call returns the gradient
reaching each module's output, and per layer:

- `nn.Linear` (any number of middle dimensions): ``Σ_t g_t a_tᵀ`` per sample;
- `nn.Conv1d` / `nn.Conv2d`: the same on unfolded input patches;
- `nn.Embedding`: the output gradients added into the rows of the sample's ids;
- `nn.LayerNorm`, `nn.GroupNorm`: the normalised input times the output gradient;
- any other module with parameters: ``torch.func.vmap`` over the samples of the
  module's own vector-Jacobian product (the module alone is recomputed).

Norms use the Goodfellow / ghost-norm identities where they are cheaper than the
gradients (`nn.Linear`, `nn.Embedding`): ``‖Σ_t g_t a_tᵀ‖² = Σ_{t,s} (a_t·a_s)(g_t·g_s)``.
Clipping weighs each sample's output gradients by ``min(1, C / ‖g_i‖)`` and forms the
weighted sum per layer directly (one matrix product, as a plain backward does), so
memory never holds ``B × parameters``.

A sample is a row of dimension 0 of the batch, and every module with parameters
must keep it in dimension 0 of its inputs and outputs (dimension 1 for modules built
with ``batch_first=False``). Modules that mix samples (BatchNorm in training mode)
have no per-sample gradients and are refused.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from ._errors import BatchShapeError, ConfigError, NonFiniteError
from ._loss import Loss, LossFn, unpack_loss
from ._split import Batch, batch_length, check_micro_batch_size, micro_batches

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_FAST = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Embedding, nn.LayerNorm, nn.GroupNorm)


@dataclass
class _Call:
    """One call of a module with parameters during the forward."""

    module: nn.Module
    name: str
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    outputs: list[Tensor]  # the tensors it returned that require grad
    versions: list[int]
    grads: list[Tensor | None] = field(default_factory=list)


class _Recorder:
    """Forward hooks on every module with trainable parameters of its own."""

    def __init__(self, model: nn.Module) -> None:
        self.calls: list[_Call] = []
        self.active = True
        self.modules = {
            module: name
            for name, module in model.named_modules()
            if any(p.requires_grad for p in module.parameters(recurse=False))
        }
        for module, name in self.modules.items():
            if isinstance(module, _BATCH_NORMS) and module.training:
                raise ConfigError(
                    f"Module {name!r} ({type(module).__name__}) is in training mode: it "
                    f"normalises with statistics of the whole batch, so a sample's output "
                    f"depends on the other samples and has no gradient of its own. Put it "
                    f"in eval mode (module.eval()) or replace it with nn.GroupNorm or "
                    f"nn.LayerNorm."
                )
            if isinstance(module, nn.Embedding) and module.scale_grad_by_freq:
                raise ConfigError(
                    f"Embedding {name!r} has scale_grad_by_freq=True: it scales gradients by "
                    f"how often each id occurs in the whole batch, which couples the "
                    f"samples. Build it with scale_grad_by_freq=False."
                )
        self.handles = [
            module.register_forward_hook(self._hook, with_kwargs=True) for module in self.modules
        ]

    def _hook(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        if not self.active:
            return
        outputs = [t for t in _tensors(output) if t.requires_grad]
        self.calls.append(
            _Call(
                module,
                self.modules[module],
                args,
                kwargs,
                outputs,
                [t._version for t in outputs],
            )
        )

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()


def _tensors(value: Any) -> Iterator[Tensor]:
    if isinstance(value, Tensor):
        yield value
    elif isinstance(value, tuple | list):
        for item in value:
            yield from _tensors(item)
    elif isinstance(value, dict):
        for item in value.values():
            yield from _tensors(item)


def _record(
    model: nn.Module, loss_fn: LossFn, micro_batch: Batch, index: int
) -> tuple[list[_Call], Loss]:
    """Forward ``micro_batch`` and backpropagate its total to every recorded output."""
    recorder = _Recorder(model)
    try:
        loss = loss_fn(model, micro_batch)
    finally:
        recorder.remove()
    total, count = unpack_loss(loss, index)
    calls = [call for call in recorder.calls if call.outputs]
    for call in calls:
        if [t._version for t in call.outputs] != call.versions:
            raise ConfigError(
                f"The output of module {call.name!r} ({type(call.module).__name__}) was "
                f"modified in place after it returned (e.g. by nn.ReLU(inplace=True)), which "
                f"hides the gradient reaching it. Use the out-of-place version of that "
                f"operation."
            )
    outputs = [t for call in calls for t in call.outputs]
    retain = any(not isinstance(call.module, _FAST) for call in calls)
    grads = torch.autograd.grad(total, outputs, allow_unused=True, retain_graph=retain)
    position = 0
    for call in calls:
        call.grads = list(grads[position : position + len(call.outputs)])
        position += len(call.outputs)
    return calls, Loss(total, count)


# -- per layer: per-sample gradients, their squared norms, and weighted sums ----------


def _as_rows(t: Tensor, batch: int, name: str, what: str) -> Tensor:
    """``[B, -1, features]`` view of ``t``, checking that dimension 0 is the batch."""
    if t.ndim < 2 or t.shape[0] != batch:
        raise BatchShapeError(
            f"The {what} of module {name!r} has shape {tuple(t.shape)}, but dimension 0 must "
            f"be the batch of {batch} samples for per-sample gradients. Keep the batch in "
            f"dimension 0 (do not flatten it into other dimensions before this layer)."
        )
    return t.reshape(batch, -1, t.shape[-1])


class _Layer:
    """Per-sample gradients of one module call: ``[B, *p.shape]`` per parameter."""

    def __init__(self, call: _Call, batch: int, params: dict[str, nn.Parameter]) -> None:
        self.call, self.batch, self.params = call, batch, params
        self._per_sample: dict[str, Tensor] | None = None

    def grads(self) -> dict[str, Tensor]:
        raise NotImplementedError

    def per_sample(self) -> dict[str, Tensor]:
        """`grads`, formed once (norms and clipping may both need them)."""
        if self._per_sample is None:
            self._per_sample = self.grads()
        return self._per_sample

    def sq_norms(self) -> Tensor:
        """``[B]``: the squared norm of each sample's gradient over this module's params."""
        squares = [g.flatten(1).pow(2).sum(1) for g in self.per_sample().values()]
        return torch.stack(squares).sum(0)

    def weighted(self, weights: Tensor) -> dict[str, Tensor]:
        """``Σ_i weights[i] · g_i`` per parameter."""
        return {
            n: torch.einsum("b,b...->...", weights.to(g.dtype), g)
            for n, g in self.per_sample().items()
        }


class _Linear(_Layer):
    def _rows(self) -> tuple[Tensor, Tensor]:
        x, grad = self.call.args[0], self.call.grads[0]
        assert grad is not None
        return (
            _as_rows(x, self.batch, self.call.name, "input"),
            _as_rows(grad, self.batch, self.call.name, "output gradient"),
        )

    def grads(self) -> dict[str, Tensor]:
        a, g = self._rows()
        out: dict[str, Tensor] = {}
        if "weight" in self.params:
            out["weight"] = torch.bmm(g.transpose(1, 2), a)
        if "bias" in self.params:
            out["bias"] = g.sum(1)
        return out

    def sq_norms(self) -> Tensor:
        a, g = self._rows()
        total = torch.zeros(self.batch, dtype=a.dtype, device=a.device)
        if "weight" in self.params:
            steps, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
            if steps == 1:  # Goodfellow: ‖g aᵀ‖ = ‖g‖ ‖a‖
                total = total + a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
            elif steps * steps <= fan_in * fan_out:  # ghost norm: no [B, out, in] tensor
                total = total + (
                    torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))
                ).sum((1, 2))
            else:
                total = total + torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))
        if "bias" in self.params:
            total = total + g.sum(1).pow(2).sum(1)
        return total

    def weighted(self, weights: Tensor) -> dict[str, Tensor]:
        a, g = self._rows()
        g = g * weights.to(g.dtype)[:, None, None]
        out: dict[str, Tensor] = {}
        if "weight" in self.params:
            out["weight"] = g.reshape(-1, g.shape[-1]).T @ a.reshape(-1, a.shape[-1])
        if "bias" in self.params:
            out["bias"] = g.sum((0, 1))
        return out


class _Conv(_Layer):
    def _geometry(self) -> tuple[Tensor, Tensor, dict[str, tuple[int, ...]]]:
        """Input and output gradient as a 2-D convolution's (height 1 for Conv1d)."""
        module = self.call.module
        assert isinstance(module, nn.Conv1d | nn.Conv2d)
        x, grad = self.call.args[0], self.call.grads[0]
        assert grad is not None
        padding = cast(tuple[int, ...], module.padding)  # not a string: see `_fast_rule`
        kernel, stride, dilation = module.kernel_size, module.stride, module.dilation
        if isinstance(module, nn.Conv1d):
            x, grad = x.unsqueeze(2), grad.unsqueeze(2)
            kernel, padding = (1, kernel[0]), (0, padding[0])
            stride, dilation = (1, stride[0]), (1, dilation[0])
        shape = {"kernel_size": kernel, "padding": padding, "stride": stride, "dilation": dilation}
        return x, grad, shape

    def grads(self) -> dict[str, Tensor]:
        x, grad, shape = self._geometry()
        g = grad.flatten(2)
        out: dict[str, Tensor] = {}
        if "weight" in self.params:
            patches = F.unfold(x, **shape)  # [B, C·k, L]
            weight_shape = self.params["weight"].shape
            out["weight"] = torch.bmm(g, patches.transpose(1, 2)).view(self.batch, *weight_shape)
        if "bias" in self.params:
            out["bias"] = g.sum(2)
        return out

    def weighted(self, weights: Tensor) -> dict[str, Tensor]:
        """The weight gradient kernel of a plain backward, on weighted output gradients."""
        x, grad, shape = self._geometry()
        grad = grad * weights.to(grad.dtype).view(-1, 1, 1, 1)
        out: dict[str, Tensor] = {}
        if "weight" in self.params:
            weight = self.params["weight"]
            size = (*weight.shape[:2], *shape["kernel_size"])
            flat = conv2d_weight(
                x, size, grad, shape["stride"], shape["padding"], shape["dilation"]
            )
            out["weight"] = flat.view(weight.shape)
        if "bias" in self.params:
            out["bias"] = grad.sum((0, 2, 3))
        return out


class _Embedding(_Layer):
    def _rows(self) -> tuple[Tensor, Tensor]:
        module = self.call.module
        assert isinstance(module, nn.Embedding)
        ids, grad = self.call.args[0], self.call.grads[0]
        assert grad is not None
        if ids.ndim < 1 or ids.shape[0] != self.batch:
            _as_rows(ids.unsqueeze(-1), self.batch, self.call.name, "input")
        ids, g = ids.reshape(self.batch, -1), grad.reshape(self.batch, -1, grad.shape[-1])
        if module.padding_idx is not None:  # its row never receives a gradient
            g = g * (ids != module.padding_idx).unsqueeze(-1).to(g.dtype)
        return ids, g

    def grads(self) -> dict[str, Tensor]:
        ids, g = self._rows()
        out = g.new_zeros(self.batch, *self.params["weight"].shape)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
        return {"weight": out}

    def sq_norms(self) -> Tensor:
        ids, g = self._rows()
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # tokens that share a row add up
        return (torch.bmm(g, g.transpose(1, 2)) * same.to(g.dtype)).sum((1, 2))

    def weighted(self, weights: Tensor) -> dict[str, Tensor]:
        ids, g = self._rows()
        g = g * weights.to(g.dtype)[:, None, None]
        out = g.new_zeros(self.params["weight"].shape)
        out.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
        return {"weight": out}


class _Norm(_Layer):
    """LayerNorm and GroupNorm: ``g ⊙ x̂`` and ``g``, summed over each sample's positions."""

    def grads(self) -> dict[str, Tensor]:
        module = self.call.module
        x, grad = self.call.args[0], self.call.grads[0]
        assert grad is not None
        with torch.no_grad():  # x̂: the normalisation without its affine part
            if isinstance(module, nn.LayerNorm):
                shape = module.normalized_shape
                normalised = F.layer_norm(x, shape, None, None, module.eps)
                reduce = tuple(range(1, x.ndim - len(shape)))
            else:
                assert isinstance(module, nn.GroupNorm)
                normalised = F.group_norm(x, module.num_groups, None, None, module.eps)
                reduce = tuple(range(2, x.ndim))
        if x.shape[0] != self.batch:
            _as_rows(x, self.batch, self.call.name, "input")
        out: dict[str, Tensor] = {}
        if "weight" in self.params:
            out["weight"] = (grad * normalised).sum(reduce) if reduce else grad * normalised
        if "bias" in self.params:
            out["bias"] = grad.sum(reduce) if reduce else grad
        return out


class _Fallback(_Layer):
    """Any other module: ``vmap`` over samples of the module's own vector-Jacobian product."""

    def grads(self) -> dict[str, Tensor]:
        call, module = self.call, self.call.module
        dim = 1 if getattr(module, "batch_first", True) is False else 0
        params = {n: p.detach() for n, p in self.params.items()}

        def per_sample(x: Any) -> int | None:
            return (
                dim
                if isinstance(x, Tensor) and x.ndim > dim and x.shape[dim] == self.batch
                else None
            )

        flat_args = [*call.args, *call.kwargs.values()]
        dims = [per_sample(x) for x in flat_args]
        grads = [
            g if g is not None else torch.zeros_like(t)
            for g, t in zip(call.grads, call.outputs, strict=True)
        ]
        grad_dims = [per_sample(g) for g in grads]
        names = list(call.kwargs)
        positional = len(call.args)

        def sample_loss(
            p: dict[str, Tensor], values: list[Any], cotangents: list[Tensor]
        ) -> Tensor:
            def one(x: Any, d: int | None) -> Any:
                return x.unsqueeze(d) if d is not None else x

            inputs = [one(x, d) for x, d in zip(values, dims, strict=True)]
            args, kwargs = inputs[:positional], dict(zip(names, inputs[positional:], strict=True))
            output = torch.func.functional_call(module, p, tuple(args), kwargs)
            outputs = [t for t in _tensors(output) if t.is_floating_point()]
            return sum(
                (
                    (o * one(c, d)).sum()
                    for o, c, d in zip(outputs, cotangents, grad_dims, strict=False)
                ),
                torch.zeros(()),
            )

        try:
            with warnings.catch_warnings():  # vmap's note that it loops over some kernels
                warnings.filterwarnings("ignore", message="There is a performance drop")
                result: dict[str, Tensor] = torch.func.vmap(
                    torch.func.grad(sample_loss),
                    in_dims=(None, dims, grad_dims),
                    randomness="error",
                )(params, flat_args, grads)
            return result
        except RuntimeError as error:
            raise ConfigError(
                f"Per-sample gradients of module {call.name!r} ({type(module).__name__}) go "
                f"through torch.func, which failed: {error}. Random operations (dropout) "
                f"inside a module with its own parameters, and data-dependent control flow, "
                f"are not supported there; move them into a submodule of their own."
            ) from error


def _layers(calls: list[_Call], batch: int) -> Iterator[_Layer]:
    """The per-layer rule for each call.

    A module run by the generic rule also owns the parameters of its submodules that
    were not called as modules (`nn.MultiheadAttention` uses ``out_proj.weight``
    through a function, not through ``out_proj``).
    """
    called = {call.module for call in calls}
    for call in calls:
        module = call.module
        own = {n: p for n, p in module.named_parameters(recurse=False) if p.requires_grad}
        fast = _fast_rule(call)
        if fast is not None:
            yield fast(call, batch, own)
            continue
        own.update(_uncalled(module, called))
        yield _Fallback(call, batch, own)


def _uncalled(
    module: nn.Module, called: set[nn.Module], prefix: str = ""
) -> dict[str, nn.Parameter]:
    """Trainable parameters of submodules not called as modules, down to called ones
    (which own theirs)."""
    found: dict[str, nn.Parameter] = {}
    for name, child in module.named_children():
        if child in called:
            continue
        for n, p in child.named_parameters(recurse=False):
            if p.requires_grad:
                found[f"{prefix}{name}.{n}"] = p
        found.update(_uncalled(child, called, f"{prefix}{name}."))
    return found


def _fast_rule(call: _Call) -> type[_Layer] | None:
    module = call.module
    if not call.grads or call.grads[0] is None or len(call.outputs) != 1:
        return None
    if isinstance(module, nn.Linear):
        return _Linear
    if (
        isinstance(module, nn.Conv1d | nn.Conv2d)
        and module.groups == 1
        and module.padding_mode == "zeros"
        and not isinstance(module.padding, str)
    ):
        return _Conv
    if isinstance(module, nn.Embedding) and module.max_norm is None:
        return _Embedding
    if isinstance(module, nn.LayerNorm | nn.GroupNorm):
        return _Norm
    return None


# -- the public functions -----------------------------------------------------------


def per_sample_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    *,
    micro_batch_size: int | None = None,
) -> dict[str, Tensor]:
    """The gradient of each sample's own ``total``, per parameter: ``[B, *p.shape]``.

    Summed over samples they give the gradient of the batch's ``total`` (the
    ``"sum"`` loss); divided by ``N(B)`` as well, the gradient of the ``"mean"``
    loss. ``p.grad`` is not touched. Frozen parameters are left out; parameters the
    loss does not reach get zeros.

    Dropout is allowed: each sample's gradient is that of the masks drawn in this
    forward. Modules that mix samples (BatchNorm in training mode) are refused.

    Example:
        >>> import torch, batchgrad as bg
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(5, 3), torch.randint(0, 2, (5,))
        >>> def loss_fn(model, batch):
        ...     x, y = batch
        ...     return bg.Loss.from_criterion(torch.nn.CrossEntropyLoss(), model(x), y)
        >>> grads = bg.per_sample_grads(model, loss_fn, (x, y), micro_batch_size=2)
        >>> grads["weight"].shape
        torch.Size([5, 2, 3])
    """
    check_micro_batch_size(micro_batch_size)
    named = _trainable(model)
    parts: dict[nn.Parameter, list[Tensor]] = {p: [] for _, p in named}
    for index, micro_batch in enumerate(micro_batches(batch, micro_batch_size)):
        size = batch_length(micro_batch, f"micro-batch {index}")
        calls, _ = _record(model, loss_fn, micro_batch, index)
        found: dict[nn.Parameter, Tensor] = {}
        with torch.no_grad():
            for layer in _layers(calls, size):
                for name, grad in layer.grads().items():
                    p = layer.params[name]
                    found[p] = found[p] + grad if p in found else grad
        for _, p in named:
            parts[p].append(found[p] if p in found else p.new_zeros(size, *p.shape))
    return {name: parts[p][0] if len(parts[p]) == 1 else torch.cat(parts[p]) for name, p in named}


def per_sample_norms(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch | Iterable[Batch],
    *,
    micro_batch_size: int | None = None,
) -> Tensor:
    """``[B]``: the L2 norm of each sample's gradient over all trainable parameters.

    Equal to the norms of `per_sample_grads`, but `nn.Linear` and `nn.Embedding`
    layers use the Goodfellow and ghost-norm identities, so their per-sample
    gradients are never formed.
    """
    check_micro_batch_size(micro_batch_size)
    norms = []
    for index, micro_batch in enumerate(micro_batches(batch, micro_batch_size)):
        size = batch_length(micro_batch, f"micro-batch {index}")
        calls, _ = _record(model, loss_fn, micro_batch, index)
        with torch.no_grad():
            norms.append(_sq_norms(list(_layers(calls, size)), size).sqrt())
    return norms[0] if len(norms) == 1 else torch.cat(norms)


def _sq_norms(layers: list[_Layer], size: int) -> Tensor:
    """Per-sample squared norms; a parameter used by several calls is formed whole."""
    uses: dict[nn.Parameter, int] = {}
    for layer in layers:
        for p in layer.params.values():
            uses[p] = uses.get(p, 0) + 1
    shared = {p for p, n in uses.items() if n > 1}
    total: Tensor | None = None
    summed: dict[nn.Parameter, Tensor] = {}
    for layer in layers:
        if any(p in shared for p in layer.params.values()):
            for name, grad in layer.per_sample().items():
                p = layer.params[name]
                summed[p] = summed[p] + grad if p in summed else grad
            continue
        sq = layer.sq_norms()
        total = sq if total is None else total + sq.to(total.dtype)
    for grad in summed.values():
        sq = grad.flatten(1).pow(2).sum(1)
        total = sq if total is None else total + sq.to(total.dtype)
    return total if total is not None else torch.zeros(size)


def clipped_sum(
    model: nn.Module,
    loss_fn: LossFn,
    micro_batch: Batch,
    index: int,
    max_norm: float,
) -> tuple[Loss, Tensor]:
    """Add ``Σ_i min(1, C/‖g_i‖) g_i`` of one micro-batch into ``p.grad``.

    Returns the micro-batch's `Loss` (detached) and each sample's clipping factor
    ``min(1, C / (‖g_i‖ + 1e-6))`` (the small constant, as Opacus uses, keeps a zero
    gradient from dividing by 0). The weighted sum is formed per layer from the
    recorded activations and output gradients, so no per-sample gradient is kept
    (but for layers whose norms needed them: the generic rule, the norms).
    """
    size = batch_length(micro_batch, f"micro-batch {index}")
    calls, loss = _record(model, loss_fn, micro_batch, index)
    layers = list(_layers(calls, size))
    with torch.no_grad():
        norms = _sq_norms(layers, size).sqrt()
    if not bool(torch.isfinite(norms).all()):
        bad = int((~torch.isfinite(norms)).nonzero()[0])
        raise NonFiniteError(
            f"The gradient of sample {bad} in micro-batch {index} is NaN or infinite, so it "
            f"cannot be clipped. Look at that sample's data and at the loss for it."
        )
    weights = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    with torch.no_grad():
        for layer in layers:
            for name, grad in layer.weighted(weights).items():
                p = layer.params[name]
                if p.grad is None:
                    p.grad = grad
                else:
                    p.grad.add_(grad)
    return Loss(loss.total.detach(), loss.count), weights


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def check_clipping(max_norm: object, noise_multiplier: object) -> None:
    if (
        isinstance(max_norm, bool)
        or not isinstance(max_norm, int | float)
        or not max_norm > 0
        or math.isinf(max_norm)
    ):
        raise ConfigError(
            f"clip_per_sample must be a positive finite number (the norm C), got {max_norm!r}."
        )
    if noise_multiplier is not None and (
        isinstance(noise_multiplier, bool)
        or not isinstance(noise_multiplier, int | float)
        or noise_multiplier < 0
    ):
        raise ConfigError(
            f"noise_multiplier must be a number >= 0 (σ; the noise's std is σ·C), got "
            f"{noise_multiplier!r}."
        )
