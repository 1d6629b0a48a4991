"""Per-sample gradients, their norms and one clipped step: batchgrad against the usual ways.

Run from the repository root::

    python benchmarks/per_sample.py

Three models, a batch of 64 samples, cross-entropy with one label per sample:

- ``mlp``: the MLP 784-256-256-10 on random inputs;
- ``cnn``: `small_cnn` (two 3×3 convolutions, 8 and 16 channels) on 1×28×28 images;
- ``transformer``: `SmallTransformer` below, 2 pre-norm layers, d_model 64, 4 heads,
  32 tokens of a vocabulary of 100, mean-pooled into a 10-way classification head.
  It is built from `nn.Embedding` (tokens and positions), `nn.LayerNorm` and
  `nn.Linear` only (attention with separate q/k/v/out projections around
  `F.scaled_dot_product_attention`), so that batchgrad's layer rules and Opacus'
  grad samplers cover every parameter without their generic (functorch) fallback.

Three tasks, each giving what DP-SGD-style training needs from one batch:

- ``grads``: every sample's gradient, ``[B, *p.shape]`` per parameter;
- ``norms``: the L2 norm of every sample's gradient over all parameters, ``[B]``;
- ``clipped``: one clipped step, ``Σ_i min(1, C / ‖g_i‖) g_i`` left in ``p.grad``
  (``C = 1``, no noise), as `bg.accumulate(..., clip_per_sample=C, reduction="sum")`
  computes it.

A sample's gradient is that of its own loss (the ``"sum"`` reduction of the batch).
Each task is done by these methods, each on its own copy of the same model:

- ``plain``: the denominator of every ratio: ``model.zero_grad(set_to_none=True)``
  and one forward and backward of the batch's summed loss, i.e. one ordinary
  training step's gradient, with no per-sample information at all;
- ``naive``: a Python loop over the samples, one forward and ``autograd.grad`` each,
  the gradients copied into ``[B, ...]`` tensors (norms: from those; clipped step:
  each sample's gradient scaled and added as it comes, never all kept);
- ``torch.func``: the documented recipe, ``vmap(grad(loss_of_one_sample))`` with
  `torch.func.functional_call`; norms from the materialised gradients; clipped step
  = per-sample gradients, their norms, the clipping weights, one weighted sum;
- ``opacus``: `opacus.GradSampleModule` (hooks mode, ``loss_reduction="sum"``): one
  forward and backward fills ``p.grad_sample``; norms from ``p.grad_sample``;
  clipped step = ``p.grad_sample`` clipped and summed into ``p.grad``;
- ``opacus ghost``: `opacus.grad_sample.GradSampleModuleFastGradientClipping` with
  ghost clipping (norms and clipped step only; it never forms per-sample gradients
  of `nn.Linear` / `nn.Embedding`): norms from one backward, the clipped step is its
  documented two backwards (the second of the per-sample losses weighted by the
  clipping coefficients, hooks off), as `DPTensorFastGradientClipping.backward`;
- ``batchgrad``: `bg.per_sample_grads`, `bg.per_sample_norms` and
  `bg.accumulate(..., clip_per_sample=1.0, reduction="sum")` with a `bg.Loss` loss
  function, as a user writes them (so its cost includes the engine's checks).

Opacus is optional (``pip install -e ".[bench]"``); without it its rows are skipped
with a note.

On CPU, ``vmap`` has no batching rule for the fused attention kernel that
`F.scaled_dot_product_attention` runs (``_scaled_dot_product_flash_attention_for_cpu``
and its backward): ``torch.func`` loops over the samples for that one operation (it
warns "There is a performance drop"). That is part of what the documented recipe
costs on this model; the other methods batch it.

Correctness first: every method runs once per model and task and is compared with
``torch.func``: per-sample gradients and clipped-step gradients to a relative error
``‖a - e‖ / ‖e‖`` of at most 1e-4 per parameter, norms to at most 1e-4 per sample
(float32). (The key projection's bias has a gradient of exactly 0, softmax being
blind to a shift shared by all keys, so ``‖e‖`` is floored at 1e-3 of the whole
gradient's norm.) Otherwise the run stops with exit status 1. Then, per model and task,
after warm-up rounds, every method is timed in interleaved rounds (the order
rotating from round to round) with `time.perf_counter` and garbage collection paused,
so drift in the machine's speed hits all alike. The headline is the ratio of medians,
method / plain; the ratio of minima and the median of the per-round ratios are second
opinions. Absolute times only describe the machine the run was made on.

Targets (reported, never asserted): batchgrad (the guard by default) no slower than
the best peer on every model and task; its clipped step at most 2× a plain step on
``mlp`` and ``transformer``. ``batchgrad verify`` shows what the guard costs on every
call.

Options: ``--budget S`` seconds of timing per model and task (default 8; at least
`MIN_ROUNDS` rounds), ``--repeats N`` fixes the rounds instead, ``--threads N`` sets
``torch.set_num_threads``, ``--no-opacus`` leaves Opacus out, ``--out`` chooses the
JSON file, and ``--quick`` runs tiny sizes in a few seconds (a smoke test, not a
measurement).
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import importlib.metadata
import os
import statistics
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Any

import torch
from common import (
    RESULTS,
    Samples,
    add_run_options,
    classifier_loss,
    describe,
    environment,
    interleaved,
    load_average,
    use_threads,
    write_results,
)
from rich.console import Console
from rich.table import Table
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap
from torch.nn import functional as F

import batchgrad as bg
from batchgrad._models import mlp, small_cnn
from batchgrad._per_sample import clipped_sum

TASKS = ("grads", "norms", "clipped")
METHODS = (
    "plain",
    "naive",
    "torch.func",
    "opacus",
    "opacus ghost",
    "backpack",
    "batchgrad",
    "batchgrad verify",
)
OPACUS_METHODS = ("opacus", "opacus ghost")
PEERS = ("torch.func", "opacus", "backpack")
"""The libraries batchgrad's per-sample gradients must be no slower than."""
REFERENCE = "torch.func"

CLIP = 1.0
"""``C``, the per-sample clipping norm of the clipped step."""

TOLERANCE = 1e-4
"""Largest relative error (float32) of any method against torch.func."""

ZERO_FLOOR = 1e-3
"""See `max_rel_err`: the smallest gradient norm a parameter's error is relative to."""

CLIPPED_TARGET = 2.0
"""batchgrad's clipped step may cost at most this many plain steps (mlp, transformer)."""

CLIPPED_TARGET_MODELS = ("mlp", "transformer")

MIN_ROUNDS, MAX_ROUNDS = 5, 2000
"""Bounds on the timed rounds of one model and task when timing to a budget."""

DEFAULT_OUT = RESULTS / "per_sample.json"

Batch = tuple[Tensor, Tensor]


@dataclass(frozen=True)
class Sizes:
    """The sizes of one run: the batch and the three models."""

    batch: int
    mlp_widths: tuple[int, ...]
    image: int
    vocab: int
    d_model: int
    heads: int
    layers: int
    seq: int
    classes: int


FULL = Sizes(
    batch=64,
    mlp_widths=(784, 256, 256, 10),
    image=28,
    vocab=100,
    d_model=64,
    heads=4,
    layers=2,
    seq=32,
    classes=10,
)
QUICK = Sizes(
    batch=8,
    mlp_widths=(32, 16, 4),
    image=8,
    vocab=16,
    d_model=16,
    heads=2,
    layers=1,
    seq=8,
    classes=4,
)


# -- the transformer ------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/out projections (no fused weight)."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(d_model, d_model)
        self.k = nn.Linear(d_model, d_model)
        self.v = nn.Linear(d_model, d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x: Tensor) -> Tensor:
        batch, length, width = x.shape

        def split(t: Tensor) -> Tensor:  # [B, T, D] -> [B, heads, T, D / heads]
            return t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)

        y = F.scaled_dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)))
        return self.out(y.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """A pre-norm encoder layer: attention and a GELU MLP, each around a residual."""

    def __init__(self, d_model: int, heads: int) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(d_model)
        self.attention = SelfAttention(d_model, heads)
        self.norm2 = nn.LayerNorm(d_model)
        self.mlp = nn.Sequential(
            nn.Linear(d_model, 4 * d_model), nn.GELU(), nn.Linear(4 * d_model, d_model)
        )

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attention(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class SmallTransformer(nn.Module):
    """``token ids [B, T] -> logits [B, classes]``: an encoder, mean-pooled.

    The positions go through an `nn.Embedding` too, indexed by ``[B, T]`` (the
    positions repeated per sample) so that every module keeps the sample in
    dimension 0, as per-sample gradients need. The key projection keeps its bias,
    whose gradient is exactly 0 (softmax ignores a shift shared by all keys).
    """

    def __init__(
        self, vocab: int, d_model: int, heads: int, layers: int, seq: int, classes: int
    ) -> None:
        super().__init__()
        self.tokens = nn.Embedding(vocab, d_model)
        self.positions = nn.Embedding(seq, d_model)
        self.blocks = nn.Sequential(*(Block(d_model, heads) for _ in range(layers)))
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, classes)

    def forward(self, ids: Tensor) -> Tensor:
        # contiguous, not expand()ed: Opacus' ghost norm of nn.Embedding view()s its ids
        positions = torch.arange(ids.shape[1], device=ids.device).repeat(ids.shape[0], 1)
        hidden = self.blocks(self.tokens(ids) + self.positions(positions))
        logits: Tensor = self.head(self.norm(hidden).mean(1))
        return logits


class GPT2Classifier(nn.Module):
    """Hugging Face's `GPT2Model` as shipped (from a config, random init, no dropout; its
    own `[1, T]` position ids), mean-pooled into a linear head: ``ids [B, T] -> logits``."""

    def __init__(
        self, vocab: int, d_model: int, heads: int, layers: int, seq: int, classes: int
    ) -> None:
        import transformers

        super().__init__()
        config = transformers.GPT2Config(
            vocab_size=vocab,
            n_positions=seq,
            n_embd=d_model,
            n_layer=layers,
            n_head=heads,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            bos_token_id=0,
            eos_token_id=0,
            attn_implementation="eager",  # what vmap (torch.func) can batch
        )
        self.gpt = transformers.GPT2Model(config)
        self.head = nn.Linear(d_model, classes)

    def forward(self, ids: Tensor) -> Tensor:
        logits: Tensor = self.head(self.gpt(input_ids=ids).last_hidden_state.mean(1))
        return logits


def transformers_missing() -> str | None:
    try:
        import transformers  # noqa: F401
    except ImportError as error:
        return f"transformers is not installed ({error})"
    return None


@dataclass(frozen=True)
class Workload:
    """A model and a batch; every method works on its own copy of the model."""

    name: str
    model: nn.Module
    batch: Batch


def build_workloads(sizes: Sizes, seed: int) -> list[Workload]:
    n = sizes.batch
    torch.manual_seed(seed)
    classifier = mlp(sizes.mlp_widths)
    mlp_batch = (torch.randn(n, sizes.mlp_widths[0]), torch.randint(0, sizes.mlp_widths[-1], (n,)))
    cnn = small_cnn(channels=1, classes=10)
    cnn_batch = (torch.randn(n, 1, sizes.image, sizes.image), torch.randint(0, 10, (n,)))
    transformer = SmallTransformer(
        sizes.vocab, sizes.d_model, sizes.heads, sizes.layers, sizes.seq, sizes.classes
    )
    ids = torch.randint(0, sizes.vocab, (n, sizes.seq))
    transformer_batch = (ids, torch.randint(0, sizes.classes, (n,)))
    workloads = [
        Workload("mlp", classifier, mlp_batch),
        Workload("cnn", cnn, cnn_batch),
        Workload("transformer", transformer, transformer_batch),
    ]
    if transformers_missing() is None:
        gpt2 = GPT2Classifier(
            sizes.vocab, sizes.d_model, sizes.heads, sizes.layers, sizes.seq, sizes.classes
        )
        ids = torch.randint(0, sizes.vocab, (n, sizes.seq))
        workloads.append(Workload("gpt2", gpt2, (ids, torch.randint(0, sizes.classes, (n,)))))
    return workloads


# -- the methods ----------------------------------------------------------------------

Grads = dict[str, Tensor]


def _trainable(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    return [(name, p) for name, p in model.named_parameters() if p.requires_grad]


def _norms_of(grads: Grads) -> Tensor:
    """``[B]``: the norm of each sample's gradient over all parameters."""
    return torch.stack([g.flatten(1).pow(2).sum(1) for g in grads.values()]).sum(0).sqrt()


def _clip_weights(norms: Tensor) -> Tensor:
    """``min(1, C / ‖g_i‖)``, with the same guard against 0 as batchgrad and Opacus."""
    return (CLIP / (norms + 1e-6)).clamp(max=1.0)


def _p_grads(model: nn.Module) -> Grads:
    return {name: p.grad for name, p in _trainable(model) if p.grad is not None}


def _clipped_sum(model: nn.Module, grads: Grads) -> Grads:
    """``p.grad = Σ_i min(1, C/‖g_i‖) g_i`` from the per-sample gradients ``grads``."""
    weights = _clip_weights(_norms_of(grads))
    for name, p in _trainable(model):
        p.grad = torch.einsum("b,b...->...", weights, grads[name])
    return _p_grads(model)


class Method:
    """One way of doing the tasks, on its own copy of the model."""

    name = ""
    tasks: tuple[str, ...] = TASKS

    def __init__(self, model: nn.Module) -> None:
        self.model = model

    def run(self, task: str, batch: Batch) -> Any:
        return getattr(self, task)(batch)

    def grads(self, batch: Batch) -> Grads:
        raise NotImplementedError

    def norms(self, batch: Batch) -> Tensor:
        raise NotImplementedError

    def clipped(self, batch: Batch) -> Grads:
        raise NotImplementedError


class Plain(Method):
    """One ordinary forward and backward: the denominator of every ratio."""

    name = "plain"

    def step(self, batch: Batch) -> Grads:
        inputs, labels = batch
        self.model.zero_grad(set_to_none=True)
        F.cross_entropy(self.model(inputs), labels, reduction="sum").backward()
        return _p_grads(self.model)

    def run(self, task: str, batch: Batch) -> Any:
        return self.step(batch)


class Naive(Method):
    """A Python loop over the samples."""

    name = "naive"

    def _each(self, batch: Batch) -> Any:
        inputs, labels = batch
        params = [p for _, p in _trainable(self.model)]
        for i in range(inputs.shape[0]):
            loss = F.cross_entropy(
                self.model(inputs[i : i + 1]), labels[i : i + 1], reduction="sum"
            )
            yield i, torch.autograd.grad(loss, params)

    def grads(self, batch: Batch) -> Grads:
        named = _trainable(self.model)
        out = [p.new_empty(batch[0].shape[0], *p.shape) for _, p in named]
        for i, sample in self._each(batch):
            for buffer, g in zip(out, sample, strict=True):
                buffer[i] = g
        return {name: buffer for (name, _), buffer in zip(named, out, strict=True)}

    def norms(self, batch: Batch) -> Tensor:
        return _norms_of(self.grads(batch))

    def clipped(self, batch: Batch) -> Grads:
        named = _trainable(self.model)
        sums = [torch.zeros_like(p) for _, p in named]
        for _, sample in self._each(batch):
            norm = torch.stack([g.pow(2).sum() for g in sample]).sum().sqrt()
            torch._foreach_add_(sums, list(sample), alpha=float(_clip_weights(norm)))
        for (_, p), total in zip(named, sums, strict=True):
            p.grad = total
        return _p_grads(self.model)


class TorchFunc(Method):
    """``vmap(grad(f))`` over the samples, with `functional_call` (the documented recipe)."""

    name = "torch.func"

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        self.params = {name: p.detach() for name, p in _trainable(model)}
        self.buffers = {name: b.detach() for name, b in model.named_buffers()}

        def sample_loss(
            params: dict[str, Tensor], buffers: dict[str, Tensor], x: Tensor, y: Tensor
        ) -> Tensor:
            logits = functional_call(model, (params, buffers), (x.unsqueeze(0),))
            return F.cross_entropy(logits, y.unsqueeze(0), reduction="sum")

        self.per_sample = vmap(grad(sample_loss), in_dims=(None, None, 0, 0))

    def grads(self, batch: Batch) -> Grads:
        inputs, labels = batch
        result: Grads = self.per_sample(self.params, self.buffers, inputs, labels)
        return result

    def norms(self, batch: Batch) -> Tensor:
        return _norms_of(self.grads(batch))

    def clipped(self, batch: Batch) -> Grads:
        grads = self.grads(batch)
        return _clipped_sum(self.model, grads)


def opacus_missing() -> str | None:
    """Why Opacus cannot run here, or ``None``. Imported only when used (it is slow to)."""
    try:
        import opacus  # noqa: F401
    except ImportError as error:  # optional: pip install -e ".[bench]"
        return f"opacus is not installed ({error}); pip install -e '.[bench]'"
    return None


def _opacus_version() -> str | None:
    return _version("opacus")


def _version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


class Opacus(Method):
    """`opacus.GradSampleModule`, hooks mode: ``p.grad_sample`` from one backward."""

    name = "opacus"

    def __init__(self, model: nn.Module) -> None:
        from opacus.grad_sample import GradSampleModule

        super().__init__(model)
        self.module = GradSampleModule(model, batch_first=True, loss_reduction="sum")

    def _backward(self, batch: Batch) -> Grads:
        inputs, labels = batch
        self.module.zero_grad(set_to_none=True)  # also clears p.grad_sample
        F.cross_entropy(self.module(inputs), labels, reduction="sum").backward()
        return {name: p.grad_sample for name, p in _trainable(self.model)}

    def grads(self, batch: Batch) -> Grads:
        return self._backward(batch)

    def norms(self, batch: Batch) -> Tensor:
        return _norms_of(self._backward(batch))

    def clipped(self, batch: Batch) -> Grads:
        grads = self._backward(batch)
        return _clipped_sum(self.model, grads)


class OpacusGhost(Method):
    """Opacus' ghost clipping: norms from one backward, the clipped step from two."""

    name = "opacus ghost"
    tasks = ("norms", "clipped")

    def __init__(self, model: nn.Module) -> None:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping

        super().__init__(model)
        self.module = GradSampleModuleFastGradientClipping(
            model, batch_first=True, loss_reduction="sum", max_grad_norm=CLIP
        )

    def _first_backward(self, batch: Batch, *, retain_graph: bool) -> Tensor:
        inputs, labels = batch
        self.module.zero_grad(set_to_none=True)
        losses = F.cross_entropy(self.module(inputs), labels, reduction="none")
        losses.sum().backward(retain_graph=retain_graph)
        return losses

    def norms(self, batch: Batch) -> Tensor:
        self._first_backward(batch, retain_graph=False)
        norms: Tensor = self.module.get_norm_sample()
        return norms

    def clipped(self, batch: Batch) -> Grads:
        # What DPTensorFastGradientClipping.backward does, without an optimizer.
        losses = self._first_backward(batch, retain_graph=True)
        weights = self.module.get_clipping_coef()
        self.module.zero_grad(set_to_none=True)
        self.module.disable_hooks()
        try:
            (weights * losses).sum().backward()
        finally:
            self.module.enable_hooks()
        return _p_grads(self.model)


def backpack_missing() -> str | None:
    try:
        import backpack  # noqa: F401
    except ImportError as error:
        return (
            f"backpack-for-pytorch is not installed ({error}); pip install --no-deps "
            f"backpack-for-pytorch einops unfoldNd"
        )
    return None


class Unsupported(RuntimeError):
    """A peer that cannot run this model: its rows say why instead of a time."""


class BackPACK(Method):
    """BackPACK's `BatchGrad` extension: ``p.grad_batch`` from one extended backward
    (norms from it: its `BatchL2Grad` forms the same per-sample gradients)."""

    name = "backpack"

    def __init__(self, model: nn.Module) -> None:
        from backpack import extend

        super().__init__(model)
        try:
            self.module = extend(model)
        except Exception as error:  # BackPACK knows a fixed set of layers
            raise Unsupported(
                f"BackPACK cannot extend it: {type(error).__name__}: {error}"
            ) from error
        self.criterion = extend(nn.CrossEntropyLoss(reduction="sum"))

    def _backward(self, batch: Batch) -> Grads:
        from backpack import backpack
        from backpack.extensions import BatchGrad

        inputs, labels = batch
        self.module.zero_grad(set_to_none=True)
        loss = self.criterion(self.module(inputs), labels)
        with backpack(BatchGrad()):
            loss.backward()
        named = _trainable(self.model)
        missing = [name for name, p in named if getattr(p, "grad_batch", None) is None]
        if missing:
            raise Unsupported(
                f"no per-sample gradients (BackPACK has no extension for their modules) "
                f"of {len(missing)} parameters, e.g. {missing[0]!r}"
            )
        return {name: p.grad_batch for name, p in named}

    def grads(self, batch: Batch) -> Grads:
        return self._backward(batch)

    def norms(self, batch: Batch) -> Tensor:
        return _norms_of(self._backward(batch))

    def clipped(self, batch: Batch) -> Grads:
        return _clipped_sum(self.model, self._backward(batch))


class Batchgrad(Method):
    """`bg.per_sample_grads`, `bg.per_sample_norms`, `bg.accumulate(clip_per_sample=)`."""

    name = "batchgrad"

    def grads(self, batch: Batch) -> Grads:
        return bg.per_sample_grads(self.model, classifier_loss, batch)

    def norms(self, batch: Batch) -> Tensor:
        return bg.per_sample_norms(self.model, classifier_loss, batch)

    def clipped(self, batch: Batch) -> Grads:
        self.model.zero_grad(set_to_none=True)
        bg.accumulate(self.model, classifier_loss, batch, clip_per_sample=CLIP, reduction="sum")
        return _p_grads(self.model)


class BatchgradVerify(Batchgrad):
    """The same with the guard on every call (``verify=True``; by default it runs on
    the first call of a batch signature, so in the timed rounds not at all)."""

    name = "batchgrad verify"

    def grads(self, batch: Batch) -> Grads:
        return bg.per_sample_grads(self.model, classifier_loss, batch, verify=True)

    def norms(self, batch: Batch) -> Tensor:
        return bg.per_sample_norms(self.model, classifier_loss, batch, verify=True)

    def clipped(self, batch: Batch) -> Grads:
        self.model.zero_grad(set_to_none=True)  # accumulate's clipped pass, guarded
        clipped_sum(self.model, classifier_loss, batch, 0, CLIP, verify=True)
        return _p_grads(self.model)


METHOD_CLASSES: dict[str, type[Method]] = {
    "plain": Plain,
    "naive": Naive,
    "torch.func": TorchFunc,
    "opacus": Opacus,
    "opacus ghost": OpacusGhost,
    "backpack": BackPACK,
    "batchgrad": Batchgrad,
    "batchgrad verify": BatchgradVerify,
}


def build_methods(
    model: nn.Module, names: tuple[str, ...]
) -> tuple[dict[str, Method], dict[str, str]]:
    """Each method on its own deep copy of ``model`` (Opacus' hooks stay on its copy),
    and why the peers that cannot take this model cannot."""
    methods: dict[str, Method] = {}
    failed: dict[str, str] = {}
    for name in names:
        try:
            methods[name] = METHOD_CLASSES[name](copy.deepcopy(model))
        except Unsupported as error:
            failed[name] = str(error)
    return methods, failed


OURS = ("batchgrad", "batchgrad verify")


# -- memory ---------------------------------------------------------------------------

MEMORY_TARGET = 1.5
"""batchgrad's clipped step may peak at most at this many times a plain step's memory."""

MEMORY_METHODS = ("plain", "torch.func", "opacus ghost", "batchgrad", "batchgrad verify")

MEMORY_IMAGE = 64
"""The CNN's image side in the memory runs: at 28 its plain step's activations (a few MB)
are of the size of the convolution kernels' own buffers, and its ratio swings."""

MEMORY_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072", "MALLOC_TRIM_THRESHOLD_": "0"}
"""For the memory runs: glibc serves every block of 128 KiB or more by its own mapping
and returns it when freed (by default the threshold adapts to the sizes freed, and
freed memory may stay resident), so the resident peak follows the live tensors."""


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def memory_child(model_name: str, method_name: str, quick: bool, seed: int) -> int:
    """In a fresh process: the bytes one call of ``method_name`` adds to the resident
    peak (``VmHWM``, reset just before) over what was resident before it."""
    import ctypes

    sizes = QUICK if quick else FULL
    if not quick:  # activations, not the kernels' buffers, should make the CNN's peak
        sizes = dataclasses.replace(sizes, image=MEMORY_IMAGE)
    (workload,) = (w for w in build_workloads(sizes, seed) if w.name == model_name)
    method = METHOD_CLASSES[method_name](workload.model)
    task = "grads" if method_name == "plain" else "clipped"
    method.run(task, workload.batch)  # first-call caches (thread pools, kernels) aside
    method.model.zero_grad(set_to_none=True)
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    with open("/proc/self/clear_refs", "w") as refs:
        refs.write("5")  # reset the peak resident size to the current one
    before = _status_kb("VmRSS")
    method.run(task, workload.batch)
    return (_status_kb("VmHWM") - before) * 1024


def measure_memory(
    quick: bool, seed: int, names: tuple[str, ...], models: tuple[str, ...]
) -> list[dict[str, Any]]:
    """Peak memory of one clipped step per method (plain: one step), each in its own
    process, as a ratio to the plain step's."""
    import subprocess
    import sys

    rows = []
    for model in models:
        found = {}
        for name in (m for m in MEMORY_METHODS if m in names):
            command = [sys.executable, __file__, "--memory-child", model, name, "--seed", str(seed)]
            done = subprocess.run(
                command + (["--quick"] if quick else []),
                capture_output=True,
                text=True,
                timeout=600,
                check=False,
                env={**os.environ, **MEMORY_ENV},
            )
            if done.returncode != 0:  # a peer that cannot run this model
                if name in ("plain", *OURS):
                    raise RuntimeError(f"memory run of {name} on {model} failed:\n{done.stderr}")
                last = (done.stderr.strip().splitlines() or ["?"])[-1]
                rows.append({"model": model, "method": name, "status": "failed", "note": last})
                continue
            found[name] = int(done.stdout.strip().splitlines()[-1])
        for name, peak in found.items():
            rows.append(
                {
                    "model": model,
                    "method": name,
                    "status": "ok",
                    "peak_bytes": peak,
                    "ratio": peak / max(found["plain"], 1),
                }
            )
    return rows


def memory_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="peak memory of one clipped step / one plain step (resident, MB)")
    table.add_column("model")
    for name in dict.fromkeys(row["method"] for row in rows):
        table.add_column(name.replace(" ", "\n"), justify="right")
    found = {(row["model"], row["method"]): row for row in rows}
    for model in dict.fromkeys(row["model"] for row in rows):
        cells = []
        for name in dict.fromkeys(row["method"] for row in rows):
            row = found.get((model, name))
            if row is None or row["status"] != "ok":
                cells.append("—" if row is None else "fails")
                continue
            text = f"{row['peak_bytes'] / 2**20:.1f}"
            if row["method"] != "plain":
                text += f" ({row['ratio']:.2f}×)"
            cells.append(text)
        table.add_row(model, *cells)
    return table


# -- checking -------------------------------------------------------------------------


class MismatchError(RuntimeError):
    """A method disagrees with torch.func: the timings would compare different things."""


def max_rel_err(actual: Any, expected: Any) -> float:
    """Gradients: the worst ``‖a - e‖ / ‖e‖`` per parameter; norms: the worst per sample.

    A parameter whose gradient is 0 in exact arithmetic (the key bias) holds rounding
    noise only, so its ``‖e‖`` is floored at `ZERO_FLOOR` × the norm of the gradient of
    all the parameters.
    """
    if isinstance(expected, Tensor):  # per-sample norms
        error = (actual.double() - expected.double()).abs()
        return float((error / expected.double().clamp(min=1e-12)).max())
    if actual.keys() != expected.keys():
        raise MismatchError(
            f"gradients for different parameters: {sorted(actual.keys() ^ expected.keys())}"
        )
    norms = {name: float(value.detach().double().norm()) for name, value in expected.items()}
    floor = ZERO_FLOOR * sum(n * n for n in norms.values()) ** 0.5
    worst = 0.0
    for name, value in expected.items():
        error = float((actual[name].detach().double() - value.detach().double()).norm())
        scale = max(norms[name], floor)
        worst = max(worst, error / scale if scale > 0 else error)
    return worst


def verify(
    workload: Workload, task: str, methods: dict[str, Method], failed: dict[str, str]
) -> dict[str, float]:
    """Run every method once; each must agree with torch.func within `TOLERANCE`.

    A peer that raises or disagrees is taken out of ``methods`` and its reason put in
    ``failed`` (its row says so); batchgrad disagreeing stops the run."""
    expected = methods[REFERENCE].run(task, workload.batch)
    errors: dict[str, float] = {}
    for name, method in list(methods.items()):
        if name in ("plain", REFERENCE):
            continue
        try:
            error = max_rel_err(method.run(task, workload.batch), expected)
        except Exception as problem:
            if name in OURS:
                raise
            failed[name] = f"fails: {type(problem).__name__}: {str(problem)[:120]}"
            del methods[name]
            continue
        if not error <= TOLERANCE and name not in OURS:
            failed[name] = f"wrong: max relative error {error:.3g} against torch.func"
            del methods[name]
            continue
        if not error <= TOLERANCE:
            raise MismatchError(
                f"{workload.name}, {task}: {name} and torch.func disagree (max relative "
                f"error {error:.3g} > {TOLERANCE:g}); the timings would compare different "
                f"computations."
            )
        errors[name] = error
    return errors


# -- timing ---------------------------------------------------------------------------


def time_rounds(
    workload: Workload,
    task: str,
    methods: dict[str, Method],
    *,
    repeats: int | None,
    budget: float = 0.0,
) -> dict[str, Samples]:
    """Interleaved rounds, one call of every method each, the order rotating.

    ``repeats`` rounds, or with ``repeats=None`` as many as fit in ``budget`` seconds
    (at least `MIN_ROUNDS`, at most `MAX_ROUNDS`).
    """
    steps = [lambda method=method: method.run(task, workload.batch) for method in methods.values()]
    samples = interleaved(
        steps, repeats, warmup=0, budget=budget, min_rounds=MIN_ROUNDS, max_rounds=MAX_ROUNDS
    )
    return dict(zip(methods, samples, strict=True))


def measure(
    workload: Workload,
    task: str,
    methods: dict[str, Method],
    *,
    repeats: int | None,
    warmup: int,
    budget: float,
) -> list[dict[str, Any]]:
    """Check, warm up and time one model and task: one row per method (a peer that
    fails or disagrees: a row with its reason)."""
    methods = dict(methods)
    failed: dict[str, str] = {}
    errors = verify(workload, task, methods, failed)
    time_rounds(workload, task, methods, repeats=warmup)  # timed as below, then dropped
    samples = time_rounds(workload, task, methods, repeats=repeats, budget=budget)
    plain = samples["plain"]
    plain_summary = plain.summary()
    rows = []
    for name, timings in samples.items():
        summary = timings.summary()
        paired = [t / p for p, t in zip(plain.seconds, timings.seconds, strict=True)]
        rows.append(
            {
                "model": workload.name,
                "task": task,
                "method": name,
                "status": "ok",
                "max_rel_err": errors.get(name, 0.0 if name == REFERENCE else None),
                "median_ms": summary["median_ms"],
                "ratio": summary["median_ms"] / plain_summary["median_ms"],
                "ratio_min": summary["min_ms"] / plain_summary["min_ms"],
                "ratio_paired_median": statistics.median(paired),
                "timings": summary,
            }
        )
    rows += [
        {"model": workload.name, "task": task, "method": name, "status": "failed", "note": note}
        for name, note in failed.items()
    ]
    return rows


def skipped_rows(workload: Workload, task: str, names: tuple[str, ...], note: str) -> list[dict]:
    return [
        {"model": workload.name, "task": task, "method": name, "status": "skipped", "note": note}
        for name in names
    ]


# -- reporting ------------------------------------------------------------------------


def _best_peer(model: str, task: str, ratio: dict[tuple[str, str, str], float]) -> float | None:
    """The lowest ratio of the peers (`PEERS`, and Opacus' ghost clipping where it
    applies) that ran this model and task correctly."""
    peers = [*PEERS, "opacus ghost"] if task != "grads" else list(PEERS)
    found = [ratio[(model, task, p)] for p in peers if (model, task, p) in ratio]
    return min(found) if found else None


def targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The targets, each met or not (``None``: not measured in this run): batchgrad as
    users call it (the guard by default) no slower than the best peer on every model
    and task; its clipped step at most `CLIPPED_TARGET` plain steps. ``batchgrad
    verify`` (the guard on every call, as `bg.check` runs it) is reported for what the
    guard costs, not held to a target."""
    ratio = {
        (row["model"], row["task"], row["method"]): row["ratio"]
        for row in rows
        if row["status"] == "ok"
    }
    found = []
    for model in dict.fromkeys(row["model"] for row in rows):
        for task in TASKS:
            best = _best_peer(model, task, ratio)
            ours = ratio.get((model, task, "batchgrad"))
            found.append(
                {
                    "target": f"{model} {task}: batchgrad no slower than the best peer",
                    "met": None if ours is None or best is None else ours <= best,
                }
            )
    for model in CLIPPED_TARGET_MODELS:
        ours = ratio.get((model, "clipped", "batchgrad"))
        found.append(
            {
                "target": f"{model}: batchgrad clipped step ≤ {CLIPPED_TARGET:g}× plain",
                "met": None if ours is None else ours <= CLIPPED_TARGET,
            }
        )
    return found


def _met(model: str, task: str, by_method: dict[str, dict[str, Any]], name: str) -> bool | None:
    """Whether ``name``'s ratio is no higher than the best peer's (None: not measured)."""
    ours = by_method.get(name, {})
    if ours.get("status") != "ok":
        return None
    ratio = {(model, task, m): r["ratio"] for m, r in by_method.items() if r["status"] == "ok"}
    best = _best_peer(model, task, ratio)
    return None if best is None else bool(ours["ratio"] <= best)


def _cell(row: dict[str, Any] | None, met: bool | None = None) -> str:
    if row is None:
        return "—"
    if row["status"] != "ok":
        return {"failed": "fails" if row["note"].startswith("fails") else "wrong"}.get(
            row["status"], "skipped"
        )
    text = f"{row['ratio']:.2f}"
    if met is None:
        return text
    style = "green" if met else "bold red"
    return f"[{style}]{text}[/{style}]"


def results_table(rows: list[dict[str, Any]]) -> Table:
    table = Table(title="time / plain forward+backward (median of interleaved rounds)")
    table.add_column("model")
    table.add_column("task")
    table.add_column("plain\nms", justify="right")
    for name in METHODS[1:]:
        table.add_column(name.replace(" ", "\n"), justify="right")
    table.add_column("batchgrad\nms", justify="right")
    table.add_column("worst err\nvs\ntorch.func", justify="right", style="dim")
    cells: dict[tuple[str, str], dict[str, dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["model"], row["task"]), {})[row["method"]] = row
    for (model, task), by_method in cells.items():
        ours = by_method.get("batchgrad", {})
        errors = [
            row["max_rel_err"] for row in by_method.values() if row.get("max_rel_err") is not None
        ]
        table.add_row(
            model,
            task,
            f"{by_method['plain']['median_ms']:.2f}",
            *(
                _cell(
                    by_method.get(name),
                    _met(model, task, by_method, name) if name == "batchgrad" else None,
                )
                for name in METHODS[1:]
            ),
            f"{ours['median_ms']:.2f}" if ours.get("status") == "ok" else "—",
            f"{max(errors):.1e}" if errors else "—",
        )
    return table


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="Time per-sample gradients, norms and a clipped step: batchgrad, "
        "torch.func, Opacus and a Python loop, as ratios to a plain backward."
    )
    parser.add_argument(
        "--repeats",
        type=int,
        default=None,
        help="timed rounds per model and task (default: as many as fit in --budget)",
    )
    parser.add_argument(
        "--budget",
        type=float,
        default=8.0,
        help="seconds of timing per model and task when --repeats is not given (default: 8)",
    )
    parser.add_argument("--warmup", type=int, default=3, help="untimed rounds first (default: 3)")
    parser.add_argument("--no-opacus", action="store_true", help="leave Opacus out")
    parser.add_argument("--no-backpack", action="store_true", help="leave BackPACK out")
    parser.add_argument(
        "--models", default=None, help="comma-separated subset of mlp,cnn,transformer,gpt2"
    )
    parser.add_argument(
        "--memory",
        action="store_true",
        help="also measure each clipped step's peak memory, one process per method (Linux)",
    )
    parser.add_argument(
        "--memory-only", action="store_true", help="measure the memory only, no timing"
    )
    parser.add_argument("--memory-child", nargs=2, help=argparse.SUPPRESS)
    add_run_options(parser, DEFAULT_OUT, "tiny sizes and 2 rounds: a smoke test in seconds")
    args = parser.parse_args(argv)
    if args.repeats is not None and args.repeats < 1:
        parser.error("--repeats must be at least 1")
    if args.threads is not None and args.threads < 1:
        parser.error("--threads must be at least 1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        use_threads(args.threads)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)
            print(memory_child(*args.memory_child, args.quick, args.seed))
        return 0
    console = Console()
    if not console.is_terminal:  # rich's default of 80 columns squeezes the table
        console = Console(width=max(console.width, 132))
    sizes = QUICK if args.quick else FULL
    repeats: int | None = args.repeats if args.repeats is not None else (2 if args.quick else None)
    warmup = 1 if args.quick else args.warmup
    use_threads(args.threads)
    opacus_note = "left out (--no-opacus)" if args.no_opacus else opacus_missing()
    backpack_note = "left out (--no-backpack)" if args.no_backpack else backpack_missing()
    names = tuple(
        m
        for m in METHODS
        if (opacus_note is None or m not in OPACUS_METHODS)
        and (backpack_note is None or m != "backpack")
    )
    env = environment(opacus=_opacus_version(), backpack=_version("backpack-for-pytorch"))
    console.print(
        describe(env, f"opacus {env['opacus']}"),
        f"batch {sizes.batch}, "
        + (f"{repeats} timed rounds" if repeats else f"~{args.budget:g} s of timing")
        + " per model and task",
        sep="\n",
    )
    if opacus_note is not None:
        console.print(f"[yellow]Opacus rows skipped:[/yellow] {opacus_note}")
    if backpack_note is not None:
        console.print(f"[yellow]BackPACK rows skipped:[/yellow] {backpack_note}")

    started = time.perf_counter()
    rows: list[dict[str, Any]] = []
    gc.collect()
    gc.freeze()  # what is alive now (torch, Opacus, the models) costs no collection later
    try:
        with warnings.catch_warnings():
            # Opacus warns about its secure RNG and full backward hooks on every wrap.
            warnings.simplefilter("ignore", UserWarning)
            for workload in build_workloads(sizes, args.seed):
                if args.models and workload.name not in args.models.split(","):
                    continue
                if args.memory_only:
                    rows.append({"model": workload.name, "status": "memory only"})
                    continue
                methods, unsupported = build_methods(workload.model, names)
                for task in TASKS:
                    console.print(f"  {workload.name}: {task} ...")
                    here = {
                        name: method for name, method in methods.items() if task in method.tasks
                    }
                    rows += measure(
                        workload,
                        task,
                        here,
                        repeats=repeats,
                        warmup=warmup,
                        budget=args.budget,
                    )
                    if opacus_note is not None:
                        wanted = tuple(m for m in OPACUS_METHODS if task in METHOD_CLASSES[m].tasks)
                        rows += skipped_rows(workload, task, wanted, opacus_note)
                    if backpack_note is not None:
                        rows += skipped_rows(workload, task, ("backpack",), backpack_note)
                    rows += [
                        {
                            "model": workload.name,
                            "task": task,
                            "method": name,
                            "status": "failed",
                            "note": f"fails: {note}",
                        }
                        for name, note in unsupported.items()
                        if task in METHOD_CLASSES[name].tasks
                    ]
    except MismatchError as error:
        console.print(f"[bold red]ABORTED:[/bold red] {error}")
        return 1
    finally:
        gc.unfreeze()
    elapsed = time.perf_counter() - started

    measured = tuple(dict.fromkeys(row["model"] for row in rows))
    rows = [row for row in rows if row["status"] != "memory only"]
    if rows:
        console.print(results_table(rows))
    for row in rows:
        if row["status"] == "failed":
            console.print(f"  {row['model']} {row['task']}, {row['method']}: {row['note']}")
    wanted = args.memory or args.memory_only
    memory = measure_memory(args.quick, args.seed, names, measured) if wanted else []
    if memory:
        console.print(memory_table(memory))
        for row in memory:
            if row["method"] == "batchgrad" and row["status"] == "ok":
                met = row["ratio"] <= MEMORY_TARGET
                verdict = "[green]met[/green]" if met else "[bold red]missed[/bold red]"
                console.print(
                    f"  {row['model']}: batchgrad clipped step ≤ {MEMORY_TARGET:g}× a plain "
                    f"step's memory: {verdict}"
                )
    found = targets(rows)
    for target in found:
        verdict = {True: "[green]met[/green]", False: "[bold red]missed[/bold red]"}.get(
            target["met"], "not measured"
        )
        console.print(f"  {target['target']}: {verdict}")
    console.print(
        f"clipped step: C = {CLIP:g}, reduction='sum'; opacus = GradSampleModule (hooks), "
        f"opacus ghost = GradSampleModuleFastGradientClipping (ghost clipping); measured in "
        f"{elapsed:.0f} s, load average after {load_average()}"
    )
    if args.quick:
        console.print("(--quick: a smoke test; its sizes are too small to judge speed)")

    results = {
        "benchmark": "per_sample",
        "environment": env,
        "settings": {
            "quick": args.quick,
            "batch": sizes.batch,
            "sizes": asdict(sizes),
            "tasks": list(TASKS),
            "methods": list(names),
            "opacus_skipped": opacus_note,
            "clip": CLIP,
            "repeats": repeats,
            "budget_s": None if repeats else args.budget,
            "warmup": warmup,
            "seed": args.seed,
            "tolerance": TOLERANCE,
            "clipped_target": CLIPPED_TARGET,
        },
        "memory": memory,
        "elapsed_s": elapsed,
        "load_average_after": load_average(),
        "targets": found,
        "rows": rows,
    }
    write_results(args.out, results)
    console.print(f"results: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
