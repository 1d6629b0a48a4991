"""Per-sample gradients, norms and clipping against a loop over single samples."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import batchgrad as bg
from batchgrad._models import TinyLM


class Scale(nn.Module):
    """A user-written layer with parameters of its own: the generic (torch.func) rule."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))
        self.shift = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return torch.tanh(x * self.weight + self.shift)


def sample_loss(model, batch):
    """A non-linear sum over each sample's outputs (any output shape)."""
    x, target = batch
    out = model(x)
    values = (out * target).flatten(1).sum(1) + out.pow(2).flatten(1).sum(1)
    return bg.Loss.from_values(values)


class Attention(nn.Module):
    """Self-attention on a batch-first input, whatever the layout of the module inside."""

    def __init__(self, attention: nn.MultiheadAttention) -> None:
        super().__init__()
        self.attention = attention

    def forward(self, x):
        if not self.attention.batch_first:
            x = x.transpose(0, 1)
        out = self.attention(x, x, x, need_weights=False)[0]
        return out if self.attention.batch_first else out.transpose(0, 1)


def build(kind, draw_int, g):
    """A one-layer model of the given kind, its input batch and a target of its shape."""
    batch = draw_int(1, 5)
    if kind == "linear":
        fan_in, fan_out = draw_int(1, 4), draw_int(1, 4)
        model = nn.Linear(fan_in, fan_out, bias=draw_int(0, 1) == 1)
        x = torch.randn(batch, fan_in, generator=g)
    elif kind == "linear-sequence":
        fan_in, fan_out = draw_int(1, 4), draw_int(1, 4)
        model = nn.Linear(fan_in, fan_out)
        x = torch.randn(batch, draw_int(1, 3), draw_int(1, 3), fan_in, generator=g)
    elif kind in ("conv1d", "conv2d"):
        dims = 1 if kind == "conv1d" else 2
        conv = nn.Conv1d if dims == 1 else nn.Conv2d
        kernel, stride, padding, dilation = (
            draw_int(1, 3),
            draw_int(1, 2),
            draw_int(0, 2),
            draw_int(1, 2),
        )
        model = conv(
            draw_int(1, 3),
            draw_int(1, 3),
            kernel,
            stride,
            padding,
            dilation,
            bias=draw_int(0, 1) == 1,
        )
        size = (kernel - 1) * dilation + 1 + draw_int(0, 3)
        x = torch.randn(batch, model.in_channels, *([size] * dims), generator=g)
    elif kind == "embedding":
        vocab = draw_int(2, 6)
        padding = draw_int(0, vocab - 1) if draw_int(0, 1) else None
        model = nn.Embedding(vocab, draw_int(1, 4), padding_idx=padding)
        x = torch.randint(0, vocab, (batch, draw_int(1, 6)), generator=g)
    elif kind == "layernorm":
        features = draw_int(2, 4)  # over one feature the output is 0: no gradient
        model = nn.LayerNorm(features if draw_int(0, 1) else (draw_int(1, 3), features))
        shape = (
            (features,)
            if isinstance(model.normalized_shape, tuple) and len(model.normalized_shape) == 1
            else model.normalized_shape
        )
        x = torch.randn(batch, *([draw_int(1, 3)] if draw_int(0, 1) else []), *shape, generator=g)
    elif kind == "groupnorm":
        groups = draw_int(1, 3)
        model = nn.GroupNorm(groups, groups * draw_int(1, 2))
        x = torch.randn(batch, model.num_channels, draw_int(2, 4), generator=g)
    elif kind == "fallback":
        model = Scale(draw_int(1, 4))
        x = torch.randn(batch, draw_int(1, 3), model.weight.shape[0], generator=g)
    elif kind == "attention":  # the generic rule; without batch_first, batch in dim 1
        heads = draw_int(1, 2)
        model = Attention(nn.MultiheadAttention(2 * heads, heads, batch_first=draw_int(0, 1) == 1))
        x = torch.randn(batch, draw_int(1, 4), 2 * heads, generator=g)
    model = model.double()
    x = x.double() if x.is_floating_point() else x
    with torch.no_grad():
        target = torch.randn_like(model(x))
    return model, (x, target), sample_loss, batch


KINDS = [
    "linear",
    "linear-sequence",
    "conv1d",
    "conv2d",
    "embedding",
    "layernorm",
    "groupnorm",
    "fallback",
    "attention",
]


def single_sample_grads(model, loss_fn, batch, size):
    """The reference: one backward per sample."""
    rows = {name: [] for name, p in model.named_parameters() if p.requires_grad}
    x, target = batch
    for i in range(size):
        model.zero_grad(set_to_none=True)
        loss_fn(model, (x[i : i + 1], target[i : i + 1])).total.backward()
        for name, p in model.named_parameters():
            if p.requires_grad:
                rows[name].append(torch.zeros_like(p) if p.grad is None else p.grad.clone())
    model.zero_grad(set_to_none=True)
    return {name: torch.stack(grads) for name, grads in rows.items()}


def assert_close_rel(actual, expected, tol=1e-10):
    """Relative error ≤ tol (and an absolute floor far below any real gradient)."""
    assert float((actual - expected).norm()) <= tol * float(expected.norm()) + 1e-14, (
        actual,
        expected,
    )


@given(kind=st.sampled_from(KINDS), data=st.data(), seed=st.integers(0, 10_000))
@settings(max_examples=120, deadline=None)
def test_per_sample_grads_equal_a_loop_over_samples(kind, data, seed):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, batch, loss_fn, size = build(kind, lambda a, b: data.draw(st.integers(a, b)), g)
    reference = single_sample_grads(model, loss_fn, batch, size)
    micro_batch_size = data.draw(st.sampled_from([None, 1, 2]))

    grads = bg.per_sample_grads(model, loss_fn, batch, micro_batch_size=micro_batch_size)
    norms = bg.per_sample_norms(model, loss_fn, batch, micro_batch_size=micro_batch_size)

    assert grads.keys() == reference.keys()
    for name in grads:
        assert grads[name].shape == reference[name].shape
        assert_close_rel(grads[name], reference[name])
    materialised = torch.cat([r.flatten(1) for r in reference.values()], 1).norm(dim=1)
    assert_close_rel(norms, materialised)
    assert all(p.grad is None for p in model.parameters())  # p.grad is not touched


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_per_sample_grads_sum_to_the_batch_gradient(reduction):
    """Summed (and for "mean" divided by N) they are the batch gradient, tokens and all."""
    torch.manual_seed(0)
    model = TinyLM(vocab=7, d_model=8, heads=2, layers=1, max_len=6).double()
    ids = torch.randint(0, 7, (5, 6))
    labels = ids.clone()
    labels[1:, 4:] = -100  # padding: samples hold different numbers of tokens

    def lm_loss(model, batch):
        return bg.Loss.from_causal_lm(model(batch[0]), batch[1])

    report = bg.accumulate(model, lm_loss, (ids, labels), reduction=reduction)
    grads = bg.per_sample_grads(model, lm_loss, (ids, labels), micro_batch_size=2)

    divisor = report.count if reduction == "mean" else 1
    for name, p in model.named_parameters():
        assert_close_rel(grads[name].sum(0) / divisor, p.grad)


def test_dropout_gives_the_gradients_of_the_drawn_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Dropout(0.5), nn.Linear(8, 2)).double()
    x, y = torch.randn(6, 4).double(), torch.randint(0, 2, (6,))

    def ce(model, batch):
        return bg.Loss.from_criterion(nn.CrossEntropyLoss(), model(batch[0]), batch[1])

    torch.manual_seed(1)
    grads = bg.per_sample_grads(model, ce, (x, y))
    torch.manual_seed(1)  # the same masks
    bg.accumulate(model, ce, (x, y), reduction="sum")

    for name, p in model.named_parameters():
        assert_close_rel(grads[name].sum(0), p.grad)


def test_shared_weights_add_up_and_frozen_parameters_are_left_out():
    torch.manual_seed(0)
    embed = nn.Embedding(5, 3)
    head = nn.Linear(3, 5)
    head.weight = embed.weight  # tied input and output embeddings
    model = nn.ModuleDict({"embed": embed, "head": head, "unused": nn.Linear(2, 2)}).double()
    model["head"].bias.requires_grad_(False)

    def tied(model, batch):
        ids = batch[0]
        logits = model["head"](model["embed"](ids))
        return bg.Loss.from_values(logits.logsumexp(-1) - logits[..., 0])

    ids = torch.randint(0, 5, (4, 3))
    reference = single_sample_grads(model, tied, (ids, torch.zeros(4)), 4)
    grads = bg.per_sample_grads(model, tied, (ids, torch.zeros(4)))
    norms = bg.per_sample_norms(model, tied, (ids, torch.zeros(4)))

    assert "head.bias" not in grads
    assert set(grads) == {"embed.weight", "unused.weight", "unused.bias"}
    assert_close_rel(grads["embed.weight"], reference["embed.weight"])
    assert not grads["unused.weight"].any()
    assert_close_rel(norms, reference["embed.weight"].flatten(1).norm(dim=1))


# -- clipping -----------------------------------------------------------------------


def reference_clipped(model, loss_fn, batch, size, max_norm, reduction):
    grads = single_sample_grads(model, loss_fn, batch, size)
    norms = torch.cat([g.flatten(1) for g in grads.values()], 1).norm(dim=1)
    factors = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    summed = {n: torch.einsum("b,b...->...", factors, g) for n, g in grads.items()}
    divisor = size if reduction == "mean" else 1
    return {n: g / divisor for n, g in summed.items()}, float((factors < 1).double().mean())


@given(
    data=st.data(),
    reduction=st.sampled_from(["mean", "sum"]),
    max_norm=st.sampled_from([0.01, 0.5, 3.0, 1e6]),
    seed=st.integers(0, 10_000),
)
@settings(max_examples=40, deadline=None)
def test_clipped_accumulate_equals_clip_then_sum(data, reduction, max_norm, seed):
    kind = data.draw(
        st.sampled_from(
            [
                "linear-sequence",
                "conv1d",
                "conv2d",
                "embedding",
                "layernorm",
                "groupnorm",
                "fallback",
            ]
        )
    )
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model, batch, loss_fn, size = build(kind, lambda a, b: data.draw(st.integers(a, b)), g)
    expected, fraction = reference_clipped(model, loss_fn, batch, size, max_norm, reduction)

    report = bg.accumulate(
        model,
        loss_fn,
        batch,
        micro_batch_size=data.draw(st.sampled_from([None, 1, 2])),
        reduction=reduction,
        clip_per_sample=max_norm,
    )

    for name, p in model.named_parameters():
        assert_close_rel(p.grad, expected[name])
    assert report.clipped == pytest.approx(fraction)


def test_noise_is_seeded_and_of_standard_deviation_sigma_c():
    torch.manual_seed(0)
    model = nn.Linear(50, 40).double()
    x = torch.randn(8, 50).double()

    def loss_fn(model, batch):
        return bg.Loss.from_values(model(batch).pow(2).sum(1))

    def noisy(seed):
        model.zero_grad(set_to_none=True)
        bg.accumulate(
            model,
            loss_fn,
            x,
            reduction="sum",
            clip_per_sample=0.1,
            noise_multiplier=2.0,
            generator=torch.Generator().manual_seed(seed),
        )
        return model.weight.grad.clone()

    bg.accumulate(model, loss_fn, x, reduction="sum", clip_per_sample=0.1, existing_grad="replace")
    clean = model.weight.grad.clone()
    first, again, other = noisy(1), noisy(1), noisy(2)

    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    assert (first - clean).std().item() == pytest.approx(0.2, rel=0.05)  # σ·C, 2000 draws


# -- refused input ------------------------------------------------------------------


def _ce(model, batch):
    return bg.Loss.from_criterion(nn.CrossEntropyLoss(), model(batch[0]), batch[1])


BATCH = (torch.randn(4, 3), torch.randint(0, 2, (4,)))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (
            nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2)),
            r"Module '1' \(BatchNorm1d\) is in training mode.*eval mode.*GroupNorm",
        ),
        (
            nn.Sequential(nn.Flatten(0), nn.Unflatten(0, (2, 6)), nn.Linear(6, 2)),
            r"run the model on 2 rows of micro-batch 0.*must run on any number of samples",
        ),
    ],
)
def test_models_without_per_sample_gradients_are_refused(model, message):
    def squares(model, x):
        return bg.Loss.from_values(model(x).reshape(len(x), -1).pow(2).sum(1))

    with pytest.raises(bg.BatchError, match=message):
        bg.per_sample_grads(model, squares, BATCH[0])
    with pytest.raises(bg.BatchError, match=message):
        bg.accumulate(model, squares, BATCH[0], clip_per_sample=1.0)
    assert all(p.grad is None for p in model.parameters())


def test_scale_grad_by_freq_is_refused():
    model = nn.Sequential(
        nn.Embedding(5, 2, scale_grad_by_freq=True), nn.Flatten(), nn.Linear(6, 2)
    )
    with pytest.raises(bg.ConfigError, match=r"scale_grad_by_freq=True.*couples the samples"):
        bg.per_sample_norms(
            model, _ce, (torch.randint(0, 5, (4, 3)), torch.zeros(4, dtype=torch.long))
        )


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(clip_per_sample=0.0), r"clip_per_sample must be a positive finite number"),
        (dict(clip_per_sample=float("inf")), r"clip_per_sample must be a positive finite number"),
        (
            dict(clip_per_sample=1.0, noise_multiplier=-1.0),
            r"noise_multiplier must be a number >= 0",
        ),
        (dict(noise_multiplier=1.0), r"noise_multiplier needs clip_per_sample"),
    ],
)
def test_invalid_clipping_options(kwargs, message):
    model = nn.Linear(3, 2)
    model.weight.grad = torch.zeros(2, 3)
    with pytest.raises(bg.ConfigError, match=message):
        bg.accumulate(model, _ce, BATCH, **kwargs)
    assert not model.weight.grad.any()
    assert model.bias.grad is None


def test_a_nan_sample_gradient_is_named():
    model = nn.Linear(3, 2)
    x = BATCH[0].clone()
    x[2, 0] = float("nan")
    with pytest.raises(
        bg.NonFiniteError, match=r"(sample 2 in micro-batch 0|micro-batch 0 is nan)"
    ):
        bg.accumulate(model, _ce, (x, BATCH[1]), clip_per_sample=1.0)
    assert model.weight.grad is None


class Hidden(nn.Module):
    """A layer whose use of its weight no trace can see (as a compiled kernel would)."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3))

    def forward(self, x):
        with torch._C.DisableTorchFunction():
            return torch.tanh(x * self.weight)


class BatchCentred(nn.Module):
    """Subtracts the batch mean: a sample's output depends on the other samples."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0)


def _squares(model, x):
    return bg.Loss.from_values(torch.tanh(model(x)).pow(2).sum(1))


@pytest.mark.parametrize(
    ("model", "message"),
    [
        (Hidden(), r"parameter 'weight' .* do not add up to its batch gradient"),
        (BatchCentred(), r"sample 3 in micro-batch 0 \(parameter 'lin\.weight'\) differs"),
    ],
)
def test_the_guard_catches_layers_no_rule_can_read(model, message):
    """Nothing silently wrong: what slips past every rule raises, in all three entries."""
    x = torch.randn(4, 3)
    with pytest.raises(bg.PerSampleError, match=message):
        bg.per_sample_grads(model, _squares, x)
    with pytest.raises(bg.PerSampleError):
        bg.per_sample_norms(model, _squares, x)
    with pytest.raises(bg.PerSampleError):
        bg.accumulate(model, _squares, x, clip_per_sample=1.0)
    assert all(p.grad is None for p in model.parameters())
    bg.accumulate(model, _squares, x)  # the model is left usable


def test_the_guard_leaves_existing_gradients_and_adds_to_them_exactly():
    """The guard's single-sample backward leaves ``p.grad`` alone whether the check
    fails (untouched) or passes (the clipped sum added to it), and runs no hook that
    follows gradient accumulation."""
    torch.manual_seed(0)
    x = torch.randn(4, 3).double()
    model = BatchCentred().double()
    bg.accumulate(model, _squares, x)
    before = [p.grad.clone() for p in model.parameters()]
    with pytest.raises(bg.PerSampleError):
        bg.accumulate(model, _squares, x, clip_per_sample=1.0, existing_grad="add")
    assert all(torch.equal(p.grad, b) for p, b in zip(model.parameters(), before, strict=True))
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2)).double()

    def squares(model, batch):
        return _squares(model, batch[0])

    batch = (x, torch.zeros(4))
    expected, _ = reference_clipped(model, squares, batch, 4, 0.5, "sum")
    bg.accumulate(model, squares, batch)
    before = [p.grad.clone() for p in model.parameters()]
    accumulated = []
    for p in model.parameters():
        p.register_post_accumulate_grad_hook(accumulated.append)
    bg.accumulate(model, squares, batch, reduction="sum", clip_per_sample=0.5, existing_grad="add")
    assert accumulated == []
    for (name, p), b in zip(model.named_parameters(), before, strict=True):
        assert_close_rel(p.grad, b + expected[name])


class HalfHidden(nn.Module):
    """Uses its weight twice: once where the trace sees it, once where it cannot."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        with torch._C.DisableTorchFunction():
            return h + torch.tanh(x @ self.lin.weight.T)


def test_the_guard_catches_a_hidden_second_use_of_a_parameter_a_rule_reads():
    """The sums are compared only where a path to the parameter bypasses the uses the
    built-in rules read; this one does."""
    from batchgrad._per_sample_guard import sum_checked
    from batchgrad._per_sample_plan import trace

    model, x = HalfHidden().double(), torch.randn(4, 3).double()
    traced, units = trace(model, _squares, x, 0)
    assert sum_checked(traced, units, list(model.parameters())) == [model.lin.weight]
    for run in (
        lambda: bg.per_sample_grads(model, _squares, x),
        lambda: bg.per_sample_norms(model, _squares, x),
        lambda: bg.accumulate(model, _squares, x, clip_per_sample=1.0),
    ):
        with pytest.raises(bg.PerSampleError, match=r"'lin\.weight' .* do not add up"):
            run()
    assert all(p.grad is None for p in model.parameters())


class HalfHiddenConv(nn.Module):
    """A convolution whose per-sample kernel gradients are kept from its norms for the
    clipped sum (C·k ≤ positions), its weight used again where no trace can see it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x):
        h = self.conv(x)
        with torch._C.DisableTorchFunction():
            h = h + torch.tanh(torch.conv2d(x, self.conv.weight, padding=1))
        return h.flatten(1)


def test_the_guard_catches_a_hidden_use_of_a_convolution_whose_gradients_are_kept():
    model, x = HalfHiddenConv().double(), torch.randn(4, 1, 4, 4).double()
    for run in (
        lambda: bg.per_sample_norms(model, _squares, x),
        lambda: bg.accumulate(model, _squares, x, clip_per_sample=1.0),
    ):
        with pytest.raises(bg.PerSampleError, match=r"'conv\.weight' .* do not add up"):
            run()
    assert all(p.grad is None for p in model.parameters())


def test_kept_convolution_gradients_give_the_clipped_sum_of_the_loop(monkeypatch):
    from batchgrad._per_sample_rules import _Conv

    kept = []
    let_go = _Conv._let_go
    monkeypatch.setattr(_Conv, "_let_go", lambda self: kept.append(1) or let_go(self))
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.Tanh(), nn.Flatten()).double()
    x = torch.randn(5, 1, 4, 4).double()  # C·k = 9 ≤ 16 positions: kept

    def loss_fn(model, batch):
        return _squares(model, batch[0])

    batch = (x, torch.zeros(5))
    expected, _ = reference_clipped(model, loss_fn, batch, 5, 0.05, "sum")
    bg.accumulate(model, loss_fn, batch, reduction="sum", clip_per_sample=0.05)
    assert kept
    for name, p in model.named_parameters():
        assert_close_rel(p.grad, expected[name])


def test_the_guard_forms_no_batch_gradient_where_the_rules_read_every_use():
    from batchgrad._per_sample_guard import sum_checked
    from batchgrad._per_sample_plan import trace

    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(), nn.LayerNorm(8), nn.Linear(8, 2))
    traced, units = trace(model, _squares, torch.randn(3, 1, 4, 4), 0)
    assert sum_checked(traced, units, list(model.parameters())) == []
    scaled = nn.Sequential(nn.Linear(3, 3), Scale(3))  # the generic rule: its sums compared
    traced, units = trace(scaled, _squares, torch.randn(3, 3), 0)
    checked = sum_checked(traced, units, list(scaled.parameters()))
    assert checked == [scaled[1].weight, scaled[1].shift]


def test_without_the_guard_a_hidden_use_is_wrong():
    """What the guard is for: ``verify=False`` trusts the trace, which misses this use."""
    model = Hidden().double()
    x = torch.randn(4, 3).double()
    grads = bg.per_sample_grads(model, _squares, x, verify=False)
    (expected,) = torch.autograd.grad(_squares(model, x).total, [model.weight])
    assert not torch.allclose(grads["weight"].sum(0), expected)


@pytest.fixture
def guard_runs(monkeypatch):
    """How many micro-batches the guard checked (its sums half runs on every one)."""
    from batchgrad import _per_sample

    runs = []
    verify_sums = _per_sample.verify_sums

    def counted(*args, **kwargs):
        runs.append(1)
        return verify_sums(*args, **kwargs)

    monkeypatch.setattr(_per_sample, "verify_sums", counted)
    return runs


def test_the_default_guard_runs_once_per_signature_and_task(guard_runs, gain_rule):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    x = torch.randn(5, 3)
    for _ in range(3):
        bg.per_sample_grads(model, _squares, x)
    assert len(guard_runs) == 1
    bg.per_sample_grads(model, _squares, x[:4])  # another shape: another signature
    bg.per_sample_norms(model, _squares, x)  # another task
    assert len(guard_runs) == 3
    for _ in range(2):  # micro-batches of 2, 2 and 1: two signatures, each guarded once
        bg.accumulate(
            model, _squares, x, micro_batch_size=2, clip_per_sample=1.0, existing_grad="replace"
        )
    assert len(guard_runs) == 5
    model.eval()  # another mode of a module
    bg.per_sample_grads(model, _squares, x)
    assert len(guard_runs) == 6
    gain_rule(lambda module, args, grads: {})  # a registered rule: every signature again
    bg.per_sample_grads(model, _squares, x)
    assert len(guard_runs) == 7
    bg.per_sample_grads(model, _squares, x, verify=True)  # every call
    bg.per_sample_grads(model, _squares, x, verify=True)
    assert len(guard_runs) == 9
    bg.per_sample_grads(model, _squares, x[:3], verify=False)  # never, and nothing recorded
    bg.per_sample_grads(model, _squares, x[:3])
    assert len(guard_runs) == 10


@pytest.mark.parametrize("make", [Hidden, BatchCentred, HalfHidden])
def test_the_default_guard_catches_an_unsupported_layer_on_every_call(make, guard_runs):
    """A signature whose guard raised is guarded again: the error repeats, never a
    result; after a call without the guard too."""
    model, x = make().double(), torch.randn(4, 3).double()
    for run in (
        lambda: bg.per_sample_grads(model, _squares, x),
        lambda: bg.per_sample_norms(model, _squares, x),
        lambda: bg.accumulate(model, _squares, x, clip_per_sample=1.0),
    ):
        for _ in range(2):
            with pytest.raises(bg.PerSampleError):
                run()
    bg.per_sample_grads(model, _squares, x, verify=False)
    with pytest.raises(bg.PerSampleError):
        bg.per_sample_grads(model, _squares, x)
    assert all(p.grad is None for p in model.parameters())


class SometimesCentred(nn.Module):
    """Mixes the samples only for batches with a large first value: a branch on values
    that leaves the sequence of parameter uses as it is."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 3)

    def forward(self, x):
        h = self.lin(x)
        return h - h.mean(0) if float(x[0, 0]) > 10 else h


def test_the_default_guard_does_not_see_a_branch_on_values_after_its_first_call():
    """The documented limit of the default: for one signature the guard ran once, so a
    computation chosen by the values later is not checked; ``verify=True`` checks it."""
    model, x = SometimesCentred().double(), torch.randn(4, 3).double()
    bg.per_sample_grads(model, _squares, x)  # guarded: no mixing on this batch
    mixing = x.clone()
    mixing[0, 0] = 20.0
    bg.per_sample_grads(model, _squares, mixing)  # the same signature: not guarded again
    with pytest.raises(bg.PerSampleError, match=r"differs from the gradient"):
        bg.per_sample_grads(model, _squares, mixing, verify=True)
    with pytest.raises(bg.PerSampleError, match=r"differs from the gradient"):
        bg.per_sample_grads(SometimesCentred().double(), _squares, mixing)  # a first call


def test_a_shared_use_outside_any_module_is_refused():
    """A regulariser inside each sample's value: no module holds its samples."""
    model = nn.Sequential(nn.Linear(3, 2))

    def loss_fn(model, x):
        return bg.Loss.from_values(model(x).pow(2).sum(1) + model[0].weight.pow(2).sum())

    with pytest.raises(bg.PerSampleError, match=r"parameter '0\.weight'.*outside any module"):
        bg.per_sample_grads(model, loss_fn, torch.randn(4, 3))


def test_a_packed_sequence_is_refused_naming_the_module():
    lstm = nn.LSTM(3, 4, batch_first=True)
    model = nn.ModuleDict({"lstm": lstm})

    def loss_fn(model, x):
        packed = nn.utils.rnn.pack_padded_sequence(x, [x.shape[1]] * len(x), batch_first=True)
        return bg.Loss.from_values(model["lstm"](packed)[1][0].pow(2).sum((0, 2)))

    with pytest.raises(bg.PerSampleError, match=r"module 'lstm' \(LSTM\).*mixed"):
        bg.per_sample_grads(model, loss_fn, torch.randn(4, 5, 3))


# -- registered rules ---------------------------------------------------------------


class Gain(nn.Module):
    """A user layer with a rule of its own: ``y = x · w`` over the last dimension."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return x * self.weight


@pytest.fixture
def gain_rule():
    from batchgrad._per_sample_modules import MODULE_RULES

    def register(rule):
        bg.register_per_sample_rule(Gain)(rule)

    yield register
    MODULE_RULES.pop(Gain, None)


def _gain_loss(model, x):
    return bg.Loss.from_values(torch.tanh(model(x)).pow(2).flatten(1).sum(1))


def test_a_registered_rule_is_used_and_checked(gain_rule):
    calls = []

    def rule(module, args, grad_outputs):
        calls.append(module)
        (x,), (g,) = args, grad_outputs
        return {"weight": (x * g).reshape(len(x), -1, x.shape[-1]).sum(1)}

    gain_rule(rule)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), Gain(4)).double()
    x = torch.randn(5, 2, 3).double()

    def loss_fn(model, batch):
        return _gain_loss(model, batch[0])

    reference = single_sample_grads(model, loss_fn, (x, torch.zeros(5)), 5)
    grads = bg.per_sample_grads(model, loss_fn, (x, torch.zeros(5)))

    assert calls  # the rule ran, not the generic one
    for name in reference:
        assert_close_rel(grads[name], reference[name])


class Gains(nn.Module):
    """A layer with a rule of its own around one that has another: ``y = (x · w) · v``."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.inner = Gain(features)
        self.scale = nn.Parameter(torch.randn(features))

    def forward(self, x):
        return self.inner(x) * self.scale


def test_the_outermost_registered_rule_covers_a_registered_layer_inside_it(gain_rule):
    """The calls return inner first; still only the outer rule counts the inner weight
    (it used to be counted by both rules: twice the gradient, without the guard)."""
    from batchgrad._per_sample_modules import MODULE_RULES

    inner_calls = []

    def inner_rule(module, args, grad_outputs):
        inner_calls.append(module)
        (x,), (g,) = args, grad_outputs
        return {"weight": x * g}

    def outer_rule(module, args, grad_outputs):
        (x,), (g,) = args, grad_outputs
        return {"scale": x * module.inner.weight * g, "inner.weight": x * module.scale * g}

    gain_rule(inner_rule)
    bg.register_per_sample_rule(Gains)(outer_rule)
    try:
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(3, 4), Gains(4)).double()
        batch = (torch.randn(5, 3).double(), torch.zeros(5))

        def loss_fn(model, batch):
            return _gain_loss(model, batch[0])

        reference = single_sample_grads(model, loss_fn, batch, 5)
        for verify in (False, True):
            grads = bg.per_sample_grads(model, loss_fn, batch, verify=verify)
            for name in reference:
                assert_close_rel(grads[name], reference[name])
    finally:
        MODULE_RULES.pop(Gains, None)
    assert inner_calls == []


def test_a_wrong_registered_rule_is_caught_by_the_guard(gain_rule):
    gain_rule(lambda module, args, grads: {"weight": args[0] * grads[0] * 0.5})
    model = Gain(3)
    with pytest.raises(bg.PerSampleError, match=r"parameter 'weight' .* do not add up"):
        bg.per_sample_grads(model, _gain_loss, torch.randn(4, 3))
    with pytest.raises(bg.PerSampleError, match=r"parameter 'weight' .* do not add up"):
        bg.accumulate(model, _gain_loss, torch.randn(4, 3), clip_per_sample=1.0)
    assert model.weight.grad is None


def test_a_registered_rule_of_the_wrong_shape_is_named(gain_rule):
    gain_rule(lambda module, args, grads: {"weight": torch.zeros(3)})
    with pytest.raises(bg.PerSampleError, match=r"rule registered for Gain returned 'weight'"):
        bg.per_sample_grads(Gain(3), _gain_loss, torch.randn(4, 3))
