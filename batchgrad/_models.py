"""Small reference models, built from configs with random initialisation.

The tour, the tests and the benchmarks share them; nothing is downloaded.
"""

from __future__ import annotations

import itertools

import torch
from torch import Tensor, nn


def mlp(sizes: tuple[int, ...] = (784, 256, 256, 10)) -> nn.Sequential:
    """A ReLU multi-layer perceptron with the given layer widths."""
    *hidden, last = itertools.pairwise(sizes)
    layers: list[nn.Module] = []
    for fan_in, fan_out in hidden:
        layers += [nn.Linear(fan_in, fan_out), nn.ReLU()]
    layers.append(nn.Linear(*last))
    return nn.Sequential(*layers)


def small_cnn(channels: int = 1, classes: int = 10) -> nn.Sequential:
    """Two convolutions, pooled to one vector per image: any image size works."""
    return nn.Sequential(
        nn.Conv2d(channels, 8, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(8, 16, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(16, classes),
    )


class TinyLM(nn.Module):
    """A causal transformer language model: ``input_ids [B, T] -> logits [B, T, V]``.

    Sequences are right-padded, so under the causal mask no real token ever attends
    to padding and no padding mask is needed; the loss ignores padded positions.
    """

    def __init__(
        self, vocab: int = 32, d_model: int = 64, heads: int = 4, layers: int = 2, max_len: int = 64
    ) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        self.position = nn.Parameter(torch.randn(max_len, d_model) * 0.02)
        block = nn.TransformerEncoderLayer(
            d_model, heads, 4 * d_model, dropout=0.0, batch_first=True, norm_first=True
        )
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(d_model)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, input_ids: Tensor) -> Tensor:
        length = input_ids.shape[1]
        hidden = self.embed(input_ids) + self.position[:length]
        causal = nn.Transformer.generate_square_subsequent_mask(
            length, device=input_ids.device, dtype=hidden.dtype
        )
        hidden = self.blocks(hidden, mask=causal, is_causal=True)
        logits: Tensor = self.head(self.norm(hidden))
        return logits
