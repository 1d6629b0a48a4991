"""Exact gradient accumulation with accelerate: `bg.accumulate` on the prepared model.

Each batch of the prepared loader is this process's share of a logical batch;
`bg.accumulate` runs it in micro-batches and leaves the gradient of the mean over
every non-padded token of the whole logical batch (all processes), so the prepared
optimizer steps on it. No `accelerator.accumulate()`, no hand-made rescaling.

    python examples/accelerate_train.py                                        # one process
    accelerate launch --cpu --num_processes 2 examples/accelerate_train.py     # two, gloo
"""

import argparse

import torch
from accelerate import Accelerator
from torch import nn

import batchgrad as bg

VOCAB, LENGTH = 32, 24


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, 32)
        self.rnn = nn.GRU(32, 32, batch_first=True)
        self.head = nn.Linear(32, VOCAB)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.head(self.rnn(self.embed(ids))[0])


def loss_fn(model, batch):
    ids, labels = batch
    return bg.Loss.from_causal_lm(model(ids), labels)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32, help="per process")
    parser.add_argument("--micro-batch-size", type=int, default=8)
    args = parser.parse_args()
    accelerator = Accelerator(cpu=True)
    torch.manual_seed(0)
    rows = args.steps * args.batch_size * accelerator.num_processes
    sizes = torch.randint(2, LENGTH + 1, (rows,))
    ids = torch.randint(1, VOCAB, (rows, LENGTH))
    mask = torch.arange(LENGTH) < sizes[:, None]
    data = torch.utils.data.TensorDataset(ids * mask, ids.masked_fill(~mask, -100))
    model = TinyLM()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    loader = torch.utils.data.DataLoader(data, batch_size=args.batch_size)
    model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    for step, batch in enumerate(loader):
        report = bg.accumulate(model, loss_fn, batch, micro_batch_size=args.micro_batch_size)
        accelerator.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad()
        accelerator.print(
            f"step {step} loss {report.loss:.4f} tokens {report.count} ranks {report.world_size}"
        )


if __name__ == "__main__":
    main()
