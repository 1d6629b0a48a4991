import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch import nn
from torch.nn import functional as F

import batchgrad as bg


def _check_against_criterion(criterion, *inputs):
    """total / count reproduces the criterion's mean, total its sum."""
    loss = bg.Loss.from_criterion(criterion, *inputs)
    criterion.reduction = "mean"
    mean = criterion(*inputs)
    criterion.reduction = "sum"
    total = criterion(*inputs)
    torch.testing.assert_close(loss.mean(), mean, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(loss.total, total, rtol=1e-12, atol=1e-12)


@given(
    n=st.integers(1, 9),
    classes=st.integers(2, 5),
    weighted=st.booleans(),
    smoothing=st.sampled_from([0.0, 0.1]),
    seed=st.integers(0, 1000),
)
def test_cross_entropy_with_ignore_index_weights_and_smoothing(
    n, classes, weighted, smoothing, seed
):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, classes, dtype=torch.float64, generator=g)
    target = torch.randint(0, classes, (n,), generator=g)
    target[0] = 0  # at least one target is counted
    target[1:] = target[1:].masked_fill(torch.rand(n - 1, generator=g) < 0.3, -100)
    weight = torch.rand(classes, dtype=torch.float64, generator=g) + 0.1 if weighted else None
    criterion = nn.CrossEntropyLoss(weight=weight, ignore_index=-100, label_smoothing=smoothing)
    _check_against_criterion(criterion, logits, target)


def test_weighted_count_is_the_sum_of_target_weights():
    weight = torch.tensor([1.0, 2.0, 4.0], dtype=torch.float64)
    target = torch.tensor([2, 1, -100, 2])
    loss = bg.Loss.from_criterion(
        nn.CrossEntropyLoss(weight=weight), torch.randn(4, 3, dtype=torch.float64), target
    )
    assert float(loss.count) == 10.0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_class_count_is_exact_in_every_dtype(dtype):
    """The count is taken from the loss kernel only where its dtype holds it exactly."""
    target = torch.arange(300) % 3
    target[::7] = -100
    logits = torch.randn(300, 3, dtype=dtype, requires_grad=True)
    for criterion, scores in [
        (nn.CrossEntropyLoss(), logits),
        (nn.NLLLoss(), logits.log_softmax(1)),
    ]:
        loss = bg.Loss.from_criterion(criterion, scores, target)
        assert float(loss.count) == int((target != -100).sum()) == 257
        torch.testing.assert_close(loss.mean(), criterion(scores, target))
    lm = bg.Loss.from_causal_lm(logits.view(3, 100, 3), target.view(3, 100))
    assert float(lm.count) == int((target.view(3, 100)[:, 1:] != -100).sum())


def test_cross_entropy_with_class_probabilities_and_spatial_dims():
    logits = torch.randn(3, 4, 5, dtype=torch.float64)
    probs = torch.softmax(torch.randn(3, 4, 5, dtype=torch.float64), dim=1)
    _check_against_criterion(nn.CrossEntropyLoss(weight=torch.rand(4).double()), logits, probs)


@pytest.mark.parametrize(
    "criterion",
    [
        nn.MSELoss(),
        nn.L1Loss(),
        nn.HuberLoss(),
        nn.SmoothL1Loss(),
        nn.BCEWithLogitsLoss(pos_weight=torch.tensor([0.5, 2.0, 1.0]).double()),
    ],
    ids=lambda c: type(c).__name__,
)
def test_element_wise_criteria(criterion):
    output = torch.randn(4, 3, dtype=torch.float64)
    target = torch.rand(4, 3, dtype=torch.float64)
    _check_against_criterion(criterion, output, target)


@pytest.mark.parametrize(
    ("criterion", "inputs"),
    [
        (
            nn.CosineEmbeddingLoss(),
            (torch.randn(4, 3), torch.randn(4, 3), torch.tensor([1, -1, 1, 1])),
        ),
        (nn.MarginRankingLoss(), (torch.randn(5), torch.randn(5), torch.ones(5))),
        (nn.TripletMarginLoss(), (torch.randn(4, 3), torch.randn(4, 3), torch.randn(4, 3))),
    ],
    ids=lambda c: type(c).__name__ if isinstance(c, nn.Module) else "",
)
def test_other_criteria_through_their_unreduced_values(criterion, inputs):
    _check_against_criterion(
        criterion, *(t.double() if t.is_floating_point() else t for t in inputs)
    )


def test_ctc_loss_is_refused_with_the_reason():
    with pytest.raises(bg.LossTypeError, match="target length"):
        bg.Loss.from_criterion(nn.CTCLoss(), torch.randn(5, 2, 3), torch.ones(2, 2), 5, 2)


def test_nll_loss_with_ignore_index():
    log_probs = torch.log_softmax(torch.randn(5, 3, dtype=torch.float64), dim=1)
    _check_against_criterion(nn.NLLLoss(ignore_index=1), log_probs, torch.tensor([0, 1, 2, 1, 0]))


def test_kl_div_batchmean_counts_samples():
    log_q = torch.log_softmax(torch.randn(4, 3, dtype=torch.float64), dim=1)
    p = torch.softmax(torch.randn(4, 3, dtype=torch.float64), dim=1)
    loss = bg.Loss.from_criterion(nn.KLDivLoss(reduction="batchmean"), log_q, p)
    assert loss.count == 4
    torch.testing.assert_close(loss.mean(), F.kl_div(log_q, p, reduction="batchmean"))


def test_from_criterion_leaves_the_users_criterion_unchanged():
    criterion = nn.MSELoss(reduction="sum")
    bg.Loss.from_criterion(criterion, torch.randn(2), torch.randn(2))
    assert criterion.reduction == "sum"


def test_from_criterion_refuses_a_plain_function():
    with pytest.raises(bg.LossTypeError, match=r"got function.*Loss\.from_values"):
        bg.Loss.from_criterion(F.mse_loss, torch.randn(2), torch.randn(2))


def test_from_values_with_boolean_mask_drops_nan_padding():
    values = torch.tensor([[1.0, float("nan")], [2.0, 3.0]])
    mask = torch.tensor([[True, False], [True, True]])
    loss = bg.Loss.from_values(values, mask)
    assert (loss.total.item(), int(loss.count)) == (6.0, 3)


def test_from_values_with_float_weights_and_broadcast_mask():
    values = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    loss = bg.Loss.from_values(values, torch.tensor([[0.5], [1.0]]))
    assert (loss.total.item(), float(loss.count)) == (8.5, 3.0)
    assert bg.Loss.from_values(values).count == 4


@given(batch=st.integers(1, 5), time=st.integers(2, 7), seed=st.integers(0, 1000))
def test_from_causal_lm_shifts_and_ignores_padding(batch, time, seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(batch, time, 6, dtype=torch.float64, generator=g)
    labels = torch.randint(0, 6, (batch, time), generator=g)
    labels[1:, -1] = -100
    loss = bg.Loss.from_causal_lm(logits, labels)
    manual = [
        F.cross_entropy(logits[b, t], labels[b, t + 1], reduction="sum")
        for b in range(batch)
        for t in range(time - 1)
        if labels[b, t + 1] != -100
    ]
    assert int(loss.count) == len(manual)
    torch.testing.assert_close(loss.total, torch.stack(manual).sum())


def test_from_causal_lm_checks_shapes():
    with pytest.raises(bg.LossTypeError, match=r"logits \[batch, time, vocab\].*\(2, 5\)"):
        bg.Loss.from_causal_lm(torch.randn(2, 5), torch.zeros(2, 5, dtype=torch.long))
