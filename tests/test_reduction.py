import pytest
import torch
from torch import nn

import batchgrad as bg

OUTPUT, TARGET = torch.randn(6, 3), torch.randint(0, 3, (6,))


@pytest.mark.parametrize(
    ("criterion", "expected"),
    [
        (nn.CrossEntropyLoss(), "mean"),
        (nn.CrossEntropyLoss(ignore_index=0, weight=torch.rand(3) + 0.1), "mean"),
        (nn.CrossEntropyLoss(reduction="sum"), "sum"),
        (nn.CrossEntropyLoss(reduction="none"), "none"),
        (lambda output, target: nn.functional.cross_entropy(output, target) * 0, "unknown"),
        (lambda output, target: output.sum() ** 2, "unknown"),
    ],
    ids=["mean", "weighted-mean", "sum", "none", "zero", "neither"],
)
def test_detect_reduction(criterion, expected):
    assert bg.detect_reduction(criterion, OUTPUT, TARGET) == expected


def test_detect_reduction_of_a_regression_loss():
    output, target = torch.randn(5, 2), torch.randn(5, 2)
    assert bg.detect_reduction(nn.MSELoss(), output, target) == "mean"
    assert bg.detect_reduction(nn.L1Loss(reduction="sum"), output, target) == "sum"
