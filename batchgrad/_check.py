"""`check`: prove that micro-batching reproduces the whole-batch gradient, or say why not.

Three gradients of the same logical batch, from the same model state and RNG state:

- ``g_full``: the whole batch in one forward and backward;
- ``g_acc``: `accumulate` over micro-batches;
- ``g_naive``: the common recipe, each micro-batch's own reduced loss divided by
  the number of micro-batches ``K``.

Where the model itself makes a sample's output depend on the rest of its batch
(BatchNorm in training mode) or on random draws (dropout), no accumulation can be
exact; `findings` names those modules: known layers by type, any other one by
running it on half of the batch and comparing.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from ._accumulate import accumulate
from ._distributed import launch
from ._errors import BatchError, ConfigError, DistributedError
from ._fsdp import is_sharded
from ._loss import LossFn, unpack_loss
from ._reduction import REDUCTIONS, Reduction
from ._split import Batch, batch_length, batched_leaves, is_structured, micro_batches, slice_batch
from ._state import ModelSnapshot

_BATCH_NORMS = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm)
_DROPOUTS = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout)


def default_tolerance(dtype: torch.dtype) -> float:
    """The relative error rounding alone can explain: 1e-10 (float64), 1e-5 (float32)."""
    if dtype == torch.float64:
        return 1e-10
    if dtype == torch.float32:
        return 1e-5
    return 1e-2


@dataclass(frozen=True)
class Finding:
    """A module that keeps micro-batching from matching the whole batch exactly.

    Attributes:
        module: the module's qualified name in the model (``""`` is the model).
        kind: ``"batchnorm"``, ``"dropout"``, ``"couples-samples"``, ``"random"``, or
            ``"precision"``: the module computes in a lower precision than the
            parameters (an upcast RMSNorm in a float64 model), so the default tolerance
            is that precision's; this one alone does not make the split inexact; or
            ``"per-sample"``: per-sample gradients (`per_sample_grads`, ``clip_per_sample``)
            are refused or fail their guard on this model and batch (the message says
            which parameter or module and why); it does not bear on micro-batching.
        message: why, and what to do.
        dtype: for ``"precision"``, the lowest dtype the modules compute in.
    """

    module: str
    kind: Literal["batchnorm", "dropout", "couples-samples", "random", "precision", "per-sample"]
    message: str
    dtype: torch.dtype | None = None


@dataclass(frozen=True)
class CheckReport:
    """The comparison of accumulated, naive and whole-batch gradients.

    Attributes:
        ok: ``max_rel_err <= tolerance``.
        max_rel_err: ``‖g_acc − g_full‖ / ‖g_full‖`` over all parameters.
        naive_rel_err: ``‖g_naive − g_full‖ / ‖g_full‖``, NaN when a micro-batch has
            no units (the naive recipe divides 0 by 0 there).
        per_param: parameter name → ``‖g_acc − g_full‖ / ‖g_full‖`` of that parameter.
        naive_per_param: the same for the naive recipe.
        findings: modules that make micro-batching inexact.
        tolerance: the threshold of ``ok``.
        micro_batches: ``K``, over all ranks.
        micro_batch_counts: the units in each micro-batch, rank by rank.
        reduction: ``"mean"`` or ``"sum"``.
        world_size: the processes the accumulated gradient was computed on.
        per_sample: whether per-sample gradients passed their guard with every
            parameter's sum compared (``False``: a ``"per-sample"`` finding says why;
            ``None``: not checked, because a finding already couples the samples or
            ``per_sample=False``).
    """

    ok: bool
    max_rel_err: float
    naive_rel_err: float
    per_param: dict[str, float]
    naive_per_param: dict[str, float]
    findings: tuple[Finding, ...]
    tolerance: float
    micro_batches: int
    micro_batch_counts: tuple[int | float, ...]
    reduction: Reduction = field(default="mean")
    world_size: int = 1
    per_sample: bool | None = None


def check(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    micro_batch_size: int,
    *,
    reduction: Reduction = "mean",
    tolerance: float | None = None,
    probe: bool = True,
    per_sample: bool = True,
) -> CheckReport:
    """Compare the accumulated gradient with the whole-batch one on ``model``.

    Parameters, buffers (BatchNorm running statistics included), RNG state and
    gradients are restored afterwards, so ``check`` can run in the middle of
    training.

    Args:
        model: the model, in the mode (train/eval) to check.
        loss_fn: ``loss_fn(model, micro_batch) -> bg.Loss``.
        batch: a tensor or (nested) tuple/list/dict of tensors: the logical batch.
        micro_batch_size: rows per micro-batch.
        reduction: ``"mean"`` or ``"sum"``.
        tolerance: the largest relative error called ok; by default what rounding
            explains in the parameters' dtype (`default_tolerance`), or in the lowest
            precision a module computes in (a ``"precision"`` finding names it).
        probe: also run every module on half of the batch to find modules, of any
            type, whose output for a sample depends on the other samples.
        per_sample: also run the per-sample norms over the micro-batches with their
            guard comparing every parameter's per-sample sum with its batch gradient
            (``report.per_sample``; a ``"per-sample"`` finding where it fails).

    Returns:
        A `CheckReport`.

    Example:
        >>> import torch, batchgrad as bg
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.BatchNorm1d(8))
        >>> def loss_fn(model, x):
        ...     return bg.Loss.from_values(model(x).square())
        >>> x = torch.randn(8, 4)
        >>> report = bg.check(model, loss_fn, x, micro_batch_size=4)
        >>> report.ok, [(finding.module, finding.kind) for finding in report.findings]
        (False, [('1', 'batchnorm')])
        >>> bg.check(model.eval(), loss_fn, x, micro_batch_size=4).ok
        True
    """
    if reduction not in REDUCTIONS:
        raise ConfigError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}.")
    if not is_structured(batch):
        raise ConfigError(
            "check needs the whole logical batch as a tensor or a tuple/list/dict of "
            f"tensors, to run it both whole and split; got {type(batch).__name__}."
        )
    if is_sharded(model):
        raise ConfigError(
            "check runs the model whole and split in this process, which a model sharded "
            "with fully_shard cannot do alone (its forward is a collective). Check the "
            "model before sharding it: batchgrad check MODULE:FACTORY --nproc N --fsdp "
            "shards it on every rank and compares with one process on the whole batch."
        )
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("The model has no parameter that requires grad: nothing to check.")
    snapshot = ModelSnapshot.take(model)
    try:
        g_full = _whole_batch_grads(model, loss_fn, batch, reduction, params)
        snapshot.reset()
        report = accumulate(
            model, loss_fn, batch, micro_batch_size=micro_batch_size, reduction=reduction
        )
        g_acc = _grads(params)
        snapshot.reset()
        g_naive = _naive_grads(model, loss_fn, batch, micro_batch_size, reduction, params)
        snapshot.reset()
        findings = _findings(model, loss_fn, batch) if probe else _known_findings(model)
        consistent: bool | None = None
        if per_sample and not any(f.kind in _COUPLING for f in findings):
            snapshot.reset()
            problem = _per_sample_problem(model, loss_fn, batch, micro_batch_size)
            consistent = problem is None
            if problem is not None:
                findings.append(problem)
    finally:
        snapshot.put_back()
    if tolerance is None:
        tolerance = _default_tolerance(params, findings)

    result = _compare(
        names, g_full, g_acc, g_naive, findings, tolerance, report.micro_batch_counts, reduction
    )
    return dataclasses.replace(result, per_sample=consistent)


_COUPLING = ("batchnorm", "couples-samples")


def _per_sample_problem(
    model: nn.Module, loss_fn: LossFn, batch: Batch, micro_batch_size: int
) -> Finding | None:
    """The guard of per-sample gradients, every parameter's sum compared: what it raises."""
    from ._per_sample import _per_sample_norms  # clipping's module; imported when used

    try:
        _per_sample_norms(model, loss_fn, batch, micro_batch_size, verify=True, thorough=True)
    except Exception as error:  # check reports; it does not fail on what it finds
        what = str(error) if isinstance(error, BatchError) else f"{type(error).__name__}: {error}"
        return Finding(
            "",
            "per-sample",
            f"Per-sample gradients (per_sample_grads, per_sample_norms, clip_per_sample) "
            f"are not available here: {what}",
        )
    return None


def _compare(
    names: list[str],
    g_full: list[Tensor],
    g_acc: list[Tensor],
    g_naive: list[Tensor],
    findings: list[Finding],
    tolerance: float,
    micro_batch_counts: tuple[int | float, ...],
    reduction: Reduction,
    world_size: int = 1,
) -> CheckReport:
    max_rel_err = _rel_err(g_acc, g_full)
    return CheckReport(
        ok=max_rel_err <= tolerance,
        max_rel_err=max_rel_err,
        naive_rel_err=_rel_err(g_naive, g_full),
        per_param={n: _rel_err([a], [f]) for n, a, f in zip(names, g_acc, g_full, strict=True)},
        naive_per_param={
            n: _rel_err([a], [f]) for n, a, f in zip(names, g_naive, g_full, strict=True)
        },
        findings=tuple(findings),
        tolerance=tolerance,
        micro_batches=len(micro_batch_counts),
        micro_batch_counts=micro_batch_counts,
        reduction=reduction,
        world_size=world_size,
    )


def _grads(params: list[nn.Parameter]) -> list[Tensor]:
    return [torch.zeros_like(p) if p.grad is None else p.grad.detach().clone() for p in params]


def _whole_batch_grads(
    model: nn.Module, loss_fn: LossFn, batch: Batch, reduction: Reduction, params: list[Any]
) -> list[Tensor]:
    total, count = unpack_loss(loss_fn(model, batch), 0)
    loss = total / count if reduction == "mean" else total
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    return [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads, strict=True)]


def _naive_grads(
    model: nn.Module,
    loss_fn: LossFn,
    batch: Batch,
    micro_batch_size: int,
    reduction: Reduction,
    params: list[nn.Parameter],
    world_size: int = 1,
) -> list[Tensor]:
    """The recipe of most training loops: ``reduced_loss_k / K``, backward per micro-batch.

    Under data parallelism each rank does this on its share and DDP averages the
    ranks' gradients; this returns the rank's part of that average, ``/ world_size``.
    """
    splits = list(micro_batches(batch, micro_batch_size, allow_empty=world_size > 1))
    for micro_batch in splits:
        total, count = unpack_loss(loss_fn(model, micro_batch), 0)
        reduced = total / count if reduction == "mean" else total
        (reduced / len(splits) / world_size).backward()
    return _grads(params)


def _rel_err(approx: list[Tensor], exact: list[Tensor]) -> float:
    diff = math.sqrt(
        sum(
            float((a.double() - e.double()).square().sum())
            for a, e in zip(approx, exact, strict=True)
        )
    )
    norm = math.sqrt(sum(float(e.double().square().sum()) for e in exact))
    if norm == 0:
        return 0.0 if diff == 0 else math.inf
    return diff / norm


def _default_tolerance(params: list[nn.Parameter], findings: list[Finding]) -> float:
    """Rounding of the parameters' dtype, or of the lowest one a module computes in."""
    tolerance = default_tolerance(params[0].dtype)
    for finding in findings:
        if finding.kind == "precision" and finding.dtype is not None:
            tolerance = max(tolerance, default_tolerance(finding.dtype))
    return tolerance


def _known_findings(model: nn.Module) -> list[Finding]:
    findings = []
    for name, module in model.named_modules():
        kind = type(module).__name__
        if isinstance(module, _BATCH_NORMS) and module.training:
            findings.append(
                Finding(
                    name,
                    "batchnorm",
                    f"{name or 'the model'} ({kind}) is in training mode: it normalises each "
                    f"micro-batch with that micro-batch's own mean and variance, so a sample's "
                    f"output depends on which samples share its micro-batch (and running "
                    f"statistics are updated once per micro-batch). Put it in eval mode, or use "
                    f"GroupNorm/LayerNorm, which do not mix samples.",
                )
            )
        elif module.training and (
            (isinstance(module, _DROPOUTS) and module.p > 0)
            or (isinstance(module, nn.MultiheadAttention) and module.dropout > 0)
        ):
            findings.append(
                Finding(
                    name,
                    "dropout",
                    f"{name or 'the model'} ({kind}) drops activations at random in training "
                    f"mode: micro-batches draw other masks than the whole batch, so the two "
                    f"gradients agree only in expectation (each is exact for its own masks). "
                    f"To compare exactly, check the model in eval mode.",
                )
            )
    return findings


def _findings(model: nn.Module, loss_fn: LossFn, batch: Batch) -> list[Finding]:
    """Known layers by type, then any module that fails the half-batch probe."""
    findings = _known_findings(model)
    length = batch_length(batch)
    if length < 2:
        return findings
    calls: dict[str, tuple[nn.Module, tuple[Any, ...], dict[str, Any], Any]] = {}
    stack: list[str] = []

    def enter(name: str, module: nn.Module, args: Any) -> None:
        stack.append(name)

    def record(name: str, module: nn.Module, args: Any, kwargs: Any, output: Any) -> None:
        if stack and stack[-1] == name:
            stack.pop()
        calls.setdefault(name, (module, args, kwargs, output))

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(functools.partial(enter, name)))
        handles.append(
            module.register_forward_hook(functools.partial(record, name), with_kwargs=True)
        )
    scan = _DowncastScan(stack)
    try:
        with torch.no_grad(), scan:
            loss_fn(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    reference = next((p.dtype for p in model.parameters() if p.is_floating_point()), None)
    precision = [] if reference is None else _precision_findings(model, scan.lowest, reference)

    flagged = {finding.module for finding in findings}
    for name, (module, args, kwargs, output) in calls.items():
        if name in flagged or not _is_per_sample_call(args, kwargs, output, length):
            continue
        verdict = _probe(module, args, kwargs, length)
        if verdict is not None:
            findings.append(Finding(name, verdict, _probe_message(name, module, verdict)))
            flagged.add(name)
    # Report the innermost modules: a parent of a flagged module is flagged through it.
    return [
        f
        for f in findings
        if not any(other != f.module and _is_inside(other, f.module) for other in flagged)
    ] + precision


class _DowncastScan(TorchFunctionMode):
    """The lowest floating dtype each module casts to: an op whose floating output is
    of lower precision than its floating inputs, attributed to the innermost module
    running (a float32 constant created from nothing is not a loss of precision)."""

    def __init__(self, stack: list[str]) -> None:
        super().__init__()
        self.stack = stack
        self.lowest: dict[str, torch.dtype] = {}

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.stack:
            inputs = [t.dtype for t in _tensor_leaves((args, kwargs)) if t.is_floating_point()]
            if inputs:
                finest = min(inputs, key=_eps)
                for t in _tensor_leaves(out):
                    if t.is_floating_point() and _eps(t.dtype) > _eps(finest):
                        name = self.stack[-1]
                        known = self.lowest.get(name)
                        if known is None or _eps(t.dtype) > _eps(known):
                            self.lowest[name] = t.dtype
        return out


def _eps(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps)


def _precision_findings(
    model: nn.Module, lowest: dict[str, torch.dtype], reference: torch.dtype
) -> list[Finding]:
    """One finding per dtype below ``reference`` that modules compute in, naming them."""
    modules = dict(model.named_modules())
    by_dtype: dict[torch.dtype, list[str]] = {}
    for name, dtype in lowest.items():
        if _eps(dtype) > _eps(reference):
            by_dtype.setdefault(dtype, []).append(name)
    findings = []
    for dtype, names in by_dtype.items():
        shown = ", ".join(
            f"{name or 'the model'} ({type(modules[name]).__name__})" for name in names[:4]
        )
        more = f" and {len(names) - 4} more" if len(names) > 4 else ""
        low, high = str(dtype).removeprefix("torch."), str(reference).removeprefix("torch.")
        message = (
            f"{shown}{more} compute in {low} inside a {high} model (a cast down, e.g. a norm "
            f"upcasting to float32): rounding there is {low}'s, so the split can differ from "
            f"the whole batch by {low} rounding; the default tolerance is "
            f"{default_tolerance(dtype):g}, {low}'s. This alone does not make it inexact."
        )
        findings.append(Finding(names[0], "precision", message, dtype))
    return findings


def _is_inside(name: str, ancestor: str) -> bool:
    return ancestor == "" or name.startswith(ancestor + ".")


def _is_per_sample_call(args: Any, kwargs: Any, output: Any, length: int) -> bool:
    """Every batched tensor in and out has the logical batch as dimension 0."""
    inputs = list(batched_leaves((args, kwargs)))
    outputs = list(batched_leaves(output))
    return bool(inputs and outputs) and all(t.shape[0] == length for _, t in inputs + outputs)


def _probe(
    module: nn.Module, args: Any, kwargs: Any, length: int
) -> Literal["couples-samples", "random"] | None:
    half = length // 2
    try:
        with torch.no_grad():
            torch.manual_seed(1)
            first = module(*args, **kwargs)
            torch.manual_seed(2)
            second = module(*args, **kwargs)
            if not _same(first, second):
                return "random"
            torch.manual_seed(1)
            part = module(*slice_batch(args, 0, half), **slice_batch(kwargs, 0, half))
    except Exception:  # a call that cannot be repeated or sliced proves nothing
        return None
    # Only per-sample outputs are compared: a 0-d one (a batch-mean loss returned next
    # to the logits, as nanoGPT's forward does) is about the batch by definition.
    whole = [t for _, t in batched_leaves(slice_batch(first, 0, half))]
    alone = [t for _, t in batched_leaves(part)]
    return None if _same(alone, whole) else "couples-samples"


def _same(a: Any, b: Any) -> bool:
    leaves_a, leaves_b = list(_tensor_leaves(a)), list(_tensor_leaves(b))
    if len(leaves_a) != len(leaves_b):
        return False
    for x, y in zip(leaves_a, leaves_b, strict=True):
        if x.shape != y.shape:
            return False
        if not x.is_floating_point():
            if not torch.equal(x, y):
                return False
            continue
        # Slicing a matmul changes its blocking: allow rounding, not more.
        scale = float(x.abs().max()) if x.numel() else 0.0
        rtol = default_tolerance(x.dtype) * 10
        if not torch.allclose(x, y, rtol=rtol, atol=rtol * scale, equal_nan=True):
            return False
    return True


def _tensor_leaves(tree: Any) -> Iterator[Tensor]:
    if isinstance(tree, Tensor):
        yield tree
    elif isinstance(tree, dict):
        for value in tree.values():
            yield from _tensor_leaves(value)
    elif isinstance(tree, tuple | list):
        for value in tree:
            yield from _tensor_leaves(value)


def _probe_message(name: str, module: nn.Module, kind: str) -> str:
    label = f"{name or 'the model'} ({type(module).__name__})"
    if kind == "random":
        return (
            f"{label} gives a different output for the same input under another random "
            f"seed: it draws random numbers (dropout, noise), so micro-batches draw other "
            f"numbers than the whole batch and the gradients agree only in expectation. "
            f"To compare exactly, disable the randomness (eval mode) while checking."
        )
    return (
        f"{label} gives a different output for the first half of the batch when run on "
        f"that half alone: a sample's output depends on the other samples in its batch "
        f"(batch statistics, in-batch normalisation or negatives), so no split can "
        f"reproduce the whole-batch gradient. Make the module per-sample (e.g. GroupNorm or "
        f"LayerNorm instead of batch statistics)."
    )


def check_data_parallel(
    make: Callable[[], tuple[Any, ...]],
    nproc: int,
    micro_batch_size: int,
    *,
    reduction: Reduction = "mean",
    tolerance: float | None = None,
    timeout: float = 300.0,
    fsdp: bool = False,
) -> CheckReport:
    """`check` across ``nproc`` local gloo processes against one process on the whole batch.

    ``make()`` returns ``(model, loss_fn, batch, ...)`` and must be picklable (a
    module-level function). Every process builds it; rank 0's parameters and
    buffers are broadcast so all start equal, as DDP does. The batch is split
    into contiguous, uneven shards, one per rank; each rank accumulates its shard
    in micro-batches through `DistributedDataParallel`. The naive recipe is the
    usual DDP loop: each rank's micro-batch means divided by its micro-batch count,
    averaged over ranks.

    With ``fsdp=True`` the model is sharded with FSDP2 instead (``fully_shard`` on
    every child module that holds parameters, then on the root, over all ranks), and
    the full gradients (``p.grad.full_tensor()``) are compared; the naive recipe is
    computed on an unsharded copy (under FSDP it would wait forever on uneven ranks).
    """
    if nproc < 1:
        raise ConfigError(f"nproc must be at least 1, got {nproc}.")
    results = launch(
        _rank_check, nproc, make, micro_batch_size, reduction, tolerance, fsdp, timeout=timeout
    )
    for result in results:  # a rank's clean error, raised here as it was there
        if isinstance(result, BatchError):
            raise result
    report = results[0]
    if not isinstance(report, CheckReport):
        raise DistributedError("Rank 0 of the data-parallel check returned no report.")
    return report


def _fully_sharded(model: nn.Module) -> nn.Module:
    """``fully_shard`` on every child module holding parameters, then on the root."""
    from torch.distributed.fsdp import fully_shard

    for child in model.children():
        if any(True for _ in child.parameters()):
            fully_shard(child)
    fully_shard(model)
    return model


def _rank_check(
    make: Callable[[], tuple[Any, ...]],
    micro_batch_size: int,
    reduction: Reduction,
    tolerance: float | None,
    fsdp: bool = False,
) -> CheckReport | BatchError | None:
    """`_data_parallel_check`, with a `BatchError` returned rather than raised: the
    launcher would wrap it in a traceback, the caller raises it as it is."""
    try:
        return _data_parallel_check(make, micro_batch_size, reduction, tolerance, fsdp)
    except BatchError as error:
        return error


def _data_parallel_check(
    make: Callable[[], tuple[Any, ...]],
    micro_batch_size: int,
    reduction: Reduction,
    tolerance: float | None,
    fsdp: bool = False,
) -> CheckReport | None:
    from torch.nn.parallel import DistributedDataParallel

    rank, world_size = dist.get_rank(), dist.get_world_size()
    model, loss_fn, batch = make()[:3]
    with torch.no_grad():
        for tensor in model.state_dict().values():
            dist.broadcast(tensor, src=0)
    names = [name for name, p in model.named_parameters() if p.requires_grad]
    params = [p for p in model.parameters() if p.requires_grad]
    snapshot = ModelSnapshot.take(model)
    g_full: list[Tensor] = []
    findings: list[Finding] = []
    if rank == 0:  # the single-process reference, before anything is synchronised
        g_full = _whole_batch_grads(model, loss_fn, batch, reduction, params)
        snapshot.reset()
        findings = _findings(model, loss_fn, batch)
        snapshot.reset()

    length = batch_length(batch)
    bounds = [round(length * r / world_size) for r in range(world_size + 1)]
    local = slice_batch(batch, bounds[rank], bounds[rank + 1])
    if fsdp:
        plain = copy.deepcopy(model)  # for the naive recipe, which FSDP cannot run unevenly
        report = accumulate(
            _fully_sharded(model),
            loss_fn,
            local,
            micro_batch_size=micro_batch_size,
            reduction=reduction,
        )
        g_acc = [p.grad.full_tensor() for p in model.parameters() if p.requires_grad]
        model, params = plain, [p for p in plain.parameters() if p.requires_grad]
        snapshot = ModelSnapshot.take(plain)
    else:
        report = accumulate(
            DistributedDataParallel(model),
            loss_fn,
            local,
            micro_batch_size=micro_batch_size,
            reduction=reduction,
        )
        g_acc = _grads(params)
    snapshot.reset()
    g_naive = _naive_grads(model, loss_fn, local, micro_batch_size, reduction, params, world_size)
    for grad in g_naive:
        dist.all_reduce(grad)  # DDP's average over ranks (each part already / world_size)
    counts: list[Any] = [None] * world_size
    dist.all_gather_object(counts, report.micro_batch_counts)
    snapshot.put_back()
    if rank != 0:
        return None
    tolerance = _default_tolerance(params, findings) if tolerance is None else tolerance
    every_count = tuple(c for rank_counts in counts for c in rank_counts)
    return _compare(
        names, g_full, g_acc, g_naive, findings, tolerance, every_count, reduction, world_size
    )
