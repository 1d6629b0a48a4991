"""Per-sample rules of whole modules: the ones users register
(`batchgrad.register_per_sample_rule`) and the built-in one of Hugging Face's
``Conv1D`` (`TransformersConv1D`: the linear layer's formulas, `x @ W + b` at every
position with ``W`` stored ``[in, out]``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._errors import ConfigError, PerSampleError
from ._per_sample_rules import (
    Unit,
    outer_sq_norms,
    outer_subtract,
    outer_sums,
    outer_weighted,
)
from ._per_sample_trace import ModuleCall, unflatten
from ._per_sample_vmap import site_unsupported

UserRule = Callable[[nn.Module, tuple[Any, ...], tuple[Tensor, ...]], dict[str, Tensor]]
"""``rule(module, args, grad_outputs) -> {name: [B, *p.shape]}``, samples in dimension 0."""

MODULE_RULES: dict[type[nn.Module], UserRule] = {}
_registrations = [0]  # how many rules were registered: a guarded signature is guarded again


def rules_generation() -> int:
    """Changes whenever a rule is registered (the guard's record of what it checked)."""
    return _registrations[0]


def register_per_sample_rule(module_type: type[nn.Module]) -> Callable[[UserRule], UserRule]:
    """Register ``rule`` for the per-sample gradients of every ``module_type`` layer.

    ``rule(module, args, grad_outputs)`` gets the positional arguments of one call of
    the module and the gradient of the batch's total reaching each tensor it returned
    (in order, zeros where none arrives), all with the samples in dimension 0, and
    returns ``{name: [B, *p.shape]}`` for the module's trainable parameters (names as
    in ``module.named_parameters()``). Their uses inside the call are then left to the
    rule; the guard (``verify=``) checks its results like any other rule's.

    Example:
        >>> import torch, batchgrad as bg
        >>> class Scale(torch.nn.Module):
        ...     def __init__(self, n):
        ...         super().__init__()
        ...         self.weight = torch.nn.Parameter(torch.ones(n))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> @bg.register_per_sample_rule(Scale)
        ... def scale_rule(module, args, grad_outputs):
        ...     (x,), (g,) = args, grad_outputs  # [B, ..., n] each
        ...     return {"weight": (x * g).flatten(1, -2).sum(1) if x.ndim > 2 else x * g}
        >>> def loss_fn(model, x):
        ...     return bg.Loss.from_values(model(x).pow(2).sum(1))
        >>> bg.per_sample_grads(Scale(3), loss_fn, torch.ones(4, 3))["weight"].shape
        torch.Size([4, 3])
    """

    def register(rule: UserRule) -> UserRule:
        if not (isinstance(module_type, type) and issubclass(module_type, nn.Module)):
            raise ConfigError(
                f"register_per_sample_rule takes an nn.Module class, got {module_type!r}."
            )
        MODULE_RULES[module_type] = rule
        _registrations[0] += 1
        return rule

    return register


def user_rule(module: nn.Module) -> UserRule | None:
    for cls in type(module).__mro__:
        if cls in MODULE_RULES:
            return MODULE_RULES[cls]
    return known_rule(module)


def known_rule(module: nn.Module) -> UserRule | None:
    """A built-in module rule (layers of other libraries, recognised without importing
    them); a rule the user registers for the class comes first."""
    if _is_transformers_conv1d(module):
        return _transformers_conv1d
    return None


def _is_transformers_conv1d(module: nn.Module) -> bool:
    """Hugging Face's ``Conv1D`` (GPT-2's projections), known without importing it."""
    cls = type(module)
    weight, bias = getattr(module, "weight", None), getattr(module, "bias", None)
    return (
        cls.__name__ == "Conv1D"
        and cls.__module__.startswith("transformers.")
        and isinstance(weight, nn.Parameter)
        and weight.ndim == 2
        and (bias is None or (isinstance(bias, nn.Parameter) and bias.shape == weight.shape[1:]))
    )


def _transformers_conv1d(
    module: nn.Module, args: tuple[Any, ...], grad_outputs: tuple[Tensor, ...]
) -> dict[str, Tensor]:
    """``Conv1D``: ``y = x W + b`` at every position, ``W`` stored ``[in, out]``, which it
    computes on the samples flattened with the positions (``addmm`` on ``x.view(-1,
    in)``), so no rule of a use can read it; its gradients are those of a linear layer,
    and their sum over samples is the batch gradient's own formula (`KnownModule`)."""
    (x, *_), (g, *_) = args, grad_outputs
    a = x.reshape(x.shape[0], -1, x.shape[-1])
    g = g.reshape(g.shape[0], -1, g.shape[-1]).to(a.dtype)
    out = {"weight": outer_sums(a, g)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = g.sum(1)
    return out


class UserModule(Unit):
    """A module call with a registered rule."""

    site: ModuleCall

    @classmethod
    def unsupported(cls, site: ModuleCall) -> str | None:
        problem = site_unsupported(site)
        if problem is not None:
            return problem
        dims = [*site.in_dims, *site.out_dims]
        leaves = [*site.inputs, *site.outputs]
        if any(
            isinstance(t, Tensor) and d not in (None, 0) for t, d in zip(leaves, dims, strict=True)
        ):
            return "its registered rule needs the samples in dimension 0"
        return None

    def grads(self) -> dict[nn.Parameter, Tensor]:
        site, module = self.site, self.site.module
        rule = user_rule(module)
        assert rule is not None
        args, _ = unflatten(site.inputs, site.spec)
        grads = tuple(
            self.grad_of(t) if t.requires_grad else torch.zeros_like(t)
            for t in site.outputs
            if isinstance(t, Tensor)
        )
        result = rule(module, tuple(args), grads)
        named = dict(module.named_parameters(remove_duplicate=False))
        wanted = {id(p) for p in self.params}
        out: dict[nn.Parameter, Tensor] = {}
        for name, grad in result.items():
            p = named.get(name)
            if p is None or not isinstance(grad, Tensor) or grad.shape != (self.rows, *p.shape):
                raise PerSampleError(
                    f"The per-sample rule registered for {type(module).__name__} returned "
                    f"{name!r} with {'no such parameter' if p is None else 'a wrong shape'} "
                    f"for module {site.name!r}: it must return {{name: [B, *p.shape]}} for "
                    f"the module's parameters."
                )
            if id(p) in wanted:
                out[p] = grad
        return out


class KnownModule(UserModule):
    """A module call with a built-in rule (`known_rule`): exact like the layer rules, so
    the guard checks the paths around it, not its sums."""


class TransformersConv1D(KnownModule):
    """Hugging Face's ``Conv1D``, ``y = x W + b`` with ``W`` stored ``[in, out]``: the
    linear layer's ghost norms and weighted product (`_Linear`), transposed, so that its
    norms and clipped sums form no per-sample gradient."""

    def __init__(self, site: ModuleCall, params: list[nn.Parameter], rows: int) -> None:
        super().__init__(site, params, rows)
        module = site.module
        self.weight = cast(nn.Parameter, module.weight)
        bias = getattr(module, "bias", None)
        self.bias = bias if isinstance(bias, nn.Parameter) else None
        self._like: tuple[torch.Size, torch.dtype, torch.device] | None = None

    @classmethod
    def unsupported(cls, site: ModuleCall) -> str | None:
        problem = super().unsupported(site)
        if problem is None and (len(site.inputs) != 1 or len(site.outputs) != 1):
            return "it is called with other arguments than one input"
        return problem

    def release(self) -> None:
        """Let go of the output (its shape kept): only its gradient is read."""
        t = self.site.outputs[0]
        self._like = (t.shape, t.dtype, t.device)
        self.site.outputs = [None]

    def _pair(self) -> tuple[Tensor, Tensor]:
        x = self.site.inputs[0]
        g = self.site.grads[0] if self.site.grads else None
        if g is None:
            if self._like is None:
                g = torch.zeros_like(self.site.outputs[0])
            else:
                shape, dtype, device = self._like
                g = torch.zeros(shape, dtype=dtype, device=device)
        a = x.reshape(self.rows, -1, x.shape[-1])
        g = g.reshape(self.rows, -1, g.shape[-1])
        return a, g

    def _has(self, p: nn.Parameter | None) -> bool:
        return p is not None and any(p is q for q in self.params)

    def grads(self) -> dict[nn.Parameter, Tensor]:
        a, g = self._pair()
        out: dict[nn.Parameter, Tensor] = {}
        if self._has(self.weight):
            out[self.weight] = outer_sums(a.to(g.dtype), g)
        if self.bias is not None and self._has(self.bias):
            out[self.bias] = g.sum(1)
        return out

    def sq_norms(self) -> Tensor:
        a, g = self._pair()
        total = torch.zeros(self.rows, dtype=g.dtype, device=g.device)
        if self._has(self.weight):
            total = total + outer_sq_norms(a, g)
        if self.bias is not None and self._has(self.bias):
            total = total + g.sum(1).pow(2).sum(1)
        return total

    def weighted(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        a, g = self._pair()
        out: dict[nn.Parameter, Tensor] = {}
        if self._has(self.weight):
            out[self.weight] = outer_weighted(a, g, weights)
        if self.bias is not None and self._has(self.bias):
            out[self.bias] = (g.sum(1) * weights.to(g.dtype)[:, None]).sum(0)
        return out

    def subtract_sum(self, targets: dict[nn.Parameter, Tensor]) -> None:
        a, g = self._pair()
        if self._has(self.weight):
            outer_subtract(targets[self.weight], a, g)
        if self.bias is not None and self._has(self.bias):
            target = targets[self.bias]
            target.sub_(g.sum((0, 1)).to(target.dtype))


def known_unit(module: nn.Module) -> type[KnownModule]:
    """The unit of a module with a built-in rule (`known_rule`)."""
    return TransformersConv1D if _is_transformers_conv1d(module) else KnownModule
