"""Per-sample rules: one parameter use (or one module call) → each sample's gradient.

Every rule works on a *site* recorded by `batchgrad._per_sample_trace`: its inputs and
outputs with their sample dimensions, and the gradient of the batch's ``total``
reaching each output. Since sample ``i``'s total depends on the site only through
row ``i`` of its outputs, that row of the output gradient is sample ``i``'s own, and
each rule forms sample ``i``'s parameter gradient from row ``i`` of the inputs and of
the output gradient:

- ``F.linear`` (any middle dimensions): ``Σ_t g_t a_tᵀ`` and ``Σ_t g_t``;
- ``F.conv1d`` / ``F.conv2d``: the weight gradient of one convolution grouped by sample;
- ``F.embedding``: the output gradients added into the rows of the sample's ids;
- ``F.embedding_bag`` (sum / mean, with offsets): the same, per bag;
- ``F.layer_norm``, ``F.group_norm``: the normalised input times the output gradient;
- ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (`_Recurrent`): the recurrence re-run step by
  step, its gates' gradients, then ``Σ_t δ_t x_tᵀ`` and ``Σ_t δ_t h_{t-1}ᵀ``;
- any other function of a parameter, or a module call whose uses cannot be read
  alone: the generic rules of `batchgrad._per_sample_vmap`;
- Hugging Face's ``Conv1D`` and the modules users register rules for
  (`batchgrad.register_per_sample_rule`): `batchgrad._per_sample_modules`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from . import _memory as memory
from ._errors import ConfigError
from ._per_sample_trace import MIXED, Dim, ModuleCall, OpCall, stale

Site = OpCall | ModuleCall


class Unit:
    """The per-sample gradients of some parameters from one recorded site."""

    def __init__(self, site: Site, params: list[nn.Parameter], rows: int) -> None:
        self.site, self.params, self.rows = site, params, rows
        self._per_sample: dict[nn.Parameter, Tensor] | None = None

    def outputs(self) -> list[Tensor]:
        """The recorded outputs whose gradients the rule reads."""
        return [
            t
            for t, d in zip(self.site.outputs, self.site.out_dims, strict=True)
            if isinstance(t, Tensor) and t.requires_grad and d is not None and d != MIXED
        ]

    def grads(self) -> dict[nn.Parameter, Tensor]:
        raise NotImplementedError

    def release(self) -> None:
        """Before the backward: drop what the rule will not read."""

    def per_sample(self) -> dict[nn.Parameter, Tensor]:
        """`grads`, formed once (norms and clipping may both need them)."""
        if self._per_sample is None:
            self._per_sample = self.grads()
        return self._per_sample

    def sq_norms(self) -> Tensor:
        """``[B]``: the squared norm of each sample's gradient over this unit's params."""
        squares = [g.flatten(1).pow(2).sum(1) for g in self.per_sample().values()]
        return torch.stack(squares).sum(0)

    def weighted(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        """``Σ_i weights[i] · g_i`` per parameter."""
        return {
            p: torch.einsum("b,b...->...", weights.to(g.dtype), g)
            for p, g in self.per_sample().items()
        }

    def subtract_sum(self, targets: dict[nn.Parameter, Tensor]) -> None:
        """``targets[p] -= Σ_i g_i`` in place, for every one of ``params`` (the guard)."""
        ones = torch.ones(self.rows, dtype=torch.float64)
        for p, g in self.weighted(ones).items():
            targets[p].sub_(g.to(targets[p].dtype))

    def grad_of(self, output: Tensor) -> Tensor:
        """The gradient reaching ``output`` (zeros when the loss does not reach it)."""
        site = self.site
        for t, g in zip(site.outputs, site.grads, strict=True):
            if t is output:
                return torch.zeros_like(t) if g is None else g
        raise AssertionError("not an output of this site")


# -- binding a call's arguments -----------------------------------------------------


def _bind(call: OpCall, names: tuple[str, ...], defaults: dict[str, Any]) -> dict[str, Any]:
    args, kwargs = call.args()
    bound = dict(defaults)
    bound.update(zip(names, args, strict=False))
    bound.update(kwargs)
    return bound


def _dim_of(site: Site, value: Any) -> Dim:
    for t, d in zip(site.inputs, site.in_dims, strict=True):
        if t is value:
            return d
    for t, d in zip(site.outputs, site.out_dims, strict=True):
        if t is value:
            return d
    return MIXED


def _rows(t: Tensor, dim: int, rows: int, features: bool = True) -> Tensor:
    """``[B, -1, features]`` (or ``[B, -1]``) with the samples moved to dimension 0."""
    t = t.movedim(dim, 0)
    return t.reshape(rows, -1, t.shape[-1]) if features else t.reshape(rows, -1)


class OpRule(Unit):
    """A rule for one use of parameters by a torch function."""

    site: OpCall
    names: ClassVar[tuple[str, ...]] = ()
    defaults: ClassVar[dict[str, Any]] = {}
    param_names: ClassVar[tuple[str, ...]] = ("weight", "bias")

    def __init__(self, site: OpCall, params: list[nn.Parameter], rows: int) -> None:
        super().__init__(site, params, rows)
        self.bound = _bind(site, self.names, self.defaults)
        self._like: tuple[torch.Size, torch.dtype, torch.device] | None = None

    def release(self) -> None:
        """Let go of the output (its shape kept): the rule reads its input and the
        output's gradient, never the output."""
        t = self.site.outputs[0]
        self._like = (t.shape, t.dtype, t.device)
        self.site.outputs = [None]

    @classmethod
    def unsupported(cls, site: OpCall, params: list[nn.Parameter]) -> str | None:
        """Why this rule cannot read the samples' gradients of ``params`` here (or None)."""
        bound = _bind(site, cls.names, cls.defaults)
        allowed = {id(bound.get(n)) for n in cls.param_names}
        if any(id(p) not in allowed for p in params):
            return "a parameter is passed where the rule expects data"
        if stale(site.inputs, site.in_versions) or stale(site.outputs, site.out_versions):
            return "a tensor it read or returned was modified in place afterwards"
        if len(site.outputs) != 1 or site.out_dims[0] in (None, MIXED):
            return "its output does not hold the samples in one dimension"
        return cls.check(site, bound)

    @classmethod
    def check(cls, site: OpCall, bound: dict[str, Any]) -> str | None:
        return None

    def has(self, name: str) -> bool:
        value = self.bound.get(name)
        return any(value is p for p in self.params)

    def param(self, name: str) -> nn.Parameter:
        value = self.bound[name]
        assert isinstance(value, nn.Parameter)
        return value

    def out_dim(self) -> int:
        d = self.site.out_dims[0]
        assert d is not None
        return d

    def grad(self) -> Tensor:
        if self._like is None:
            return self.grad_of(self.site.outputs[0])
        g = self.site.grads[0]
        if g is None:  # the loss does not reach this use
            shape, dtype, device = self._like
            return torch.zeros(shape, dtype=dtype, device=device)
        return g


class _Linear(OpRule):
    names = ("input", "weight", "bias")
    defaults: ClassVar[dict[str, Any]] = {"bias": None}

    @classmethod
    def check(cls, site: OpCall, bound: dict[str, Any]) -> str | None:
        x, d = bound["input"], _dim_of(site, bound["input"])
        if d in (None, MIXED) or d != site.out_dims[0] or d == x.ndim - 1:
            return "its input does not hold the samples in the same dimension as its output"
        return None

    def _pair(self) -> tuple[Tensor, Tensor]:
        d = self.out_dim()
        return _rows(self.bound["input"], d, self.rows), _rows(self.grad(), d, self.rows)

    def grads(self) -> dict[nn.Parameter, Tensor]:
        a, g = self._pair()
        out: dict[nn.Parameter, Tensor] = {}
        if self.has("weight"):
            out[self.param("weight")] = outer_sums(g, a.to(g.dtype))
        if self.has("bias"):
            out[self.param("bias")] = g.sum(1)
        return out

    def sq_norms(self) -> Tensor:
        a, g = self._pair()
        total = torch.zeros(self.rows, dtype=g.dtype, device=g.device)
        if self.has("weight"):
            total = total + outer_sq_norms(a, g)
        if self.has("bias"):
            total = total + g.sum(1).pow(2).sum(1)
        return total

    def subtract_sum(self, targets: dict[nn.Parameter, Tensor]) -> None:
        """One ``addmm_`` into the batch gradient: no temporary of the weight's size."""
        a, g = self._pair()
        if self.has("weight"):
            outer_subtract(targets[self.param("weight")], g, a)
        if self.has("bias"):
            target = targets[self.param("bias")]
            target.sub_(g.sum((0, 1)).to(target.dtype))

    def weighted(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        """``Σ_i w_i g_iᵀ a_i`` as one product (`outer_weighted`)."""
        a, g = self._pair()
        out: dict[nn.Parameter, Tensor] = {}
        if self.has("weight"):
            out[self.param("weight")] = outer_weighted(g, a, weights)
        if self.has("bias"):
            out[self.param("bias")] = (g.sum(1) * weights.to(g.dtype)[:, None]).sum(0)
        return out


def outer_sums(left: Tensor, right: Tensor) -> Tensor:
    """``Σ_t left_t right_tᵀ`` per sample (``left``: ``[B, T, m]``, ``right``: ``[B, T,
    n]``, the result ``[B, m, n]``): a broadcast product for one step, which writes the
    result in one pass (a batched matrix product of inner size 1 costs about 7% more
    on a CPU, its result the same), ``bmm`` otherwise."""
    shape = (left.shape[0], left.shape[2], right.shape[2])
    out = memory.empty(shape, torch.promote_types(left.dtype, right.dtype), left.device)
    if left.shape[1] == 1:
        return torch.mul(left.transpose(1, 2), right, out=out)
    return torch.bmm(left.transpose(1, 2), right, out=out)


def outer_sq_norms(a: Tensor, g: Tensor) -> Tensor:
    """``‖Σ_t g_t a_tᵀ‖²`` per sample (``a``: ``[B, T, in]``, ``g``: ``[B, T, out]``), the
    same for ``Σ_t a_t g_tᵀ``: Goodfellow's product of norms for one step, the ghost norm
    ``Σ_{t,s} (a_t·a_s)(g_t·g_s)`` while ``T²`` is at most ``in·out`` (no ``[B, out, in]``
    tensor), the per-sample products otherwise."""
    a = a.to(g.dtype)
    steps, fan_in, fan_out = a.shape[1], a.shape[2], g.shape[2]
    if steps == 1:
        return a.pow(2).sum((1, 2)) * g.pow(2).sum((1, 2))
    if steps * steps <= fan_in * fan_out:
        return (torch.bmm(a, a.transpose(1, 2)) * torch.bmm(g, g.transpose(1, 2))).sum((1, 2))
    return torch.bmm(g.transpose(1, 2), a).pow(2).sum((1, 2))


def outer_weighted(left: Tensor, right: Tensor, weights: Tensor) -> Tensor:
    """``Σ_i w_i Σ_t left_{i,t} right_{i,t}ᵀ`` (``[B, T, m]`` and ``[B, T, n]`` → ``[m, n]``)
    as one matrix product, the weights on the narrower of the two (the only temporary of
    the activations' size)."""
    dtype = left.dtype if left.is_floating_point() else right.dtype
    left, right = left.to(dtype), right.to(dtype)
    w = weights.to(dtype)[:, None, None]
    if left.shape[-1] < right.shape[-1]:
        left = left * w
    else:
        right = right * w
    return left.reshape(-1, left.shape[-1]).T @ right.reshape(-1, right.shape[-1])


def outer_subtract(target: Tensor, left: Tensor, right: Tensor) -> None:
    """``target -= Σ_{i,t} left_{i,t} right_{i,t}ᵀ`` in place: one ``addmm_``."""
    lhs = left.reshape(-1, left.shape[-1]).T.to(target.dtype)
    target.addmm_(lhs, right.reshape(-1, right.shape[-1]).to(target.dtype), alpha=-1)


def _pair(value: Any, n: int) -> tuple[int, ...]:
    return tuple(value) if isinstance(value, tuple | list) else (int(value),) * n


class _Conv(OpRule):
    """``F.conv1d`` / ``F.conv2d`` with one group: per-sample ``g · unfold(x)ᵀ``."""

    names = ("input", "weight", "bias", "stride", "padding", "dilation", "groups")
    defaults: ClassVar[dict[str, Any]] = {
        "bias": None,
        "stride": 1,
        "padding": 0,
        "dilation": 1,
        "groups": 1,
    }

    @classmethod
    def check(cls, site: OpCall, bound: dict[str, Any]) -> str | None:
        if bound["groups"] != 1 or isinstance(bound["padding"], str):
            return "grouped or string-padded"  # the generic rule takes it
        if _dim_of(site, bound["input"]) != 0 or site.out_dims[0] != 0:
            return "the samples are not in dimension 0"
        if bound["input"].ndim != bound["weight"].ndim:
            return "an input without a batch dimension"
        return None

    def _geometry(self) -> tuple[Tensor, Tensor, dict[str, tuple[int, ...]]]:
        x, grad, weight = self.bound["input"], self.grad(), self.bound["weight"]
        n = weight.ndim - 2
        kernel = tuple(weight.shape[2:])
        stride, padding = _pair(self.bound["stride"], n), _pair(self.bound["padding"], n)
        dilation = _pair(self.bound["dilation"], n)
        if n == 1:
            x, grad = x.unsqueeze(2), grad.unsqueeze(2)
            kernel, padding = (1, kernel[0]), (0, padding[0])
            stride, dilation = (1, stride[0]), (1, dilation[0])
        shape = {"kernel_size": kernel, "padding": padding, "stride": stride, "dilation": dilation}
        return x, grad, shape

    def grads(self) -> dict[nn.Parameter, Tensor]:
        """The samples as groups of one grouped convolution's weight gradient: the
        ``[1, B·C, H, W]`` input against ``[1, B·O, H', W']`` output gradients with
        ``groups = B`` gives ``[B·O, C, k…]``, each group one sample's kernel gradient
        (the batching rule of ``vmap`` over a convolution; faster than unfolding)."""
        x, grad, shape = self._geometry()
        out: dict[nn.Parameter, Tensor] = {}
        if self.has("weight"):
            weight = self.param("weight")
            rows, channels = x.shape[:2]
            kernel = shape["kernel_size"]
            per_group = grad.new_empty(()).expand(rows * weight.shape[0], channels, *kernel)
            _, found, _ = torch.ops.aten.convolution_backward(
                grad.reshape(1, -1, *grad.shape[2:]),
                x.reshape(1, -1, *x.shape[2:]).to(grad.dtype),
                per_group,  # only its shape is read
                None,
                list(shape["stride"]),
                list(shape["padding"]),
                list(shape["dilation"]),
                False,
                [0, 0],
                rows,
                [False, True, False],
            )
            out[weight] = found.view(self.rows, *weight.shape)
        if self.has("bias"):
            out[self.param("bias")] = grad.flatten(2).sum(2)
        return out

    def sq_norms(self) -> Tensor:
        """Whichever needs less memory: the ghost norm on unfolded patches ``p`` (``C·k``
        by ``L`` positions), ``Σ_{l,m} (p_l·p_m)(g_l·g_m)``, or per-sample gradients
        (``O·C·k`` per sample). Per-sample gradients no larger than the output gradient
        (``C·k ≤ L``) are kept for `weighted` (a weighted sum of them, not a second
        convolution backward) and the input and output gradient let go; larger ones are
        formed and dropped here."""
        if self.has("weight"):
            x, grad, shape = self._geometry()
            weight = self.param("weight")
            g = grad.flatten(2)  # [B, O, L]
            positions, fan_in = g.shape[2], weight[0].numel()
            if fan_in * positions + 2 * positions * positions < weight.numel():
                patches = F.unfold(x.to(g.dtype), **shape)  # [B, C·k, L]
                gram = torch.bmm(patches.transpose(1, 2), patches)
                total = (gram * torch.bmm(g.transpose(1, 2), g)).sum((1, 2))
                if self.has("bias"):
                    total = total + g.sum(2).pow(2).sum(1)
                return total
            del x, grad, g
            if fan_in <= positions:
                grads = self.per_sample()
                self._let_go()
                squares = [t.flatten(1).pow(2).sum(1) for t in grads.values()]
                return torch.stack(squares).sum(0)
        squares = [t.flatten(1).pow(2).sum(1) for t in self.grads().values()]
        return torch.stack(squares).sum(0)

    def _let_go(self) -> None:
        """Drop the input and output gradient once the per-sample gradients are kept."""
        self.site.grads = [None] * len(self.site.grads)
        self.bound["input"] = None
        self.site.inputs = [
            t if not isinstance(t, Tensor) or isinstance(t, nn.Parameter) else None
            for t in self.site.inputs
        ]

    def weighted(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        """The weight gradient kernel of a plain backward, on weighted output gradients;
        a weighted sum of the per-sample gradients where `sq_norms` kept them."""
        if self._per_sample is not None:
            return super().weighted(weights)
        x, grad, shape = self._geometry()
        grad = grad * weights.to(grad.dtype).view(-1, 1, 1, 1)
        out: dict[nn.Parameter, Tensor] = {}
        if self.has("weight"):
            weight = self.param("weight")
            size = (*weight.shape[:2], *shape["kernel_size"])
            flat = conv2d_weight(
                x, size, grad, shape["stride"], shape["padding"], shape["dilation"]
            )
            out[weight] = flat.view(weight.shape)
        if self.has("bias"):
            out[self.param("bias")] = grad.sum((0, 2, 3))
        return out


class _Embedding(OpRule):
    names = (
        "input",
        "weight",
        "padding_idx",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "sparse",
    )
    defaults: ClassVar[dict[str, Any]] = {"padding_idx": None, "scale_grad_by_freq": False}
    param_names = ("weight",)

    @classmethod
    def check(cls, site: OpCall, bound: dict[str, Any]) -> str | None:
        if bound["scale_grad_by_freq"]:
            raise ConfigError(
                f"{site.where()} has scale_grad_by_freq=True: it scales gradients by how "
                f"often each id occurs in the whole batch, which couples the samples. "
                f"Use scale_grad_by_freq=False."
            )
        if _dim_of(site, bound["input"]) != site.out_dims[0]:
            return "its ids do not hold the samples in the same dimension as its output"
        return None

    def _pair(self) -> tuple[Tensor, Tensor]:
        d, weight = self.out_dim(), self.param("weight")
        ids = _rows(self.bound["input"], d, self.rows, features=False)
        g = _rows(self.grad(), d, self.rows)
        padding = self.bound["padding_idx"]
        if padding is not None:  # its row never receives a gradient
            padding = padding + weight.shape[0] if padding < 0 else padding
            g = g * (ids != padding).unsqueeze(-1).to(g.dtype)
        return ids, g

    def grads(self) -> dict[nn.Parameter, Tensor]:
        ids, g = self._pair()
        weight = self.param("weight")
        out = memory.zeros((self.rows, *weight.shape), g.dtype, g.device)
        out.scatter_add_(1, ids.unsqueeze(-1).expand(-1, -1, g.shape[-1]), g)
        return {weight: out}

    def sq_norms(self) -> Tensor:
        ids, g = self._pair()
        same = ids.unsqueeze(2) == ids.unsqueeze(1)  # tokens that share a row add up
        return (torch.bmm(g, g.transpose(1, 2)) * same.to(g.dtype)).sum((1, 2))

    def weighted(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        ids, g = self._pair()
        g = g * weights.to(g.dtype)[:, None, None]
        weight = self.param("weight")
        out = g.new_zeros(weight.shape)
        out.index_add_(0, ids.reshape(-1), g.reshape(-1, g.shape[-1]))
        return {weight: out}


class _EmbeddingBag(OpRule):
    """``F.embedding_bag`` in ``"sum"`` / ``"mean"`` mode, ids ``[B, L]`` or flat with offsets."""

    names = (
        "input",
        "weight",
        "offsets",
        "max_norm",
        "norm_type",
        "scale_grad_by_freq",
        "mode",
        "sparse",
        "per_sample_weights",
        "include_last_offset",
        "padding_idx",
    )
    defaults: ClassVar[dict[str, Any]] = {
        "offsets": None,
        "scale_grad_by_freq": False,
        "mode": "mean",
        "per_sample_weights": None,
        "include_last_offset": False,
        "padding_idx": None,
    }
    param_names = ("weight",)

    @classmethod
    def check(cls, site: OpCall, bound: dict[str, Any]) -> str | None:
        if bound["scale_grad_by_freq"]:
            raise ConfigError(
                f"{site.where()} has scale_grad_by_freq=True, which couples the samples. "
                f"Use scale_grad_by_freq=False."
            )
        if bound["mode"] not in ("sum", "mean") or site.out_dims[0] != 0:
            return "max mode, or bags not in dimension 0"
        ids, offsets = bound["input"], bound["offsets"]
        if ids.ndim == 2:
            return None if _dim_of(site, ids) == 0 else "its ids do not hold the samples"
        if offsets is None or bound["include_last_offset"] or _dim_of(site, offsets) != 0:
            return "flat ids need offsets with one entry per sample"
        return None

    def _pieces(self) -> tuple[Tensor, Tensor, Tensor]:
        """Per id: its bag (the sample), its row and its weight in the bag's output."""
        ids, g = self.bound["input"], self.grad()
        if ids.ndim == 2:
            bags = torch.arange(ids.shape[0], device=ids.device).repeat_interleave(ids.shape[1])
            ids = ids.reshape(-1)
        else:
            offsets = self.bound["offsets"]
            positions = torch.arange(ids.numel(), device=ids.device)
            bags = torch.bucketize(positions, offsets, right=True) - 1
        scale = torch.ones(ids.shape, dtype=g.dtype, device=g.device)
        padding = self.bound["padding_idx"]
        if padding is not None:
            weight = self.param("weight")
            padding = padding + weight.shape[0] if padding < 0 else padding
            scale = scale * (ids != padding).to(g.dtype)
        if self.bound["per_sample_weights"] is not None:
            scale = scale * self.bound["per_sample_weights"].reshape(-1).to(g.dtype)
        if self.bound["mode"] == "mean":
            sizes = torch.zeros(self.rows, dtype=g.dtype, device=g.device)
            sizes.index_add_(0, bags, (scale != 0).to(g.dtype))
            scale = scale / sizes.clamp(min=1)[bags]
        return bags, ids, scale

    def grads(self) -> dict[nn.Parameter, Tensor]:
        bags, ids, scale = self._pieces()
        g, weight = self.grad(), self.param("weight")
        out = g.new_zeros(self.rows * weight.shape[0], weight.shape[1])
        out.index_add_(0, bags * weight.shape[0] + ids, g[bags] * scale[:, None])
        return {weight: out.view(self.rows, *weight.shape)}


class _Norm(OpRule):
    """``F.layer_norm`` and ``F.group_norm``: ``g ⊙ x̂`` and ``g`` over each sample's positions."""

    param_names = ("weight", "bias")

    def _normalised(self) -> tuple[Tensor, tuple[int, ...]]:
        raise NotImplementedError

    def _output_grad(self) -> Tensor:
        """The gradient reaching the output, samples in dimension 0."""
        return self.grad()

    def grads(self) -> dict[nn.Parameter, Tensor]:
        normalised, reduce = self._normalised()
        g = self._output_grad()
        out: dict[nn.Parameter, Tensor] = {}
        if self.has("weight"):
            out[self.param("weight")] = (g * normalised).sum(reduce) if reduce else g * normalised
        if self.has("bias"):
            out[self.param("bias")] = g.sum(reduce) if reduce else g
        return out


class _LayerNorm(_Norm):
    names = ("input", "normalized_shape", "weight", "bias", "eps")
    defaults: ClassVar[dict[str, Any]] = {"weight": None, "bias": None, "eps": 1e-5}

    @classmethod
    def check(cls, site: OpCall, bound: dict[str, Any]) -> str | None:
        x, d = bound["input"], _dim_of(site, bound["input"])
        if d in (None, MIXED) or d != site.out_dims[0]:
            return "its input does not hold the samples like its output"
        if d >= x.ndim - len(bound["normalized_shape"]):
            return "the samples are among the normalised dimensions"
        return None

    def _normalised(self) -> tuple[Tensor, tuple[int, ...]]:
        x, shape, d = self.bound["input"], tuple(self.bound["normalized_shape"]), self.out_dim()
        normalised = F.layer_norm(x, shape, None, None, self.bound["eps"])
        moved = normalised.movedim(d, 0)
        return moved, tuple(range(1, x.ndim - len(shape)))

    def _output_grad(self) -> Tensor:
        return self.grad().movedim(self.out_dim(), 0)


class _GroupNorm(_Norm):
    names = ("input", "num_groups", "weight", "bias", "eps")
    defaults: ClassVar[dict[str, Any]] = {"weight": None, "bias": None, "eps": 1e-5}

    @classmethod
    def check(cls, site: OpCall, bound: dict[str, Any]) -> str | None:
        if _dim_of(site, bound["input"]) != 0 or site.out_dims[0] != 0:
            return "the samples are not in dimension 0"
        return None

    def _normalised(self) -> tuple[Tensor, tuple[int, ...]]:
        x = self.bound["input"]
        normalised = F.group_norm(x, self.bound["num_groups"], None, None, self.bound["eps"])
        return normalised, tuple(range(2, x.ndim))


RULES: dict[Callable[..., Any], type[OpRule]] = {
    F.linear: _Linear,
    F.conv1d: _Conv,
    F.conv2d: _Conv,
    F.embedding: _Embedding,
    F.embedding_bag: _EmbeddingBag,
    F.layer_norm: _LayerNorm,
    F.group_norm: _GroupNorm,
}
