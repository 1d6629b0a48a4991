"""Which tensors of a forward hold the samples, and where each parameter is used.

Per-sample gradients need two facts about every operation that touches a parameter:
in which dimension of each of its inputs and outputs the samples lie, and whether
anything else uses the same parameter. Both are read from the forward itself, never
guessed from sizes:

- **Uses.** A `torch.overrides.TorchFunctionMode` sees every torch function called
  during the forward; each call with a trainable parameter among its arguments is a
  *use* of that parameter (``F.linear`` inside ``nn.Linear``, but as well
  ``F.linear(h, emb.weight)`` in a loss function, ``x * self.scale`` in a custom
  layer, the flat weights of ``nn.LSTM``). Forward hooks on every module record the
  module calls around the uses, so a use that no rule can handle is handled by the
  innermost module call enclosing all uses of its parameter.
- **Sample dimensions.** The forward also runs on a *probe*: ``P`` rows of the same
  batch (``P ≠ B``). A dimension of a recorded tensor is the sample dimension when its
  size is ``B`` in the real forward and ``P`` in the probe; a tensor whose shape does not
  change is shared by all samples (position ids ``[1, T]``, an attention mask ``[T, T]``,
  the weights); any other change (samples flattened into another dimension, packed
  sequences) marks it *mixed*, and no rule reads samples out of it.

An operation with a rule whose inputs are all shared (a position embedding looked up
with ids ``[T]`` or ``[1, T]``) gets its output expanded over the batch, ``[B, T, D]``, a
view that broadcasts exactly like the original; the gradient reaching that view is then
each sample's own.

A signature whose plan had only layer rules and module rules (`Probe.lean`) is traced
*lean* on its later calls: only the calls of the modules with a rule are hooked and no
random state is kept per use, which leaves the traced forward a few percent above a
plain one. Its uses, and which modules returned in which order, are still checked
against the probe's (a call that differs is probed afresh), and a plan that then needs
more runs the forward again, fully traced.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn import functional as F
from torch.nn.modules.module import register_module_forward_hook
from torch.overrides import TorchFunctionMode
from torch.utils import _pytree as pytree

from ._errors import ConfigError, PerSampleError

MIXED = -1
"""Sample dimension of a tensor whose samples are not one of its dimensions."""

Dim = int | None  # the sample dimension, None when shared by all samples, or MIXED

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)

# Functions whose rule can take an input shared by all samples (its output expanded).
EXPANDABLE: set[Callable[..., Any]] = {F.embedding, F.linear, F.layer_norm}

# What may be done with such an expanded output without changing any number: broadcast
# it in an elementwise operation (checked by shape), convert it, read its dtype.
_BROADCASTING = {
    *("add", "sub", "mul", "div", "rsub", "true_divide"),
    *("add_", "sub_", "mul_", "div_"),
    *("__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__mul__", "__rmul__"),
    *("__truediv__",),
}
_CONVERSIONS = {"to", "contiguous", "float", "double", "half", "bfloat16", "type_as"}
_PROPERTIES = {"device", "dtype", "requires_grad", "is_leaf", "grad_fn", "layout", "is_cuda"}


@dataclass(eq=False)
class ModuleCall:
    """One call of a module during the forward."""

    module: nn.Module
    name: str
    parent: ModuleCall | None
    inputs: list[Any] = field(default_factory=list)  # leaves of (args, kwargs)
    spec: Any = None
    outputs: list[Any] = field(default_factory=list)
    in_versions: list[int | None] = field(default_factory=list)
    out_versions: list[int | None] = field(default_factory=list)
    in_dims: list[Dim] = field(default_factory=list)
    out_dims: list[Dim] = field(default_factory=list)
    rng: Tensor | None = None  # the CPU generator's state before the call, if it drew
    grads: list[Tensor | None] = field(default_factory=list)

    def enclosing(self) -> Iterator[ModuleCall]:
        call: ModuleCall | None = self
        while call is not None:
            yield call
            call = call.parent


@dataclass(eq=False)
class OpCall:
    """One torch function call with trainable parameters among its arguments."""

    func: Callable[..., Any]
    inputs: list[Any]
    spec: Any
    outputs: list[Any]
    scope: ModuleCall | None
    params: list[nn.Parameter]
    in_versions: list[int | None]
    out_versions: list[int | None] = field(default_factory=list)
    in_dims: list[Dim] = field(default_factory=list)
    out_dims: list[Dim] = field(default_factory=list)
    grads: list[Tensor | None] = field(default_factory=list)
    rng: Tensor | None = None  # the CPU generator's state before the call, if it drew

    @property
    def name(self) -> str:
        return getattr(self.func, "__name__", repr(self.func))

    def where(self) -> str:
        if self.scope is None:
            return f"{self.name} called outside any module (in the loss function)"
        module = self.scope.module
        return f"{self.name} in module {self.scope.name!r} ({type(module).__name__})"

    def args(self) -> tuple[tuple[Any, ...], dict[str, Any]]:
        return unflatten(self.inputs, self.spec)


_FLAT = object()  # the spec of arguments that are all leaves already (the usual case)


def _leaf(value: Any) -> bool:
    """Whether an argument is kept whole: anything but a container, and a tuple or list
    of numbers (a convolution's stride, a shape), which holds no tensor to record."""
    if isinstance(value, dict):
        return False
    if isinstance(value, tuple | list):
        return all(isinstance(v, int | float | bool | None) for v in value)
    return True


def flatten(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[list[Any], Any]:
    """The leaves of ``(args, kwargs)`` and what `unflatten` needs to rebuild them."""
    if all(_leaf(a) for a in args) and all(_leaf(v) for v in kwargs.values()):
        return [*args, *kwargs.values()], (_FLAT, len(args), tuple(kwargs))
    return pytree.tree_flatten((args, kwargs))


def unflatten(leaves: list[Any], spec: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    if isinstance(spec, tuple) and spec and spec[0] is _FLAT:
        _, positional, names = spec
        return tuple(leaves[:positional]), dict(zip(names, leaves[positional:], strict=True))
    args, kwargs = pytree.tree_unflatten(leaves, spec)
    return tuple(args), dict(kwargs)


def leaves_of(output: Any) -> list[Any]:
    return [output] if isinstance(output, Tensor) else pytree.tree_leaves(output)


def _versions(leaves: list[Any]) -> list[int | None]:
    return [t._version if isinstance(t, Tensor) else None for t in leaves]


def stale(leaves: list[Any], versions: list[int | None]) -> bool:
    """Whether a recorded tensor was modified in place after it was recorded."""
    return any(
        isinstance(t, Tensor) and t._version != v for t, v in zip(leaves, versions, strict=True)
    )


def _shapes(leaves: list[Any]) -> list[Any]:
    """Each tensor's shape; each other leaf itself (a size passed as a number)."""
    return [tuple(t.shape) if isinstance(t, Tensor) else t for t in leaves]


def _sample_dim(real: Any, probe: Any, rows: int, probe_rows: int) -> Dim:
    if not isinstance(real, Tensor):
        if isinstance(real, int | tuple | list) and not isinstance(real, bool) and real != probe:
            return MIXED  # numbers that follow the batch size (x.expand(B, …), x.view((B, -1)))
        return None
    if not isinstance(probe, tuple) or len(probe) != real.ndim:
        return MIXED
    changed = [d for d in range(real.ndim) if real.shape[d] != probe[d]]
    if not changed:
        return None
    if len(changed) == 1 and real.shape[changed[0]] == rows and probe[changed[0]] == probe_rows:
        return changed[0]
    return MIXED


def _has_param(args: tuple[Any, ...], kwargs: dict[str, Any] | None, ids: AbstractSet[int]) -> bool:
    for value in (*args, *(kwargs.values() if kwargs else ())):
        if id(value) in ids:
            return True
        if type(value) in (list, tuple) and any(id(v) in ids for v in value):
            return True
    return False


@dataclass(frozen=True)
class Probe:
    """What the real forward needs of the probe: its rows and the shapes it recorded,
    modules by id (so that a cached probe keeps no module or tensor alive)."""

    rows: int
    op_shapes: list[tuple[Callable[..., Any], list[Any], list[Any], tuple[int, ...]]]
    call_shapes: list[tuple[int, list[Any], list[Any]]]
    # what the per-sample guard has checked on this signature and found consistent
    guarded: set[Any] = field(default_factory=set, compare=False, hash=False)
    # per rule generation under which this signature's plan had only layer and module
    # rules: the modules whose calls those rules read (its later forwards record no
    # others, and no random states: they are traced lean)
    lean: dict[int, frozenset[int]] = field(default_factory=dict, compare=False, hash=False)


class Diverged(PerSampleError):
    """The real forward called other functions or modules than the probe."""


_PROBES: weakref.WeakKeyDictionary[nn.Module, dict[Any, Probe]] = weakref.WeakKeyDictionary()
_PROBES_PER_MODEL = 8


def _leaf_key(leaf: Any) -> Any:
    if isinstance(leaf, Tensor):
        return (tuple(leaf.shape), leaf.dtype, leaf.device, leaf.requires_grad)
    try:
        hash(leaf)
    except TypeError:
        return (type(leaf), id(leaf))
    return (type(leaf), leaf)


def probe_key(model: nn.Module, loss_fn: Any, batch: Any) -> Any:
    """What a probe's shapes depend on other than the values: the batch's structure and
    its tensors' shapes, the modules and their modes, the trainable parameters (and
    their shapes and dtypes: ``p.data`` may be replaced), the loss function and the
    grad mode."""
    try:
        hash(loss_fn)  # kept in the key (not its id, which a new function may reuse)
    except TypeError:
        return None
    leaves, spec = pytree.tree_flatten(batch)
    return (
        spec,
        tuple(_leaf_key(leaf) for leaf in leaves),
        tuple((id(m), type(m), m.training) for m in model.modules()),
        tuple((id(p), p.shape, p.dtype) for p in model.parameters() if p.requires_grad),
        loss_fn,
        torch.is_grad_enabled(),
    )


def cached_probe(model: nn.Module, key: Any) -> Probe | None:
    if key is None:
        return None
    try:
        return _PROBES.get(model, {}).get(key)
    except TypeError:  # a model or batch leaf that cannot be a key: no cache
        return None


def remember_probe(model: nn.Module, key: Any, tracer: Tracer) -> Probe:
    probe = Probe(
        tracer.rows,
        tracer.op_shapes,
        [(id(module), ins, outs) for module, ins, outs in tracer.call_shapes],
    )
    if key is None:
        return probe
    try:
        probes = _PROBES.setdefault(model, {})
        probes.pop(key, None)
    except TypeError:
        return probe
    probes[key] = probe
    while len(probes) > _PROBES_PER_MODEL:
        del probes[next(iter(probes))]
    return probe


def forget_probe(model: nn.Module, key: Any) -> None:
    if key is not None:
        _PROBES.get(model, {}).pop(key, None)


class Tracer(TorchFunctionMode):
    """Records module calls and parameter uses of one forward (probe or real).

    ``lean``: the ids of the only modules whose calls are recorded, and no random state
    before each use (no hooks on the other modules, no copies of the generator's
    state), for a forward whose rules read nothing else; ``None``: everything."""

    def __init__(
        self,
        model: nn.Module,
        rows: int,
        probe: Probe | None = None,
        expand: bool = True,
        lean: AbstractSet[int] | None = None,
    ) -> None:
        super().__init__()
        self.rows = rows
        self.lean = lean
        self.probe = probe
        self.expand, self.expanded = expand, False
        self.shared: dict[int, tuple[Tensor, tuple[int, ...]]] = {}  # expanded → shape
        self.opaque = False  # an expanded output was used other than by broadcasting
        self.busy = False
        self.params = {id(p): p for p in model.parameters() if p.requires_grad}
        self.names = {m: n for n, m in model.named_modules(remove_duplicate=False)}
        self.ops: list[OpCall] = []
        self.calls: list[ModuleCall] = []
        # per use: the function, its inputs' and outputs' shapes, its parameters' ids
        self.op_shapes: list[tuple[Callable[..., Any], list[Any], list[Any], tuple[int, ...]]] = []
        self.call_shapes: list[tuple[nn.Module, list[Any], list[Any]]] = []
        self.stack: list[ModuleCall] = []
        self.handles: list[Any] = []
        modules = list(dict.fromkeys(self.names))
        for module in modules:
            _refuse_mixing(module, self.names[module])
        # A lean trace still follows which modules return, in order (one global hook
        # that notes ids): a branch on the values through a module without parameters
        # (a layout swap) must be probed afresh, as a full trace's checks would have it.
        self.returned: list[int] = []
        if lean is not None:
            ids = {id(m) for m in modules}
            self.handles.append(register_module_forward_hook(self._returned(ids)))
            modules = [m for m in modules if id(m) in lean]
        self.probe_calls = probe.call_shapes if probe is not None else []
        if probe is not None and lean is not None:
            self.probe_calls = [entry for entry in probe.call_shapes if entry[0] in lean]
        for module in modules:
            self.handles.append(module.register_forward_pre_hook(self._enter, with_kwargs=True))
            self.handles.append(module.register_forward_hook(self._leave, with_kwargs=True))

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _returned(self, ids: AbstractSet[int]) -> Callable[..., None]:
        def note(module: nn.Module, args: Any, output: Any) -> None:
            if id(module) in ids:
                self.returned.append(id(module))

        return note

    def check_lean(self) -> None:
        """After a lean forward: the same module calls as the probe's, and no fewer uses."""
        assert self.probe is not None
        if self.returned != [entry[0] for entry in self.probe.call_shapes]:
            raise _diverged("the sequence of module calls")
        if len(self.ops) != len(self.probe.op_shapes):
            raise _diverged("the number of parameter uses")

    # -- module calls -------------------------------------------------------------

    # The hooks read shapes and versions of what they record with torch functions off:
    # under the mode every ``t.shape`` would be a call of `__torch_function__`.

    def _enter(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        self.busy = True
        try:
            with torch._C.DisableTorchFunction():
                self._push(module, args, kwargs)
        finally:
            self.busy = False

    def _leave(
        self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any
    ) -> None:
        self.busy = True
        try:
            with torch._C.DisableTorchFunction():
                self._pop(module, output)
        finally:
            self.busy = False

    def _push(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        parent = self.stack[-1] if self.stack else None
        call = ModuleCall(module, self.names[module], parent)
        call.inputs, call.spec = flatten(args, kwargs)
        call.in_versions = _versions(call.inputs)
        call.rng = torch.get_rng_state()
        self.stack.append(call)

    def _pop(self, module: nn.Module, output: Any) -> None:
        if not self.stack or self.stack[-1].module is not module:
            return  # the forward raised inside a nested call; the error propagates
        call = self.stack.pop()
        call.outputs = leaves_of(output)
        call.out_versions = _versions(call.outputs)
        if call.rng is not None and torch.equal(call.rng, torch.get_rng_state()):
            call.rng = None  # it drew no random numbers: nothing to replay
        index = len(self.calls)
        self.calls.append(call)
        if self.probe is None:
            self.call_shapes.append((module, _shapes(call.inputs), _shapes(call.outputs)))
            return
        if index >= len(self.probe_calls) or self.probe_calls[index][0] != id(module):
            raise _diverged(f"module {call.name!r} ({type(module).__name__})")
        _, in_shapes, out_shapes = self.probe_calls[index]
        call.in_dims = self._dims(call.inputs, in_shapes)
        call.out_dims = self._dims(call.outputs, out_shapes)

    def _dims(self, leaves: list[Any], shapes: list[Any]) -> list[Dim]:
        assert self.probe is not None
        if len(leaves) != len(shapes):
            return [MIXED] * len(leaves)
        return [
            _sample_dim(t, s, self.rows, self.probe.rows)
            for t, s in zip(leaves, shapes, strict=True)
        ]

    # -- parameter uses -----------------------------------------------------------

    def __torch_function__(
        self,
        func: Callable[..., Any],
        types: Any,
        args: tuple[Any, ...] = (),
        kwargs: dict[str, Any] | None = None,
    ) -> Any:
        kwargs = kwargs or {}
        if self.busy:  # the tracer's own hooks reading what they record
            return func(*args, **kwargs)
        if self.shared and _has_param(args, kwargs, self.shared.keys()):
            return self._consume(func, args, kwargs)
        if not _has_param(args, kwargs, self.params.keys()):
            return func(*args, **kwargs)
        rng = None if self.lean is not None else torch.get_rng_state()
        output = func(*args, **kwargs)
        if rng is not None and torch.equal(rng, torch.get_rng_state()):
            rng = None  # it drew no random numbers: nothing to replay
        outputs = leaves_of(output)
        if not any(isinstance(t, Tensor) for t in outputs):
            return output  # a size, a dtype: no gradient flows through it
        inputs, spec = flatten(args, kwargs)
        params = [self.params[id(t)] for t in inputs if id(t) in self.params]
        scope = self.stack[-1] if self.stack else None
        index = len(self.ops)
        if self.probe is None:
            used = tuple(id(p) for p in params)
            self.op_shapes.append((func, _shapes(inputs), _shapes(outputs), used))
            self.ops.append(OpCall(func, inputs, spec, [output], scope, params, []))
            return output
        if (
            index >= len(self.probe.op_shapes)
            or self.probe.op_shapes[index][0] is not func
            or self.probe.op_shapes[index][3] != tuple(id(p) for p in params)
        ):
            raise _diverged(f"the call of {getattr(func, '__name__', func)}")
        _, in_shapes, out_shapes, _ = self.probe.op_shapes[index]
        in_dims = self._dims(inputs, in_shapes)
        out_dims = self._dims(outputs, out_shapes)
        if (
            self.expand
            and func in EXPANDABLE
            and isinstance(output, Tensor)
            and all(d is None for d in in_dims)
            and out_dims == [None]
        ):
            self.expanded = True
            new = output.ndim == 0 or output.shape[0] != 1
            shape = tuple(output.shape)
            output = _expand(output, self.rows, new)
            self.shared[id(output)] = (output, shape)
            outputs, out_dims = [output], [0]
            inputs = [_expand(inputs[0], self.rows, new), *inputs[1:]]
            in_dims = [0, *in_dims[1:]]
        call = OpCall(func, inputs, spec, outputs, scope, params, _versions(inputs))
        call.in_dims, call.out_dims, call.rng = in_dims, out_dims, rng
        call.out_versions = _versions(outputs)
        self.ops.append(call)
        return output

    def _consume(
        self, func: Callable[..., Any], args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> Any:
        """Follow an expanded output: it must act exactly as the shared tensor would."""
        output = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__":
            owner = getattr(getattr(func, "__self__", None), "__name__", "")
            self.opaque |= owner not in _PROPERTIES
        elif name in _CONVERSIONS and isinstance(output, Tensor):
            source = self.shared.get(id(args[0]))
            if source is not None and output is not args[0]:
                self.shared[id(output)] = (output, source[1])
            self.opaque |= source is None
        elif name in _BROADCASTING and isinstance(output, Tensor) and not kwargs:
            inplace = (name.endswith("_") and not name.startswith("__")) or name == "__iadd__"
            shapes = [
                self.shared[id(a)][1] if id(a) in self.shared else tuple(a.shape)
                for a in args
                if isinstance(a, Tensor)
            ]
            try:
                same = torch.broadcast_shapes(*shapes) == output.shape
            except RuntimeError:
                same = False
            self.opaque |= not same or (inplace and id(args[0]) in self.shared)
        else:
            self.opaque = True
        return output


def _expand(t: Any, rows: int, new: bool) -> Any:
    """``t`` expanded over the samples: ``[…] → [B, …]`` (new) or ``[1, …] → [B, …]``."""
    if not isinstance(t, Tensor):
        return t
    if new:
        return t.unsqueeze(0).expand(rows, *t.shape)
    return t.expand(rows, *t.shape[1:])


def _diverged(what: str) -> PerSampleError:
    return Diverged(
        f"The forward runs differently on a batch of a different size: {what} happens at "
        f"another point than in a forward on a few rows of the same batch. Per-sample "
        f"gradients need the same computation for any number of samples; make control "
        f"flow independent of the batch size."
    )


def _refuse_mixing(module: nn.Module, name: str) -> None:
    """Modules whose output for one sample depends on the other samples."""
    if isinstance(module, _BATCH_NORMS) and module.training:
        raise ConfigError(
            f"Module {name!r} ({type(module).__name__}) is in training mode: it "
            f"normalises with statistics of the whole batch, so a sample's output "
            f"depends on the other samples and has no gradient of its own. Put it "
            f"in eval mode (module.eval()) or replace it with nn.GroupNorm or "
            f"nn.LayerNorm."
        )
    if isinstance(module, nn.Embedding | nn.EmbeddingBag) and module.scale_grad_by_freq:
        raise ConfigError(
            f"Embedding {name!r} has scale_grad_by_freq=True: it scales gradients by "
            f"how often each id occurs in the whole batch, which couples the "
            f"samples. Build it with scale_grad_by_freq=False."
        )


def rng_states(model: nn.Module) -> list[Tensor]:
    """The states of the generators a forward of ``model`` may draw from."""
    states = [torch.get_rng_state()]
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = {p.device for p in model.parameters() if p.device.type == "cuda"}
        states += [torch.cuda.get_rng_state(d) for d in sorted(devices, key=str)]
    return states
