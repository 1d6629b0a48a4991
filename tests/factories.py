"""Factories for `batchgrad check MODULE:FACTORY` in the CLI tests."""

import torch
from torch import nn

import batchgrad as bg


def _loss(model, batch):
    x, y = batch
    return bg.Loss.from_criterion(nn.CrossEntropyLoss(ignore_index=-100), model(x), y)


def _data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(10, 4, generator=g, dtype=torch.float64)
    y = torch.randint(0, 3, (10,), generator=g).masked_fill(torch.rand(10, generator=g) < 0.3, -100)
    return x, y


def exact():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.Tanh(), nn.Linear(8, 3)).double(), _loss, _data(), 4


def with_batchnorm():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Linear(8, 3)).double()
    return model, _loss, _data()


def not_a_tuple():
    return "model"


def wrong_model():
    return "model", _loss, _data()


def loss_not_callable():
    return nn.Linear(4, 3).double(), nn.CrossEntropyLoss(), _data()


def string_batch():
    return nn.Linear(4, 3).double(), _loss, "rows"


def disagreeing_batch():
    x, y = _data()
    return nn.Linear(4, 3).double(), _loss, (x, y[:7])


def bad_micro_batch_size():
    return (*exact()[:3], 0)


def nan_loss():
    x, y = _data()
    x[6] = float("nan")
    return nn.Linear(4, 3).double(), _loss, (x, y), 4
