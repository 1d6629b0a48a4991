"""Tiny regression problems for compare, advise and the critical-batch measurements."""

import torch
from torch import nn

import batchgrad as bg
from batchgrad._problem import Problem


def mse(model, batch):
    x, y = batch
    return bg.Loss.from_values((model(x) - y).pow(2).sum(1))


def regression(n, dim=3, noise=0.3, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=torch.float64)
    w = torch.randn(dim, 1, generator=g, dtype=torch.float64)
    return x, x @ w + noise * torch.randn(n, 1, generator=g, dtype=torch.float64)


def tiny_problem(n=40, **kwargs):
    def model():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(3, 8), nn.Tanh(), nn.Linear(8, 1)).double()

    return Problem(model, mse, regression(n), regression(20, seed=1), **kwargs)
