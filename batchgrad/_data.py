"""Embedded datasets: shipped with an installed package or generated in code.

Nothing is downloaded.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

IGNORE_INDEX = -100


class Split(NamedTuple):
    """A classification data set split into a training and a held-out part."""

    train: tuple[Tensor, Tensor]
    test: tuple[Tensor, Tensor]


def digits(test_fraction: float = 0.2, seed: int = 0) -> Split:
    """scikit-learn's handwritten digits (1797 images of 8×8 pixels, 10 classes).

    Real data that scikit-learn ships inside its wheel, so it loads offline.
    Inputs are ``[n, 64]`` float32 in ``[0, 1]``, labels ``[n]`` int64; the split is
    a fixed random permutation.
    """
    from sklearn.datasets import load_digits  # imported here: it takes a second

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32) / 16.0
    y = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    test = round(len(y) * test_fraction)
    held, kept = order[:test], order[test:]
    return Split((x[kept], y[kept]), (x[held], y[held]))


class TokenBatch(NamedTuple):
    """Right-padded token sequences for a causal language model.

    Attributes:
        input_ids: ``[n, max_len]`` token ids, padding with token 0.
        labels: ``input_ids`` with padding set to ``IGNORE_INDEX``.
    """

    input_ids: Tensor
    labels: Tensor


def counting_sequences(
    n: int, *, vocab: int = 32, min_len: int = 2, max_len: int = 64, seed: int = 0
) -> TokenBatch:
    """Sequences that count up modulo ``vocab - 1`` from a random start, with noise.

    Lengths are drawn uniformly from ``[min_len, max_len]``: the spread of token
    counts between samples is what breaks per-micro-batch averaging.
    """
    generator = torch.Generator().manual_seed(seed)
    lengths = torch.randint(min_len, max_len + 1, (n,), generator=generator)
    start = torch.randint(0, vocab - 1, (n, 1), generator=generator)
    tokens = 1 + (start + torch.arange(max_len)) % (vocab - 1)
    noisy = torch.rand(n, max_len, generator=generator) < 0.1
    tokens = torch.where(noisy, torch.randint(1, vocab, (n, max_len), generator=generator), tokens)
    padded = torch.arange(max_len) >= lengths[:, None]
    input_ids = tokens.masked_fill(padded, 0)
    return TokenBatch(input_ids, input_ids.masked_fill(padded, IGNORE_INDEX))
