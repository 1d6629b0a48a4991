"""Per-sample rules: one parameter use (or one module call) → each sample's gradient.

Every rule works on a *site* recorded by `batchgrad._per_sample_trace`: its inputs and
outputs with their sample dimensions, and the gradient of the batch's ``total``
reaching each output. Since sample ``i``'s total depends on the site only through
row ``i`` of its outputs, that row of the output gradient is sample ``i``'s own, and
each rule forms sample ``i``'s parameter gradient from row ``i`` of the inputs and of
the output gradient:

- ``F.linear`` (any middle dimensions): ``Σ_t g_t a_tᵀ`` and ``Σ_t g_t``;
- ``F.conv1d`` / ``F.conv2d``: the weight gradient of one convolution grouped by sample;
- Hugging Face's ``Conv1D`` (`TransformersConv1D`, a module rule): the linear layer's;
- ``F.embedding``: the output gradients added into the rows of the sample's ids;
- ``F.embedding_bag`` (sum / mean, with offsets): the same, per bag;
- ``F.layer_norm``, ``F.group_norm``: the normalised input times the output gradient;
- ``nn.RNN`` / ``nn.GRU`` / ``nn.LSTM`` (`_Recurrent`): the recurrence re-run step by
  step, its gates' gradients, then ``Σ_t δ_t x_tᵀ`` and ``Σ_t δ_t h_{t-1}ᵀ``;
- any other function of a parameter (`VmapOp`) and, where a use cannot be read
  alone, the innermost module call enclosing all uses of the parameter
  (`VmapModule`): ``torch.func.vmap`` over the samples of that function's own
  vector-Jacobian product, the samples given to it as batches of one.

Users add rules for their own functions or modules with
`batchgrad.register_per_sample_rule`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any, ClassVar, cast

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.grad import conv2d_weight

from ._errors import ConfigError, PerSampleError
from ._per_sample_trace import MIXED, Dim, ModuleCall, OpCall, leaves_of, stale, unflatten

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
            out[self.param("weight")] = _outer_sums(g, a.to(g.dtype))
        if self.has("bias"):
            out[self.param("bias")] = g.sum(1)
        return out

    def sq_norms(self) -> Tensor:
        a, g = self._pair()
        total = torch.zeros(self.rows, dtype=g.dtype, device=g.device)
        if self.has("weight"):
            total = total + _outer_sq_norms(a, g)
        if self.has("bias"):
            total = total + g.sum(1).pow(2).sum(1)
        return total

    def subtract_sum(self, targets: dict[nn.Parameter, Tensor]) -> None:
        """One ``addmm_`` into the batch gradient: no temporary of the weight's size."""
        a, g = self._pair()
        if self.has("weight"):
            _outer_subtract(targets[self.param("weight")], g, a)
        if self.has("bias"):
            target = targets[self.param("bias")]
            target.sub_(g.sum((0, 1)).to(target.dtype))

    def weighted(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        """``Σ_i w_i g_iᵀ a_i`` as one product (`_outer_weighted`)."""
        a, g = self._pair()
        out: dict[nn.Parameter, Tensor] = {}
        if self.has("weight"):
            out[self.param("weight")] = _outer_weighted(g, a, weights)
        if self.has("bias"):
            out[self.param("bias")] = (g.sum(1) * weights.to(g.dtype)[:, None]).sum(0)
        return out


def _outer_sums(left: Tensor, right: Tensor) -> Tensor:
    """``Σ_t left_t right_tᵀ`` per sample (``left``: ``[B, T, m]``, ``right``: ``[B, T,
    n]``, the result ``[B, m, n]``): a broadcast product for one step, which writes the
    result in one pass (a batched matrix product of inner size 1 costs about 7% more
    on a CPU, its result the same), ``bmm`` otherwise."""
    if left.shape[1] == 1:
        return left.transpose(1, 2) * right
    return torch.bmm(left.transpose(1, 2), right)


def _outer_sq_norms(a: Tensor, g: Tensor) -> Tensor:
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


def _outer_weighted(left: Tensor, right: Tensor, weights: Tensor) -> Tensor:
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


def _outer_subtract(target: Tensor, left: Tensor, right: Tensor) -> None:
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
        out = g.new_zeros(self.rows, *weight.shape)
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


# -- the generic rules: vmap over the samples ----------------------------------------


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
        return _site_unsupported(site)

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


def _site_unsupported(site: Site) -> str | None:
    if stale(site.inputs, site.in_versions):
        return "a tensor it read was modified in place afterwards"
    if stale(site.outputs, site.out_versions):
        return "its output was modified in place afterwards"
    for t, d in zip(site.inputs, site.in_dims, strict=True):
        if isinstance(t, int) and d == MIXED:
            return f"its argument {t} is the number of samples"
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
        return _site_unsupported(site)

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
    out = {"weight": _outer_sums(a, g)}
    if getattr(module, "bias", None) is not None:
        out["bias"] = g.sum(1)
    return out


class UserModule(Unit):
    """A module call with a registered rule."""

    site: ModuleCall

    @classmethod
    def unsupported(cls, site: ModuleCall) -> str | None:
        problem = _site_unsupported(site)
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
            out[self.weight] = _outer_sums(a.to(g.dtype), g)
        if self.bias is not None and self._has(self.bias):
            out[self.bias] = g.sum(1)
        return out

    def sq_norms(self) -> Tensor:
        a, g = self._pair()
        total = torch.zeros(self.rows, dtype=g.dtype, device=g.device)
        if self._has(self.weight):
            total = total + _outer_sq_norms(a, g)
        if self.bias is not None and self._has(self.bias):
            total = total + g.sum(1).pow(2).sum(1)
        return total

    def weighted(self, weights: Tensor) -> dict[nn.Parameter, Tensor]:
        a, g = self._pair()
        out: dict[nn.Parameter, Tensor] = {}
        if self._has(self.weight):
            out[self.weight] = _outer_weighted(a, g, weights)
        if self.bias is not None and self._has(self.bias):
            out[self.bias] = (g.sum(1) * weights.to(g.dtype)[:, None]).sum(0)
        return out

    def subtract_sum(self, targets: dict[nn.Parameter, Tensor]) -> None:
        a, g = self._pair()
        if self._has(self.weight):
            _outer_subtract(targets[self.weight], a, g)
        if self.bias is not None and self._has(self.bias):
            target = targets[self.bias]
            target.sub_(g.sum((0, 1)).to(target.dtype))


def known_unit(module: nn.Module) -> type[KnownModule]:
    """The unit of a module with a built-in rule (`known_rule`)."""
    return TransformersConv1D if _is_transformers_conv1d(module) else KnownModule


RULES: dict[Callable[..., Any], type[OpRule]] = {
    F.linear: _Linear,
    F.conv1d: _Conv,
    F.conv2d: _Conv,
    F.embedding: _Embedding,
    F.embedding_bag: _EmbeddingBag,
    F.layer_norm: _LayerNorm,
    F.group_norm: _GroupNorm,
}
