"""The layer zoo: per-sample cases as data, one row per (module, input maker, layout).

Each case builds a float64 model and a batch ``(x, target)`` of ``B`` samples; the
model's output has the samples in dimension 0 and the loss is a non-linear sum over
each sample's outputs, so every output element carries its own gradient. Wrappers
turn other layouts (time-first, tuple outputs, masks) into that shape; the layer
inside sees the layout of the case.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

import batchgrad as bg


def sample_loss(model, batch):
    x, target = batch
    out = model(x)
    values = (out * target).flatten(1).sum(1) + out.pow(2).flatten(1).sum(1)
    return bg.Loss.from_values(values)


@dataclass(frozen=True)
class Case:
    """A model factory and an input maker ``(B, generator) -> x``."""

    id: str
    model: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], object]
    batch: int = 4
    random: bool = False  # draws random numbers: compared through the batch gradient
    raises: str | None = None  # no exact per-sample gradients: a PerSampleError matching this


def randn(*shape):
    return lambda b, g: torch.randn(b, *shape, generator=g, dtype=torch.float64)


def ids(vocab, *shape):
    return lambda b, g: torch.randint(0, vocab, (b, *shape), generator=g)


class TimeFirst(nn.Module):
    """Feeds ``[T, B, …]`` to the layer inside and returns ``[B, …]``."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x):
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


class First(nn.Module):
    """The first output of a layer returning a tuple."""

    def __init__(self, layer: nn.Module, index: int = 0, time_first: bool = False) -> None:
        super().__init__()
        self.layer, self.index, self.time_first = layer, index, time_first

    def forward(self, x):
        out = self.layer(x.transpose(0, 1) if self.time_first else x)[self.index]
        return out.transpose(0, 1) if self.time_first else out


class Recurrent(nn.Module):
    """An RNN with outputs and final states all in the loss, optional initial states."""

    def __init__(self, rnn: nn.RNNBase, initial: bool = False) -> None:
        super().__init__()
        self.rnn, self.initial = rnn, initial
        layers = rnn.num_layers * (2 if rnn.bidirectional else 1)
        self.h0 = nn.Parameter(torch.randn(layers, 1, rnn.hidden_size)) if initial else None

    def forward(self, x):
        rnn = self.rnn
        seq = x if rnn.batch_first else x.transpose(0, 1)
        state = None
        if self.h0 is not None:
            h0 = self.h0.expand(-1, x.shape[0], -1).contiguous() * x[:, :1, :1].transpose(0, 1)
            state = (h0, torch.tanh(h0)) if isinstance(rnn, nn.LSTM) else h0
        out, hidden = rnn(seq, state)
        out = out if rnn.batch_first else out.transpose(0, 1)
        h = hidden[0] if isinstance(hidden, tuple) else hidden
        parts = [out.flatten(1), h.transpose(0, 1).flatten(1)]
        if isinstance(hidden, tuple):
            parts.append(hidden[1].transpose(0, 1).flatten(1))
        return torch.cat(parts, 1)


class Attention(nn.Module):
    def __init__(self, batch_first: bool, mask: str | None = None, weights: bool = False):
        super().__init__()
        self.attention = nn.MultiheadAttention(4, 2, batch_first=batch_first)
        self.mask, self.weights = mask, weights

    def forward(self, x):
        b, t, _ = x.shape
        kwargs = {}
        if self.mask == "causal":
            kwargs["attn_mask"] = torch.triu(torch.ones(t, t, dtype=torch.bool), 1)
        elif self.mask == "padding":
            padding = torch.zeros(b, t, dtype=torch.bool)
            padding[:, t - 1] = x[:, 0, 0] > 0  # from each sample's own data
            kwargs["key_padding_mask"] = padding
        seq = x if self.attention.batch_first else x.transpose(0, 1)
        out, weights = self.attention(seq, seq, seq, need_weights=self.weights, **kwargs)
        out = out if self.attention.batch_first else out.transpose(0, 1)
        return out if weights is None else torch.cat([out.flatten(1), weights.flatten(1)], 1)


class PositionEmbedding(nn.Module):
    """nanoGPT's pattern: ids ``[T]`` (or HF's ``[1, T]``) shared by all samples."""

    def __init__(self, leading_one: bool) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 3), nn.Embedding(9, 3)
        self.leading_one = leading_one

    def forward(self, ids):
        pos = torch.arange(ids.shape[1])
        pos = pos.unsqueeze(0) if self.leading_one else pos
        return self.tokens(ids) + self.positions(pos)


class ReducedPositions(nn.Module):
    """A shared lookup reduced over its first dimension: only broadcasting may see it
    expanded over the batch, so this one must not."""

    def __init__(self) -> None:
        super().__init__()
        self.tokens, self.positions = nn.Embedding(7, 3), nn.Embedding(9, 3)

    def forward(self, ids):
        pos = self.positions(torch.arange(ids.shape[1]))
        return F.dropout(self.tokens(ids), 0.0) + pos.sum(0) + pos


class RelativeBias(nn.Module):
    """T5's pattern: a bias looked up with shared ids ``[T, T]``, permuted to ``[H, T, T]``
    (no broadcast of a batch-expanded lookup could do that)."""

    def __init__(self, heads: int = 2, length: int = 6) -> None:
        super().__init__()
        self.bias = nn.Embedding(2 * length - 1, heads)
        self.q = nn.Linear(3, 3)
        self.length = length

    def forward(self, x):
        t = x.shape[1]
        rel = torch.arange(t)[:, None] - torch.arange(t)[None, :] + self.length - 1
        scores = (self.q(x) @ x.transpose(1, 2)).unsqueeze(1)
        return torch.tanh(scores + self.bias(rel).permute(2, 0, 1)).flatten(1)


class SharedArgument(nn.Module):
    """A layer called with a per-sample and a shared ``[T, D]`` argument."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.randn(4, 3))
        self.mix = Mix()

    def forward(self, x):
        return self.mix(x, torch.tanh(self.table[: x.shape[1]]))


class Mix(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))

    def forward(self, x, shared):
        return torch.tanh(x * self.weight + shared)


class TimeFirstLayer(nn.Module):
    """A custom layer on ``[T, B, D]``: weights along time, samples in dimension 1."""

    def __init__(self) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.randn(3))

    def forward(self, seq):
        return torch.tanh(seq.cumsum(0) * self.gain)


class ParentHoldsChildBias(nn.Module):
    """Hugging Face's BERT MLM head: the parent registers the child's bias again."""

    def __init__(self) -> None:
        super().__init__()
        self.decoder = nn.Linear(3, 5)
        self.bias = self.decoder.bias

    def forward(self, x):
        return self.decoder(x)


class FunctionalTie(nn.Module):
    """Output projection written as ``F.linear(h, emb.weight)`` outside ``emb``."""

    def __init__(self) -> None:
        super().__init__()
        self.emb = nn.Embedding(6, 3)
        self.mid = nn.Linear(3, 3)

    def forward(self, ids):
        h = torch.tanh(self.mid(self.emb(ids)))
        return F.linear(h, self.emb.weight)


class GradlessFirst(nn.Module):
    """Returns a tensor without grad before its real output."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))

    def forward(self, x):
        return x.detach().sum(-1), torch.tanh(x * self.weight)


class Keyword(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = KeywordInner()

    def forward(self, x):
        return self.inner(x=x, scale=torch.tanh(x))


class KeywordInner(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))

    def forward(self, *, x, scale):
        return torch.sin(x * self.weight) * scale


class NoisyScale(nn.Module):
    """Dropout inside a custom layer with parameters of its own."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        return self.lin(F.dropout(torch.tanh(x * self.weight), 0.5, training=True))


class Flattened(nn.Module):
    """Samples flattened into rows before a layer, unflattened after."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x):
        b, t, d = x.shape
        return self.lin(x.reshape(b * t, d)).reshape(b, t, 2)


class Bags(nn.Module):
    """``EmbeddingBag`` over flat ids with offsets (bags of varying size)."""

    def __init__(self, mode: str) -> None:
        super().__init__()
        self.bag = nn.EmbeddingBag(8, 3, mode=mode)

    def forward(self, ids):
        lengths = ids[:, 0] % ids.shape[1] + 1  # from each sample's own data
        keep = torch.arange(ids.shape[1]) < lengths[:, None]
        offsets = torch.cat([torch.zeros(1, dtype=torch.long), lengths.cumsum(0)[:-1]])
        return self.bag(ids[keep], offsets)


def _hf_conv1d(out_features: int, in_features: int) -> Callable[[], nn.Module]:
    """Hugging Face's ``Conv1D`` (GPT-2's projections: ``x @ W + b``, ``W`` ``[in, out]``)."""

    def make() -> nn.Module:
        from transformers.pytorch_utils import Conv1D

        layer = Conv1D(out_features, in_features)
        with torch.no_grad():  # its init (std 0.02, zero bias) leaves the bias's gradient tiny
            layer.weight.normal_()
            layer.bias.normal_()
        return layer

    return make


def _seq(*layers: nn.Module) -> Callable[[], nn.Module]:
    return lambda: nn.Sequential(*layers)


def _rnn(cls: type[nn.RNNBase], **kwargs: object) -> Callable[[], nn.Module]:
    initial = bool(kwargs.pop("initial", False))
    return lambda: Recurrent(cls(3, 4, **kwargs), initial)


CASES = [
    Case("linear", lambda: nn.Linear(3, 2), randn(3)),
    Case("linear-3d-no-bias", lambda: nn.Linear(3, 2, bias=False), randn(2, 4, 3)),
    Case("linear-B-equals-features", lambda: nn.Linear(4, 4), randn(4), batch=4),
    Case("conv1d", lambda: nn.Conv1d(2, 3, 3, padding=1), randn(2, 6)),
    Case("conv2d-stride-dilation", lambda: nn.Conv2d(2, 3, 3, 2, 1, 2), randn(2, 7, 6)),
    Case("conv2d-groups", lambda: nn.Conv2d(4, 6, 3, groups=2), randn(4, 5, 5)),
    # few output positions, many channels: the norms by the ghost norm on patches
    Case("conv2d-ghost-norm", lambda: nn.Conv2d(4, 6, 3), randn(4, 4, 4)),
    Case("conv1d-ghost-norm", lambda: nn.Conv1d(5, 6, 3, dilation=2), randn(5, 6)),
    Case(
        "conv2d-same-reflect",
        lambda: nn.Conv2d(2, 2, 3, padding="same", padding_mode="reflect"),
        randn(2, 5, 5),
    ),
    Case("conv3d", lambda: nn.Conv3d(2, 2, 2), randn(2, 3, 3, 4)),
    Case("conv-transpose1d", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2), randn(2, 4)),
    Case(
        "conv-transpose2d", lambda: nn.ConvTranspose2d(2, 3, 2, stride=2, groups=1), randn(2, 3, 3)
    ),
    Case("conv-transpose3d", lambda: nn.ConvTranspose3d(2, 1, 2), randn(2, 2, 2, 3)),
    Case("embedding", lambda: nn.Embedding(6, 3), ids(6, 5)),
    Case(
        "embedding-padding-max-norm",
        lambda: nn.Embedding(6, 3, padding_idx=2, max_norm=1.0),
        ids(6, 5),
    ),
    Case("embedding-B-equals-T", lambda: nn.Embedding(6, 3), ids(6, 4), batch=4),
    Case("embedding-bag-2d-sum", lambda: nn.EmbeddingBag(8, 3, mode="sum"), ids(8, 4)),
    Case("embedding-bag-offsets-mean", lambda: Bags("mean"), ids(8, 3)),
    Case("embedding-bag-offsets-sum", lambda: Bags("sum"), ids(8, 3)),
    Case("layernorm", lambda: nn.LayerNorm(3), randn(2, 3)),
    Case("layernorm-2d-shape", lambda: nn.LayerNorm((2, 3)), randn(4, 2, 3)),
    Case("groupnorm", lambda: nn.GroupNorm(2, 4), randn(4, 3)),
    Case("instancenorm1d", lambda: nn.InstanceNorm1d(3, affine=True), randn(3, 5)),
    Case("instancenorm2d", lambda: nn.InstanceNorm2d(2, affine=True), randn(2, 3, 3)),
    Case("rmsnorm", lambda: nn.RMSNorm(3), randn(2, 3)),
    Case("prelu", lambda: nn.PReLU(3), randn(3, 2)),
    Case("mha-batch-first", lambda: Attention(True), randn(3, 4)),
    Case("mha-time-first-B-equals-T", lambda: Attention(False), randn(4, 4), batch=4),
    Case("mha-causal-mask", lambda: Attention(True, "causal"), randn(3, 4)),
    Case("mha-key-padding-weights", lambda: Attention(False, "padding", True), randn(3, 4)),
    Case(
        "transformer-layer",
        lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.0, batch_first=True),
        randn(3, 4),
    ),
    Case("rnn-tanh", _rnn(nn.RNN, batch_first=True), randn(5, 3)),
    Case(
        "rnn-relu-time-first-2-layers",
        _rnn(nn.RNN, nonlinearity="relu", num_layers=2),
        randn(4, 3),
        batch=4,
    ),
    Case("gru-bidirectional", _rnn(nn.GRU, batch_first=True, bidirectional=True), randn(3, 3)),
    Case("gru-initial-state", _rnn(nn.GRU, num_layers=2, initial=True), randn(3, 3)),
    Case("lstm-batch-first-h_n", _rnn(nn.LSTM, batch_first=True), randn(4, 3), batch=4),
    Case(
        "lstm-time-first-bidirectional-2-layers",
        _rnn(nn.LSTM, num_layers=2, bidirectional=True),
        randn(3, 3),
    ),
    Case("lstm-initial-state", _rnn(nn.LSTM, batch_first=True, initial=True), randn(3, 3)),
    Case("position-ids-T-B-equals-T", lambda: PositionEmbedding(False), ids(7, 4), batch=4),
    Case("position-ids-1-T", lambda: PositionEmbedding(True), ids(7, 5)),
    Case("shared-lookup-reduced", ReducedPositions, ids(7, 4), batch=4),
    Case("relative-bias-T-equals-B", RelativeBias, randn(4, 3), batch=4),
    Case("shared-argument-T-equals-B", SharedArgument, randn(4, 3), batch=4),
    Case("time-first-layer-T-equals-B", lambda: TimeFirst(TimeFirstLayer()), randn(4, 3), batch=4),
    Case("parent-holds-child-bias", ParentHoldsChildBias, randn(2, 3)),
    Case("functional-tie", FunctionalTie, ids(6, 4)),
    Case("gradless-first-output", lambda: First(GradlessFirst(), 1), randn(2, 3)),
    Case("keyword-inputs", Keyword, randn(2, 3)),
    Case("inplace-relu", _seq(nn.Linear(3, 4), nn.ReLU(inplace=True), nn.Linear(4, 2)), randn(3)),
    Case("flattened-samples", Flattened, randn(4, 3), batch=4),
    Case("dropout-in-custom-layer", NoisyScale, randn(2, 3), random=True),
    Case(
        "dropout-in-transformer-layer",
        lambda: nn.TransformerEncoderLayer(4, 2, 8, dropout=0.3, batch_first=True),
        randn(3, 4),
        random=True,
    ),
    Case(
        "dropout-in-lstm",
        _rnn(nn.LSTM, num_layers=2, dropout=0.3),
        randn(3, 3),
        raises=r"lstm in module 'rnn' \(LSTM\) draws dropout masks between its layers",
    ),
    *(
        [
            # one position (Goodfellow), T² ≤ in·out (ghost norm), T² > in·out (products)
            Case("hf-conv1d-one-position", _hf_conv1d(2, 3), randn(3)),
            Case("hf-conv1d-ghost-norm", _hf_conv1d(6, 5), randn(2, 5)),
            Case("hf-conv1d-many-positions", _hf_conv1d(2, 3), randn(5, 3)),
            Case("hf-conv1d-4d-B-equals-T", _hf_conv1d(4, 4), randn(4, 2, 4), batch=4),
        ]
        if importlib.util.find_spec("transformers") is not None
        else []
    ),
    Case(
        "dropout-between-layers",
        _seq(nn.Linear(3, 4), nn.Dropout(0.5), nn.Linear(4, 2)),
        randn(3),
        random=True,
    ),
]
