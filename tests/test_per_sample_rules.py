"""Every case of the layer zoo against the per-sample loop, in float64."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import batchgrad as bg
from batchgrad._split import slice_batch
from tests.per_sample_zoo import CASES, sample_loss


def loop_grads(model, loss_fn, batch, size):
    """The reference: one forward and backward per sample, alone."""
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    rows = {n: [] for n, _ in params}
    for i in range(size):
        total = loss_fn(model, slice_batch(batch, i, i + 1)).total
        grads = torch.autograd.grad(total, [p for _, p in params], allow_unused=True)
        for (n, p), g in zip(params, grads, strict=True):
            rows[n].append(torch.zeros_like(p) if g is None else g)
    return {n: torch.stack(r) for n, r in rows.items()}


def rel_err(actual, expected):
    return float((actual - expected).norm()) / max(float(expected.norm()), 1e-300)


def make(case, seed=0):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    model = case.model().double()
    x = case.inputs(case.batch, g)
    with torch.no_grad():
        torch.manual_seed(seed + 1)
        target = torch.randn_like(model(x))
    return model, (x, target)


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.id)
def test_zoo_case_equals_the_per_sample_loop(case):
    model, batch = make(case)
    if case.raises:
        with pytest.raises(bg.PerSampleError, match=case.raises):
            bg.per_sample_grads(model, sample_loss, batch)
        return
    if case.random:  # other masks per call: the sum against the batch gradient, same masks
        torch.manual_seed(5)
        grads = bg.per_sample_grads(model, sample_loss, batch)
        torch.manual_seed(5)
        total = sample_loss(model, batch).total
        names = [name for name, _ in model.named_parameters()]
        batch_grads = torch.autograd.grad(total, list(model.parameters()))
        for name, g in zip(names, batch_grads, strict=True):
            assert rel_err(grads[name].sum(0), g) <= 1e-10, name
        return
    reference = loop_grads(model, sample_loss, batch, case.batch)
    for micro_batch_size in (None, 3):
        grads = bg.per_sample_grads(model, sample_loss, batch, micro_batch_size=micro_batch_size)
        assert grads.keys() == reference.keys()
        for name in grads:
            assert rel_err(grads[name], reference[name]) <= 1e-10, name
    norms = bg.per_sample_norms(model, sample_loss, batch)
    expected = torch.cat([r.flatten(1) for r in reference.values()], 1).norm(dim=1)
    assert rel_err(norms, expected) <= 1e-10
    # clipping at the median norm: some samples clipped, some not
    factors = (float(expected.median()) / (expected + 1e-6)).clamp(max=1.0)
    model.zero_grad(set_to_none=True)
    bg.accumulate(
        model, sample_loss, batch, reduction="sum", clip_per_sample=float(expected.median())
    )
    for name, p in model.named_parameters():
        want = torch.einsum("b,b...->...", factors, reference[name])
        assert rel_err(p.grad, want) <= 1e-10, name


@given(
    case=st.sampled_from([c for c in CASES if not c.random and not c.raises]),
    rows=st.integers(1, 6),
    micro_batch_size=st.sampled_from([None, 1, 2, 4]),
    seed=st.integers(0, 1000),
)
@settings(max_examples=60, deadline=None)
def test_zoo_over_batch_sizes_and_splits(case, rows, micro_batch_size, seed):
    """Any number of samples, split any way: batch sizes meet the cases' other sizes."""
    case = dataclasses.replace(case, batch=rows)
    model, batch = make(case, seed)
    reference = loop_grads(model, sample_loss, batch, rows)
    grads = bg.per_sample_grads(model, sample_loss, batch, micro_batch_size=micro_batch_size)
    whole = sum(float(r.norm()) for r in reference.values())
    for name, r in reference.items():
        assert float((grads[name] - r).norm()) <= 1e-10 * float(r.norm()) + 1e-13 * whole, name
