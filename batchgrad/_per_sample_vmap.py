"""The generic per-sample rules: ``torch.func.vmap`` over the samples.

Any function of a parameter that no layer rule of `batchgrad._per_sample_rules` reads
(`VmapOp`) and, where a use cannot be read alone, the innermost module call enclosing
all uses of the parameter (`VmapModule`): ``vmap`` over the samples of that
function's own vector-Jacobian product, the samples given to it as batches of one.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, cast

import torch
from torch import Tensor, nn

from ._errors import PerSampleError
from ._per_sample_rules import (
    OpRule,
    Site,
    Unit,
)
from ._per_sample_trace import MIXED, ModuleCall, OpCall, leaves_of, stale, unflatten


def _vmap_grads(
    function: Callable[[dict[str, Tensor], list[Any]], Any],
    params: dict[str, nn.Parameter],
    site: Site,
    rows: int,
    unit: Unit,
    where: str,
    replay: Tensor | None = None,
) -> dict[nn.Parameter, Tensor]:
    """``vmap`` over samples of the VJP of ``function(params, inputs)`` with the site's
    output gradients; each sample enters as a batch of one (its dimension kept, size 1)."""
    per_sample = [
        i
        for i, (t, d) in enumerate(zip(site.inputs, site.in_dims, strict=True))
        if isinstance(t, Tensor) and d is not None
    ]
    dims = [cast(int, site.in_dims[i]) for i in per_sample]  # None filtered out above
    outs = [
        (i, d)
        for i, (t, d) in enumerate(zip(site.outputs, site.out_dims, strict=True))
        if isinstance(t, Tensor) and t.requires_grad and d is not None
    ]
    cotangents = [unit.grad_of(site.outputs[i]) for i, _ in outs]
    base = [t.detach() if isinstance(t, Tensor) else t for t in site.inputs]

    def sample_loss(p: dict[str, Tensor], xs: list[Tensor], cs: list[Tensor]) -> Tensor:
        inputs = list(base)
        for i, d, x in zip(per_sample, dims, xs, strict=True):
            inputs[i] = x.unsqueeze(d)
        leaves = leaves_of(function(p, inputs))
        total = torch.zeros((), dtype=cs[0].dtype if cs else torch.float32)
        for (i, d), c in zip(outs, cs, strict=True):
            total = total + (leaves[i] * c.unsqueeze(d)).sum()
        return total

    detached = {n: p.detach() for n, p in params.items()}
    xs = [base[i] for i in per_sample]
    randomness = "different" if replay is not None else "error"
    try:
        with warnings.catch_warnings(), torch.random.fork_rng(devices=[]):
            warnings.filterwarnings("ignore", message="There is a performance drop")
            if replay is not None:  # draw the forward's random numbers again
                torch.set_rng_state(replay)
            result: dict[str, Tensor] = torch.func.vmap(
                torch.func.grad(sample_loss),
                in_dims=(None, dims, [d for _, d in outs]),
                randomness=randomness,
            )(detached, xs, cotangents)
    except (RuntimeError, ValueError, TypeError, IndexError, AssertionError) as error:
        raise PerSampleError(
            f"Per-sample gradients of {where} go through torch.func.vmap over its samples, "
            f"which failed: {type(error).__name__}: {error}. Register a per-sample rule for "
            f"it (batchgrad.register_per_sample_rule), or move what vmap cannot run "
            f"(data-dependent control flow, in-place updates of inputs) out of it."
        ) from error
    return {params[n]: g for n, g in result.items()}


class VmapOp(OpRule):
    """Any torch function of parameters whose inputs and outputs hold the samples."""

    param_names = ()

    def release(self) -> None:
        pass  # the function is run again on its outputs' gradients: keep the site whole

    @classmethod
    def unsupported(cls, site: OpCall, params: list[nn.Parameter]) -> str | None:
        if site.rng is not None and site.func in _RECURRENT:
            raise PerSampleError(
                f"{site.where()} draws dropout masks between its layers inside one fused "
                f"kernel, which cannot be drawn again per sample. Build it with dropout=0 "
                f"(or stack one-layer modules with nn.Dropout between them)."
            )
        return site_unsupported(site)

    def grads(self) -> dict[nn.Parameter, Tensor]:
        site = self.site
        slots = {id(p): f"p{k}" for k, p in enumerate(self.params)}
        names = {f"p{k}": p for k, p in enumerate(self.params)}

        def function(p: dict[str, Tensor], inputs: list[Any]) -> Any:
            leaves = [p[slots[id(t)]] if id(t) in slots else t for t in inputs]
            leaves = [
                p[slots[id(orig)]] if id(orig) in slots else leaf
                for orig, leaf in zip(site.inputs, leaves, strict=True)
            ]
            args, kwargs = unflatten(leaves, site.spec)
            return site.func(*args, **kwargs)

        return _vmap_grads(function, names, site, self.rows, self, site.where(), site.rng)


_RECURRENT = (torch.lstm, torch.gru, torch.rnn_tanh, torch.rnn_relu)


def site_unsupported(site: Site) -> str | None:
    if stale(site.inputs, site.in_versions):
        return "a tensor it read was modified in place afterwards"
    if stale(site.outputs, site.out_versions):
        return "its output was modified in place afterwards"
    for t, d in zip(site.inputs, site.in_dims, strict=True):
        if isinstance(t, int | tuple | list) and d == MIXED:
            return f"its argument {t} is or holds the number of samples"
        if isinstance(t, Tensor) and d == MIXED:
            return (
                f"an input of shape {tuple(t.shape)} holds the samples mixed with another "
                f"dimension (flattened, packed or reshaped), not in a dimension of their own"
            )
    carried = False
    for t, d in zip(site.outputs, site.out_dims, strict=True):
        if isinstance(t, Tensor) and t.requires_grad:
            if d is None or d == MIXED:
                return (
                    f"an output of shape {tuple(t.shape)} does not hold the samples in a "
                    f"dimension of their own"
                )
            carried = True
    if not carried:
        return "none of its outputs carries a gradient"
    return None


class VmapModule(Unit):
    """A module call: vmap over its samples, differentiating only ``params``."""

    site: ModuleCall

    @classmethod
    def unsupported(cls, site: ModuleCall) -> str | None:
        return site_unsupported(site)

    def grads(self) -> dict[nn.Parameter, Tensor]:
        site, module = self.site, self.site.module
        names = {
            id(p): n for n, p in module.named_parameters(remove_duplicate=False)
        }  # a tied parameter: functional_call replaces every name it has
        params = {names[id(p)]: p for p in self.params}

        def function(p: dict[str, Tensor], inputs: list[Any]) -> Any:
            args, kwargs = unflatten(inputs, site.spec)
            return torch.func.functional_call(module, p, tuple(args), kwargs)

        where = f"module {site.name!r} ({type(module).__name__})"
        return _vmap_grads(function, params, site, self.rows, self, where, site.rng)
